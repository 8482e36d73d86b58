"""The README's first command, run as the README shows it, and the README's table.

One run of ``examples/quickstart.py`` with its default sizes on the offline
digits (what the README's table reports) serves every test here: the first
checks what it prints and writes (table, plots, exported models, TensorBoard
logs), the second that the README's table is the one it wrote, so that the
README's figures cannot drift from what the quickstart prints.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# The README's copy of the results, between these markers (pymdownx.snippets
# section markers: docs/index.md includes the same lines).
SECTION = re.compile(
    r"<!-- --8<-- \[start:quickstart-results\] -->\n(.*?)"
    r"<!-- --8<-- \[end:quickstart-results\] -->",
    re.S,
)
# A row of the comparison table: model, test accuracy, sparsity,
# multi-modality, step time (ms), parameters.
ROW = re.compile(
    r"^\| (SoftMax|MultiMax) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) "
    r"\| ([\d,]+) \|$",
    re.M,
)
MEASURED_ON = re.compile(r"^Measured on .*$", re.M)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.only_backend(
        "tensorflow",
        reason="the quickstart exports to SavedModel and LiteRT, which need "
        "TensorFlow, and the README's figures are TensorFlow's",
    ),
]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """Runs the quickstart once: ``(stdout, output directory)``."""
    pytest.importorskip("matplotlib", reason="the quickstart plots need matplotlib")
    pytest.importorskip("sklearn", reason="the offline digits need scikit-learn")
    pytest.importorskip(
        "ai_edge_litert", reason="the .tflite check needs ai-edge-litert"
    )
    out = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "quickstart.py"),
            "--dataset",
            "digits",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=str(out),
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, out


def _figures(text):
    """``{model: (accuracy, sparsity, multi-modality, parameters)}`` as printed.

    The step time is left out: it is the one column that changes run to run.
    """
    return {r[0]: (r[1], r[2], r[3], r[5]) for r in ROW.findall(text)}


def test_quickstart_prints_and_writes_everything(quickstart):
    stdout, out = quickstart
    # The comparison table, one row per model, numbers in range.
    rows = ROW.findall(stdout)
    assert [r[0] for r in rows] == ["SoftMax", "MultiMax"], stdout
    for _, accuracy, sparsity, modality, step_ms, _ in rows:
        assert 0.0 <= float(accuracy) <= 1.0
        assert 0.0 <= float(sparsity) <= 1.0 and 0.0 <= float(modality) <= 1.0
        assert float(step_ms) > 0.0
    # The results file: where, the same table, and a row per encoder block.
    written = (out / "results.md").read_text()
    assert MEASURED_ON.search(written).group() in stdout
    assert ROW.findall(written) == rows
    layers = re.findall(r"^\| (encoder_block_\d)/self_attention \|", written, re.M)
    assert layers == [f"encoder_block_{i}" for i in range(4)]

    # Plots and exported models.
    for name in ("modulators.png", "attention_maps.png", "simplex.png"):
        assert (out / name).stat().st_size > 10_000, name
    assert (out / "model.keras").is_file()
    assert (out / "saved_model" / "saved_model.pb").is_file()
    assert (out / "model.tflite").stat().st_size > 1000
    assert os.listdir(out / "tensorboard" / "modulator")

    # Each export was compared with Keras (the script exits non-zero when one
    # exceeds its bound, 64 eps · scale). export.format_table: format | file |
    # size | max abs diff | latency.
    table = stdout[stdout.index("| format | file | size |") :]
    diffs = dict(
        re.findall(
            r"^\| ([^|]+?) \| [^|]+ \| [^|]+ \| ([\d.e+-]+) \| [^|]+ \|$", table, re.M
        )
    )
    assert set(diffs) == {"Keras (.keras)", "SavedModel", "LiteRT float32 (.tflite)"}


def test_readme_table_is_what_the_quickstart_writes(quickstart):
    _, out = quickstart
    written = (out / "results.md").read_text()
    section = SECTION.search(README.read_text())
    assert section, "README.md lost its quickstart-results section markers"
    readme = section.group(1)
    ours, theirs = _figures(readme), _figures(written)
    assert list(ours) == ["SoftMax", "MultiMax"], readme
    # Parameter counts follow from the architecture: equal on every machine.
    assert {m: f[3] for m, f in ours.items()} == {m: f[3] for m, f in theirs.items()}
    readme_where = MEASURED_ON.search(readme)
    assert readme_where, "The README's quickstart table must say where it was measured"
    here = MEASURED_ON.search(written).group()
    if readme_where.group() != here:
        pytest.skip(
            "Trained figures repeat exactly only on the same CPU, core count "
            f"and library versions. README: {readme_where.group()!r}; this "
            f"run: {here!r}"
        )
    assert ours == theirs, (
        "README.md's quickstart table differs from what examples/quickstart.py "
        "wrote; run `python examples/quickstart.py --dataset digits` and copy "
        f"the first lines of its results.md into README.md:\n{written}"
    )
