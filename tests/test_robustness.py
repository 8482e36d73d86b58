"""Inputs that once broke the package (issue: adversarial inputs B1–B9).

Each test names the break it guards against. References are independent:
`tf.nn.softmax`, the NumPy reference, and MultiMax on the same row with the
excluded entries dropped.
"""

import os
import tempfile
import warnings

import keras
import numpy as np
import numpy_reference as ref
import pytest
import tensorflow as tf
from switches import fused_forward

from keras_multimax import layers
from keras_multimax import ops
from keras_multimax.convert import to_multimax

INF = np.inf
ZEROS = np.zeros(4, "float32")
# Order 2 with ts[2] > 0: σ(−inf) = −inf + ts[2]·inf would be +inf (or NaN).
RANGES = np.array([-0.5, 0.5, -0.3, 0.4], "float32")
TS_POSITIVE = np.array([0.4, 0.3, 0.5, 0.2], "float32")
TS_NEGATIVE = -TS_POSITIVE
EPS32 = float(np.finfo(np.float32).eps)


def _modes():
    """The three ways a forward is built: eager, plain-op graph, fused graph."""

    def eager(fn, *args):
        return fn(*args)

    def graph(fn, *args):
        return tf.function(fn)(*args)

    def fused(fn, *args):
        with fused_forward():
            return tf.function(fn)(*args)

    return {"eager": eager, "graph": graph, "fused": fused}


MODES = _modes()


def _value_and_grads(x, ranges, ts, fn=ops.multimax, weights=None):
    x, ranges, ts = (tf.constant(v, tf.float32) for v in (x, ranges, ts))
    weights = tf.range(1.0, 1.0 + x.shape[-1]) if weights is None else weights

    def run(x, ranges, ts):
        with tf.GradientTape() as tape:
            tape.watch([x, ranges, ts])
            y = fn(x, ranges, ts)
            # d loss / d y = weights, also where y = ±inf (seglu).
            loss = tf.reduce_sum(y * weights)
        return (y, *tape.gradient(loss, [x, ranges, ts]))

    return run, (x, ranges, ts)


# -- B1: −inf and huge entries ----------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "row",
    [[-INF, 1.0, 2.0], [1e20, 1.0, 2.0], [-1e20, 1.0, 2.0], [3e38, -3e38, 0.0]],
    ids=["neg_inf", "huge", "neg_huge", "extremes"],
)
def test_ts_zero_is_softmax_with_extreme_entries(mode, row):
    run, args = _value_and_grads([row], ZEROS, ZEROS)
    y, *grads = MODES[mode](run, *args)
    expected = tf.nn.softmax(tf.constant([row], tf.float32)).numpy()
    assert np.all(np.isfinite(expected))
    # One SoftMax of the same float32 input: a few ulps of the largest prob.
    np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=8 * EPS32)
    for g in grads:
        assert np.all(np.isfinite(g.numpy())), g


def test_bfloat16_huge_negative_at_ts_zero():
    x = tf.constant([[-1e20, 1.0, 2.0]], tf.bfloat16)
    y = ops.multimax(x, ZEROS, ZEROS)
    assert y.dtype == tf.bfloat16
    expected = tf.nn.softmax(tf.cast(x, tf.float32)).numpy()
    # Rounded once to bfloat16 (8 bits of mantissa): half an ulp of 1.
    bf16_eps = 2.0**-7
    np.testing.assert_allclose(
        tf.cast(y, tf.float32).numpy(), expected, atol=bf16_eps / 2
    )


@pytest.mark.parametrize("mode", MODES)
def test_seglu_is_identity_at_ts_zero_for_extreme_entries(mode):
    row = [[-INF, INF, 1e20, -1e20, 0.5]]
    run, args = _value_and_grads(row, ZEROS, ZEROS, fn=ops.seglu, weights=tf.ones(5))
    y, gx, gr, gt = MODES[mode](run, *args)
    np.testing.assert_array_equal(y.numpy(), np.array(row, "float32"))
    np.testing.assert_array_equal(gx.numpy(), np.ones((1, 5), "float32"))
    for g in (gr, gt):
        assert np.all(np.isfinite(g.numpy())), g


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ts", [TS_POSITIVE, TS_NEGATIVE], ids=["ts+", "ts-"])
def test_negative_infinity_is_excluded_whatever_the_sign_of_ts(mode, ts):
    row = np.array([[-INF, 0.3, -1.2, -INF, 2.0]], "float32")
    kept = np.isfinite(row[0])
    run, args = _value_and_grads(row, RANGES, ts)
    y, gx, gr, gt = MODES[mode](run, *args)
    y, gx = y.numpy(), gx.numpy()
    assert np.all(y[0, ~kept] == 0.0)
    assert np.all(gx[0, ~kept] == 0.0)
    # The kept entries get MultiMax of the row with the −inf entries dropped.
    dropped = ref.multimax(row[:, kept], RANGES, ts)
    np.testing.assert_allclose(y[:, kept], dropped, rtol=0, atol=16 * EPS32)
    run_d, args_d = _value_and_grads(
        row[:, kept], RANGES, ts, weights=tf.constant([2.0, 3.0, 5.0])
    )
    _, gx_d, gr_d, gt_d = run_d(*args_d)
    # Gradients of a 3-entry MultiMax: sums of a few products of O(1) terms.
    np.testing.assert_allclose(gx[0, kept], gx_d.numpy()[0], atol=64 * EPS32)
    np.testing.assert_allclose(gr.numpy(), gr_d.numpy(), atol=64 * EPS32)
    np.testing.assert_allclose(gt.numpy(), gt_d.numpy(), atol=64 * EPS32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ts", [ZEROS, TS_POSITIVE, TS_NEGATIVE], ids=["0", "+", "-"])
def test_fully_excluded_rows_give_zeros(mode, ts):
    x = np.array([[-INF, -INF, -INF], [0.5, -INF, 1.0]], "float32")
    run, args = _value_and_grads(x, RANGES, ts)
    y, gx, gr, gt = MODES[mode](run, *args)
    np.testing.assert_array_equal(y.numpy()[0], np.zeros(3, "float32"))
    np.testing.assert_array_equal(gx.numpy()[0], np.zeros(3, "float32"))
    assert y.numpy()[1, 1] == 0.0
    np.testing.assert_allclose(y.numpy()[1].sum(), 1.0, atol=4 * EPS32)
    for g in (gr, gt):
        assert np.all(np.isfinite(g.numpy()))


def test_xla_compiled_model_excludes_negative_infinity():
    fn = tf.function(lambda x: ops.multimax(x, RANGES, TS_POSITIVE), jit_compile=True)
    y = fn(tf.constant([[-INF, -INF], [-INF, 1.0]])).numpy()
    np.testing.assert_array_equal(y, [[0.0, 0.0], [0.0, 1.0]])


def test_to_multimax_of_a_model_fed_negative_infinity():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Softmax()(inputs))
    new = to_multimax(model, replace_softmax=True)
    x = np.array([[-INF, 1.0, 2.0], [0.0, -INF, 0.0]], "float32")
    # ts = 0 after conversion: the same SoftMax of the same float32 input.
    np.testing.assert_allclose(new(x), model(x), rtol=0, atol=8 * EPS32)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(new(x))))


# -- B2: gradients when the parameters broadcast x up -------------------------


@pytest.mark.parametrize("fn", [ops.multimax, ops.seglu], ids=["multimax", "seglu"])
def test_gradient_shape_with_unknown_dims_and_broadcasting_parameters(fn):
    rng = np.random.default_rng(0)
    ranges = tf.constant(rng.normal(size=(5, 4)), tf.float32)
    ts = tf.constant(0.3 * rng.normal(size=(5, 4)), tf.float32)
    weights = tf.constant(rng.normal(size=(2, 5)), tf.float32)

    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fn(x, ranges, ts) * weights)
        return tape.gradient(loss, x)

    x = tf.constant([[0.3], [-0.9]])
    eager = gradient(x)
    traced = tf.function(gradient, input_signature=[tf.TensorSpec([None, None])])
    graph = traced(x)
    assert eager.shape == (2, 1)
    assert graph.shape == (2, 1)
    # Same kernels, same order of summation over the 5 broadcast entries.
    np.testing.assert_allclose(graph.numpy(), eager.numpy(), rtol=4 * EPS32)
    # Independent check: the gradient of x is the sum over its 5 copies.
    x_up = tf.broadcast_to(x, (2, 5))
    with tf.GradientTape() as tape:
        tape.watch(x_up)
        loss = tf.reduce_sum(fn(x_up, ranges, ts) * weights)
    summed = tf.reduce_sum(tape.gradient(loss, x_up), axis=1, keepdims=True)
    np.testing.assert_allclose(graph.numpy(), summed.numpy(), rtol=16 * EPS32)


# -- B3: masks that cannot broadcast, shapes known only at run time -----------


def test_mask_that_cannot_broadcast_fails_when_the_graph_runs():
    fn = tf.function(
        lambda x, m: ops.multimax(x, ZEROS, ZEROS, mask=m),
        input_signature=[
            tf.TensorSpec([None, None]),
            tf.TensorSpec([None, None], tf.bool),
        ],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="`mask` must be broad"):
        fn(tf.ones([2, 1]), tf.ones([2, 3], tf.bool))
    # Positive control: a mask that broadcasts runs and masks.
    y = fn(tf.ones([2, 3]), tf.constant([[True, False, True]] * 2)).numpy()
    np.testing.assert_allclose(y, [[0.5, 0.0, 0.5]] * 2, atol=4 * EPS32)
    y = fn(tf.ones([2, 3]), tf.constant([[True], [False]])).numpy()
    np.testing.assert_allclose(y, [[1 / 3] * 3, [0.0] * 3], atol=4 * EPS32)


def test_mask_of_unknown_rank_is_rejected():
    fn = tf.function(
        lambda m: ops.multimax(tf.ones([2, 3]), ZEROS, ZEROS, mask=m),
        input_signature=[tf.TensorSpec(None, tf.bool)],
    )
    with pytest.raises(ValueError, match="`mask` must have a known rank"):
        fn.get_concrete_function()


# -- B4: None arguments ------------------------------------------------------


@pytest.mark.parametrize("name", ["x", "ranges", "ts"])
@pytest.mark.parametrize("fn", [ops.multimax, ops.seglu], ids=["multimax", "seglu"])
def test_none_arguments_are_named(fn, name):
    args = {"x": [[1.0, 2.0]], "ranges": ZEROS, "ts": ZEROS, name: None}
    with pytest.raises(TypeError, match=f"`{name}` must be a floating-point tensor"):
        fn(**args)


def test_mask_holding_none_is_named():
    with pytest.raises(TypeError, match="`mask` could not be converted"):
        ops.multimax([[1.0, 2.0]], ZEROS, ZEROS, mask=[[True, None]])


# -- B5: attention on inputs without a sequence axis --------------------------


@pytest.mark.parametrize(
    "layer",
    [
        lambda: layers.MultiMaxAttention(2, 4),
        lambda: layers.MultiMaxGroupQueryAttention(4, 2, 1),
    ],
    ids=["mha", "gqa"],
)
def test_rank_two_query_names_the_query(layer):
    x = np.zeros((2, 8), "float32")
    with pytest.raises(ValueError, match=r"`query`.*query.shape=\(2, 8\) \(rank 2\)"):
        layer()(x, x)


def test_group_query_attention_rejects_rank_four():
    x = np.zeros((2, 3, 3, 8), "float32")
    with pytest.raises(ValueError, match=r"exactly 3 .*rank 4"):
        layers.MultiMaxGroupQueryAttention(4, 2, 1)(x, x)


# -- B6: weights files of SoftMax models ------------------------------------


def _attention_model(cls):
    inputs = keras.Input((5, 8))
    x = cls(num_heads=2, key_dim=4)(inputs, inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def test_softmax_weights_file_is_refused_with_the_route():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mha.weights.h5")
        _attention_model(keras.layers.MultiHeadAttention).save_weights(path)
        twin = _attention_model(layers.MultiMaxAttention)
        with pytest.raises(ValueError, match="to_multimax"):
            twin.load_weights(path)
        # skip_mismatch=True is Keras' "warn instead": the warning says why.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            twin.load_weights(path, skip_mismatch=True)
        assert any("to_multimax" in str(w.message) for w in caught)
        # Positive control: MultiMax weights files still load, exactly.
        own = os.path.join(tmp, "mm.weights.h5")
        source = _attention_model(layers.MultiMaxAttention)
        source.save_weights(own)
        twin.load_weights(own)
        for a, b in zip(source.weights, twin.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


# -- B9: NumPy integers -------------------------------------------------------


def test_numpy_integer_axis_and_order():
    x = np.array([[1.0, 2.0, 0.5]], "float32")
    expected = ops.multimax(x, RANGES, TS_POSITIVE, axis=1).numpy()
    np.testing.assert_array_equal(
        ops.multimax(x, RANGES, TS_POSITIVE, axis=np.int64(1)).numpy(), expected
    )
    np.testing.assert_array_equal(
        ops.multimax(x, RANGES, TS_POSITIVE, axis=(np.int32(-1),)).numpy(), expected
    )
    for layer in (
        layers.MultiMax(axis=np.int64(1), order=np.int64(2)),
        layers.SegLU(order=np.int64(2)),
        layers.MultiMaxAttention(2, 4, order=np.int64(2)),
    ):
        config = layer.get_config()
        assert type(config["order"]) is int
        if "axis" in config:
            assert type(config["axis"]) is int
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layers.MultiMax(axis=np.int64(-1))(inputs))
    with tempfile.TemporaryDirectory() as tmp:
        model.save(os.path.join(tmp, "m.keras"))  # the config is JSON
