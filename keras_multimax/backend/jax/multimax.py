"""MultiMax and SegLU on JAX: one `jax.custom_vjp` each, closed-form backward.

The formula is `keras_multimax._formula` (written with `keras.ops`, which on
this backend are `jax.numpy` calls); this module adds what JAX needs around
it: the compute dtype, the exclusion of masked and −inf entries, and the
backward pass from the saved input and output alone. Arguments arrive
validated by `keras_multimax.ops`; everything here is traceable by `jax.jit`
(shapes are static under JAX, so no check is left for run time).

Performance (``benchmarks/bench_jax.py``): the forward is one loop for σ
and XLA's SoftMax kernel, with no pass after it (see `_multimax_values`).
The backward sums the parameter products over a split leading axis (see
`_SPLIT`) and, on the CPU, runs over cache-sized slices of the leading
axis (see `_SLICE_BYTES`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_multimax import _formula

_UPCAST_DTYPES = (jnp.float16, jnp.bfloat16)


def compute_dtype(dtype):
    """float16/bfloat16 are computed in float32 (order-2 squares overflow float16)."""
    return jnp.float32 if dtype in _UPCAST_DTYPES else dtype


def convert_to_tensor(x):
    """`x` as a JAX array; strings and objects stay NumPy arrays, which
    `keras_multimax.ops` then rejects by dtype (JAX has no string arrays)."""
    if isinstance(x, (np.ndarray, list, tuple, str, bytes)):
        array = np.asarray(x)
        if array.dtype.kind in "USO":
            return array
    # Keras' conversion also reads Keras variables (traced inside `fit`).
    return keras.ops.convert_to_tensor(x)


def greater_than_half(mask: jax.Array) -> jax.Array:
    return mask > 0.5


def check_mask_at_run_time(mask, x, message: str):
    """`mask` unchanged: only symbolic dimensions (`jax.export` with a
    polymorphic batch, as Keras' ``model.export`` on JAX traces) get here,
    and JAX itself refuses to broadcast them unless they provably fit."""
    del x, message
    return mask


def _split(p, dtype):
    return _formula.split_parameters(p.astype(dtype))


def _keep(x, mask):
    """The entries that take part in the normalisation: not masked, not −inf."""
    keep = x != -jnp.inf
    return keep if mask is None else jnp.logical_and(keep, mask)


def _reduced_axes(shape: tuple, target: tuple) -> tuple:
    """The axes of `shape` summed to get `target` (broadcast from the right)."""
    lead = len(shape) - len(target)
    return tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(target) if d == 1 and shape[lead + i] != 1
    )


def _sum_to(value, target: tuple):
    """Sums `value` (broadcast from `target`, aligned right) down to `target`."""
    axes = _reduced_axes(value.shape, target)
    return (jnp.sum(value, axis=axes) if axes else value).reshape(target)


def _is_static(shape: tuple) -> bool:
    """Whether every dimension is a number (not symbolic, as under `jax.export`)."""
    return all(isinstance(d, int) for d in shape)


def _variadic_sum(values: list, axes: tuple) -> tuple:
    """Sums of several arrays of one shape over `axes`, in one reduction."""
    zeros = tuple(jnp.zeros((), v.dtype) for v in values)
    return jax.lax.reduce(
        tuple(values), zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), axes
    )


# The parameter gradients are sums of 4K products over every entry of x.
# XLA's CPU emitter runs a multi-output reduction over a long or minor axis
# as scalar code (float sums are not reassociated), one output at a time:
# 4K full sums cost 5-7x the SoftMax backward. Summed over a leading axis of
# length 4 instead, the reduction is unrolled and vectorised across the
# contiguous rest; the quarter-size partial sums are then reduced one by one,
# which XLA hands to its vectorised library kernels.
# Measured at [16, 6, 197, 197], order 2, data in cache: the 8 sums take
# 12 ms as one reduction to scalars, 3.7 ms this way.
_SPLIT = 4


def _sums_to(values: list, target: tuple) -> list:
    """`_sum_to` of several arrays of one shape (see `_SPLIT`)."""
    shape = values[0].shape
    axes = _reduced_axes(shape, target)
    if not axes:
        return [v.reshape(target) for v in values]
    # Symbolic dimensions (`jax.export`): no split that needs their value.
    static = _is_static(shape)
    if static and len(axes) == len(shape) and np.prod(shape) % _SPLIT == 0:
        # Every entry is summed: any split of the flat array will do.
        firsts = _variadic_sum([v.reshape(_SPLIT, -1) for v in values], (0,))
        return [jnp.sum(f).reshape(target) for f in firsts]
    split = next((a for a in axes if static and shape[a] % _SPLIT == 0), None)
    if split is None:
        return [s.reshape(target) for s in _variadic_sum(values, axes)]
    parts = shape[:split] + (_SPLIT, shape[split] // _SPLIT) + shape[split + 1 :]
    # The partial sums have the rank of x again, the split axis a quarter long.
    firsts = _variadic_sum([v.reshape(parts) for v in values], (split,))
    return [_sum_to(f, target) for f in firsts]


def _modulated_scores(x, ranges, ts, mask):
    """σ(x) clipped to the finite floats, excluded entries set to −inf."""
    compute = compute_dtype(x.dtype)
    x = x.astype(compute)
    z = _formula.modulate(x, _split(ranges, compute), _split(ts, compute))
    info = jnp.finfo(compute)
    # An overflowing σ (±inf) would turn into inf − inf = NaN in the SoftMax.
    z = jnp.clip(z, info.min, info.max)
    return jnp.where(_keep(x, mask), z, -jnp.inf)


def _multimax_values(x, ranges, ts, mask, axes):
    """The SoftMax of σ(x), written out so that excluded entries need no extra pass.

    Excluded entries hold −inf: exp gives them exactly 0. A fully excluded
    slice has its max raised to the lowest float (exp(−inf − lowest) = 0, not
    NaN) and its sum of 0 raised to the smallest normal, so it comes out as
    zeros. Elsewhere the max is a score and the sum is at least 1: both
    bounds leave the values of `jax.nn.softmax` unchanged.
    """
    z = _modulated_scores(x, ranges, ts, mask)
    info = jnp.finfo(z.dtype)
    top = jnp.maximum(jnp.max(z, axis=axes, keepdims=True), info.min)
    e = jnp.exp(z - top)
    y = e / jnp.maximum(jnp.sum(e, axis=axes, keepdims=True), info.tiny)
    return y.astype(x.dtype)


def _gradients(x, gs, ranges, ts):
    """∂L/∂x and the 4K parameter sums given gs = ∂L/∂σ (compute dtype).

    Non-finite entries of x are replaced once, before `finite_partials`: there
    ∂σ/∂x = 1 and the parameters get nothing (±inf are fixed points of σ;
    NaN gets the same treatment). gs = 0 (masked entries) gives 0 whatever x
    holds there.
    """
    compute = gs.dtype
    xc = x.astype(compute)
    finite = jnp.abs(xc) < jnp.inf
    d_x, ranges_factors, ts_factors = _formula.finite_partials(
        jnp.where(finite, xc, 0), _split(ranges, compute), _split(ts, compute)
    )
    zero = jnp.zeros_like(gs)
    gx = jnp.where(gs == 0, zero, jnp.where(finite, gs * d_x, gs))
    g_finite = jnp.where(finite, gs, zero)
    sums = _sums_to(
        [g_finite * f for f in ranges_factors + ts_factors], ranges.shape[:-1]
    )
    return gx, jnp.stack(sums, axis=-1)


def _parameter_gradients(sums, ranges, ts):
    """∂L/∂ranges and ∂L/∂ts from the 4K sums of `_gradients`."""
    n = ts.shape[-1]
    ts_c = ts.astype(sums.dtype)
    scale = jnp.asarray(_formula.range_scale(n // 2), sums.dtype)
    d_ranges = sums[..., :n] * ts_c * scale
    # ∂σ/∂b = (k+1)·t_b·lo^k is exactly 0 where t_b = 0, also if Σ lo^k overflowed.
    d_ranges = jnp.where(ts_c == 0, jnp.zeros_like(d_ranges), d_ranges)
    return d_ranges.astype(ranges.dtype), sums[..., n:].astype(ts.dtype)


def _backward(x, gs, ranges, ts):
    """Gradients of x, ranges and ts given gs = ∂L/∂σ (in the compute dtype)."""
    gx, sums = _gradients(x, gs, ranges, ts)
    return (
        _sum_to(gx, x.shape).astype(x.dtype),
        *_parameter_gradients(sums, ranges, ts),
    )


# The MultiMax backward reads x, y and dy and writes ∂L/∂x, with several
# x-sized temporaries in between (∂L/∂σ, the partial sums). On the CPU it runs
# over slices of the leading axis of about this many bytes each, in a loop
# whose temporaries are slice-sized. That matters mostly through glibc's
# malloc: large temporaries land in per-thread arenas whose heaps are unmapped
# when empty, so every call refaults them page by page. Forward+backward at
# [16, 6, 197, 197]: 1.5-1.8x faster in 4 slices than whole with the default
# allocator, 6-10 % slower when the allocator keeps its memory
# (benchmarks/README.md, "Page faults"). On GPU and TPU the loop is not used:
# their memory is fast and their kernels want large shapes.
_SLICE_BYTES = 4 << 20


def _slices(x, y, ranges, axes) -> int:
    """How many slices of the leading axis the backward loops over (1: none).

    Slices of at most `_SLICE_BYTES`, as few as the length of the axis
    allows; no loop for arrays that fit in cache anyway, for slices so small
    that the loop would cost more than it saves, on other platforms than the
    CPU, where the leading axis is normalised over or holds parameters, and
    where the parameters or the mask broadcast x to a larger output y.
    """
    shape = x.shape
    if (
        jax.default_backend() != "cpu"
        # Symbolic dimensions (`jax.export`, jax2tf) first: no comparison below
        # can be decided on them.
        or not _is_static(shape + y.shape)
        or y.shape != shape
        or len(shape) < 2
        or shape[0] < 2
        or 0 in {a % len(shape) for a in axes}
        or (len(ranges.shape) - 1 == len(shape) and ranges.shape[0] != 1)
    ):
        return 1
    row_bytes = int(np.prod(shape[1:])) * np.dtype(compute_dtype(x.dtype)).itemsize
    if shape[0] * row_bytes <= 2 * _SLICE_BYTES:
        return 1
    count = next(
        c
        for c in range(2, shape[0] + 1)
        if shape[0] % c == 0
        and shape[0] // c * row_bytes <= _SLICE_BYTES
        or c == shape[0]
    )
    return count if shape[0] // count * row_bytes >= _SLICE_BYTES // 16 else 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _multimax(x, ranges, ts, mask, axes):
    return _multimax_values(x, ranges, ts, mask, axes)


def _multimax_fwd(x, ranges, ts, mask, axes):
    y = _multimax_values(x, ranges, ts, mask, axes)
    # The backward keeps x and the output only.
    return y, (x, ranges, ts, mask, y)


def _multimax_bwd(axes, saved, dy):
    x, ranges, ts, mask, y = saved
    compute = compute_dtype(y.dtype)

    def gradients(x, y, dy):
        yc, dyc = y.astype(compute), dy.astype(compute)
        # The SoftMax backward; it is 0 at excluded entries, and so are their gradients.
        # Written y·dy − y·Σ dy·y: jax 0.10.2 on the CPU miscomputes y·(dy − Σ dy·y)
        # (tens of % off) when dy is a broadcast, e.g. of a weight shared over the batch
        # (`tests/test_backend_jax.py::test_gradient_with_an_upstream_that_broadcasts`).
        gs = yc * dyc - yc * jnp.sum(dyc * yc, axis=axes, keepdims=True)
        return _gradients(x, gs, ranges, ts)

    count = _slices(x, y, ranges, axes)
    if count == 1:
        gx, sums = gradients(x, y, dy)
        gx = gx.astype(x.dtype)
    else:
        size = x.shape[0] // count

        def one_slice(i, carry):
            total, out = carry

            def part(a):
                return jax.lax.dynamic_slice_in_dim(a, i * size, size)

            gx, sums = gradients(part(x), part(out), part(dy))
            # ∂L/∂x overwrites y, slice by slice: no x-sized buffer to allocate and clear.
            out = jax.lax.dynamic_update_slice_in_dim(
                out, gx.astype(out.dtype), i * size, 0
            )
            return total + sums, out

        zeros = jnp.zeros(ranges.shape[:-1] + (2 * ts.shape[-1],), compute)
        sums, gx = jax.lax.fori_loop(0, count, one_slice, (zeros, y))
    return (_sum_to(gx, x.shape), *_parameter_gradients(sums, ranges, ts), None)


_multimax.defvjp(_multimax_fwd, _multimax_bwd)


def _seglu_values(x, ranges, ts):
    compute = compute_dtype(x.dtype)
    out = _formula.modulate(
        x.astype(compute), _split(ranges, compute), _split(ts, compute)
    )
    return out.astype(jnp.result_type(x.dtype))


@jax.custom_vjp
def _seglu(x, ranges, ts):
    return _seglu_values(x, ranges, ts)


def _seglu_fwd(x, ranges, ts):
    return _seglu_values(x, ranges, ts), (x, ranges, ts)


def _seglu_bwd(saved, dy):
    x, ranges, ts = saved
    return _backward(x, dy.astype(compute_dtype(dy.dtype)), ranges, ts)


_seglu.defvjp(_seglu_fwd, _seglu_bwd)


def multimax(x, ranges, ts, axes: tuple, mask):
    """MultiMax of validated arrays (`keras_multimax.ops.multimax`)."""
    return _multimax(x, ranges, ts, mask, tuple(axes))


def seglu(x, ranges, ts):
    """SegLU of validated arrays (`keras_multimax.ops.seglu`)."""
    return _seglu(x, ranges, ts)
