"""Tests of `MultiMaxGroupQueryAttention` against NumPy built from its weights."""

import keras
import numpy as np
import numpy_reference as ref
import pytest
from backend_helpers import to_numpy
from backend_helpers import variable_gradients
from layer_test_case import assert_positional_drop_in
from layer_test_case import paper_modulator
from layer_test_case import run_layer_test

from keras_multimax import Modulator
from keras_multimax import layers

RNG = np.random.default_rng(23)
X = RNG.normal(size=(2, 5, 8)).astype("float32")
Y = RNG.normal(size=(2, 6, 8)).astype("float32")
RANGES = np.array([0.1, -0.1, 0.3, -0.2], "float32")
TS = np.array([0.9, -0.6, 0.4, 0.5], "float32")
PAD = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], bool)[:, None, :]
SUBLAYERS = ("_query_dense", "_key_dense", "_value_dense", "_output_dense")


def numpy_gqa(layer, query, value, key=None, mask=None, causal=False, keep=None):
    """Grouped-query MultiMax attention in float64 NumPy from `layer`'s weights.

    Returns (output, scores); `keep` multiplies the weights (dropout stand-in).
    """
    key = value if key is None else key
    f64 = lambda w: np.asarray(to_numpy(w), np.float64)  # noqa: E731

    def project(dense, x):
        out = np.einsum("btd,dnh->btnh", np.asarray(x, np.float64), f64(dense.kernel))
        return out + f64(dense.bias) if layer.use_bias else out

    q = project(layer._query_dense, query)
    k = np.repeat(project(layer._key_dense, key), layer.num_repeats, axis=2)
    v = np.repeat(project(layer._value_dense, value), layer.num_repeats, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(layer.head_dim)
    full = np.ones(scores.shape, bool)
    if mask is not None:
        full &= np.asarray(mask, bool)[:, None]
    if causal:
        full &= np.tril(np.ones(scores.shape[-2:], bool))
    if layer.sliding_window is not None:
        i, j = np.indices(scores.shape[-2:])
        full &= np.abs(i - j) < layer.sliding_window
    ranges, ts = f64(layer.ranges), f64(layer.ts)
    if layer.per_head:
        ranges, ts = ranges[:, None, None, :], ts[:, None, None, :]
    probs = ref.multimax(scores, ranges, ts, axis=-1, mask=full)
    weights = probs if keep is None else probs * keep
    o = np.einsum("bnts,bsnh->btnh", weights, v)
    if layer.use_gate:
        o = o / (1.0 + np.exp(-project(layer._gate_dense, query)))
    out = np.einsum("btnh,nhm->btm", o, f64(layer._output_dense.kernel))
    if layer.use_bias:
        out = out + f64(layer._output_dense.bias)
    return out, probs


def _built(value=X, ranges=RANGES, ts=TS, **kwargs):
    config = {"head_dim": 4, "num_query_heads": 4, "num_key_value_heads": 2}
    layer = layers.MultiMaxGroupQueryAttention(**{**config, **kwargs})
    layer(X, value)
    layer.ranges.assign(np.broadcast_to(ranges, layer.ranges.shape))
    layer.ts.assign(np.broadcast_to(ts, layer.ts.shape))
    return layer


def _softmax_twin(layer, value=X):
    config = {
        k: v
        for k, v in layer.get_config().items()
        if k not in ("per_head", "modulator", "name")
    }
    twin = keras.layers.GroupQueryAttention.from_config(config)
    twin(X, value)
    names = SUBLAYERS + (("_gate_dense",) if layer.use_gate else ())
    for name in names:
        getattr(twin, name).set_weights(getattr(layer, name).get_weights())
    return twin


@pytest.mark.parametrize(
    "init_kwargs, n_weights",
    [
        ({"num_key_value_heads": 1, "per_head": True, "use_gate": True}, 12),
        (
            {
                "use_bias": False,
                "modulator": paper_modulator(order=3, ts_regularizer="l2"),
            },
            6,
        ),
    ],
    ids=["mqa_per_head_gate", "no_bias_order3"],
)
def test_standard_checks(init_kwargs, n_weights):
    run_layer_test(
        layers.MultiMaxGroupQueryAttention,
        {
            "head_dim": 4,
            "num_query_heads": 4,
            "num_key_value_heads": 2,
            "modulator": paper_modulator(),
            **init_kwargs,
        },
        {"query": X, "value": Y},
        expected_output_shape=X.shape,
        expected_num_trainable_weights=n_weights,
    )


@pytest.mark.parametrize("return_scores", [False, True], ids=["fused", "scores"])
@pytest.mark.parametrize(
    "case",
    [
        "plain",
        "cross_mask",
        "causal",
        "causal_and_mask",
        "gate",
        "sliding_window",
        "mqa_per_head",
    ],
)
def test_paths_equal_numpy(case, return_scores):
    value = Y if case == "cross_mask" else X
    kwargs, call_kwargs, np_kwargs = {}, {}, {}
    if case == "gate":
        kwargs["use_gate"] = True
    if case == "sliding_window":
        kwargs["sliding_window"] = 2
        call_kwargs["use_causal_mask"] = np_kwargs["causal"] = True
    if case == "mqa_per_head":
        kwargs.update(num_key_value_heads=1, per_head=True)
        kwargs["ts"] = TS * np.array([[1.0], [-1.0], [0.5], [2.0]])
    if case == "cross_mask":
        call_kwargs["attention_mask"] = np_kwargs["mask"] = PAD
    if case in ("causal", "causal_and_mask"):
        call_kwargs["use_causal_mask"] = np_kwargs["causal"] = True
    if case == "causal_and_mask":
        extra = np.ones((2, 5, 5), bool)
        extra[0, 3, 1] = extra[1, 4, 0] = False
        call_kwargs["attention_mask"] = np_kwargs["mask"] = extra
    layer = _built(value=value, **kwargs)
    result = layer(X, value, return_attention_scores=return_scores, **call_kwargs)
    out = result[0] if return_scores else result
    expected, expected_scores = numpy_gqa(layer, X, value, **np_kwargs)
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-5, atol=2e-6)
    if return_scores:
        np.testing.assert_allclose(to_numpy(result[1]), expected_scores, atol=2e-6)

    twin = _softmax_twin(layer, value)
    softmax_out = to_numpy(twin(X, value, **call_kwargs))
    assert np.max(np.abs(to_numpy(out) - softmax_out)) > 1e-3
    layer.ts.assign(np.zeros(layer.ts.shape))
    np.testing.assert_allclose(
        to_numpy(layer(X, value, **call_kwargs)), softmax_out, atol=1e-6
    )


# keras.layers.GroupQueryAttention itself passes the masked inputs on to its
# projections, which warn that they drop the mask.
@pytest.mark.filterwarnings("ignore:Layer '(query|key|value)':UserWarning")
def test_keras_masks_and_zero_weight_on_masked_keys():
    tokens_q = np.array([[1, 2, 3, 0, 0], [3, 3, 1, 1, 2]])
    tokens_v = np.array([[5, 4, 0, 0, 0, 0], [3, 1, 2, 2, 0, 1]])
    query = keras.layers.Embedding(4, 8, mask_zero=True)(tokens_q)
    value = keras.layers.Embedding(6, 8, mask_zero=True)(tokens_v)
    layer = _built(value=Y, ts=-5 * np.abs(TS))  # negative slopes
    out, scores = layer(query, value, return_attention_scores=True)
    mask = (tokens_q > 0)[:, :, None] & (tokens_v > 0)[:, None, :]
    expected, expected_scores = numpy_gqa(
        layer, to_numpy(query), to_numpy(value), mask=mask
    )
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(to_numpy(scores), expected_scores, atol=2e-6)
    assert np.all(
        to_numpy(scores)[~np.broadcast_to(mask[:, None], scores.shape)] == 0.0
    )


def test_lora_equals_numpy():
    layer = _built()
    for dense in (layer._query_dense, layer._key_dense, layer._value_dense):
        dense.enable_lora(2)
        dense.lora_kernel_b.assign(RNG.normal(size=dense.lora_kernel_b.shape))
    expected, _ = numpy_gqa(layer, X, X, causal=True)
    np.testing.assert_allclose(
        to_numpy(layer(X, X, use_causal_mask=True)), expected, rtol=1e-5, atol=2e-6
    )


class _FixedDropout(keras.layers.Layer):
    def __init__(self, keep, rate):
        super().__init__()
        self.keep, self.rate = keep, rate

    def call(self, x, training=None):
        if not training:
            return x
        return x * keras.ops.cast(self.keep, x.dtype) / (1.0 - self.rate)


def test_dropout_paths():
    layer = _built(dropout=0.3, seed=1)
    expected, _ = numpy_gqa(layer, X, X, causal=True)
    np.testing.assert_allclose(
        to_numpy(layer(X, X, use_causal_mask=True, training=False)),
        expected,
        rtol=1e-5,
        atol=2e-6,
    )
    trained = to_numpy(layer(X, X, use_causal_mask=True, training=True))
    assert np.max(np.abs(trained - expected)) > 1e-3
    keep = RNG.random(size=(2, 4, 5, 5)) > 0.3
    object.__setattr__(layer, "_dropout_layer", _FixedDropout(keep, 0.3))
    expected, _ = numpy_gqa(layer, X, X, causal=True, keep=keep / 0.7)
    np.testing.assert_allclose(
        to_numpy(layer(X, X, use_causal_mask=True, training=True)),
        expected,
        rtol=1e-5,
        atol=2e-6,
    )


@pytest.mark.parametrize("per_head", [False, True])
def test_ranges_and_ts_get_nonzero_gradients(per_head):
    layer = _built(per_head=per_head)
    _, (g_ranges, g_ts) = variable_gradients(
        lambda: layer(X, X, use_causal_mask=True) ** 2, [layer.ranges, layer.ts]
    )
    assert g_ranges.shape == layer.ranges.shape
    assert np.all(g_ranges != 0.0) and np.all(g_ts != 0.0)


def test_bad_arguments():
    base = {"head_dim": 4, "num_query_heads": 4, "num_key_value_heads": 2}
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        layers.MultiMaxGroupQueryAttention(**{**base, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="head_dim=0"):
        layers.MultiMaxGroupQueryAttention(**{**base, "head_dim": 0})
    with pytest.raises(TypeError, match="per_head=1"):
        layers.MultiMaxGroupQueryAttention(**base, per_head=1)


def test_registered_and_config_round_trip():
    assert (
        keras.saving.get_registered_name(layers.MultiMaxGroupQueryAttention)
        == "keras_multimax>MultiMaxGroupQueryAttention"
    )
    layer = layers.MultiMaxGroupQueryAttention(
        head_dim=4,
        num_query_heads=4,
        num_key_value_heads=2,
        per_head=True,
        modulator=Modulator(order=1),
        sliding_window=3,
    )
    config = layer.get_config()
    clone = layers.MultiMaxGroupQueryAttention.from_config(config)
    assert clone.get_config() == config
    clone(X, X)
    assert tuple(clone.ts.shape) == (4, 2)


def test_parent_positional_arguments_are_accepted():
    assert_positional_drop_in(
        keras.layers.GroupQueryAttention,
        layers.MultiMaxGroupQueryAttention,
        {
            "head_dim": 4,
            "num_query_heads": 4,
            "num_key_value_heads": 2,
            "dropout": 0.1,
            "use_bias": False,
            "sliding_window": 3,
            "flash_attention": False,
            "kernel_initializer": "he_normal",
            "bias_initializer": "ones",
            "kernel_regularizer": "l2",
            "bias_regularizer": "l1",
            "activity_regularizer": "l1",
            "kernel_constraint": "non_neg",
            "bias_constraint": "unit_norm",
            "use_gate": True,
            "seed": 7,
        },
    )
