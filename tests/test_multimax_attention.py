"""Tests of `MultiMaxAttention` against a NumPy attention built from its weights."""

import keras
import numpy as np
import numpy_reference as ref
import pytest
from layer_test_case import run_layer_test

from keras_multimax import layers

RNG = np.random.default_rng(11)
X = RNG.normal(size=(2, 5, 8)).astype("float32")
Y = RNG.normal(size=(2, 6, 8)).astype("float32")
# Thresholds inside the range of the scores and slopes large enough that
# MultiMax is far from SoftMax (and of both signs).
RANGES = np.array([0.1, -0.1, 0.3, -0.2], "float32")
TS = np.array([0.9, -0.6, 0.4, 0.5], "float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


def numpy_attention(
    layer,
    query,
    value,
    key=None,
    mask=None,
    causal=False,
    dropout_mask=None,
):
    """MultiMax attention in float64 NumPy from `layer`'s own weights.

    Independent of the layer's code path: projections with `np.einsum`,
    attention axes flattened to one query and one key axis, MultiMax from
    `numpy_reference`. `mask` is given in flattened coordinates
    (broadcastable to ``(<batch dims>, T, S)``); `dropout_mask` multiplies
    the weights (before the value product), broadcast to the scores' shape.
    Returns (output, scores) with scores in the layer's layout.
    """
    key = value if key is None else key
    f64 = lambda w: np.asarray(_np(w), np.float64)  # noqa: E731

    def project(dense, x):
        out = np.einsum("...d,dnh->...nh", np.asarray(x, np.float64), f64(dense.kernel))
        if layer._use_bias:
            out = out + f64(dense.bias)
        return out

    q, k, v = (
        project(layer._query_dense, query),
        project(layer._key_dense, key),
        project(layer._value_dense, value),
    )
    rank = q.ndim
    axes = tuple(layer._attention_axes)
    batch = [i for i in range(rank - 2) if i not in axes]
    perm = batch + [rank - 2] + list(axes) + [rank - 1]

    def flatten(t):
        t = np.transpose(t, perm)
        lead = t.shape[: len(batch) + 1]
        return t.reshape(lead + (-1, t.shape[-1]))

    qf, kf, vf = flatten(q), flatten(k), flatten(v)
    scores = np.einsum("...nth,...nsh->...nts", qf, kf) / np.sqrt(layer._key_dim)
    ranges, ts = f64(layer.ranges), f64(layer.ts)
    if layer.per_head:
        ranges, ts = ranges[:, None, None, :], ts[:, None, None, :]
    full = np.ones(scores.shape, bool)
    if mask is not None:
        m = np.asarray(mask, bool)
        full &= m[..., None, :, :] if m.ndim >= 2 else m
    if causal:
        full &= np.tril(np.ones(scores.shape[-2:], bool))
    if layer._sliding_window is not None:
        i, j = np.indices(scores.shape[-2:])
        full &= np.abs(i - j) < layer._sliding_window
    probs = ref.multimax(scores, ranges, ts, axis=-1, mask=full)
    weights = probs if dropout_mask is None else probs * dropout_mask
    o = np.einsum("...nts,...nsh->...nth", weights, vf)
    # Back to (B, <dims>, N, H).
    q_shape_perm = tuple(q.shape[i] for i in perm)
    o = o.reshape(q_shape_perm[:-1] + (o.shape[-1],))
    o = np.transpose(o, np.argsort(perm))
    if layer._use_gate:
        g = project(layer._gate_dense, query)
        o = o * (1.0 / (1.0 + np.exp(-g)))
    out = np.tensordot(o, f64(layer._output_dense.kernel), axes=([-2, -1], [0, 1]))
    if layer._use_bias:
        out = out + f64(layer._output_dense.bias)
    q_dims = [q.shape[a] for a in axes]
    k_dims = [k.shape[a] for a in axes]
    scores_shape = probs.shape[:-2] + tuple(q_dims) + tuple(k_dims)
    return out, probs.reshape(scores_shape)


def _built(query=X, value=X, ts=TS, ranges=RANGES, **kwargs):
    layer = layers.MultiMaxAttention(**{"num_heads": 2, "key_dim": 4, **kwargs})
    layer(query, value)
    n = layer.ranges.shape
    layer.ranges.assign(np.broadcast_to(ranges, n))
    layer.ts.assign(np.broadcast_to(ts, n))
    return layer


def _softmax_twin(layer, query=X, value=X):
    """A `keras.layers.MultiHeadAttention` with the same projection weights."""
    config = layer.get_config()
    for k in ("per_head", "order", "name") + tuple(
        k for k in config if k.startswith(("ranges_", "ts_"))
    ):
        config.pop(k)
    twin = keras.layers.MultiHeadAttention.from_config(config)
    twin(query, value)
    for name in ("_query_dense", "_key_dense", "_value_dense", "_output_dense"):
        getattr(twin, name).set_weights(getattr(layer, name).get_weights())
    if layer._use_gate:
        twin._gate_dense.set_weights(layer._gate_dense.get_weights())
    return twin


# ---------------------------------------------------------------------------
# Standard layer checks (config, symbolic/eager, training step, .keras, mixed)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "init_kwargs",
    [
        {"num_heads": 2, "key_dim": 4},
        {"num_heads": 2, "key_dim": 4, "order": 1, "per_head": True},
        {
            "num_heads": 2,
            "key_dim": 2,
            "value_dim": 3,
            "use_bias": False,
            "ts_regularizer": "l2",
            "ranges_constraint": "non_neg",
        },
    ],
    ids=["default", "order1_per_head", "no_bias_regularized"],
)
def test_standard_checks(init_kwargs):
    run_layer_test(
        layers.MultiMaxAttention,
        init_kwargs,
        {"query": X, "value": Y},
        expected_output_shape=X.shape,
        expected_num_trainable_weights=10 if init_kwargs.get("use_bias", True) else 6,
    )


# ---------------------------------------------------------------------------
# Every call path computes MultiMax attention
# ---------------------------------------------------------------------------

CAUSAL = np.tril(np.ones((5, 5), bool))
PAD = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], bool)[:, None, :]


@pytest.mark.parametrize("return_scores", [False, True], ids=["fused", "scores"])
@pytest.mark.parametrize(
    "case",
    ["plain", "cross", "attention_mask", "causal", "causal_and_mask"],
)
def test_paths_equal_numpy(case, return_scores):
    value = Y if case in ("cross", "attention_mask") else X
    layer = _built(value=value)
    kwargs, np_kwargs = {}, {}
    if case == "attention_mask":
        kwargs["attention_mask"] = np_kwargs["mask"] = PAD
    if case in ("causal", "causal_and_mask"):
        kwargs["use_causal_mask"] = np_kwargs["causal"] = True
    if case == "causal_and_mask":
        extra = np.ones((2, 5, 5), bool)
        extra[0, 3, 1] = extra[1, 4, 0] = False
        kwargs["attention_mask"] = np_kwargs["mask"] = extra
    result = layer(X, value, return_attention_scores=return_scores, **kwargs)
    expected, expected_scores = numpy_attention(layer, X, value, **np_kwargs)
    out = result[0] if return_scores else result
    np.testing.assert_allclose(_np(out), expected, rtol=1e-5, atol=2e-6)
    if return_scores:
        np.testing.assert_allclose(_np(result[1]), expected_scores, atol=2e-6)

    # Same weights, SoftMax: clearly different; with ts = 0: the same.
    twin = _softmax_twin(layer, X, value)
    softmax_out = _np(twin(X, value, **kwargs))
    assert np.max(np.abs(_np(out) - softmax_out)) > 1e-3
    layer.ts.assign(np.zeros_like(TS))
    np.testing.assert_allclose(_np(layer(X, value, **kwargs)), softmax_out, atol=1e-6)


def test_masked_keys_get_exactly_zero_weight_for_both_signs_of_ts():
    for sign in (1.0, -1.0):
        layer = _built(value=Y, ts=sign * np.abs(TS) * 5)
        _, scores = layer(X, Y, attention_mask=PAD, return_attention_scores=True)
        scores = _np(scores)
        mask = np.broadcast_to(PAD[:, None], scores.shape)
        assert np.all(scores[~mask] == 0.0)
        np.testing.assert_allclose(scores.sum(-1), 1.0, atol=1e-6)


def test_flash_attention_true_is_rejected():
    with pytest.raises(ValueError, match="flash_attention=True"):
        layers.MultiMaxAttention(num_heads=2, key_dim=4, flash_attention=True)
