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


def cross_entropy_chunk(z, target, ranges, ts):
    """One vocabulary chunk of ``logsumexp(σ(z)) − σ(z)[label]``, per token.

    Returns the max of σ(z), Σ exp(σ(z) − max) and σ(z)[target] (0 where the
    label is not in this chunk); the caller merges chunks as an online
    logsumexp.
    """
    s = modulate(z, split_parameters(ranges), split_parameters(ts))
    top = ops.max(s, axis=1)
    total = ops.sum(ops.exp(s - top[:, None]), axis=1)
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


def _largest(dtype) -> float:
    return float(np.finfo(backend.standardize_dtype(dtype)).max)
