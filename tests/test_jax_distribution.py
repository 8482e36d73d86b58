"""Keras' JAX distribution API with MultiMax models, on 2 host devices.

The three configurations train one after the other in one JAX process
started with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (the flag
only acts before JAX starts).
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "jax_workers" / "distribution_worker.py"

pytestmark = pytest.mark.only_backend(
    "jax",
    reason="keras.distribution on JAX devices (the workers are JAX processes: "
    "one pytest run is enough)",
)


def train_all(tmp_path) -> dict:
    """``{mode: saved arrays}`` for one device, data and model parallel."""
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=str(ROOT),  # this checkout's keras_multimax
    )
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        m: dict(np.load(tmp_path / f"{m}.npz")) for m in ("single", "data", "model")
    }


def weights(run: dict) -> list:
    return [run[f"w{i}"] for i in range(sum(k.startswith("w") for k in run))]


def _assert_same_weights(run: dict, single: dict) -> None:
    # The same float32 steps except that gradient sums are split where the
    # data or the weights are: rounding of ~1e-7 per step, amplified by 8
    # SGD steps, stays far below 1e-5 of each weight tensor's scale.
    for a, b in zip(weights(run), weights(single)):
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1.0)


@pytest.mark.slow
def test_data_and_model_parallel_train_to_the_weights_of_one_device(tmp_path):
    """One test and one process: the reference trains once, JAX starts once."""
    runs = train_all(tmp_path)
    single, data, model = runs["single"], runs["data"], runs["model"]
    assert not data["sharded"].size  # data parallelism replicates weights
    _assert_same_weights(data, single)

    sharded = set(model["sharded"].tolist())
    for name in ("query", "key", "value", "attention_output"):
        assert any(f"/{name}/kernel" in path for path in sharded), sharded
    assert np.all(np.isfinite(model["loss"]))
    assert model["loss"][-1] < model["loss"][0]
    _assert_same_weights(model, single)
