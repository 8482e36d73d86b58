"""XLA: `ops.multimax`/`ops.seglu` compile and equal eager; models train jit-compiled."""

import keras
import numpy as np
import numpy_reference as ref
import pytest
from backend_helpers import to_numpy

from keras_multimax import layers
from keras_multimax import ops

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

CASES = {
    # name: (x shape, parameter shape, axis, with mask)
    "last_axis": ((4, 7), (4,), -1, False),
    "masked": ((2, 5, 6), (4,), -1, True),
    "per_head_scores": ((2, 3, 5, 5), (3, 1, 1, 6), -1, True),
    "two_axes": ((2, 4, 3, 5), (4,), (-2, -1), False),
}


def _case(name, dtype):
    shape, param_shape, axis, masked = CASES[name]
    rng = np.random.default_rng(0)
    x = tf.constant(3.0 * rng.standard_normal(shape), dtype)
    ranges = tf.constant(rng.standard_normal(param_shape), dtype)
    ts = tf.constant(0.5 * rng.standard_normal(param_shape), dtype)
    mask = None
    if masked:
        mask = rng.random(shape) < 0.6
        mask[..., 0] = True
        mask.reshape(-1, shape[-1])[0] = False  # one fully masked row
        mask = tf.constant(mask)
    weights = tf.constant(rng.standard_normal(shape), dtype)
    return x, ranges, ts, axis, mask, weights


def _values_and_gradients(x, ranges, ts, axis, mask, weights):
    with tf.GradientTape() as tape:
        tape.watch([x, ranges, ts])
        y = ops.multimax(x, ranges, ts, axis=axis, mask=mask)
        s = ops.seglu(x, ranges, ts)
        loss = tf.reduce_sum(y * weights) + 0.01 * tf.reduce_sum(s * weights)
    return [y, s, *tape.gradient(loss, [x, ranges, ts])]


@pytest.mark.only_backend(
    "tensorflow",
    reason="jit_compile=True is a TensorFlow path of its own; on JAX every "
    "traced test of test_ops.py is compiled by XLA",
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(CASES))
def test_jit_compiled_ops_equal_eager(name, dtype):
    x, ranges, ts, axis, mask, weights = _case(name, dtype)
    eager = _values_and_gradients(x, ranges, ts, axis, mask, weights)

    def fn(x, ranges, ts, weights):
        return _values_and_gradients(x, ranges, ts, axis, mask, weights)

    # Raises if any op (forward or custom backward) cannot be compiled by XLA.
    jit = tf.function(fn, jit_compile=True)(x, ranges, ts, weights)

    # Values elementwise; gradients of ranges/ts are sums over all entries,
    # whose order XLA may change (a few float32 ulps of the sum).
    value_tol, grad_tol = (1e-6, 1e-5) if dtype == "float32" else (1e-12, 1e-10)
    for i, (e, j) in enumerate(zip(eager, jit)):
        e, j = e.numpy(), j.numpy()
        tol = value_tol if i < 2 else grad_tol
        np.testing.assert_allclose(j, e, rtol=tol, atol=tol * max(1.0, np.abs(e).max()))
    # Values are right, not merely equal to eager.
    want = ref.multimax(x.numpy(), ranges.numpy(), ts.numpy(), axis=axis, mask=mask)
    np.testing.assert_allclose(jit[0].numpy(), want, atol=1e-6)
    if mask is not None:
        assert np.all(jit[0].numpy()[~mask.numpy()] == 0.0)


@pytest.mark.slow
def test_model_trains_jit_compiled():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 6, 8)).astype("float32")
    y = (x[:, :, 0].sum(-1) > 0).astype("int32") + (x[:, 0, 1] > 0)  # 3 classes

    inputs = keras.Input((6, 8))
    h = layers.MultiMaxAttention(num_heads=2, key_dim=4, per_head=True)(inputs, inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dense(3)(h)
    logits = layers.SegLU()(h)
    probs = layers.MultiMax()(logits)
    model = keras.Model(inputs, probs)
    model.compile(
        keras.optimizers.Adam(1e-2),
        "sparse_categorical_crossentropy",
        jit_compile=True,
    )
    before = {w.path: to_numpy(w) for w in model.weights}
    history = model.fit(x, y, batch_size=32, epochs=6, verbose=0)
    assert model.jit_compile is True
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    for w in model.weights:  # ranges and ts of every layer are trained
        if w.path.endswith(("ranges", "ts")):
            assert not np.allclose(to_numpy(w), before[w.path]), w.path
    # The trained model predicts the same jit-compiled and eagerly.
    np.testing.assert_allclose(
        model.predict(x[:8], verbose=0), to_numpy(model(x[:8])), atol=1e-6
    )
