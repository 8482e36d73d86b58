"""Keras' JAX distribution API with MultiMax models, on 2 host devices.

Each configuration trains in its own JAX process
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``: the flag only acts
before JAX starts), so this file runs from either backend's pytest run.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "jax_workers" / "distribution_worker.py"


def train(mode: str, tmp_path) -> dict:
    out = tmp_path / f"{mode}.npz"
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=str(ROOT),  # this checkout's keras_multimax
    )
    proc = subprocess.run(
        [sys.executable, str(WORKER), mode, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


def weights(run: dict) -> list:
    return [run[f"w{i}"] for i in range(sum(k.startswith("w") for k in run))]


@pytest.mark.slow
def test_data_parallel_trains_to_the_weights_of_one_device(tmp_path):
    single, data = train("single", tmp_path), train("data", tmp_path)
    assert not data["sharded"].size  # data parallelism replicates weights
    for a, b in zip(weights(data), weights(single)):
        # The same float32 steps except that each gradient sum is split in
        # two halves added last: rounding of ~1e-7 per step, amplified by 8
        # SGD steps, stays far below 1e-5 of each weight tensor's scale.
        scale = max(np.abs(b).max(), 1.0)
        assert np.abs(a - b).max() <= 1e-5 * scale


@pytest.mark.slow
def test_model_parallel_shards_the_attention_projections_and_trains(tmp_path):
    run = train("model", tmp_path)
    sharded = set(run["sharded"].tolist())
    for name in ("query", "key", "value", "attention_output"):
        assert any(f"/{name}/kernel" in path for path in sharded), sharded
    assert np.all(np.isfinite(run["loss"]))
    assert run["loss"][-1] < run["loss"][0]
    single = train("single", tmp_path)
    # Sharding changes where sums are split, not the math: same bound as above.
    for a, b in zip(weights(run), weights(single)):
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1.0)
