"""Smoke run of examples/keras_hub_finetune.py --smoke."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # about a minute: two tiny models trained, compiled, saved
def test_keras_hub_finetune_smoke_run(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "keras_hub_finetune.py"),
            "--smoke",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(tmp_path),
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "No --preset given" in out
    assert "GPT2CausalLM -> MultiMaxGPT2CausalLM: MultiMax in 2 attention layers" in out
    perplexities = dict(re.findall(r"^(SoftMax|MultiMax) +([0-9.]+) ", out, re.M))
    assert set(perplexities) == {"SoftMax", "MultiMax"}
    assert all(1.0 < float(p) < 1e4 for p in perplexities.values())
    assert "gives back a MultiMaxGPT2CausalLM that generates the same text" in out
    assert os.path.exists(tmp_path / "multimax_preset" / "config.json")
