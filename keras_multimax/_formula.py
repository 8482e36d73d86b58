"""The MultiMax formula, written once for every backend.

σ and its partial derivatives, in `keras.ops` so that the TensorFlow and JAX
custom gradients (``keras_multimax/backend/<name>/``) compute the same thing.
Nothing here validates, casts or reduces: callers pass tensors of one compute
dtype and the parameters already split into their ``2K`` components.

Notation (Zhou, Fritz & Keuper, ICML 2024): for order ``K`` the parameters are
two vectors of length ``2K``. ``r[2k]``/``r[2k+1]`` (``ranges``) are the lower
and upper thresholds ``b`` and ``d`` of order ``k+1``; ``t[2k]``/``t[2k+1]``
(``ts``) are their slopes ``t_b`` and ``t_d``:

    σ(x) = x + Σ_k t[2k]·relu(r[2k] − x)^(k+1) + t[2k+1]·relu(x − r[2k+1])^(k+1)

Two conventions keep σ finite where the plain formula is not:

- A term whose slope is 0 is exactly 0, also where its power overflows
  (``0·relu(x − d)² = 0·inf`` at ``x = 1e20``): ``ts = 0`` is the identity
  for every finite ``x``.
- ``±inf`` are fixed points, ``σ(±inf) = ±inf``, with no gradient to the
  parameters: ``−inf`` marks an excluded entry (MultiMax gives it
  probability 0) whatever the sign of ``ts``.
"""

from __future__ import annotations

import numpy as np
from keras import backend
from keras import ops


def split_parameters(p) -> list:
    """Splits a ``(..., 2K)`` parameter into ``2K`` tensors broadcasting against x."""
    return [p[..., i] for i in range(p.shape[-1])]


def order_of(t: list) -> int:
    return len(t) // 2


def _power(base, exponent: int):
    """``base ** exponent`` as repeated products (exact, and cheap to fuse)."""
    out = base
    for _ in range(exponent - 1):
        out = out * base
    return out


def _scaled(slope, term):
    """``slope · term``, exactly 0 where the slope is 0 (even if ``term`` is inf)."""
    return ops.where(ops.equal(slope, 0), ops.zeros_like(term), slope * term)


def _is_infinite(x):
    # `abs(x) == inf`, not `isinf`: LiteRT has no builtin IsInf.
    return ops.equal(ops.abs(x), float("inf"))


def modulate(x, r: list, t: list):
    """σ(x) = x + Σ_k t[2k]·relu(r[2k] − x)^(k+1) + t[2k+1]·relu(x − r[2k+1])^(k+1)."""
    out = x
    for k in range(order_of(t)):
        lower = ops.relu(r[2 * k] - x)
        upper = ops.relu(x - r[2 * k + 1])
        out = out + _scaled(t[2 * k], _power(lower, k + 1))
        out = out + _scaled(t[2 * k + 1], _power(upper, k + 1))
    return ops.where(_is_infinite(x), x, out)


def partials(x, r: list, t: list):
    """Returns ∂σ/∂x and the factors of ∂σ/∂ranges and ∂σ/∂ts.

    With ``lo = relu(b − x)`` and ``hi = relu(x − d)`` at order ``k+1``:
    ``∂σ/∂b = (k+1)·t_b·lo^k``, ``∂σ/∂d = −(k+1)·t_d·hi^k`` (``lo^0``/``hi^0``
    being the step function, as relu' in autodiff), ``∂σ/∂t_b = lo^(k+1)``,
    ``∂σ/∂t_d = hi^(k+1)`` and ``∂σ/∂x = 1 − Σ_i ∂σ/∂ranges[i]``.

    The factors returned for ``ranges`` leave out ``±(k+1)·t`` (see
    `range_scale`): it is constant over every summed entry, so callers apply
    it after reducing. Factors are 0 at ``x = ±inf`` (fixed points of σ) and
    saturate at the largest float of the dtype where a power overflows, so
    that parameter gradients stay finite.
    """
    finite = ops.logical_not(_is_infinite(x))
    d_x, ranges_factors, ts_factors = finite_partials(x, r, t)
    zeros = ops.zeros_like(x)
    return (
        ops.where(finite, d_x, ops.ones_like(d_x)),
        [ops.where(finite, f, zeros) for f in ranges_factors],
        [ops.where(finite, f, zeros) for f in ts_factors],
    )


def finite_partials(x, r: list, t: list):
    """`partials` for finite ``x``, without the ``±inf`` fixed points.

    For callers that replace non-finite entries themselves, once, instead of
    once per factor (the JAX backward: ``backend/jax/multimax.py``). Factors
    saturate at the largest float of the dtype, as in `partials`.
    """
    largest = _largest(x.dtype)
    d_x = ops.ones_like(x)
    ranges_factors, ts_factors = [], []
    for k in range(order_of(t)):
        lower = ops.relu(r[2 * k] - x)
        upper = ops.relu(x - r[2 * k + 1])
        if k == 0:
            lower_k = ops.cast(ops.greater(lower, 0), x.dtype)
            upper_k = ops.cast(ops.greater(upper, 0), x.dtype)
        else:
            lower_k, upper_k = _power(lower, k), _power(upper, k)
        d_x = d_x - (k + 1) * (
            _scaled(t[2 * k], lower_k) - _scaled(t[2 * k + 1], upper_k)
        )
        ranges_factors += [ops.minimum(lower_k, largest), ops.minimum(upper_k, largest)]
        ts_factors += [
            ops.minimum(lower_k * lower, largest),
            ops.minimum(upper_k * upper, largest),
        ]
    return d_x, ranges_factors, ts_factors


def _hits(z, target):
    """Where column j of a ``(tokens, chunk)`` block is the token's label.

    ``target = label − first column of the chunk`` (outside the chunk: no hit).
    """
    columns = ops.arange(ops.shape(z)[1], dtype=target.dtype)
    return ops.equal(columns[None, :], target[:, None])


# ---------------------------------------------------------------------------
# Online log-sum-exp over blocks (the fused LM-head loss, blockwise attention)
# ---------------------------------------------------------------------------
#
# A row's logsumexp is kept as (top, total): its maximum so far and the sum of
# exp(s − top) over the blocks seen. Blocks are merged one at a time; excluded
# entries hold −inf (they add exactly 0), and a row that has seen nothing but
# −inf keeps top = −inf and total = 0.


def _finite_or_zero(top):
    """``top`` where it is a number, 0 where it is −inf (a row with no entry)."""
    return ops.where(ops.equal(top, float("-inf")), ops.zeros_like(top), top)


def block_logsumexp(s):
    """A block's share of the logsumexp over its last axis.

    Returns ``top = max(s)``, ``e = exp(s − top)`` and ``total = Σ e``; a row
    of −inf only gives ``top = −inf``, ``e = 0`` and ``total = 0`` (not NaN).
    """
    top = ops.max(s, axis=-1)
    e = ops.exp(s - ops.expand_dims(_finite_or_zero(top), -1))
    return top, e, ops.sum(e, axis=-1)


def merge_logsumexp(top, total, block_top, block_total):
    """Merges a block's ``(block_top, block_total)`` into a row's ``(top, total)``.

    Returns the new ``(top, total)`` and the factors that rescaled the old
    total and the block's (``exp(top − new_top)``, ``exp(block_top −
    new_top)``), for the sums kept beside it (attention's ``Σ e·v``).
    """
    new_top = ops.maximum(top, block_top)
    safe = _finite_or_zero(new_top)
    old_scale = ops.exp(top - safe)
    block_scale = ops.exp(block_top - safe)
    return (
        new_top,
        total * old_scale + block_total * block_scale,
        old_scale,
        block_scale,
    )


def finish_logsumexp(top, total):
    """``top + log(total)``; 0 for a row that had no entry (``total = 0``).

    NaN stays NaN, so that a NaN input shows.
    """
    empty = ops.equal(total, 0)
    return ops.where(empty, ops.zeros_like(top), top + ops.log(total))


def cross_entropy_chunk(z, target, ranges, ts):
    """One vocabulary chunk of ``logsumexp(σ(z)) − σ(z)[label]``, per token.

    Returns the max of σ(z), Σ exp(σ(z) − max) and σ(z)[target] (0 where the
    label is not in this chunk); the caller merges chunks with
    `merge_logsumexp`.
    """
    s = modulate(z, split_parameters(ranges), split_parameters(ts))
    top, _, total = block_logsumexp(s)
    picked = ops.sum(ops.where(_hits(z, target), s, ops.zeros_like(s)), axis=1)
    return top, total, picked


def cross_entropy_chunk_gradients(z, lse, g, target, ranges, ts):
    """∂L/∂z of a chunk, its column sums (∂L/∂bias) and the 4K parameter sums per token.

    With ``p = exp(σ(z) − lse)``: ``∂L/∂σ = g·(p − onehot(label))`` and
    ``∂L/∂z = ∂L/∂σ · σ'(z)``. The parameter sums are per token (``(4K,
    tokens)``, added up by the caller) rather than to scalars: XLA on CPU
    runs a reduction to a scalar on one thread, and row sums were 30-45 %
    faster for the whole kernel at [4096, 1024].
    """
    r, t = split_parameters(ranges), split_parameters(ts)
    p = ops.exp(modulate(z, r, t) - lse[:, None])
    ds = g[:, None] * (p - ops.cast(_hits(z, target), z.dtype))
    d_z, ranges_factors, ts_factors = partials(z, r, t)
    dz = ds * d_z
    sums = ops.stack([ops.sum(ds * f, axis=1) for f in ranges_factors + ts_factors])
    return dz, ops.sum(dz, axis=0), sums


def range_scale(order: int) -> list[int]:
    """±(k+1) for ranges[2k] (+) and ranges[2k+1] (−), in the order of the factors."""
    return [s * (k + 1) for k in range(order) for s in (1, -1)]


def parameter_gradients(sums, ts):
    """∂L/∂ranges and ∂L/∂ts from the 4K sums of ∂L/∂σ times the factors.

    ``sums`` holds on its last axis the sums of ∂L/∂σ times the factors of
    `partials` (the 2K of ``ranges``, then the 2K of ``ts``); ``ts`` is in
    the dtype of ``sums`` and broadcasts against ``sums[..., :2K]``.
    """
    n = ts.shape[-1]
    scale = ops.convert_to_tensor(range_scale(n // 2), dtype=sums.dtype)
    d_ranges = sums[..., :n] * ts * scale
    # ∂σ/∂b = (k+1)·t_b·lo^k is exactly 0 where t_b = 0, also if Σ lo^k overflowed.
    d_ranges = ops.where(ops.equal(ts, 0), ops.zeros_like(d_ranges), d_ranges)
    return d_ranges, sums[..., n:]


# ---------------------------------------------------------------------------
# Blocks of attention scores (blockwise MultiMax attention)
# ---------------------------------------------------------------------------


def masked_modulate(x, keep, r: list, t: list):
    """σ(x) where ``keep``, −inf elsewhere.

    σ is clipped to the finite floats (an overflowing σ would turn into
    inf − inf = NaN in the SoftMax); the excluded entries get −inf *after*
    σ, so that they have probability 0 whatever the sign of ``t``.
    """
    largest = _largest(x.dtype)
    z = ops.clip(modulate(x, r, t), -largest, largest)
    return ops.where(keep, z, ops.full_like(z, float("-inf")))


def modulator_gradients(x, gs, r: list, t: list):
    """∂L/∂x and the 4K products ``gs · factor`` given ``gs = ∂L/∂σ``.

    Entries with ``gs = 0`` (excluded ones) get exactly 0, whatever ``x``
    holds there (inf, NaN, a masked huge score). Non-finite ``x`` are fixed
    points of σ: ∂σ/∂x = 1 and nothing for the parameters (their factors
    are computed at 0 instead). The products are in the order of
    `partials`' factors (ranges, then ts).
    """
    finite = ops.less(ops.abs(x), float("inf"))
    zero = ops.zeros_like(gs)
    d_x, ranges_factors, ts_factors = finite_partials(ops.where(finite, x, zero), r, t)
    dx = ops.where(ops.equal(gs, 0), zero, ops.where(finite, gs * d_x, gs))
    g_finite = ops.where(finite, gs, zero)
    return dx, [g_finite * f for f in ranges_factors + ts_factors]


def _largest(dtype) -> float:
    return float(np.finfo(backend.standardize_dtype(dtype)).max)
