"""MirroredStrategy: training on 2 replicas equals training on one device.

The worker (tests/distributed_workers/mirrored_worker.py) runs in a fresh
process because logical CPU devices must be configured before TensorFlow
initialises its devices. It uses every GPU when several are visible and
otherwise splits the CPU in two, printing why.
"""

import os

import numpy as np
import pytest
import tensorflow as tf
from distributed_workers import common

from keras_multimax import distribute

pytestmark = pytest.mark.only_backend(
    "tensorflow", reason="tf.distribute.MirroredStrategy"
)

# Reductions over 2 replicas sum the gradients in another order than one
# device does: float32 round-off, a few ulps of the weights after 3 epochs.
ATOL = 1e-5
RTOL = 1e-4


@pytest.mark.slow
def test_mirrored_training_equals_single_device(tmp_path):
    epochs = 3
    out = common.run_worker("mirrored_worker.py", tmp_path, epochs)
    meta = common.read_json(os.path.join(tmp_path, "meta.json"))
    print(f"MirroredStrategy on {meta['devices']} ({meta['reason']})")
    assert meta["num_replicas"] == 2 or "GPUs" in meta["reason"], meta
    assert meta["num_replicas"] >= 2
    assert "MirroredVariable" in meta["ranges_variable_type"]
    assert "split the CPU" in out or "GPUs" in out  # the worker said why

    weights = np.load(os.path.join(tmp_path, "weights.npz"))
    paths = [k[len("single/") :] for k in weights.files if k.startswith("single/")]
    expected = {"pool_multimax/ranges", "pool_multimax/ts"}
    expected |= {"head_seglu/ranges", "head_seglu/ts"}
    expected |= {"attention/ranges", "attention/ts"}  # MultiMaxAttention
    assert expected <= set(paths), paths
    for path in paths:
        single = weights[f"single/{path}"]
        mirrored = weights[f"mirrored/{path}"]
        moved = np.max(np.abs(single - weights[f"init/{path}"]))
        # The comparison only means something if training moved the weight.
        assert moved > 10 * ATOL, f"{path} did not train (moved {moved})"
        np.testing.assert_allclose(mirrored, single, atol=ATOL, rtol=RTOL, err_msg=path)
    np.testing.assert_allclose(meta["mirrored_loss"], meta["single_loss"], rtol=1e-5)
    assert meta["single_loss"][-1] < meta["single_loss"][0]


def test_choose_strategy_cpu_and_auto():
    cpu = distribute.choose_strategy("cpu")
    assert isinstance(cpu, tf.distribute.OneDeviceStrategy)
    assert cpu.num_replicas_in_sync == 1
    auto = distribute.choose_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    reachable, reason = distribute.tpu_reachable()
    if reachable:
        assert isinstance(auto, tf.distribute.TPUStrategy)
    elif len(gpus) > 1:
        assert isinstance(auto, tf.distribute.MirroredStrategy)
        assert auto.num_replicas_in_sync == len(gpus)
    else:
        print(f"auto picked {type(auto).__name__}: {reason}; {len(gpus)} GPU(s)")
        assert auto.num_replicas_in_sync == 1


def test_choose_strategy_rejects_bad_preference():
    with pytest.raises(ValueError, match="Received: preference='gpu'"):
        distribute.choose_strategy("gpu")


def test_choose_strategy_unsatisfiable_preferences(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="TF_CONFIG"):
        distribute.choose_strategy("multi_worker")
    if not tf.config.list_logical_devices("GPU"):
        with pytest.raises(RuntimeError, match="no GPU"):
            distribute.choose_strategy("gpus")
    if not distribute.tpu_reachable()[0]:
        with pytest.raises(RuntimeError, match="no TPU"):
            distribute.choose_strategy("tpu")


def test_choose_strategy_rejects_malformed_tf_config(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.choose_strategy("multi_worker")
