"""`ops.multimax_dot_product_attention` (blockwise) against two references.

Written once for every backend (`keras.ops`, gradients through
`backend_helpers`); CI also runs it on JAX (marker ``backends``).

References, for the output and the gradients of query, key, value, bias,
ranges and ts under a random upstream gradient:

- the materialised path: ``scores = scale·q·kᵀ + bias``,
  `ops.multimax` (its own tested closed-form gradient) with the mask and the
  causal mask, then ``·v``, in float32 like the op;
- NumPy in float64 (`_numpy_attention`): the formula of the paper and its
  derivatives written out here, sharing no code with the package.

Tolerances are ``depth · eps(dtype) · scale`` (`tolerances.py`), the depths
derived in `Depths`.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from backend_helpers import traced
from backend_helpers import value_and_gradients
from numpy_reference import multimax as np_multimax
from tolerances import assert_close
from tolerances import assert_defect_caught

from keras_multimax import ops

ORDER2 = ([-1.0, 1.0, -2.0, 2.0], [0.3, 0.4, 0.1, -0.05])
NAMES = ("query", "key", "value", "bias", "ranges", "ts")


class Depths:
    """Roundings by which two float32 computations of the same values differ.

    Scores ``x`` are sums of ``D = 8`` products: up to 8 roundings, and σ
    multiplies an error of ``x`` by ``σ'(x)``, here at most 3 (order 2,
    |t| <= 0.4, |x| <= 6). exp() turns an absolute error of σ into a relative
    one of the probabilities; the output then sums ``Tk <= 13`` products, and
    the log-sum-exp is merged over the blocks in another order (a few more).
    8·3 + 13 + 8 = 45: 64 for outputs.

    Gradients of q, k, v and bias add two products of the same kind (``dO·vᵀ``
    over ``D``, then ``∂L/∂x·k`` over ``Tk`` or ``∂L/∂xᵀ·q`` over ``Tq·G``):
    about 45 + 8 + 26 = 79, and they are compared to the largest entry while
    their differences add up from every term of a sum: 256.

    The parameter gradients are sums over all ``B·H·Tq·Tk`` (~1100) entries of
    terms of both signs; they are compared to the sum of the terms' absolute
    values (`_numpy_attention` returns it), which bounds every partial sum,
    so the order of summation costs up to log2(1100) ≈ 10 roundings of that
    scale on top of the 79 of each term: 128.
    """

    output = 64
    gradient = 256
    parameter = 128


def _problem(
    batch=2,
    q_length=13,
    k_length=11,
    heads=4,
    kv_heads=2,
    depth=8,
    bias_shape=(2, 1, 13, 11),
    per_head=False,
    seed=0,
):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, q_length, heads, depth)).astype("float32")
    k = rng.normal(size=(batch, k_length, kv_heads, depth)).astype("float32")
    v = rng.normal(size=(batch, k_length, kv_heads, depth)).astype("float32")
    # Scores of a few units: every piece of the modulator is visited.
    q *= 2.0
    bias = None
    if bias_shape is not None:
        bias = (0.5 * rng.normal(size=bias_shape)).astype("float32")
    ranges = np.array(ORDER2[0], "float32")
    ts = np.array(ORDER2[1], "float32")
    if per_head:
        ranges = (ranges + 0.3 * rng.normal(size=(heads, 4))).astype("float32")
        ts = (ts + 0.1 * rng.normal(size=(heads, 4))).astype("float32")
    upstream = rng.normal(size=(batch, q_length, heads, depth)).astype("float32")
    return dict(q=q, k=k, v=v, bias=bias, ranges=ranges, ts=ts, upstream=upstream)


def _causal(q_length, k_length):
    return np.tril(np.ones((q_length, k_length), bool))


def _materialised(q, k, v, bias, mask, ranges, ts, scale, is_causal):
    """``multimax(scale·q·kᵀ + bias)·v`` through `ops.multimax` (float32)."""
    heads, kv_heads = q.shape[2], k.shape[2]
    k = keras.ops.repeat(k, heads // kv_heads, axis=2)
    v = keras.ops.repeat(v, heads // kv_heads, axis=2)
    x = keras.ops.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        x = x + bias
    if is_causal:
        causal = _causal(q.shape[1], k.shape[1])
        mask = causal if mask is None else np.logical_and(mask, causal)
    if len(ranges.shape) == 2:
        ranges = keras.ops.reshape(ranges, (heads, 1, 1, -1))
        ts = keras.ops.reshape(ts, (heads, 1, 1, -1))
    p = ops.multimax(x, ranges, ts, axis=-1, mask=mask)
    return keras.ops.einsum("bhqk,bkhd->bqhd", p, v)


def _numpy_attention(q, k, v, bias, mask, ranges, ts, scale, is_causal, upstream):
    """Float64 output, the 6 gradients and the scales of the parameter sums."""
    q, k, v, upstream = (np.asarray(a, np.float64) for a in (q, k, v, upstream))
    batch, q_length, heads, _ = q.shape
    groups = heads // k.shape[2]
    kk, vv = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    x = scale * np.einsum("bqhd,bkhd->bhqk", q, kk)
    if bias is not None:
        x = x + np.asarray(bias, np.float64)
    keep = np.broadcast_to(True if mask is None else mask, x.shape)
    keep = keep & (x != -np.inf)
    if is_causal:
        keep = keep & _causal(q_length, k.shape[1])
    r = np.asarray(ranges, np.float64)
    t = np.asarray(ts, np.float64)
    if r.ndim == 2:
        r, t = r[:, None, None, :], t[:, None, None, :]
    x = np.where(keep, x, 0.0)  # excluded entries: any finite value
    p = np_multimax(x, r, t, mask=keep)
    out = np.einsum("bhqk,bkhd->bqhd", p, vv)

    d_p = np.einsum("bqhd,bkhd->bhqk", upstream, vv)
    gs = p * (d_p - np.sum(p * d_p, axis=-1, keepdims=True))  # ∂L/∂σ
    d_sigma = np.ones_like(x)
    d_ranges, d_ts = [], []
    for order in range(t.shape[-1] // 2):
        lower = np.maximum(r[..., 2 * order] - x, 0.0)
        upper = np.maximum(x - r[..., 2 * order + 1], 0.0)
        lower_k = (lower > 0) * 1.0 if order == 0 else lower**order
        upper_k = (upper > 0) * 1.0 if order == 0 else upper**order
        d_b = (order + 1) * t[..., 2 * order] * lower_k
        d_d = -(order + 1) * t[..., 2 * order + 1] * upper_k
        d_sigma = d_sigma - d_b - d_d
        d_ranges += [gs * d_b, gs * d_d]
        d_ts += [gs * lower ** (order + 1), gs * upper ** (order + 1)]
    d_x = gs * d_sigma
    d_kk = scale * np.einsum("bhqk,bqhd->bkhd", d_x, q)
    d_vv = np.einsum("bhqk,bqhd->bkhd", p, upstream)

    def per_kv_head(g):
        return g.reshape(*g.shape[:2], -1, groups, g.shape[-1]).sum(axis=3)

    axes = (0, 2, 3) if np.ndim(ranges) == 2 else (0, 1, 2, 3)
    terms = np.stack(d_ranges + d_ts, axis=-1)
    grads = [
        scale * np.einsum("bhqk,bkhd->bqhd", d_x, kk),
        per_kv_head(d_kk),
        per_kv_head(d_vv),
        None if bias is None else _sum_to(d_x, np.shape(bias)),
    ]
    sums = terms.sum(axis=axes)
    n = t.shape[-1]
    grads += [sums[..., :n], sums[..., n:]]
    return out, grads, np.abs(terms).sum(axis=axes)


def _sum_to(g, shape):
    g = g.sum(axis=tuple(range(g.ndim - len(shape))))
    axes = tuple(a for a, d in enumerate(shape) if d == 1 and g.shape[a] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _run(fn, problem, mask, is_causal, scale, compile_fn=True):
    """``fn``'s output and gradients under ``problem``'s upstream gradient."""
    bias = problem["bias"]
    upstream = problem["upstream"]

    def loss(q, k, v, r, t, *b):
        out = fn(q, k, v, b[0] if b else None, mask, r, t, scale, is_causal)
        return out * upstream, out

    def total(*args):
        return loss(*args)[0]

    def output(*args):
        return loss(*args)[1]

    args = [problem[n] for n in ("q", "k", "v", "ranges", "ts")]
    if bias is not None:
        args.append(bias)
    wrap = traced if compile_fn else (lambda f: f)
    _, grads = value_and_gradients(wrap(total), *args)
    out = keras.ops.convert_to_numpy(wrap(output)(*args))
    # Back in the order of NAMES.
    grads = grads[:3] + ([grads[5]] if bias is not None else [None]) + grads[3:5]
    return out, grads


def _flash(block_size):
    def fn(q, k, v, bias, mask, ranges, ts, scale, is_causal):
        return ops.multimax_dot_product_attention(
            q,
            k,
            v,
            bias,
            mask,
            scale,
            is_causal,
            ranges=ranges,
            ts=ts,
            block_size=block_size,
        )

    return fn


def _check(problem, mask=None, is_causal=False, scale=None, block_size=4):
    depth = problem["q"].shape[-1]
    scale_value = 1 / np.sqrt(depth) if scale is None else scale
    got = _run(_flash(block_size), problem, mask, is_causal, scale)
    materialised = _run(_materialised, problem, mask, is_causal, scale_value)
    want, want_grads, parameter_scales = _numpy_attention(
        problem["q"],
        problem["k"],
        problem["v"],
        problem["bias"],
        mask,
        problem["ranges"],
        problem["ts"],
        scale_value,
        is_causal,
        problem["upstream"],
    )
    assert got[0].dtype == np.float32
    assert_close(got[0], want, "float32", Depths.output, floor=1.0, what="output")
    assert_close(
        got[0], materialised[0], "float32", Depths.output, floor=1.0, what="output"
    )
    for index, name in enumerate(NAMES):
        g, m, w = got[1][index], materialised[1][index], want_grads[index]
        if w is None:
            assert g is None, name
            continue
        assert g.shape == np.shape(w) == m.shape, (name, g.shape, np.shape(w))
        if name in ("ranges", "ts"):
            n = np.shape(w)[-1]
            part = slice(0, n) if name == "ranges" else slice(n, 2 * n)
            floor = float(np.max(parameter_scales[..., part]))
            for reference in (w, m):
                assert_close(
                    g, reference, "float32", Depths.parameter, floor, what=name
                )
        else:
            for reference in (w, m):
                assert_close(g, reference, "float32", Depths.gradient, 1.0, what=name)
    return got


# ---------------------------------------------------------------------------
# Against the references
# ---------------------------------------------------------------------------


# Each case compiles its own programs (seconds each): two run by default, the
# rest of the matrix is marked slow.
slow = pytest.mark.slow


@pytest.mark.parametrize(
    "is_causal, block_size",
    [
        (False, 4),
        (True, 5),
        pytest.param(True, 4, marks=slow),
        pytest.param(False, 5, marks=slow),
        pytest.param(True, 1, marks=slow),
        pytest.param(True, 64, marks=slow),
    ],
)
def test_matches_references(is_causal, block_size):
    # 13 queries, 11 keys: blocks of 4 (13 = 4·4 − 3, 11 = 3·4 − 1) and 5 leave
    # padding; 64 is one block; 1 is one query and one key per block. Both
    # extremes run causal only: the causal case covers the non-causal loop and
    # adds the skipped blocks and the diagonal. Block size 1 runs 5 queries
    # and 4 keys (still more queries than keys, as the causal offset needs):
    # its programs grow with the number of blocks, and 13 × 11 of them took
    # 6-53 s to compile.
    problem = (
        _problem(q_length=5, k_length=4, bias_shape=(2, 1, 5, 4))
        if block_size == 1
        else _problem()
    )
    _check(problem, is_causal=is_causal, block_size=block_size)


@pytest.mark.parametrize(
    "kv_heads, per_head",
    [
        (1, True),
        (2, False),
        pytest.param(2, True, marks=slow),
        pytest.param(4, True, marks=slow),
        pytest.param(1, False, marks=slow),
        pytest.param(4, False, marks=slow),
    ],
)
def test_grouped_heads_and_per_head_parameters(kv_heads, per_head):
    problem = _problem(kv_heads=kv_heads, per_head=per_head, bias_shape=(4, 1, 11))
    _check(problem, is_causal=True, block_size=5)


@pytest.mark.parametrize(
    "bias_shape",
    [
        (2, 4, 13, 11),
        (1, 4, 1, 1),
        pytest.param(None, marks=slow),
        pytest.param((11,), marks=slow),
        pytest.param((13, 11), marks=slow),
        pytest.param((2, 1, 1, 11), marks=slow),
    ],
    ids=lambda s: "none" if s is None else "x".join(map(str, s)),
)
def test_bias_shapes(bias_shape):
    _check(_problem(bias_shape=bias_shape), block_size=4)


def test_mask_and_explicit_scale():
    problem = _problem()
    rng = np.random.default_rng(3)
    mask = rng.random((2, 1, 13, 11)) < 0.7
    _check(problem, mask=mask, scale=0.5, block_size=4)
    # Numeric masks keep the entries > 0.5, as in `ops.multimax`.
    args = [problem[n] for n in ("q", "k", "v", "bias")]
    params = dict(ranges=problem["ranges"], ts=problem["ts"], block_size=4)
    numeric = ops.multimax_dot_product_attention(*args, mask * 0.9, 0.5, **params)
    boolean = ops.multimax_dot_product_attention(*args, mask, 0.5, **params)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(numeric), keras.ops.convert_to_numpy(boolean)
    )


def test_one_query_as_in_cached_decoding():
    problem = _problem(q_length=1, k_length=37, bias_shape=(2, 1, 1, 37))
    rng = np.random.default_rng(4)
    mask = rng.random((2, 1, 1, 37)) < 0.8  # e.g. the cache's filled positions
    _check(problem, mask=mask, block_size=8)


# ---------------------------------------------------------------------------
# Excluded entries
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["ts_positive", "ts_negative"])
def test_minus_inf_and_masked_entries_get_zero_probability_and_gradient(sign):
    """−inf and masked keys are dropped, whatever the sign of ts.

    With slopes of either sign and a key excluded from every query (by −inf
    in the bias for one, by the mask for another), the output equals
    attention over the other keys, and the excluded keys and values get
    exactly zero gradient; masked scores hold huge values, which σ of order
    2 would turn into huge scores if they were modulated before masking.
    """
    problem = _problem(bias_shape=(1, 1, 1, 11))
    problem["ts"] = (sign * np.abs(problem["ts"]) * 10).astype("float32")
    problem["bias"][..., 3] = -np.inf
    problem["bias"][..., 7] = 1e4
    mask = np.ones((1, 1, 1, 11), bool)
    mask[..., 7] = False
    out, grads = _run(_flash(4), problem, mask, False, None)
    kept = [j for j in range(11) if j not in (3, 7)]
    dropped = dict(problem, k=problem["k"][:, kept], v=problem["v"][:, kept])
    dropped["bias"] = problem["bias"][..., kept]
    want, want_grads = _run(_flash(4), dropped, None, False, None)
    assert np.all(np.isfinite(out))
    assert_close(out, want, "float32", Depths.output, floor=1.0, what="output")
    for index in (1, 2):  # key, value
        assert np.all(grads[index][:, [3, 7]] == 0), NAMES[index]
        assert_close(grads[index][:, kept], want_grads[index], "float32", 256, 1.0)
    assert np.all(grads[3][..., [3, 7]] == 0)  # bias
    for index in (0, 4, 5):  # query, ranges, ts: finite, as without those keys
        assert np.all(np.isfinite(grads[index])), NAMES[index]


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_fully_masked_queries_give_zeros(is_causal):
    problem = _problem(bias_shape=None)
    mask = np.ones((2, 4, 13, 11), bool)
    mask[0, :, 2] = False  # query 2 of the first sequence sees nothing
    mask[1, 1, 5:] = False  # and, in head 1 of the second, queries 5 on
    out, grads = _check(problem, mask=mask, is_causal=is_causal, block_size=4)
    assert np.all(out[0, 2] == 0) and np.all(out[1, 5:, 1] == 0)
    assert np.all(grads[0][0, 2] == 0) and np.all(grads[0][1, 5:, 1] == 0)
    assert np.abs(out[0, 3]).max() > 0.1


def test_nan_in_a_query_shows_in_its_output_only():
    problem = _problem(bias_shape=None)
    problem["q"][0, 2, 1, 0] = np.nan
    out = keras.ops.convert_to_numpy(
        ops.multimax_dot_product_attention(
            problem["q"],
            problem["k"],
            problem["v"],
            ranges=problem["ranges"],
            ts=problem["ts"],
            block_size=4,
        )
    )
    assert np.all(np.isnan(out[0, 2, 1]))
    others = np.ones(out.shape, bool)
    others[0, 2, 1] = False
    assert np.all(np.isfinite(out[others]))


# ---------------------------------------------------------------------------
# Other properties
# ---------------------------------------------------------------------------


def test_ts_zero_is_keras_dot_product_attention():
    problem = _problem(bias_shape=(2, 1, 13, 11))
    zeros = np.zeros(4, "float32")
    args = [problem[n] for n in ("q", "k", "v", "bias")]
    got = ops.multimax_dot_product_attention(
        *args, is_causal=True, ranges=problem["ranges"], ts=zeros, block_size=4
    )
    want = keras.ops.dot_product_attention(*args, is_causal=True)
    assert_close(got, want, "float32", Depths.output, floor=1.0)
    # Control: with the test's slopes the output is another one.
    multimax = ops.multimax_dot_product_attention(
        *args, is_causal=True, ranges=problem["ranges"], ts=problem["ts"]
    )
    assert_defect_caught(multimax, want, "float32", Depths.output, floor=1.0)


def test_bounds_catch_a_mask_applied_before_the_modulation():
    """Control: the bounds of `_check` tell a real defect from rounding."""
    problem = _problem(bias_shape=None)
    mask = np.random.default_rng(5).random((2, 1, 13, 11)) < 0.7
    got, _ = _run(_flash(4), problem, mask, False, None)
    # Masking by a large negative score before σ: order 2 with t_b > 0 turns
    # it into a large positive one.
    bias = np.where(mask, 0.0, -1e3).astype("float32")
    defect, _ = _run(_flash(4), dict(problem, bias=bias), None, False, None)
    assert_defect_caught(defect, got, "float32", Depths.output, floor=1.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_computed_in_float32(dtype):
    problem = _problem(bias_shape=None)
    half = {n: keras.ops.cast(problem[n], dtype) for n in ("q", "k", "v")}
    rounded = {
        n: keras.ops.convert_to_numpy(keras.ops.cast(half[n], "float32")) for n in half
    }
    flash = _flash(4)
    upstream = problem["upstream"]

    def loss(q, k, v, r, t):
        out = flash(q, k, v, None, None, r, t, None, True)
        return keras.ops.cast(out, "float32") * upstream

    params = (problem["ranges"], problem["ts"])
    got = flash(half["q"], half["k"], half["v"], None, None, *params, None, True)
    assert keras.backend.standardize_dtype(got.dtype) == dtype
    _, grads = value_and_gradients(
        traced(loss), half["q"], half["k"], half["v"], *params
    )
    _, want_grads = value_and_gradients(
        traced(loss), rounded["q"], rounded["k"], rounded["v"], *params
    )
    want, _, scales = _numpy_attention(
        rounded["q"],
        rounded["k"],
        rounded["v"],
        None,
        None,
        problem["ranges"],
        problem["ts"],
        1 / np.sqrt(8),
        True,
        upstream,
    )
    # float32 work on the rounded inputs (`Depths.output` of float32), then one
    # rounding to `dtype`: within one eps of `dtype` (2 for a margin).
    got = keras.ops.convert_to_numpy(keras.ops.cast(got, "float32"))
    assert_close(got, want, dtype, 2, floor=1.0)
    # The gradients are the float32 ones of the rounded inputs but for the
    # output that the backward reads, saved in `dtype` (one rounding, in
    # rowsum(dO·O) of every row), and their own rounding to `dtype`: 8, of
    # the sums of the terms' absolute values for ranges and ts (`_check`).
    floors = [1.0] * 3 + [float(np.max(scales[:4])), float(np.max(scales[4:]))]
    for name, g, w, floor in zip(NAMES[:3] + NAMES[4:], grads, want_grads, floors):
        assert str(g.dtype) == (dtype if name in NAMES[:3] else "float32"), name
        assert_close(np.asarray(g, np.float32), w, dtype, 8, floor, what=name)


@pytest.mark.only_backend(
    "tensorflow", reason="the fused forward is a TensorFlow switch"
)
def test_fused_tensorflow_forward_matches_the_references():
    from switches import fused_forward

    with fused_forward():  # the forward as one XLA program
        _check(_problem(), mask=np.tri(13, 11, 2, dtype=bool), block_size=4)


@pytest.mark.only_backend("jax", reason="reads XLA's memory analysis of the program")
def test_memory_of_a_training_step_grows_linearly_with_the_length():
    """The compiled forward+backward needs O(T) scratch memory, not O(T²).

    XLA's buffer assignment of the whole step (no run needed): doubling T
    at most doubles the scratch (2.2: a margin for its fixed part), and at
    T = 2048 it is less than a tenth of the float32 scores of the 2 heads
    (measured: 4 %), which the materialised attention holds several times.
    """
    import jax
    import jax.numpy as jnp

    def scratch(length):
        q = jnp.zeros((1, length, 2, 16))
        r = jnp.zeros(4)

        def loss(q, k, v, r, t):
            out = ops.multimax_dot_product_attention(
                q, k, v, is_causal=True, ranges=r, ts=t, block_size=64
            )
            return jnp.sum(out)

        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        return step.lower(q, q, q, r, r).compile().memory_analysis().temp_size_in_bytes

    sizes = {length: scratch(length) for length in (512, 1024, 2048)}
    assert sizes[1024] <= 2.2 * sizes[512] and sizes[2048] <= 2.2 * sizes[1024], sizes
    scores = 2 * 2048 * 2048 * 4  # the float32 scores of the 2 heads at T = 2048
    assert sizes[2048] < scores / 10, (sizes, scores)


def test_traced_and_eager_calls_agree():
    problem = _problem()
    got = _run(_flash(4), problem, None, True, None, compile_fn=False)
    want = _run(_flash(4), problem, None, True, None)
    assert_close(got[0], want[0], "float32", Depths.output, floor=1.0)
    for index, name in enumerate(NAMES):
        assert_close(
            got[1][index], want[1][index], "float32", Depths.gradient, 1.0, what=name
        )


# ---------------------------------------------------------------------------
# Symbolic calls, Functional models, bad arguments
# ---------------------------------------------------------------------------


def test_symbolic_call_returns_a_keras_tensor_and_builds_a_model(tmp_path):
    query = keras.Input((None, 4, 8), name="query")
    key = keras.Input((None, 2, 8), name="key")
    value = keras.Input((None, 2, 6), name="value", dtype="float32")
    mask = keras.Input((1, 1, None), name="mask", dtype="bool")
    problem = _problem(bias_shape=None)
    out = ops.multimax_dot_product_attention(
        query,
        key,
        value,
        mask=mask,
        is_causal=True,
        ranges=problem["ranges"],
        ts=problem["ts"],
        block_size=4,
    )
    assert isinstance(out, keras.KerasTensor)
    assert (out.shape, out.dtype) == ((None, None, 4, 6), "float32")
    model = keras.Model([query, key, value, mask], out)

    rng = np.random.default_rng(6)
    v = rng.normal(size=(2, 11, 2, 6)).astype("float32")
    keep = rng.random((2, 1, 1, 11)) < 0.8
    inputs = [problem["q"], problem["k"], v, keep]
    got = keras.ops.convert_to_numpy(model(inputs))
    want = ops.multimax_dot_product_attention(
        problem["q"],
        problem["k"],
        v,
        mask=keep,
        is_causal=True,
        ranges=problem["ranges"],
        ts=problem["ts"],
        block_size=4,
    )
    np.testing.assert_array_equal(got, keras.ops.convert_to_numpy(want))

    path = str(tmp_path / "attention.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(inputs)), got)
    (node,) = [
        o
        for o in loaded.operations
        if type(o).__name__ == "MultiMaxDotProductAttention"
    ]
    assert node.get_config()["is_causal"] and node.get_config()["block_size"] == 4


def test_symbolic_output_dtype_is_that_of_the_inputs():
    out = ops.multimax_dot_product_attention(
        keras.Input((3, 2, 4), dtype="bfloat16"),
        keras.Input((5, 1, 4), dtype="bfloat16"),
        keras.Input((5, 1, 4), dtype="bfloat16"),
        ranges=np.zeros((2, 2), "float32"),
        ts=np.zeros((2, 2), "float32"),
    )
    assert (out.shape, out.dtype) == ((None, 3, 2, 4), "bfloat16")


def test_operation_round_trips_its_configuration():
    operation = ops.MultiMaxDotProductAttention(is_causal=True, block_size=64)
    config = operation.get_config()
    assert type(operation).from_config(config).get_config() == config


def _arguments(**change):
    problem = _problem(bias_shape=None)
    arguments = dict(
        query=problem["q"],
        key=problem["k"],
        value=problem["v"],
        ranges=problem["ranges"],
        ts=problem["ts"],
    )
    arguments.update(change)
    return arguments


Q, K = np.zeros((2, 13, 4, 8), "float32"), np.zeros((2, 11, 2, 8), "float32")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(block_size=0), ValueError, r"Received: block_size=0"),
        (dict(block_size=2.0), TypeError, r"Received: block_size=2.0"),
        (dict(is_causal="yes"), TypeError, r"Received: is_causal='yes'"),
        (dict(scale="0.1"), TypeError, r"Received: scale='0.1'"),
        (dict(scale=float("nan")), ValueError, r"Received: scale=nan"),
        (
            dict(query=Q[0]),
            ValueError,
            r"`query` must have rank 4.*Received: query.shape=\(13, 4, 8\)",
        ),
        (dict(query=Q[..., :4]), ValueError, r"same head_dim"),
        (dict(query=Q[:, :, :3]), ValueError, r"multiple of those of `key`"),
        (dict(value=K[:, :7]), ValueError, r"length and heads of `key`"),
        (dict(key=K[:1]), ValueError, r"same batch size"),
        (
            dict(key=K[:, :0]),
            ValueError,
            r"at least one position.*key.shape=\(2, 0, 2, 8\)",
        ),
        (dict(query=Q.astype("int32")), TypeError, r"Received: query.dtype=int32"),
        (
            dict(ranges=np.zeros(3, "float32"), ts=np.zeros(3, "float32")),
            ValueError,
            r"ts.shape=\(3,\)",
        ),
        (
            dict(ranges=np.zeros((3, 4), "float32"), ts=np.zeros((3, 4), "float32")),
            ValueError,
            r"num_heads=4",
        ),
        (
            dict(ranges=np.zeros(2, "float32")),
            ValueError,
            r"ranges.shape=\(2,\), ts.shape=\(4,\)",
        ),
        (dict(ts=None), TypeError, r"Received: ts=None"),
        (
            dict(bias=np.zeros((3, 13, 11), "float32")),
            ValueError,
            r"bias.shape=\(3, 13, 11\)",
        ),
        (
            dict(bias=np.zeros((1, 1, 1, 1, 11), "float32")),
            ValueError,
            r"`bias` must broadcast",
        ),
        (dict(mask=np.ones((13, 12), bool)), ValueError, r"mask.shape=\(13, 12\)"),
        (dict(mask=np.array(["a"])), TypeError, r"mask.dtype"),
    ],
)
def test_bad_arguments_are_named_with_their_value(change, error, match):
    with pytest.raises(error, match=match):
        ops.multimax_dot_product_attention(**_arguments(**change))


def test_symbolic_calls_raise_the_errors_of_eager_calls():
    for query in (keras.Input((13, 4, 8)), keras.ops.ones((2, 13, 4, 8))):
        with pytest.raises(ValueError, match="multiple of those of `key`"):
            ops.multimax_dot_product_attention(**_arguments(query=query[:, :, :3]))


# ---------------------------------------------------------------------------
# Export: a SavedModel reloads without keras_multimax
# ---------------------------------------------------------------------------

SAVED_MODEL_CHILD = """
import sys
sys.modules["keras_multimax"] = None  # any import of it now raises
import numpy as np
import tensorflow as tf

EPS32 = 2.0**-23
# Depths in eps · max(|expected|, 1), as tests/test_flash_attention.py's
# `Depths` (this process runs without the tests on its path).
OUTPUT_DEPTH, GRADIENT_DEPTH, PARAMETER_DEPTH = {depths}


def assert_close(got, want, depth, what, floor=1.0):
    unit = EPS32 * max(floor, float(np.max(np.abs(want))))
    error = float(np.max(np.abs(np.asarray(got) - want)))
    assert error <= depth * unit, (what, error / unit, depth)


loaded = tf.saved_model.load("attention")
data = np.load("expected.npz")
for j in range(2):  # two lengths through the same dynamic signature
    q, k, v, mask, upstream = (
        tf.constant(data[f"{{name}}_{{j}}"])
        for name in ("q", "k", "v", "mask", "upstream")
    )
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = loaded.call(q, k, v, mask)
        loss = tf.reduce_sum(out * upstream)
    grads = tape.gradient(loss, [q, k, v, loaded.ranges, loaded.ts])
    assert_close(out.numpy(), data[f"out_{{j}}"], OUTPUT_DEPTH, "output")
    for i, g in enumerate(grads[:3]):
        assert_close(g.numpy(), data[f"grad{{i}}_{{j}}"], GRADIENT_DEPTH, f"grad {{i}}")
    for i, g in enumerate(grads[3:], 3):
        floor = float(data[f"floor{{i}}_{{j}}"])
        assert_close(g.numpy(), data[f"grad{{i}}_{{j}}"], PARAMETER_DEPTH, f"grad {{i}}", floor)
    print("checked", j, tuple(out.shape))

@tf.function
def gradient_graph(q, k, v, mask):
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        loss = tf.reduce_sum(loaded.call(q, k, v, mask))
    return tape.gradient(loss, [q, k, v])

# In a graph, after the eager tapes above: where TensorFlow differentiates the
# forward loops too, the query that sees no key gives 0/0 = NaN there.
inputs = [tf.constant(data[f"{{name}}_0"]) for name in ("q", "k", "v", "mask")]
grads = [g.numpy() for g in gradient_graph(*inputs)]
assert all(np.all(np.isfinite(g)) for g in grads), [np.isnan(g).sum() for g in grads]
assert np.all(grads[0][:, 0] == 0)
graph = gradient_graph.get_concrete_function(*inputs).graph.as_graph_def()
names = {{n.op for n in graph.node}}
for f in graph.library.function:
    names |= {{n.op for n in f.node_def}}
# Autodiff of the forward would differentiate its ReLUs and pop its loops'
# saved intermediates; the saved closed-form gradient does neither.
assert not names & {{"ReluGrad", "TensorListPopBack"}}, sorted(names)
assert sys.modules["keras_multimax"] is None
print("no ReluGrad")
"""


@pytest.mark.slow
@pytest.mark.only_backend("tensorflow", reason="SavedModel")
def test_saved_model_reloads_without_keras_multimax(tmp_path):
    import tensorflow as tf
    from export_models import run_fresh_python

    problem = _problem(per_head=True, bias_shape=None)
    module = tf.Module()
    module.ranges = tf.Variable(problem["ranges"], name="ranges")
    module.ts = tf.Variable(problem["ts"], name="ts")

    def call(q, k, v, mask):
        return ops.multimax_dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=True,
            ranges=module.ranges,
            ts=module.ts,
            block_size=4,
        )

    module.call = tf.function(
        call,
        input_signature=[
            tf.TensorSpec([None, None, 4, 8]),
            tf.TensorSpec([None, None, 2, 8]),
            tf.TensorSpec([None, None, 2, 8]),
            tf.TensorSpec([None, 1, 1, None], tf.bool),
        ],
        autograph=False,
    )
    tf.saved_model.save(module, str(tmp_path / "attention"))

    arrays = {}
    for j, (batch, length) in enumerate(((2, 13), (1, 6))):
        p = _problem(batch=batch, q_length=length, k_length=length, bias_shape=None)
        mask = np.random.default_rng(j).random((batch, 1, 1, length)) < 0.8
        mask[..., 0] = False  # causal: query 0 sees no key
        p["bias"] = None
        p["ranges"], p["ts"] = problem["ranges"], problem["ts"]
        out, grads = _run(_flash(4), p, mask, True, None)
        _, _, scales = _numpy_attention(
            p["q"],
            p["k"],
            p["v"],
            None,
            mask,
            p["ranges"],
            p["ts"],
            1 / np.sqrt(8),
            True,
            p["upstream"],
        )
        arrays.update({f"{n}_{j}": p[n] for n in ("q", "k", "v", "upstream")})
        arrays.update({f"mask_{j}": mask, f"out_{j}": out})
        for i, g in enumerate(grads[:3] + grads[4:]):
            arrays[f"grad{i}_{j}"] = g
        arrays[f"floor3_{j}"] = np.max(scales[..., :4])
        arrays[f"floor4_{j}"] = np.max(scales[..., 4:])
    np.savez(tmp_path / "expected.npz", **arrays)

    depths = (Depths.output, Depths.gradient, Depths.parameter)
    stdout = run_fresh_python(
        SAVED_MODEL_CHILD.format(depths=depths), cwd=str(tmp_path)
    )
    assert stdout.split() == [
        "checked",
        "0",
        "(2,",
        "13,",
        "4,",
        "8)",
        "checked",
        "1",
        "(1,",
        "6,",
        "4,",
        "8)",
        "no",
        "ReluGrad",
    ], stdout


@pytest.mark.slow
@pytest.mark.only_backend("tensorflow", reason="LiteRT converts TensorFlow graphs")
def test_litert_converts_the_loops_to_builtin_while_ops(tmp_path):
    """Builtin ops only (WHILE for the loops), any batch and length, parity."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter
    from test_export_litert import operator_names

    problem = _problem(per_head=True)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, 4, 8]),
            tf.TensorSpec([None, None, 2, 8]),
            tf.TensorSpec([None, None, 2, 8]),
            tf.TensorSpec([None, 1, 1, None]),
        ],
        autograph=False,
    )
    def attention(q, k, v, bias):
        return ops.multimax_dot_product_attention(
            q,
            k,
            v,
            bias,
            is_causal=True,
            ranges=problem["ranges"],
            ts=problem["ts"],
            block_size=4,
        )

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [attention.get_concrete_function()], attention
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    path = tmp_path / "attention.tflite"
    path.write_bytes(converter.convert())
    names = operator_names(str(path))
    assert "WHILE" in names and not [n for n in names if n.startswith("CUSTOM")]

    for batch, length in ((2, 13), (1, 5), (1, 1)):
        p = _problem(batch=batch, q_length=length, k_length=length, bias_shape=None)
        bias = np.random.default_rng(length).normal(size=(batch, 1, 1, length))
        inputs = [p["q"], p["k"], p["v"], bias.astype("float32")]
        interpreter = Interpreter(str(path))
        details = interpreter.get_input_details()
        assert [d["name"] for d in details] == ["q", "k", "v", "bias"]
        for detail, array in zip(details, inputs):
            interpreter.resize_tensor_input(detail["index"], array.shape)
        interpreter.allocate_tensors()
        for detail, array in zip(details, inputs):
            interpreter.set_tensor(detail["index"], array)
        interpreter.invoke()
        got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        want = attention(*inputs).numpy()
        # The same float32 ops, in another runtime (XNNPACK's matrix products).
        assert_close(got, want, "float32", Depths.output, floor=1.0)
