"""MultiMax and SegLU on JAX: one `jax.custom_vjp` each, closed-form backward.

The formula is `keras_multimax._formula` (written with `keras.ops`, which on
this backend are `jax.numpy` calls); this module adds what JAX needs around
it: the compute dtype, the exclusion of masked and −inf entries, and the
backward pass from the saved input and output alone. Arguments arrive
validated by `keras_multimax.ops`; everything here is traceable by `jax.jit`
(shapes are static under JAX, so no check is left for run time).

Performance (``benchmarks/bench_ops.py --backend jax``): XLA fuses the whole
forward into the SoftMax and the elementwise backward into a few loops. The
parameter gradients are sums over every entry of x; XLA's CPU emitter runs a
full reduction to a scalar in one thread, so each product is first summed
over the last axis of x (a row reduction) and the small remainder reduced
after (see `_sum_to`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

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


@contextlib.contextmanager
def plain_ops() -> Iterator[None]:
    """No effect on JAX: `jax.jit` compiles the whole program, there is no
    separate kernel to keep out of exported graphs (see the TensorFlow
    `keras_multimax.backend.tensorflow.multimax.plain_ops`)."""
    yield


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


def _sums_to(values: list, target: tuple) -> list:
    """`_sum_to` of several arrays of one shape, in one variadic reduction.

    One reduction reads x and gs once for every product, instead of once per
    parameter factor: measured 3.5x faster than separate sums on CPU, where
    XLA runs each reduction in a single thread.
    """
    axes = _reduced_axes(values[0].shape, target)
    if not axes:
        return [v.reshape(target) for v in values]
    zeros = tuple(jnp.zeros((), v.dtype) for v in values)
    sums = jax.lax.reduce(
        tuple(values),
        zeros,
        lambda a, b: tuple(u + v for u, v in zip(a, b)),
        axes,
    )
    return [s.reshape(target) for s in sums]


def _modulated_scores(x, ranges, ts, mask):
    """σ(x) clipped to the finite floats, excluded entries set to the lowest."""
    compute = compute_dtype(x.dtype)
    x = x.astype(compute)
    z = _formula.modulate(x, _split(ranges, compute), _split(ts, compute))
    info = jnp.finfo(compute)
    # An overflowing σ (±inf) would turn into inf − inf = NaN in the SoftMax.
    z = jnp.clip(z, info.min, info.max)
    return jnp.where(_keep(x, mask), z, info.min)


def _multimax_values(x, ranges, ts, mask, axes):
    y = jax.nn.softmax(_modulated_scores(x, ranges, ts, mask), axis=axes)
    # A fully excluded slice, filled with the lowest float, would come out uniform.
    y = jnp.where(_keep(x, mask), y, 0)
    return y.astype(x.dtype)


def _backward(x, gs, ranges, ts):
    """Gradients of x, ranges and ts given gs = ∂L/∂σ (in the compute dtype)."""
    compute = gs.dtype
    xc = x.astype(compute)
    d_x, ranges_factors, ts_factors = _formula.partials(
        xc, _split(ranges, compute), _split(ts, compute)
    )
    zero = jnp.zeros_like(gs)
    excluded = gs == 0
    # gs = 0 (masked entries) gives 0 whatever x holds there (inf, NaN).
    gx = jnp.where(excluded, zero, gs * d_x)
    lead = ranges.shape[:-1]
    sums = _sums_to(
        [jnp.where(excluded, zero, gs * f) for f in ranges_factors + ts_factors],
        lead,
    )
    n = ts.shape[-1]
    ts_c = ts.astype(compute)
    scale = jnp.asarray(_formula.range_scale(n // 2), compute)
    d_ranges = jnp.stack(sums[:n], axis=-1) * ts_c * scale
    # ∂σ/∂b = (k+1)·t_b·lo^k is exactly 0 where t_b = 0, also if Σ lo^k overflowed.
    d_ranges = jnp.where(ts_c == 0, jnp.zeros_like(d_ranges), d_ranges)
    d_ts = jnp.stack(sums[n:], axis=-1)
    return (
        _sum_to(gx, x.shape).astype(x.dtype),
        d_ranges.astype(ranges.dtype),
        d_ts.astype(ts.dtype),
    )


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
    yc = y.astype(compute)
    dyc = dy.astype(compute)
    # The SoftMax backward; it is 0 at excluded entries, and so are their gradients.
    gs = yc * (dyc - jnp.sum(dyc * yc, axis=axes, keepdims=True))
    gx, gr, gt = _backward(x, gs, ranges, ts)
    return gx, gr, gt, None


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
