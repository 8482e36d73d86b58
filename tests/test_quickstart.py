"""Smoke run of the README's first command: examples/quickstart.py --smoke."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_smoke_run(tmp_path):
    pytest.importorskip("matplotlib", reason="the quickstart plots need matplotlib")
    pytest.importorskip("sklearn", reason="the offline digits need scikit-learn")
    pytest.importorskip(
        "ai_edge_litert", reason="the .tflite check needs ai-edge-litert"
    )
    out = tmp_path / "quickstart"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "quickstart.py"),
            "--smoke",
            "--dataset",
            "digits",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stdout = result.stdout

    # The comparison table, one row per model, numbers in range.
    rows = re.findall(
        r"^\| (SoftMax|MultiMax) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|",
        stdout,
        re.M,
    )
    assert [r[0] for r in rows] == ["SoftMax", "MultiMax"], stdout
    for _, accuracy, sparsity, modality, step_ms in rows:
        assert 0.0 <= float(accuracy) <= 1.0
        assert 0.0 <= float(sparsity) <= 1.0 and 0.0 <= float(modality) <= 1.0
        assert float(step_ms) > 0.0
    assert (out / "results.md").read_text().count("\n") == 8  # 2 tables, 1 layer

    # Plots and exported models.
    for name in ("modulators.png", "attention_maps.png", "simplex.png"):
        assert (out / name).stat().st_size > 10_000, name
    assert (out / "model.keras").is_file()
    assert (out / "saved_model" / "saved_model.pb").is_file()
    assert (out / "model.tflite").stat().st_size > 1000
    assert os.listdir(out / "tensorboard" / "modulator")

    # Each export was compared with Keras (the script exits non-zero otherwise).
    # export.format_table: format | file | size | max abs diff | latency.
    table = stdout[stdout.index("| format | file | size |") :]
    diffs = dict(
        re.findall(
            r"^\| ([^|]+?) \| [^|]+ \| [^|]+ \| ([\d.e+-]+) \| [^|]+ \|$", table, re.M
        )
    )
    assert set(diffs) == {"Keras (.keras)", "SavedModel", "LiteRT float32 (.tflite)"}
    # The script exits non-zero when one exceeds its bound (64 eps · scale).
    assert all(float(d) >= 0.0 for d in diffs.values()), diffs
