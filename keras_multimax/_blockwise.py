"""Blockwise ("flash") MultiMax attention, written once for every backend.

The algorithm of `keras_multimax.ops.multimax_dot_product_attention`, in
`keras.ops`: the backends (``keras_multimax/backend/<name>/attention.py``)
add the custom gradient and three primitives (`Primitives`), nothing else.
Arguments arrive validated by `keras_multimax._attention`.

Layout. Scores are ``(B, Hkv, G, Tq, Tk)``: the ``H = Hkv·G`` query heads
split into the key/value head they read (``h = hkv·G + g``, as Keras'
`ops.dot_product_attention` repeats K and V) and the group, so that K and V
broadcast over ``G`` and are never repeated. Inputs are cut into blocks
stacked on a leading axis: queries ``(nq, B, Hkv, G, bq, D)``, keys and
values ``(nk, B, Hkv, bk, D)``, lengths padded with zeros to ``nq·bq`` and
``nk·bk`` (padded keys are excluded, padded queries dropped).

Forward, for each block of queries: over the key blocks it sees, the scores
``x = scale·q·kᵀ + bias``, ``z = σ(x)`` with excluded entries (masked,
−inf, causal, padding) set to −inf after σ, and an online log-sum-exp of
``z`` (`_formula.merge_logsumexp`, shared with the fused LM-head loss) with
the running ``Σ exp(z − top)·v``. It keeps the output and the per-row
log-sum-exp only.

Backward, for each block of keys: over the query blocks that see it, the
scores again, ``p = exp(z − lse)``, and in closed form

    ∂L/∂v = pᵀ·dO,    ∂L/∂σ = p·(dO·vᵀ − rowsum(dO·O)),    ∂L/∂x = ∂L/∂σ·σ'(x)
    ∂L/∂q = scale·∂L/∂x·k,    ∂L/∂k = scale·∂L/∂xᵀ·q,    ∂L/∂bias = ∂L/∂x

and the 4K parameter sums of ``∂L/∂σ`` times σ's factors. ``∂L/∂k`` and
``∂L/∂v`` are summed over the inner loop; ``∂L/∂q`` (and ``∂L/∂bias``) are
added into their block of a full-size buffer, in place under XLA.

Causal attention (Keras' convention, ``tril(ones(Tq, Tk))``: query ``i``
sees keys ``j <= i``) skips the blocks above the diagonal in both passes.
"""

from __future__ import annotations

import math
from typing import Any
from typing import NamedTuple
from typing import Protocol

from keras import backend
from keras import ops

from keras_multimax import _formula


class Tiling(NamedTuple):
    """The static part of a call: hashable, a `jax.custom_vjp` nondiff argument."""

    scale: float
    is_causal: bool
    q_block: int
    k_block: int


class Primitives(Protocol):
    """What a backend provides: two loops and one reduction.

    The loops (`tf.while_loop`, `jax.lax`) run their iterations one after
    the other, so that only one block's buffers are alive at a time.
    """

    def fold(self, start, stop, body, carry):
        """``carry = body(i, carry)`` for ``i`` in ``[start, stop)`` (tensors allowed)."""

    def map_blocks(self, count, body, carry, like):
        """``carry, ys_i = body(i, carry)`` for ``i < count``; returns the carry
        and each of ``ys`` stacked on a new leading axis.

        ``like`` holds a tensor of the dtype and shape of each of ``ys``.
        """

    def sum_products(self, products, axis: int):
        """The sums of each of ``products`` (of one shape) over ``axis``, stacked."""


def block_size(length, block: int) -> int:
    """The block used along an axis of ``length`` for a requested ``block``.

    As few blocks as ``block`` allows, of equal size, so that at most one
    position per block is padding (``length = 1000``, ``block = 512``: two
    blocks of 500); ``block`` itself when the length is not known until the
    graph runs.
    """
    if length is None:
        return block
    count = math.ceil(length / block)
    return math.ceil(length / count)


def _static(dim):
    return dim if isinstance(dim, int) else None


def _count(length, block: int):
    return (length + block - 1) // block


def _pad_axis(x, axis: int, amount, value=0):
    if isinstance(amount, int) and amount == 0:
        return x
    widths = [[0, 0] for _ in range(len(x.shape))]
    widths[axis][1] = amount
    return ops.pad(x, widths, constant_values=value)


def query_blocks(x, block: int, kv_heads: int):
    """``(B, Tq, H, D)`` → ``(nq, B, Hkv, G, block, D)``."""
    b, length, heads, depth = ops.shape(x)
    count = _count(length, block)
    x = _pad_axis(x, 1, count * block - length)
    x = ops.reshape(x, (b, count, block, kv_heads, heads // kv_heads, depth))
    return ops.transpose(x, (1, 0, 3, 4, 2, 5))


def key_blocks(x, block: int):
    """``(B, Tk, Hkv, D)`` → ``(nk, B, Hkv, block, D)``."""
    b, length, heads, depth = ops.shape(x)
    count = _count(length, block)
    x = _pad_axis(x, 1, count * block - length)
    x = ops.reshape(x, (b, count, block, heads, depth))
    return ops.transpose(x, (1, 0, 3, 2, 4))


def from_query_blocks(x, length):
    """Inverse of `query_blocks`: ``(nq, B, Hkv, G, bq, D)`` → ``(B, Tq, H, D)``."""
    count, b, kv_heads, groups, block, depth = ops.shape(x)
    x = ops.transpose(x, (1, 0, 4, 2, 3, 5))
    x = ops.reshape(x, (b, count * block, kv_heads * groups, depth))
    return x[:, :length]


def from_key_blocks(x, length):
    """Inverse of `key_blocks`: ``(nk, B, Hkv, bk, D)`` → ``(B, Tk, Hkv, D)``."""
    count, b, heads, block, depth = ops.shape(x)
    x = ops.reshape(ops.transpose(x, (1, 0, 3, 2, 4)), (b, count * block, heads, depth))
    return x[:, :length]


def score_layout(x, heads: int, kv_heads: int, pads: tuple, fill):
    """A bias or mask broadcastable to ``(B, H, Tq, Tk)`` in the score layout.

    Returns ``(B|1, Hkv|1, G|1, Tq|1, Tk|1)``, its query and key axes padded
    by ``pads`` with ``fill`` where they are not broadcast.
    """
    x = ops.reshape(x, (1,) * (4 - len(x.shape)) + tuple(ops.shape(x)))
    b, h, tq, tk = ops.shape(x)
    # Static sizes decide (None, known when a graph runs, is not broadcast).
    if x.shape[1] == heads:
        x = ops.reshape(x, (b, kv_heads, heads // kv_heads, tq, tk))
    else:
        x = ops.expand_dims(x, 2)
    if x.shape[3] != 1:
        x = _pad_axis(x, 3, pads[0], fill)
    if x.shape[4] != 1:
        x = _pad_axis(x, 4, pads[1], fill)
    return x


def _block_starts(x, i, j, tiling: Tiling):
    """Start and size of block ``(i, j)`` of a bias/mask in the score layout.

    The sizes are static where ``x``'s are (None for a batch size known
    only when a TensorFlow graph runs, which is never broadcast).
    """
    shape = tuple(x.shape)
    q_full, k_full = shape[3] != 1, shape[4] != 1
    starts = [0, 0, 0, i * tiling.q_block if q_full else 0]
    starts.append(j * tiling.k_block if k_full else 0)
    sizes = [*shape[:3], tiling.q_block if q_full else 1]
    sizes.append(tiling.k_block if k_full else 1)
    return starts, sizes


def _dynamic(sizes: list, x) -> list:
    """``sizes`` with its unknown entries read from ``x``'s shape."""
    return [ops.shape(x)[a] if d is None else d for a, d in enumerate(sizes)]


def score_block(x, i, j, tiling: Tiling):
    starts, sizes = _block_starts(x, i, j, tiling)
    return ops.slice(x, starts, _dynamic(sizes, x))


def add_to_block(buffer, starts, update):
    """``buffer[starts : starts + update.shape] += update`` (in place under XLA)."""
    part = ops.slice(buffer, starts, ops.shape(update))
    return ops.slice_update(buffer, starts, part + update)


class _Problem(NamedTuple):
    """One call's inputs in the blocked layout (compute dtype but bias/mask)."""

    q: Any  # (nq, B, Hkv, G, bq, D), times the scale
    k: Any  # (nk, B, Hkv, bk, D)
    v: Any  # (nk, B, Hkv, bk, Dv)
    bias: Any  # score layout, or None
    mask: Any  # score layout (bool), or None
    r: list  # ranges' 2K components, broadcasting against a block of scores
    t: list  # ts' 2K components
    k_length: Any  # Tk (an int, or a tensor in a TensorFlow graph)
    tiling: Tiling


def compute_dtype(*dtypes) -> str:
    """float64 stays float64; everything else is computed in float32."""
    dtype = backend.result_type(*dtypes)
    return "float64" if dtype == "float64" else "float32"


def _components(p, heads: int, kv_heads: int, compute: str) -> list:
    """``(2K,)`` → 2K scalars; ``(H, 2K)`` → 2K of ``(Hkv, G, 1, 1)``."""
    p = ops.cast(p, compute)
    if len(p.shape) == 2:
        p = ops.reshape(p, (kv_heads, heads // kv_heads, 1, 1, p.shape[-1]))
    return _formula.split_parameters(p)


def _problem(query, key, value, bias, mask, ranges, ts, tiling: Tiling) -> _Problem:
    compute = compute_dtype(query.dtype, key.dtype, value.dtype)
    heads, kv_heads = query.shape[2], key.shape[2]
    q_length, k_length = ops.shape(query)[1], ops.shape(key)[1]
    pads = (
        _count(q_length, tiling.q_block) * tiling.q_block - q_length,
        _count(k_length, tiling.k_block) * tiling.k_block - k_length,
    )
    q = ops.cast(query, compute) * ops.cast(tiling.scale, compute)
    if bias is not None:
        bias = score_layout(bias, heads, kv_heads, pads, 0)
    if mask is not None:
        mask = score_layout(mask, heads, kv_heads, pads, False)
    return _Problem(
        q=query_blocks(q, tiling.q_block, kv_heads),
        k=key_blocks(ops.cast(key, compute), tiling.k_block),
        v=key_blocks(ops.cast(value, compute), tiling.k_block),
        bias=bias,
        mask=mask,
        r=_components(ranges, heads, kv_heads, compute),
        t=_components(ts, heads, kv_heads, compute),
        k_length=k_length,
        tiling=tiling,
    )


def _scores(problem: _Problem, qi, kj, i, j):
    """Block ``(i, j)``: the scores ``x`` and which entries take part."""
    tiling = problem.tiling
    x = ops.einsum("bhgqd,bhkd->bhgqk", qi, kj)
    if problem.bias is not None:
        x = x + ops.cast(score_block(problem.bias, i, j, tiling), x.dtype)
    keep = ops.not_equal(x, float("-inf"))
    if problem.mask is not None:
        keep = ops.logical_and(keep, score_block(problem.mask, i, j, tiling))
    cols = j * tiling.k_block + ops.arange(tiling.k_block)
    padded = _static(problem.k_length)
    if padded is None or padded % tiling.k_block:
        keep = ops.logical_and(keep, ops.less(cols, problem.k_length))
    if tiling.is_causal:
        rows = i * tiling.q_block + ops.arange(tiling.q_block)
        keep = ops.logical_and(keep, ops.greater_equal(rows[:, None], cols[None, :]))
    return x, keep


def _keys_seen(i, key_count, tiling: Tiling):
    """How many key blocks query block ``i`` sees (causal: up to the diagonal)."""
    if not tiling.is_causal:
        return key_count
    last_row = (i + 1) * tiling.q_block - 1
    return ops.minimum(key_count, last_row // tiling.k_block + 1)


def _first_query(j, query_count, tiling: Tiling):
    """The first query block that sees key block ``j`` (causal: its diagonal)."""
    if not tiling.is_causal:
        return 0
    return ops.minimum((j * tiling.k_block) // tiling.q_block, query_count)


def _forward_blocks(problem: _Problem, prims: Primitives):
    """Output ``(nq, B, Hkv, G, bq, Dv)`` and log-sum-exp ``(nq, B, Hkv, G, bq)``."""
    q, k, v = problem.q, problem.k, problem.v
    key_count = ops.shape(k)[0]
    # (B, Hkv, G, bq, Dv) zeros, from the shapes of a query block and of v.
    acc_zeros = ops.zeros_like(q[0][..., :1]) * ops.zeros_like(v[0][0, 0, :1])

    def query_block(i, carry):
        qi = q[i]

        def key_block(j, state):
            top, total, acc = state
            x, keep = _scores(problem, qi, k[j], i, j)
            z = _formula.masked_modulate(x, keep, problem.r, problem.t)
            block_top, e, block_total = _formula.block_logsumexp(z)
            top, total, old_scale, block_scale = _formula.merge_logsumexp(
                top, total, block_top, block_total
            )
            ev = ops.einsum("bhgqk,bhkd->bhgqd", e, v[j])
            acc = acc * old_scale[..., None] + ev * block_scale[..., None]
            return top, total, acc

        rows = qi[..., 0]
        state = (ops.full_like(rows, float("-inf")), ops.zeros_like(rows), acc_zeros)
        top, total, acc = prims.fold(
            0, _keys_seen(i, key_count, problem.tiling), key_block, state
        )
        empty = ops.equal(total, 0)[..., None]
        out = ops.where(empty, ops.zeros_like(acc), acc / total[..., None])
        return carry, (out, _formula.finish_logsumexp(top, total))

    like = (acc_zeros, q[0][..., 0])
    _, (out, lse) = prims.map_blocks(ops.shape(q)[0], query_block, (), like)
    return out, lse


def forward(
    query, key, value, bias, mask, ranges, ts, tiling: Tiling, prims: Primitives
):
    """The attention output ``(B, Tq, H, Dv)`` and the log-sum-exp it saves.

    The output is in the dtype of ``query``, ``key`` and ``value`` together
    (`backend.result_type`); the log-sum-exp ``(nq, B, Hkv, G, bq)`` in the
    compute dtype.
    """
    problem = _problem(query, key, value, bias, mask, ranges, ts, tiling)
    out, lse = _forward_blocks(problem, prims)
    dtype = backend.result_type(query.dtype, key.dtype, value.dtype)
    return ops.cast(from_query_blocks(out, ops.shape(query)[1]), dtype), lse


def _sum_to(x, shape):
    """Sums ``x`` over the axes where ``shape`` is 1 (same rank), keeping them."""
    axes = tuple(a for a, d in enumerate(shape) if d == 1 and x.shape[a] != 1)
    return ops.sum(x, axis=axes, keepdims=True) if axes else x


def backward(
    query,
    key,
    value,
    bias,
    mask,
    ranges,
    ts,
    out,
    lse,
    d_out,
    tiling: Tiling,
    prims: Primitives,
):
    """Gradients of ``query``, ``key``, ``value``, ``bias`` (None without
    one), ``ranges`` and ``ts``, in their dtypes; see the module docstring.

    ``out`` and ``lse`` are what `forward` returned, ``d_out`` the upstream
    gradient of ``out``.
    """
    problem = _problem(query, key, value, bias, mask, ranges, ts, tiling)
    q, k, v = problem.q, problem.k, problem.v
    compute = q.dtype
    kv_heads = key.shape[2]
    d_out = query_blocks(ops.cast(d_out, compute), tiling.q_block, kv_heads)
    out = query_blocks(ops.cast(out, compute), tiling.q_block, kv_heads)
    delta = ops.sum(d_out * out, axis=-1)  # rowsum(dO·O) = Σ_k p·(dO·vᵀ)
    query_count = ops.shape(q)[0]
    per_head = len(ranges.shape) == 2
    factor_count = 2 * ts.shape[-1]

    def key_block(j, carry):
        d_q, d_bias, sums = carry
        kj, vj = k[j], v[j]

        def query_block(i, state):
            d_q, d_bias, d_k, d_v, part = state
            qi, d_oi = q[i], d_out[i]
            x, keep = _scores(problem, qi, kj, i, j)
            z = _formula.masked_modulate(x, keep, problem.r, problem.t)
            p = ops.exp(z - lse[i][..., None])
            d_v = d_v + ops.einsum("bhgqk,bhgqd->bhkd", p, d_oi)
            d_p = ops.einsum("bhgqd,bhkd->bhgqk", d_oi, vj)
            gs = p * (d_p - delta[i][..., None])
            d_x, products = _formula.modulator_gradients(x, gs, problem.r, problem.t)
            d_qi = ops.einsum("bhgqk,bhkd->bhgqd", d_x, kj)
            d_q = add_to_block(d_q, [i, 0, 0, 0, 0, 0], d_qi[None])
            d_k = d_k + ops.einsum("bhgqk,bhgqd->bhkd", d_x, qi)
            # Summed over the queries here, over the keys after the loop.
            part = part + prims.sum_products(products, 3)
            if problem.bias is not None:
                starts, sizes = _block_starts(problem.bias, i, j, tiling)
                d_bias = add_to_block(d_bias, starts, _sum_to(d_x, sizes))
            return d_q, d_bias, d_k, d_v, part

        # (4K, B, Hkv, G, bk) zeros, from the shapes of a query and a key block.
        row = ops.zeros_like(q[0][..., :1, 0]) * ops.zeros_like(kj[:, :, None, :, 0])
        part = ops.stack([row] * factor_count)
        state = (d_q, d_bias, ops.zeros_like(kj), ops.zeros_like(vj), part)
        d_q, d_bias, d_k, d_v, part = prims.fold(
            _first_query(j, query_count, tiling), query_count, query_block, state
        )
        axes = (1, 4) if per_head else (1, 2, 3, 4)
        return (d_q, d_bias, sums + ops.sum(part, axis=axes)), (d_k, d_v)

    if per_head:
        sums = ops.zeros((factor_count, kv_heads, query.shape[2] // kv_heads), compute)
    else:
        sums = ops.zeros((factor_count,), compute)
    d_bias = () if bias is None else ops.zeros_like(problem.bias, dtype=compute)
    (d_q, d_bias, sums), (d_k, d_v) = prims.map_blocks(
        ops.shape(k)[0],
        key_block,
        (ops.zeros_like(q), d_bias, sums),
        (k[0], v[0]),
    )

    d_q = from_query_blocks(d_q, ops.shape(query)[1]) * ops.cast(tiling.scale, compute)
    k_length = ops.shape(key)[1]
    grads = [
        ops.cast(d_q, query.dtype),
        ops.cast(from_key_blocks(d_k, k_length), key.dtype),
        ops.cast(from_key_blocks(d_v, k_length), value.dtype),
        None if bias is None else _bias_gradient(d_bias, bias, query, key),
    ]
    if per_head:
        sums = ops.reshape(sums, (factor_count, -1))
    sums = ops.moveaxis(sums, 0, -1)
    d_ranges, d_ts = _formula.parameter_gradients(sums, ops.cast(ts, compute))
    return (*grads, ops.cast(d_ranges, ranges.dtype), ops.cast(d_ts, ts.dtype))


def _bias_gradient(d_bias, bias, query, key):
    """The score-layout ``∂L/∂bias`` back in the shape and dtype of ``bias``."""
    q_length, k_length = ops.shape(query)[1], ops.shape(key)[1]
    tq, tk = d_bias.shape[3], d_bias.shape[4]
    d_bias = d_bias[:, :, :, : q_length if tq != 1 else 1, : k_length if tk != 1 else 1]
    return ops.cast(ops.reshape(d_bias, ops.shape(bias)), bias.dtype)
