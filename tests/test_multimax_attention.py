"""Tests of `MultiMaxAttention` against a NumPy attention built from its weights."""

import keras
import numpy as np
import numpy_reference as ref
import pytest
from backend_helpers import float64
from backend_helpers import to_numpy
from backend_helpers import traced
from backend_helpers import variable_gradients
from layer_test_case import assert_positional_drop_in
from layer_test_case import paper_modulator
from layer_test_case import run_layer_test
from plain_formula import plain_seglu

from keras_multimax import Modulator
from keras_multimax import layers

RNG = np.random.default_rng(11)
X = RNG.normal(size=(2, 5, 8)).astype("float32")
Y = RNG.normal(size=(2, 6, 8)).astype("float32")
# Thresholds inside the range of the scores and slopes large enough that
# MultiMax is far from SoftMax (and of both signs).
RANGES = np.array([0.1, -0.1, 0.3, -0.2], "float32")
TS = np.array([0.9, -0.6, 0.4, 0.5], "float32")


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
    f64 = lambda w: np.asarray(to_numpy(w), np.float64)  # noqa: E731

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
    for k in ("per_head", "modulator", "name"):
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
        {"num_heads": 2, "key_dim": 4, "modulator": paper_modulator()},
        {
            "num_heads": 2,
            "key_dim": 2,
            "value_dim": 3,
            "use_bias": False,
            "per_head": True,
            "modulator": paper_modulator(
                order=1, ts_regularizer="l2", ranges_constraint="non_neg"
            ),
        },
    ],
    ids=["default", "order1_per_head_no_bias_regularized"],
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
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-5, atol=2e-6)
    if return_scores:
        np.testing.assert_allclose(to_numpy(result[1]), expected_scores, atol=2e-6)

    # Same weights, SoftMax: clearly different; with ts = 0: the same.
    twin = _softmax_twin(layer, X, value)
    softmax_out = to_numpy(twin(X, value, **kwargs))
    assert np.max(np.abs(to_numpy(out) - softmax_out)) > 1e-3
    layer.ts.assign(np.zeros_like(TS))
    np.testing.assert_allclose(
        to_numpy(layer(X, value, **kwargs)), softmax_out, atol=1e-6
    )


def test_masked_keys_get_exactly_zero_weight_for_both_signs_of_ts():
    for sign in (1.0, -1.0):
        layer = _built(value=Y, ts=sign * np.abs(TS) * 5)
        _, scores = layer(X, Y, attention_mask=PAD, return_attention_scores=True)
        scores = to_numpy(scores)
        mask = np.broadcast_to(PAD[:, None], scores.shape)
        assert np.all(scores[~mask] == 0.0)
        np.testing.assert_allclose(scores.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("use_causal_mask", [False, True])
def test_keras_masks_on_query_and_value(use_causal_mask):
    tokens_q = np.array([[1, 2, 3, 0, 0], [3, 3, 1, 1, 2]])
    tokens_v = np.array([[5, 4, 0, 0, 0], [3, 1, 2, 2, 0]])
    query = keras.layers.Embedding(4, 8, mask_zero=True)(tokens_q)
    value = keras.layers.Embedding(6, 8, mask_zero=True)(tokens_v)
    layer = _built(query=to_numpy(query), value=to_numpy(value))
    out = layer(query, value, use_causal_mask=use_causal_mask)
    # The query's mask is propagated to the output, as in MultiHeadAttention.
    np.testing.assert_array_equal(to_numpy(out._keras_mask), tokens_q > 0)
    mask = (tokens_q > 0)[:, :, None] & (tokens_v > 0)[:, None, :]
    expected, _ = numpy_attention(
        layer, to_numpy(query), to_numpy(value), mask=mask, causal=use_causal_mask
    )
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize(
    "shape, attention_axes, per_head",
    [
        ((2, 3, 4, 8), (1, 2), False),
        ((2, 3, 4, 8), (1, 2), True),
        ((2, 3, 4, 8), (-2,), True),
        ((2, 2, 3, 2, 8), (2, 3), False),
    ],
    ids=["2axes", "2axes_per_head", "axis_minus2_per_head", "5d_2axes"],
)
@pytest.mark.parametrize("with_mask", [False, True])
def test_multi_axis_attention_equals_numpy(shape, attention_axes, per_head, with_mask):
    x = RNG.normal(size=shape).astype("float32")
    layer = _built(
        query=x,
        value=x,
        attention_axes=attention_axes,
        per_head=per_head,
        ranges=RANGES,
        ts=TS * np.array([[1.0], [-0.5]]) if per_head else TS,
    )
    kwargs, np_kwargs = {}, {}
    if with_mask:
        # Mask in the layer's layout: (B, <batch dims>, <query axes>, <key axes>).
        axes = tuple(a % len(shape) for a in attention_axes)  # projected rank - 1
        batch = [shape[i] for i in range(len(shape) - 1) if i not in axes]
        attn = [shape[a] for a in axes]
        mask = RNG.random(size=batch + attn + attn) > 0.3
        mask[..., 0] = True  # every query sees at least its first key
        kwargs["attention_mask"] = mask
        t = int(np.prod(attn))
        np_kwargs["mask"] = mask.reshape(tuple(batch) + (t, t))
    out, scores = layer(x, x, return_attention_scores=True, **kwargs)
    expected, expected_scores = numpy_attention(layer, x, x, **np_kwargs)
    np.testing.assert_allclose(to_numpy(scores), expected_scores, atol=2e-6)
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-5, atol=2e-6)
    fused = layer(x, x, **kwargs)  # no scores, dropout 0
    np.testing.assert_allclose(to_numpy(fused), expected, rtol=1e-5, atol=2e-6)
    twin = _softmax_twin(layer, x, x)
    assert np.max(np.abs(to_numpy(fused) - to_numpy(twin(x, x, **kwargs)))) > 1e-3


@pytest.mark.parametrize(
    "variant",
    ["use_gate", "sliding_window", "sliding_window_causal", "output_shape", "lora"],
)
def test_parent_features_equal_numpy(variant):
    kwargs, call_kwargs, np_kwargs = {}, {}, {}
    if variant == "use_gate":
        kwargs["use_gate"] = True
    if variant.startswith("sliding_window"):
        kwargs["sliding_window"] = 2
    if variant == "sliding_window_causal":
        call_kwargs["use_causal_mask"] = np_kwargs["causal"] = True
    if variant == "output_shape":
        kwargs["output_shape"] = (3, 2)
    layer = _built(**kwargs)
    if variant == "lora":
        for dense in (layer.query_dense, layer.key_dense, layer.value_dense):
            dense.enable_lora(2)
            dense.lora_kernel_b.assign(RNG.normal(size=dense.lora_kernel_b.shape))
    for return_scores in (False, True):
        result = layer(X, X, return_attention_scores=return_scores, **call_kwargs)
        out = result[0] if return_scores else result
        # For LoRA, `dense.kernel` is the effective kernel W + (alpha/r) A B.
        expected, expected_scores = numpy_attention(layer, X, X, **np_kwargs)
        np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-5, atol=2e-6)
        if return_scores:
            np.testing.assert_allclose(to_numpy(result[1]), expected_scores, atol=2e-6)
    if variant == "lora":
        assert len(layer.non_trainable_weights) == 3  # frozen base kernels
        assert {"ranges", "ts"} <= {w.name for w in layer.trainable_weights}


def test_per_head_parameters_equal_numpy():
    ranges = RNG.normal(scale=0.3, size=(3, 4)).astype("float32")
    ts = RNG.normal(scale=0.7, size=(3, 4)).astype("float32")
    layer = _built(num_heads=3, per_head=True, ranges=ranges, ts=ts)
    assert tuple(layer.ranges.shape) == (3, 4) and tuple(layer.ts.shape) == (3, 4)
    out, scores = layer(X, X, use_causal_mask=True, return_attention_scores=True)
    expected, expected_scores = numpy_attention(layer, X, X, causal=True)
    np.testing.assert_allclose(to_numpy(scores), expected_scores, atol=2e-6)
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-5, atol=2e-6)
    # Each head really uses its own row: a shared modulator gives other scores.
    shared = _built(num_heads=3, ranges=ranges[0], ts=ts[0])
    for name in ("_query_dense", "_key_dense", "_value_dense", "_output_dense"):
        getattr(shared, name).set_weights(getattr(layer, name).get_weights())
    _, shared_scores = shared(X, X, use_causal_mask=True, return_attention_scores=True)
    np.testing.assert_allclose(
        to_numpy(shared_scores)[:, 0], expected_scores[:, 0], atol=2e-6
    )
    assert (
        np.max(np.abs(to_numpy(shared_scores)[:, 1:] - expected_scores[:, 1:])) > 1e-3
    )


class _FixedDropout(keras.layers.Layer):
    """Stands in for the layer's Dropout with a known keep mask."""

    def __init__(self, keep, rate):
        super().__init__()
        self.keep, self.rate = keep, rate

    def call(self, x, training=None):
        if not training:
            return x
        return x * keras.ops.cast(self.keep, x.dtype) / (1.0 - self.rate)


@pytest.mark.parametrize("return_scores", [False, True])
def test_dropout_paths(return_scores):
    layer = _built(dropout=0.4, seed=3)

    def call(training):
        result = layer(
            X,
            X,
            attention_mask=CAUSAL,
            training=training,
            return_attention_scores=return_scores,
        )
        return result if return_scores else (result, None)

    expected, expected_scores = numpy_attention(layer, X, X, mask=CAUSAL)
    out, scores = call(training=False)
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-5, atol=2e-6)
    # Real dropout is active in training and acts on MultiMax weights; the
    # returned scores are the weights before dropout.
    out, scores = call(training=True)
    assert np.max(np.abs(to_numpy(out) - expected)) > 1e-3
    if return_scores:
        np.testing.assert_allclose(to_numpy(scores), expected_scores, atol=2e-6)
    # With a known keep mask the training output is the NumPy one.
    keep = RNG.random(size=(2, 2, 5, 5)) > 0.4
    # Bypass Keras' state tracking: the test swaps a built layer's sublayer.
    object.__setattr__(layer, "_dropout_layer", _FixedDropout(keep, 0.4))
    out, _ = call(training=True)
    expected, _ = numpy_attention(layer, X, X, mask=CAUSAL, dropout_mask=keep / 0.6)
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-5, atol=2e-6)


def _plain_attention(layer, query, value, mask):
    """The same attention in plain `keras.ops`, differentiated by autodiff
    (no custom gradient): the plain formula of the modulator, masked
    entries at −inf before a SoftMax."""
    ops = keras.ops
    q = ops.einsum("btd,dnh->btnh", query, layer.query_dense.kernel)
    k = ops.einsum("bsd,dnh->bsnh", value, layer.key_dense.kernel)
    v = ops.einsum("bsd,dnh->bsnh", value, layer.value_dense.kernel)
    q = q + layer.query_dense.bias
    k = k + layer.key_dense.bias
    v = v + layer.value_dense.bias
    s = ops.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(layer.key_dim)
    r = ops.reshape(ops.cast(layer.ranges, s.dtype), (-1, 1, 1, 4))
    t = ops.reshape(ops.cast(layer.ts, s.dtype), (-1, 1, 1, 4))
    z = ops.where(mask, plain_seglu(s, r, t), -np.inf)
    p = ops.softmax(z, axis=-1)
    o = ops.einsum("bnts,bsnh->btnh", p, v)
    return ops.einsum("btnh,nhe->bte", o, layer.output_dense.kernel) + (
        layer.output_dense.bias
    )


@pytest.mark.parametrize("per_head", [False, True])
def test_gradients_match_autodiff_of_plain_formula(per_head):
    # float64 throughout (but ranges/ts, float32 weights by design), so the
    # comparison is not limited by rounding.
    x = X.astype("float64")
    with float64():
        layer = _built(query=x, value=x, per_head=per_head, ts=TS * 2, dtype="float64")
        target = np.random.default_rng(5).normal(size=X.shape)
        mask = np.broadcast_to(CAUSAL, (2, 1, 5, 5))
        variables = layer.trainable_variables

        def loss(fn):
            return variable_gradients(
                lambda: keras.ops.sum((fn() - target) ** 2), variables
            )[1]

        got = loss(lambda: layer(x, x, use_causal_mask=True))
        want = loss(lambda: _plain_attention(layer, x, x, mask))
    for var, g, w in zip(variables, got, want):
        assert g.dtype == np.dtype(var.dtype), var.path
        np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-9, err_msg=var.path)
        if var.name in ("ranges", "ts"):
            assert np.all(g != 0.0), f"zero gradient for {var.path}"


def test_fit_updates_ranges_and_ts():
    inputs = keras.Input((5, 8))
    layer = layers.MultiMaxAttention(num_heads=2, key_dim=4, per_head=True)
    model = keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    before = [to_numpy(layer.ranges), to_numpy(layer.ts)]
    target = RNG.normal(size=X.shape).astype("float32")
    history = model.fit(X, target, epochs=5, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for old, var in zip(before, (layer.ranges, layer.ts)):
        assert np.all(old != to_numpy(var)), var.path


def test_traced_equals_eager():
    layer = _built(value=Y)

    def graph(q, v, mask):
        return layer(q, v, attention_mask=mask, return_attention_scores=True)

    eager = layer(X, Y, attention_mask=PAD, return_attention_scores=True)
    for a, b in zip(traced(graph)(X, Y, PAD), eager):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), atol=1e-6)


@pytest.mark.parametrize(
    "q_shape, v_shape, attention_axes",
    [((3, 8), (6, 8), None), ((3, 4, 8), (3, 4, 8), (1, 2)), ((2, 3, 8), (2, 5, 8), 2)],
)
def test_symbolic_scores_shape_matches_eager(q_shape, v_shape, attention_axes):
    layer = layers.MultiMaxAttention(
        num_heads=2, key_dim=4, attention_axes=attention_axes
    )
    q, v = keras.Input(q_shape), keras.Input(v_shape)
    _, symbolic = layer(q, v, return_attention_scores=True)
    _, eager = layer(
        np.ones((2,) + q_shape, "float32"),
        np.ones((2,) + v_shape, "float32"),
        return_attention_scores=True,
    )
    assert tuple(symbolic.shape[1:]) == tuple(eager.shape[1:])


def test_standard_checks_multi_axis_gate_per_head():
    x = RNG.normal(size=(2, 3, 4, 8)).astype("float32")
    run_layer_test(
        layers.MultiMaxAttention,
        {
            "num_heads": 2,
            "key_dim": 4,
            "attention_axes": (1, 2),
            "use_gate": True,
            "per_head": True,
            "modulator": paper_modulator(),
        },
        {"query": x, "value": x},
        expected_output_shape=x.shape,
        expected_num_trainable_weights=12,
    )


def test_lora_model_keras_round_trip(tmp_path):
    inputs = keras.Input((5, 8))
    layer = layers.MultiMaxAttention(num_heads=2, key_dim=4, use_gate=True)
    model = keras.Model(inputs, layer(inputs, inputs))
    layer.query_dense.enable_lora(2)
    layer.value_dense.enable_lora(2)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(X, X, epochs=1, verbose=0)
    path = str(tmp_path / "lora.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(X, verbose=0), model.predict(X, verbose=0), atol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"per_head": "yes"}, TypeError, "per_head='yes'"),
        ({"num_heads": 0}, ValueError, "num_heads=0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        layers.MultiMaxAttention(**{"num_heads": 2, "key_dim": 4, **kwargs})


def test_registered_and_config_round_trip():
    assert (
        keras.saving.get_registered_name(layers.MultiMaxAttention)
        == "keras_multimax>MultiMaxAttention"
    )
    layer = layers.MultiMaxAttention(
        num_heads=3,
        key_dim=2,
        modulator=Modulator(order=3, ranges_regularizer="l1", ts_constraint="non_neg"),
        per_head=True,
        sliding_window=4,
        use_gate=True,
    )
    config = layer.get_config()
    assert config["modulator"]["config"]["order"] == 3 and config["per_head"] is True
    assert config["sliding_window"] == 4 and config["use_gate"] is True
    clone = layers.MultiMaxAttention.from_config(config)
    assert clone.get_config() == config
    clone(X, X)
    assert tuple(clone.ts.shape) == (3, 6)
    assert np.all(to_numpy(clone.ts) == 0.0)


def test_mask_shapes_broadcast_like_multi_head_attention():
    layer = _built()
    outs = [
        to_numpy(layer(X, X, attention_mask=mask))
        for mask in (
            CAUSAL,  # (T, S)
            np.broadcast_to(CAUSAL, (2, 5, 5)),  # (B, T, S)
            np.broadcast_to(CAUSAL, (2, 2, 5, 5)),  # (B, heads, T, S)
            CAUSAL.astype("float32"),  # numeric masks are accepted too
        )
    ]
    expected, _ = numpy_attention(layer, X, X, causal=True)
    for out in outs:
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("return_scores", [False, True])
def test_compute_attention_combines_causal_and_explicit_mask(return_scores):
    # `_compute_attention` is an override point; called directly with both a
    # causal flag and an explicit mask, it must apply both (as the parent).
    layer = _built()
    q, k, v = (RNG.normal(size=(1, 5, 2, 4)).astype("float32") for _ in range(3))
    extra = np.ones((1, 5, 5), bool)
    extra[:, 3, 1] = False
    both, _ = layer._compute_attention(
        q, k, v, extra, None, return_scores, use_causal_mask=True
    )
    merged, _ = layer._compute_attention(q, k, v, extra & CAUSAL, None, return_scores)
    np.testing.assert_allclose(to_numpy(both), to_numpy(merged), atol=1e-7)


def test_int8_quantized_projections_still_use_multimax():
    layer = _built()
    twin = _softmax_twin(layer)
    reference = to_numpy(layer(X, X))
    for attention in (layer, twin):
        for dense in (
            attention.query_dense,
            attention.key_dense,
            attention.value_dense,
        ):
            dense.quantize("int8")
    assert keras.backend.standardize_dtype(layer.query_dense._kernel.dtype) == "int8"
    quantized = to_numpy(layer(X, X))
    assert np.mean((quantized - reference) ** 2) < 1e-3
    assert np.max(np.abs(quantized - to_numpy(twin(X, X)))) > 1e-3


def test_parent_positional_arguments_are_accepted():
    # e.g. MultiHeadAttention(2, 4, None, 0.0, True, None, None, 3): every
    # argument of the parent keeps its position (sliding_window included).
    assert_positional_drop_in(
        keras.layers.MultiHeadAttention,
        layers.MultiMaxAttention,
        {
            "num_heads": 2,
            "key_dim": 4,
            "value_dim": 3,
            "dropout": 0.1,
            "use_bias": False,
            "output_shape": (6,),
            "attention_axes": (1,),
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
    layer = layers.MultiMaxAttention(2, 4, None, 0.0, True, None, None, 3)
    assert layer.get_config()["sliding_window"] == 3
