"""The TPU path: TPUStrategy when a TPU is reachable, and everywhere the
TPU-shaped training (XLA `jit_compile=True`, static shapes, `mixed_bfloat16`),
`mixed_float16` with loss scaling, and extreme logits.
"""

import keras
import numpy as np
import numpy_reference as ref
import pytest
from backend_helpers import to_numpy
from backend_helpers import traced
from backend_helpers import value_and_gradients
from distributed_workers import common
from layer_test_case import paper_modulator

from keras_multimax import layers
from keras_multimax import ops

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    from keras_multimax import distribute

EPOCHS = 5
TENSORFLOW = pytest.mark.only_backend(
    "tensorflow",
    reason="TPUStrategy, tf.data and the XLA HLO of a TensorFlow train step",
)


def _static_dataset(x, y):
    # Static shapes: every batch has GLOBAL_BATCH rows (drop_remainder).
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(common.GLOBAL_BATCH, drop_remainder=True)
        .cache()
    )


def _assert_step_compiles(model, x, y):
    """Lowers the full Keras train step (forward, custom gradients, optimizer
    update, loss scaling) to XLA HLO; raises if any op has no XLA kernel."""
    model.optimizer.build(model.trainable_variables)
    step = tf.function(model.train_step, jit_compile=True)
    batch = (
        tf.constant(x[: common.GLOBAL_BATCH]),
        tf.constant(y[: common.GLOBAL_BATCH]),
    )
    hlo = step.experimental_get_compiler_ir(batch)(stage="hlo")
    assert "ENTRY" in hlo
    return hlo


def _train_tpu_shaped(policy, optimizer):
    keras.mixed_precision.set_global_policy(policy)
    x, y = common.make_data(seed=3, n=64)
    model = common.build_model(batch_size=common.GLOBAL_BATCH)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    assert model.jit_compile is True
    hlo = _assert_step_compiles(model, x, y)
    history = model.fit(_static_dataset(x, y), epochs=EPOCHS, shuffle=False, verbose=0)
    losses = history.history["loss"]
    print(f"{policy}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    for v in model.weights:
        assert np.all(np.isfinite(v.numpy())), v.path
    return model, hlo


def _check_policy_dtypes(model, compute_dtype):
    assert model.get_layer("embed").compute_dtype == compute_dtype
    for name in ("attention", "pool_multimax", "head_seglu"):
        layer = model.get_layer(name)
        assert layer.ranges.dtype == "float32" and layer.ts.dtype == "float32"
    assert model.output.dtype == "float32"  # float32 SegLU head


@pytest.mark.slow
@TENSORFLOW
def test_tpu_strategy_when_reachable():
    reachable, reason = distribute.tpu_reachable()
    if not reachable:
        pytest.skip(f"TPUStrategy test skipped: {reason}")
    strategy = distribute.choose_strategy("tpu")
    assert isinstance(strategy, tf.distribute.TPUStrategy)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    x, y = common.make_data(seed=3, n=64)
    global_batch = common.GLOBAL_BATCH * strategy.num_replicas_in_sync
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
    dataset = dataset.batch(global_batch, drop_remainder=True)
    with strategy.scope():
        model = common.build_model()
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            steps_per_execution=4,
        )
    history = model.fit(
        dataset, epochs=EPOCHS, steps_per_epoch=8, shuffle=False, verbose=0
    )
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.slow
@TENSORFLOW
def test_bfloat16_xla_training_compiles_and_learns():
    model, hlo = _train_tpu_shaped("mixed_bfloat16", keras.optimizers.Adam(1e-2))
    _check_policy_dtypes(model, "bfloat16")
    assert "bf16[" in hlo  # the compiled step really computes in bfloat16


@pytest.mark.slow
@TENSORFLOW
def test_float16_loss_scaling_xla_training_compiles_and_learns():
    model, hlo = _train_tpu_shaped("mixed_float16", keras.optimizers.Adam(1e-2))
    _check_policy_dtypes(model, "float16")
    assert "f16[" in hlo
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    scale = float(model.optimizer.dynamic_scale.numpy())
    assert np.isfinite(scale) and scale >= 1.0


# Per-order thresholds/slopes of both signs: order-2 terms make σ ~ 1e7 at 1e4.
RANGES = np.array([-1.0, 1.0, -2.0, 2.0], "float32")
SLOPES = {
    "positive": np.array([0.5, 0.5, 0.1, 0.1], "float32"),
    "negative": np.array([-0.5, 0.3, -0.1, -0.1], "float32"),
}


def _extreme_inputs(dtype):
    big = 1e4 if dtype == "float32" else float(np.finfo(np.float16).max)
    row = np.array([-big, -big / 3, -1.0, 0.0, 1e-3, 1.0, big / 7, big], dtype)
    return np.stack([row, row[::-1], -row, np.linspace(-big, big, 8).astype(dtype)])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("sign", ["positive", "negative"])
def test_extreme_logits_stay_finite_under_xla(dtype, sign):
    x = _extreme_inputs(dtype)
    # A loss that weights the classes differently, so gradients are not
    # trivially zero.
    y, grads = value_and_gradients(
        ops.multimax, x, RANGES, SLOPES[sign], upstream=np.arange(8.0), mode="xla"
    )
    assert keras.backend.standardize_dtype(y.dtype) == dtype
    y = to_numpy(y).astype("float64")
    assert np.all(np.isfinite(y))
    expected = ref.multimax(x, RANGES, SLOPES[sign])
    np.testing.assert_allclose(y, expected, atol=1e-6 if dtype == "float32" else 1e-3)
    np.testing.assert_allclose(
        y.sum(-1), 1.0, atol=1e-5 if dtype == "float32" else 5e-3
    )
    for g in grads:
        assert np.all(np.isfinite(g))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_extreme_logits_mixed_precision_layers(dtype):
    """MultiMax and MultiMaxAttention layers under the matching mixed policy."""
    policy = "mixed_float16" if dtype == "float16" else "float32"
    keras.mixed_precision.set_global_policy(policy)
    # The official ts (|ts| <= 0.04): at ts = 0 it would be SoftMax alone.
    layer = layers.MultiMax(modulator=paper_modulator(ranges_initializer="zeros"))
    x = _extreme_inputs(dtype)
    layer.build(x.shape)
    y = to_numpy(traced(layer, xla=True)(x))
    assert np.all(np.isfinite(y))
    expected = ref.multimax(x, to_numpy(layer.ranges), to_numpy(layer.ts))
    np.testing.assert_allclose(y, expected, atol=1e-3)

    attention = layers.MultiMaxAttention(
        num_heads=2, key_dim=4, per_head=True, modulator="paper"
    )
    big = 1e4 if dtype == "float32" else 2e2  # float16 q·k must stay in range
    q = np.random.default_rng(0).uniform(-big, big, (2, 5, 8)).astype(dtype)
    attention(q, q)  # built eagerly: a traced call must not create variables
    out = to_numpy(traced(attention, xla=True)(q, q))
    assert np.all(np.isfinite(out))
