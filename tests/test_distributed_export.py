"""SavedModel and .keras export of models trained under strategies.

export_train_worker.py trains a MultiMaxAttention/MultiMax/SegLU model inside
`MirroredStrategy.scope()` (2 logical CPUs, or all GPUs) and one on the
TPU-shaped path (`mixed_bfloat16`, `jit_compile=True`; `TPUStrategy` when a
TPU is reachable) and exports both from inside the scope with `model.export`
and `tf.saved_model.save`. export_reload_worker.py, a fresh process, reloads
them with no strategy, inside a `MirroredStrategy` scope (run per replica) and
under `tf.function(jit_compile=True)`, and loads each `.keras` file under a
strategy other than the one it was saved under.
"""

import os

import numpy as np
import pytest
from distributed_workers import common
from tolerances import assert_close
from tolerances import assert_defect_caught

pytestmark = pytest.mark.only_backend(
    "tensorflow", reason="tf.distribute strategies and SavedModels"
)

# Bounds in eps · (largest |logit|), see tests/tolerances.py.
# float32: the same ops, reloaded, fused or ordered differently (plain, XLA,
# per replica): a couple of roundings in each of ~8 layers. Measured 1.8.
FLOAT32 = ("float32", 16)
# bfloat16 run by XLA (as predict() ran it) or by the TF executor: one rounding
# of each of ~8 layers' outputs apart. Measured 0.34 on AVX-512 (native
# bfloat16 dot products) and 3.4 on an AVX2-only CPU.
BF16 = ("bfloat16", 8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed_export")
    # Each worker imports TensorFlow, trains or reloads two models: ~1 min of
    # CPU, several on a busy 2-core machine running pytest -n 2.
    common.run_worker("export_train_worker.py", out, timeout=600)
    common.run_worker("export_reload_worker.py", out, timeout=600)
    return (
        np.load(os.path.join(out, "reference.npz")),
        np.load(os.path.join(out, "reloaded.npz")),
        common.read_json(os.path.join(out, "train_meta.json")),
        common.read_json(os.path.join(out, "reload_meta.json")),
    )


def _assert_close(actual, expected, untrained, tolerance, what):
    dtype, depth = tolerance
    # Control: a reload with stale (untrained) weights is >= 10 bounds away.
    assert_defect_caught(untrained, expected, dtype, depth)
    assert_close(actual, expected, dtype, depth, what=what)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["export", "tfsave"])
def test_mirrored_savedmodel_reloads_everywhere(exported, fmt):
    reference, reloaded, train_meta, reload_meta = exported
    assert train_meta["mirrored"]["strategy"] == "MirroredStrategy"
    assert train_meta["mirrored"]["replicas"] >= 2
    print(
        f"trained on {train_meta['mirrored']['replicas']} replicas: {train_meta['reason']}"
    )
    key = f"mirrored_{fmt}"
    expected, untrained = reference["mirrored"], reference["mirrored_untrained"]
    assert reload_meta[key]["input_dtypes"] == ["float32"]
    assert reload_meta[key]["output_dtypes"] == ["float32"]
    assert reload_meta[key]["replicas"] >= 2
    for how in ["plain", "jit"] + [
        f"replica{i}" for i in range(reload_meta[key]["replicas"])
    ]:
        _assert_close(
            reloaded[f"{key}/{how}"], expected, untrained, FLOAT32, f"{key}/{how}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["export", "tfsave"])
def test_bfloat16_xla_savedmodel_serves_float32(exported, fmt):
    reference, reloaded, train_meta, reload_meta = exported
    assert train_meta["bf16"]["compute_dtype"] == "bfloat16"
    assert train_meta["bf16"]["output_dtype"] == "float32"
    key = f"bf16_{fmt}"
    # A float32 serving signature although the model computes in bfloat16.
    assert reload_meta[key]["input_dtypes"] == ["float32"]
    assert reload_meta[key]["output_dtypes"] == ["float32"]
    expected, untrained = reference["bf16"], reference["bf16_untrained"]
    # Under XLA the reloaded graph rounds as the XLA-trained model's predict().
    _assert_close(reloaded[f"{key}/jit"], expected, untrained, FLOAT32, f"{key}/jit")
    for how in ["plain"] + [f"replica{i}" for i in range(reload_meta[key]["replicas"])]:
        assert reloaded[f"{key}/{how}"].dtype == np.float32
        _assert_close(
            reloaded[f"{key}/{how}"], expected, untrained, BF16, f"{key}/{how}"
        )


@pytest.mark.slow
def test_keras_file_saved_under_one_strategy_loads_under_another(exported):
    reference, reloaded, _, reload_meta = exported
    # Saved under MirroredStrategy, loaded under OneDeviceStrategy.
    _assert_close(
        reloaded["mirrored_keras/one_device"],
        reference["mirrored"],
        reference["mirrored_untrained"],
        FLOAT32,
        "mirrored.keras",
    )
    # Saved on the bf16/XLA path, loaded under MirroredStrategy: still bf16,
    # variables mirrored, and predict() still compiled with XLA.
    assert reload_meta["bf16_keras_compute_dtype"] == "bfloat16"
    assert reload_meta["bf16_keras_variable"] == "MirroredVariable"
    _assert_close(
        reloaded["bf16_keras/mirrored"],
        reference["bf16"],
        reference["bf16_untrained"],
        FLOAT32,
        "bf16.keras",
    )
