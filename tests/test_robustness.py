"""Inputs that once broke the package (issue: adversarial inputs B1–B9).

Each test names the break it guards against. References are independent:
`keras.ops.softmax`, the NumPy reference, and MultiMax on the same row with
the excluded entries dropped. The breaks that need TensorFlow graphs of
unknown shape (B2, B3) are in test_backend_tensorflow.py.
"""

import os
import tempfile
import warnings

import keras
import numpy as np
import numpy_reference as ref
import pytest
from backend_helpers import DEFAULT_MODE
from backend_helpers import MODES
from backend_helpers import to_numpy
from backend_helpers import traced
from backend_helpers import value_and_gradients
from tolerances import EPS

from keras_multimax import Modulator
from keras_multimax import layers
from keras_multimax import ops
from keras_multimax.convert import to_multimax

INF = np.inf
ZEROS = np.zeros(4, "float32")
# Order 2 with ts[2] > 0: σ(−inf) = −inf + ts[2]·inf would be +inf (or NaN).
RANGES = np.array([-0.5, 0.5, -0.3, 0.4], "float32")
TS_POSITIVE = np.array([0.4, 0.3, 0.5, 0.2], "float32")
TS_NEGATIVE = -TS_POSITIVE
EPS32 = EPS["float32"]


def _value_and_grads(x, ranges, ts, mode, fn=ops.multimax, weights=None):
    """``fn`` and the gradients of ``sum(fn · weights)`` (float32), as NumPy.

    d loss / d y = weights, also where y = ±inf (seglu).
    """
    x, ranges, ts = (np.asarray(v, "float32") for v in (x, ranges, ts))
    weights = np.arange(1.0, 1.0 + x.shape[-1]) if weights is None else weights
    y, grads = value_and_gradients(fn, x, ranges, ts, upstream=weights, mode=mode)
    return (to_numpy(y), *grads)


# -- B1: −inf and huge entries ----------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "row",
    [[-INF, 1.0, 2.0], [1e20, 1.0, 2.0], [-1e20, 1.0, 2.0], [3e38, -3e38, 0.0]],
    ids=["neg_inf", "huge", "neg_huge", "extremes"],
)
def test_ts_zero_is_softmax_with_extreme_entries(mode, row):
    y, *grads = _value_and_grads([row], ZEROS, ZEROS, mode)
    expected = to_numpy(keras.ops.softmax(np.array([row], "float32")))
    assert np.all(np.isfinite(expected))
    # One SoftMax of the same float32 input: a few ulps of the largest prob.
    np.testing.assert_allclose(y, expected, rtol=0, atol=8 * EPS32)
    for g in grads:
        assert np.all(np.isfinite(g)), g


def test_bfloat16_huge_negative_at_ts_zero():
    x = keras.ops.convert_to_tensor([[-1e20, 1.0, 2.0]], "bfloat16")
    y = ops.multimax(x, ZEROS, ZEROS)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    expected = to_numpy(keras.ops.softmax(keras.ops.cast(x, "float32")))
    # Rounded once to bfloat16 (8 bits of mantissa): half an ulp of 1.
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(y, "float32")), expected, atol=EPS["bfloat16"] / 2
    )


@pytest.mark.parametrize("mode", MODES)
def test_seglu_is_identity_at_ts_zero_for_extreme_entries(mode):
    row = [[-INF, INF, 1e20, -1e20, 0.5]]
    y, gx, gr, gt = _value_and_grads(
        row, ZEROS, ZEROS, mode, fn=ops.seglu, weights=np.ones(5)
    )
    np.testing.assert_array_equal(y, np.array(row, "float32"))
    np.testing.assert_array_equal(gx, np.ones((1, 5), "float32"))
    for g in (gr, gt):
        assert np.all(np.isfinite(g)), g


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ts", [TS_POSITIVE, TS_NEGATIVE], ids=["ts+", "ts-"])
def test_negative_infinity_is_excluded_whatever_the_sign_of_ts(mode, ts):
    row = np.array([[-INF, 0.3, -1.2, -INF, 2.0]], "float32")
    kept = np.isfinite(row[0])
    y, gx, gr, gt = _value_and_grads(row, RANGES, ts, mode)
    assert np.all(y[0, ~kept] == 0.0)
    assert np.all(gx[0, ~kept] == 0.0)
    # The kept entries get MultiMax of the row with the −inf entries dropped.
    dropped = ref.multimax(row[:, kept], RANGES, ts)
    np.testing.assert_allclose(y[:, kept], dropped, rtol=0, atol=16 * EPS32)
    _, gx_d, gr_d, gt_d = _value_and_grads(
        row[:, kept], RANGES, ts, DEFAULT_MODE, weights=np.array([2.0, 3.0, 5.0])
    )
    # Gradients of a 3-entry MultiMax: sums of a few products of O(1) terms.
    np.testing.assert_allclose(gx[0, kept], gx_d[0], atol=64 * EPS32)
    np.testing.assert_allclose(gr, gr_d, atol=64 * EPS32)
    np.testing.assert_allclose(gt, gt_d, atol=64 * EPS32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ts", [ZEROS, TS_POSITIVE, TS_NEGATIVE], ids=["0", "+", "-"])
def test_fully_excluded_rows_give_zeros(mode, ts):
    x = np.array([[-INF, -INF, -INF], [0.5, -INF, 1.0]], "float32")
    y, gx, gr, gt = _value_and_grads(x, RANGES, ts, mode)
    np.testing.assert_array_equal(y[0], np.zeros(3, "float32"))
    np.testing.assert_array_equal(gx[0], np.zeros(3, "float32"))
    assert y[1, 1] == 0.0
    np.testing.assert_allclose(y[1].sum(), 1.0, atol=4 * EPS32)
    for g in (gr, gt):
        assert np.all(np.isfinite(g))


@pytest.mark.only_backend(
    "tensorflow",
    reason="jit_compile=True is a TensorFlow path of its own; on JAX the "
    "traced mode of the tests above is XLA already",
)
def test_xla_compiled_model_excludes_negative_infinity():
    fn = traced(lambda x: ops.multimax(x, RANGES, TS_POSITIVE), xla=True)
    y = to_numpy(fn(np.array([[-INF, -INF], [-INF, 1.0]], "float32")))
    np.testing.assert_array_equal(y, [[0.0, 0.0], [0.0, 1.0]])


def test_to_multimax_of_a_model_fed_negative_infinity():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Softmax()(inputs))
    new = to_multimax(model, replace_softmax=True)
    x = np.array([[-INF, 1.0, 2.0], [0.0, -INF, 0.0]], "float32")
    # ts = 0 after conversion: the same SoftMax of the same float32 input.
    np.testing.assert_allclose(
        to_numpy(new(x)), to_numpy(model(x)), rtol=0, atol=8 * EPS32
    )
    assert np.all(np.isfinite(to_numpy(new(x))))


# -- B4: None arguments ------------------------------------------------------


def test_mask_holding_none_is_named():
    # TensorFlow cannot convert the list; JAX makes an object array.
    with pytest.raises(
        TypeError, match=r"`mask` (could not be converted|must be bool)"
    ):
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
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


# -- B9: NumPy integers -------------------------------------------------------


def test_numpy_integer_axis_and_order():
    x = np.array([[1.0, 2.0, 0.5]], "float32")
    expected = to_numpy(ops.multimax(x, RANGES, TS_POSITIVE, axis=1))
    for axis in (np.int64(1), (np.int32(-1),)):
        np.testing.assert_array_equal(
            to_numpy(ops.multimax(x, RANGES, TS_POSITIVE, axis=axis)), expected
        )
    modulator = Modulator(order=np.int64(2))
    assert type(modulator.order) is int
    for layer in (
        layers.MultiMax(axis=np.int64(1), modulator=modulator),
        layers.SegLU(modulator=modulator),
        layers.MultiMaxAttention(2, 4, modulator=modulator),
    ):
        config = layer.get_config()
        assert type(config["modulator"]["config"]["order"]) is int
        if "axis" in config:
            assert type(config["axis"]) is int
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layers.MultiMax(axis=np.int64(-1))(inputs))
    with tempfile.TemporaryDirectory() as tmp:
        model.save(os.path.join(tmp, "m.keras"))  # the config is JSON
