"""Tests of `keras_multimax.ops`: values, gradients, masks, numerics, errors."""

import json
import pathlib

import numpy as np
import numpy_reference as ref
import pytest
import tensorflow as tf
from switches import fused_forward

from keras_multimax import ops

REFERENCE = json.loads(
    (pathlib.Path(__file__).parent / "data" / "multimax_reference.json").read_text()
)["cases"]


def _modes(fn):
    """The same function eagerly, inside `tf.function` and with the fused forward.

    The first two run the default forward (plain ops, what exporters
    receive); "fused" traces it with `config.enable_fused_forward()` (the XLA
    kernel).
    """
    traced = tf.function(fn)

    def fused(*args):
        with fused_forward():
            return tf.function(fn)(*args)

    return {"eager": fn, "tf_function": traced, "fused": fused}


MODES = ["eager", "tf_function", "fused"]


def _values_and_gradients(x, ranges, ts, upstream, axis=-1, mask=None):
    def fn(x, ranges, ts):
        with tf.GradientTape() as tape:
            tape.watch([x, ranges, ts])
            y = ops.multimax(x, ranges, ts, axis=axis, mask=mask)
            loss = tf.reduce_sum(y * tf.cast(np.asarray(upstream, np.float64), y.dtype))
        return (y, *tape.gradient(loss, [x, ranges, ts]))

    return fn


def plain_seglu(x, ranges, ts):
    """The modulator written with plain TF ops, differentiated by autodiff."""
    sigma = x
    for k in range(ts.shape[-1] // 2):
        sigma = (
            sigma
            + ts[..., 2 * k] * tf.nn.relu(ranges[..., 2 * k] - x) ** (k + 1)
            + ts[..., 2 * k + 1] * tf.nn.relu(x - ranges[..., 2 * k + 1]) ** (k + 1)
        )
    return sigma


def plain_multimax(x, ranges, ts, axis=-1, mask=None):
    """MultiMax written with plain TF ops, differentiated by autodiff."""
    sigma = plain_seglu(x, ranges, ts)
    if mask is None:
        return tf.exp(sigma - tf.reduce_logsumexp(sigma, axis=axis, keepdims=True))
    sigma = tf.where(mask, sigma, -np.inf)
    top = tf.stop_gradient(tf.reduce_max(sigma, axis=axis, keepdims=True))
    top = tf.where(tf.math.is_finite(top), top, 0.0)
    e = tf.where(mask, tf.exp(sigma - top), 0.0)
    total = tf.reduce_sum(e, axis=axis, keepdims=True)
    return e / tf.where(total > 0, total, 1.0)


def _relative_error(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


# --- the reference JSON (official formulation, float64) ---------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(REFERENCE)))
def test_reference_float64(case, mode):
    c = REFERENCE[case]
    args = [tf.constant(c[k], tf.float64) for k in ("x", "ranges", "ts")]
    fn = _modes(_values_and_gradients(*args, c["upstream"], axis=c["axis"]))[mode]
    y, gx, gr, gt = fn(*args)
    np.testing.assert_allclose(ops.seglu(*args).numpy(), c["seglu"], rtol=1e-9)
    for actual, key in (
        (y, "multimax"),
        (gx, "grad_x"),
        (gr, "grad_ranges"),
        (gt, "grad_ts"),
    ):
        np.testing.assert_allclose(actual.numpy(), c[key], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(REFERENCE)))
def test_reference_float32(case, mode):
    """float32: values and grad_x within 1e-5 of their largest magnitude.

    The gradients of `ranges` and `ts` are sums of terms of both signs over
    every entry; where they cancel (case 4: grad_ranges is 3e-4 from terms of
    1e-2) float32 cannot reach 1e-5 of the result itself, even from correctly
    rounded float32 outputs. Their bound is 1e-5 of the larger of the result
    and the sum of the absolute terms (the condition of the sum), computed
    independently in float64.
    """
    c = REFERENCE[case]
    args = [tf.constant(c[k], tf.float32) for k in ("x", "ranges", "ts")]
    fn = _modes(_values_and_gradients(*args, c["upstream"], axis=c["axis"]))[mode]
    y, gx, gr, gt = fn(*args)
    assert _relative_error(ops.seglu(*args), c["seglu"]) <= 1e-5
    for actual, key in ((y, "multimax"), (gx, "grad_x")):
        assert actual.dtype == tf.float32
        assert _relative_error(actual, c[key]) <= 1e-5, key
    terms = ref.parameter_gradient_terms(c["x"], c["ranges"], c["ts"], c["upstream"])
    for actual, key, term in ((gr, "grad_ranges", terms[0]), (gt, "grad_ts", terms[1])):
        expected = np.asarray(c[key])
        np.testing.assert_allclose(
            term.reshape(-1, expected.size).sum(0), expected, rtol=1e-9
        )
        scale = max(
            np.abs(expected).max(), np.abs(term).reshape(-1, expected.size).sum(0).max()
        )
        error = np.abs(actual.numpy() - expected).max()
        assert error <= 1e-5 * scale, (key, error, scale)


def test_reference_covers_both_orders():
    assert {c["order"] for c in REFERENCE} == {1, 2}


# --- gradients ----------------------------------------------------------------


def _away_from_breakpoints(shape, ranges, rng, gap=0.05):
    x = rng.normal(scale=1.5, size=shape)
    for r in np.ravel(ranges):
        close = np.abs(x - r) < gap
        x[close] += 2 * gap
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("axis", [-1, (0, 2)])
def test_numerical_gradient_float64(order, axis):
    rng = np.random.default_rng(order)
    ranges = rng.uniform(-1, 1, size=2 * order)
    ts = rng.uniform(-0.5, 0.5, size=2 * order)
    x = _away_from_breakpoints((2, 3, 4), ranges, rng)
    upstream = tf.constant(rng.normal(size=x.shape))

    def loss(x, ranges, ts):
        return tf.reduce_sum(ops.multimax(x, ranges, ts, axis=axis) * upstream)

    theoretical, numerical = tf.test.compute_gradient(loss, [x, ranges, ts], delta=1e-6)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_numerical_gradient_seglu_float64(order):
    rng = np.random.default_rng(10 + order)
    ranges = rng.uniform(-1, 1, size=(3, 1, 2 * order))  # per-row parameters
    ts = rng.uniform(-0.5, 0.5, size=(3, 1, 2 * order))
    x = _away_from_breakpoints((3, 4), ranges, rng)
    theoretical, numerical = tf.test.compute_gradient(
        lambda x, r, t: ops.seglu(x, r, t), [x, ranges, ts], delta=1e-6
    )
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "x_shape, param_shape, axis, with_mask",
    [
        ((4, 7), (4,), -1, False),
        ((4, 7), (2,), 0, True),
        ((2, 3, 5, 6), (3, 1, 1, 4), -1, True),  # per-head parameters
        ((2, 3, 5, 6), (4,), (2, 3), True),
        ((2, 3, 5, 6), (3, 5, 1, 6), (1, 3), False),
        ((2, 1, 5, 6), (3, 1, 1, 4), -1, True),  # parameters broadcast x up
    ],
)
def test_gradient_equals_autodiff_of_plain_formula(
    x_shape, param_shape, axis, with_mask, mode
):
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(scale=2.0, size=x_shape))
    ranges = tf.constant(rng.normal(size=param_shape))
    ts = tf.constant(rng.normal(scale=0.3, size=param_shape))
    upstream = tf.constant(rng.normal(size=x_shape))
    mask = tf.constant(rng.random(x_shape) > 0.3) if with_mask else None

    def both(x, ranges, ts):
        out = []
        for fn in (ops.multimax, plain_multimax):
            with tf.GradientTape() as tape:
                tape.watch([x, ranges, ts])
                y = fn(x, ranges, ts, axis=axis, mask=mask)
                loss = tf.reduce_sum(y * upstream)
            out.append((y, *tape.gradient(loss, [x, ranges, ts])))
        return out

    ours, plain = _modes(both)[mode](x, ranges, ts)
    for a, b in zip(ours, plain):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)


def test_parameter_gradients_are_reduced_to_parameter_shape():
    x = tf.random.normal((2, 3, 4, 4))
    ranges = tf.zeros((3, 1, 1, 4))
    ts = tf.zeros((3, 1, 1, 4))
    with tf.GradientTape() as tape:
        tape.watch([ranges, ts])
        y = ops.multimax(x, ranges, ts)
        loss = tf.reduce_sum(y * tf.random.normal(y.shape))
    gr, gt = tape.gradient(loss, [ranges, ts])
    assert gr.shape == ranges.shape and gt.shape == ts.shape
    assert np.abs(gt.numpy()).max() > 0


# --- properties against NumPy ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("axis", [-1, 1, (1, 2), (0, 2)])
def test_values_against_numpy(order, axis, mode):
    rng = np.random.default_rng(order)
    x = rng.normal(scale=3, size=(3, 4, 5)).astype("float32")
    ranges = rng.uniform(-1, 1, size=2 * order).astype("float32")
    ts = rng.uniform(-0.3, 0.3, size=2 * order).astype("float32")
    fn = _modes(lambda x: ops.multimax(x, ranges, ts, axis=axis))[mode]
    y = fn(tf.constant(x)).numpy()
    np.testing.assert_allclose(
        y, ref.multimax(x, ranges, ts, axis=axis), rtol=2e-5, atol=1e-7
    )
    np.testing.assert_allclose(y.sum(axis=axis), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        ops.seglu(x, ranges, ts).numpy(), ref.seglu(x, ranges, ts), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_zero_ts_equals_tf_softmax(dtype):
    x = tf.random.normal((5, 11), stddev=4.0, dtype=dtype)
    ranges = tf.random.normal((4,), dtype=dtype)
    y = ops.multimax(x, ranges, tf.zeros((4,), dtype))
    np.testing.assert_allclose(
        y.numpy(), tf.nn.softmax(x).numpy(), rtol=1e-6 if dtype == tf.float32 else 1e-13
    )
    np.testing.assert_array_equal(
        ops.seglu(x, ranges, tf.zeros((4,), dtype)).numpy(), x.numpy()
    )


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("mode", MODES)
def test_masks_give_exact_zeros_and_no_nan(sign, mode):
    rng = np.random.default_rng(5)
    x = rng.normal(scale=3, size=(6, 8)).astype("float32")
    mask = rng.random((6, 8)) > 0.4
    mask[2] = False  # a fully masked row
    ranges = np.array([0.5, -0.5, 0.2, -0.2], "float32")
    ts = sign * np.array([0.8, 0.4, 0.6, 0.3], "float32")

    def fn(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ops.multimax(x, ranges, ts, mask=mask)
            loss = tf.reduce_sum(y * tf.constant(rng.normal(size=(6, 8)), tf.float32))
        return y, tape.gradient(loss, x)

    y, grad = _modes(fn)[mode](tf.constant(x))
    y, grad = y.numpy(), grad.numpy()
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(grad))
    np.testing.assert_array_equal(y[~mask], 0.0)
    np.testing.assert_array_equal(grad[~mask], 0.0)
    np.testing.assert_array_equal(y[2], 0.0)
    np.testing.assert_allclose(y[np.arange(6) != 2].sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        y, ref.multimax(x, ranges, ts, mask=mask), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("fill", [-np.inf, np.inf, np.nan, -1e30, 1e30, -1e13])
@pytest.mark.parametrize("order", [2, 3])
def test_masked_values_never_reach_the_gradients(fill, order):
    """Padding values under the mask (-inf, NaN, 1e30) change nothing."""
    rng = np.random.default_rng(order)
    x = rng.normal(size=(3, 6))
    mask = np.ones((3, 6), bool)
    mask[:, 2] = mask[1, 4] = False
    ranges = tf.constant(rng.uniform(-1, 1, 2 * order))
    ts = tf.constant(rng.uniform(-0.5, 0.5, 2 * order))
    upstream = tf.constant(rng.normal(size=(3, 6)))

    def gradients(fn, x):
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch([x, ranges, ts])
            y = fn(x, ranges, ts, mask=mask)
            loss = tf.reduce_sum(y * upstream)
        return [y, *tape.gradient(loss, [x, ranges, ts])]

    padded = np.where(mask, x, fill)
    ours = gradients(ops.multimax, padded)
    plain = gradients(plain_multimax, x)  # finite values under the mask
    for a, b in zip(ours, plain):
        assert np.all(np.isfinite(a.numpy()))
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(ours[1].numpy()[~mask], 0.0)


def test_seglu_gradient_has_the_shape_of_x_when_parameters_broadcast_it():
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(2, 1, 3)))
    ranges = tf.constant(rng.normal(size=(5, 1, 4)))
    ts = tf.constant(rng.normal(size=(5, 1, 4)))
    upstream = tf.constant(rng.normal(size=(2, 5, 3)))
    grads = []
    for fn in (ops.seglu, plain_seglu):
        with tf.GradientTape() as tape:
            tape.watch([x, ranges, ts])
            loss = tf.reduce_sum(fn(x, ranges, ts) * upstream)
        grads.append(tape.gradient(loss, [x, ranges, ts]))
    for a, b, v in zip(*grads, (x, ranges, ts)):
        assert a.shape == v.shape
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)


def test_unknown_rank_input_is_a_value_error():
    fn = tf.function(
        lambda x: ops.multimax(x, tf.zeros(4), tf.zeros(4)),
        input_signature=[tf.TensorSpec(None, tf.float32)],
    )
    with pytest.raises(ValueError, match=r"x.shape=<unknown>"):
        fn.get_concrete_function()


def test_mask_equals_dropping_the_entries():
    x = np.array([[0.3, 2.0, -1.0, 1.5, -4.0]], "float32")
    keep = np.array([True, True, False, True, False])
    ranges = np.array([0.1, 0.2, -0.1, 0.3], "float32")
    ts = np.array([0.9, -0.4, 0.7, 0.2], "float32")
    masked = ops.multimax(x, ranges, ts, mask=keep[None]).numpy()
    dropped = ops.multimax(x[:, keep], ranges, ts).numpy()
    np.testing.assert_allclose(masked[:, keep], dropped, rtol=1e-6)


def test_large_negative_masking_fails_where_mask_argument_works():
    """Why masks are applied after σ: -1e9 fed into σ becomes a huge score."""
    x = np.array([[1.0, 2.0, -1e9]], "float32")
    ranges = np.array([0.0, 0.0, 0.0, 0.0], "float32")
    ts = np.array([0.0, 0.0, 0.1, 0.0], "float32")  # t_b of order 2 > 0
    additive = ops.multimax(x, ranges, ts).numpy()
    assert additive[0, 2] > 0.99  # the "masked" entry takes all the mass
    proper = ops.multimax(x[:, :2], ranges, ts).numpy()
    masked = ops.multimax(
        np.array([[1.0, 2.0, 5.0]], "float32"), ranges, ts, mask=[[1, 1, 0]]
    )
    np.testing.assert_allclose(masked.numpy()[:, :2], proper, rtol=1e-6)
    assert masked.numpy()[0, 2] == 0.0


@pytest.mark.parametrize(
    "dtype, scale",
    [(tf.float32, 1e4), (tf.float16, 300.0), (tf.bfloat16, 300.0), (tf.float64, 1e4)],
)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_inputs_stay_finite(dtype, scale, sign):
    rng = np.random.default_rng(2)
    x = tf.cast(rng.uniform(-scale, scale, size=(4, 64)), dtype)
    ranges = tf.constant([0.1, -0.1, 0.2, -0.2], dtype)
    ts = tf.constant(sign * np.array([0.02, 0.03, 0.02, 0.01]), dtype)
    with tf.GradientTape() as tape:
        tape.watch([x, ranges, ts])
        y = ops.multimax(x, ranges, ts)
        loss = tf.reduce_sum(y * tf.cast(tf.range(64.0), dtype))
    grads = tape.gradient(loss, [x, ranges, ts])
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    for value in (y, *grads):
        assert np.all(np.isfinite(tf.cast(value, tf.float32).numpy()))
    expected = ref.multimax(
        tf.cast(x, tf.float64).numpy(),
        ranges.numpy().astype("f8"),
        ts.numpy().astype("f8"),
    )
    tolerance = {tf.float16: 1e-3, tf.bfloat16: 1e-2}.get(dtype, 1e-5)
    np.testing.assert_allclose(tf.cast(y, tf.float64).numpy(), expected, atol=tolerance)


def test_overflowing_modulator_gives_finite_probabilities():
    x = tf.constant([[1e30, 1e30, -1e30, 0.0]])
    y = ops.multimax(x, tf.zeros(4), tf.constant([0.0, 0.0, 0.5, 0.5]))
    assert np.all(np.isfinite(y.numpy()))
    np.testing.assert_allclose(y.numpy().sum(), 1.0, rtol=1e-6)


def test_half_precision_is_computed_in_float32():
    """(±300)² = 90000 overflows float16; 0.1·90000 + 300 does not."""
    x = tf.constant([[300.0, -300.0, 0.0]], tf.float16)
    ranges = tf.constant([0.0, 0.0, 0.0, 0.0], tf.float16)
    ts = tf.constant([0.0, 0.0, 0.1, 0.1], tf.float16)
    expected = ref.seglu(x.numpy(), ranges.numpy(), ts.numpy())
    assert np.all(np.abs(expected) < 65504)
    actual = tf.cast(ops.seglu(x, ranges, ts), tf.float32).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-3)


# Argument errors: tests/test_ops_errors.py (the same on every backend).
