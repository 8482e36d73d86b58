"""The documentation keeps up with the code: every public name has an API entry.

Every name in ``keras_multimax.__all__`` and in each public submodule's
``__all__`` (the toolkit's modules included) must appear as a mkdocstrings directive (``::: module.name``) on
an API page under ``docs/api/``, and every API page must be in the mkdocs
nav, so a new public name or module without documentation fails here. The
README stays a short entry point: at most 12 KB, with the two set-up
commands in its first 40 lines. (The site itself is built by
``mkdocs build --strict`` in CI.)
"""

import importlib
import importlib.util
import pathlib
import re
import types

import pytest

import keras_multimax

ROOT = pathlib.Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api"
README_MAX_BYTES = 12_000
SETUP_LINES = 40
EXAMPLES_COMMAND = 'pip install -e ".[examples]" && python examples/quickstart.py'
TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest'

# Public subpackages that keras_multimax does not import (and so does not list
# in its __all__): they need an optional extra.
OPTIONAL_MODULES = {"hub": "keras_hub"}
# The toolkit (keras_multimax/toolkit/): support code of the examples, not
# imported by keras_multimax; its modules are documented all the same.
TOOLKIT_MODULES = [
    "toolkit",
    "toolkit.data",
    "toolkit.plots",
    "toolkit.timing",
    "toolkit.training",
]


def _public_modules():
    names = [
        name
        for name in keras_multimax.__all__
        if isinstance(getattr(keras_multimax, name), types.ModuleType)
    ]
    return ["keras_multimax"] + [
        f"keras_multimax.{name}"
        for name in [*names, *OPTIONAL_MODULES, *TOOLKIT_MODULES]
    ]


def _resolve(path):
    """The object a ``::: a.b.c`` directive names (None if it names nothing)."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        if importlib.util.find_spec(parts[0]) is None:
            return None
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute, None)
        return obj
    return None


def _documented():
    names = set()
    for page in API.glob("*.md"):
        names.update(re.findall(r"^::: *([\w.]+)", page.read_text(), re.M))
    return names


@pytest.mark.parametrize("module_name", _public_modules())
def test_every_public_name_has_an_api_entry(module_name):
    short = module_name.rpartition(".")[2]
    if short in OPTIONAL_MODULES and not importlib.util.find_spec(
        OPTIONAL_MODULES[short]
    ):
        pytest.skip(f"{module_name} needs {OPTIONAL_MODULES[short]}")
    module = importlib.import_module(module_name)
    documented = _documented()
    # A re-export (keras_multimax.Modulator is keras_multimax.modulator.Modulator)
    # is documented by the entry of the object it names.
    documented_objects = [_resolve(path) for path in documented]
    missing = [
        name
        for name in module.__all__
        if f"{module_name}.{name}" not in documented
        and not any(getattr(module, name) is obj for obj in documented_objects)
    ]
    assert not missing, (
        f"Public names of {module_name} without an entry in docs/api/*.md: "
        f"{missing}. Add a line '::: {module_name}.<name>' to its page."
    )
    assert module_name in documented, f"docs/api has no '::: {module_name}'"


def test_every_api_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in API.glob("*.md") if f"api/{p.name}" not in nav]
    assert not missing, f"API pages missing from the mkdocs.yml nav: {missing}"


def test_readme_is_short_and_opens_with_the_setup_commands():
    readme = (ROOT / "README.md").read_text()
    size = len(readme.encode())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes; keep it within {README_MAX_BYTES} and move "
        "details into docs/."
    )
    head = readme.splitlines()[:SETUP_LINES]
    assert EXAMPLES_COMMAND in head
    assert any(line.startswith(TEST_COMMAND) for line in head)
