"""Installs keras_multimax: MultiMax (ICML 2024) for Keras 3 / TensorFlow."""

import pathlib
import re

from setuptools import find_packages
from setuptools import setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"',
    (HERE / "keras_multimax" / "__init__.py").read_text(),
    re.M,
).group(1)

EXTRAS = {
    # keras_multimax.toolkit (tfds pipelines, plots, the digits fallback) and
    # the LiteRT check of the quickstart.
    "examples": [
        "tensorflow-datasets",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "ai-edge-litert",
    ],
    # Runtimes to check exported models (LiteRT interpreter, ONNX), and the
    # offline digits that examples/export.py trains on.
    "export": ["ai-edge-litert", "onnxruntime", "tf2onnx", "onnx", "scikit-learn>=1.3"],
    # MultiMax in KerasHub models (keras_multimax.hub). Its attention twins
    # subclass KerasHub's attention classes and re-implement the non-fused
    # branch of their `_compute_attention`, which KerasHub may change in any
    # minor release (0.x): the bound stops before the next minor version,
    # 0.33, until the twins are checked against it (tests/test_hub*.py).
    "keras-hub": ["keras-hub>=0.32,<0.33"],
    # Keras' JAX backend (KERAS_BACKEND=jax), CPU wheels.
    "jax": ["jax[cpu]>=0.10"],
    # The documentation site: mkdocs build --strict (mkdocs.yml).
    "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
}
EXTRAS["test"] = sorted(
    {
        "pytest>=7",
        "pytest-xdist>=3.2",  # --dist worksteal
        "ruff>=0.6",
        # KerasHub's own TestCase (tests/test_hub_contract.py) imports grain.
        "grain>=0.2",
        *EXTRAS["examples"],
        *EXTRAS["export"],
        *EXTRAS["keras-hub"],
        *EXTRAS["jax"],
    }
)

setup(
    name="keras-multimax",
    version=VERSION,
    description=(
        "MultiMax: sparse and multi-modal attention (ICML 2024) for Keras 3 "
        "with the TensorFlow and JAX backends."
    ),
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["keras_multimax", "keras_multimax.*"]),
    python_requires=">=3.10",
    install_requires=["tensorflow>=2.16", "keras>=3", "numpy"],
    extras_require=EXTRAS,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
