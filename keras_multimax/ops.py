"""MultiMax math: the piece-wise modulator (SegLU), MultiMax and their gradients.

This module is the only place in keras_multimax where the formula lives. Layers
hold weights and configuration and call the functions below.

Notation (Zhou, Fritz & Keuper, ICML 2024): for order ``K`` the parameters are
two vectors of length ``2K``. ``ranges[2k]``/``ranges[2k+1]`` are the lower and
upper thresholds ``b`` and ``d`` of order ``k+1``; ``ts[2k]``/``ts[2k+1]`` are
their slopes ``t_b`` and ``t_d``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from keras_multimax import _formula
from keras_multimax._cross_entropy import multimax_cross_entropy

try:  # Whether a gradient tape is recording (see "Export" below).
    from tensorflow.python.eager.record import (
        could_possibly_record as _tape_is_recording,
    )
except ImportError:  # pragma: no cover - private API moved: fuse graphs only

    def _tape_is_recording() -> bool:
        return False


TensorLike = tf.types.experimental.TensorLike

__all__ = ["multimax", "multimax_cross_entropy", "plain_ops", "seglu"]

# Inputs in these dtypes are computed in float32 and returned in their own
# dtype: order-2 squares of |x| > 256 overflow float16.
_UPCAST_DTYPES = (tf.float16, tf.bfloat16)


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _to_tensor(value, name: str) -> tf.Tensor:
    try:
        return tf.convert_to_tensor(value)
    except (TypeError, ValueError) as error:  # e.g. a None inside a list
        raise TypeError(
            f"`{name}` could not be converted to a tensor ({error}). "
            f"Received: {name}={value!r}"
        ) from None


def _float_tensor(x, name: str) -> tf.Tensor:
    if x is None:
        raise TypeError(
            f"`{name}` must be a floating-point tensor, not None. Received: {name}=None"
        )
    x = _to_tensor(x, name)
    if not x.dtype.is_floating:
        raise TypeError(
            f"`{name}` must be a floating-point tensor "
            f"(float16, bfloat16, float32 or float64). "
            f"Received: {name}.dtype={x.dtype.name}"
        )
    return x


def _compute_dtype(dtype: tf.DType) -> tf.DType:
    return tf.float32 if dtype in _UPCAST_DTYPES else dtype


def _check_parameters(x: tf.Tensor, ranges: tf.Tensor, ts: tf.Tensor) -> int:
    """Validates `ranges`/`ts` against `x` and returns the order K."""
    if ranges.shape.rank == 0 or ranges.shape.rank is None:
        raise ValueError(
            "`ranges` must have a static rank of at least 1 with the "
            f"thresholds on its last axis. Received: ranges.shape={ranges.shape}"
        )
    if ts.shape.rank == 0 or ts.shape.rank is None:
        raise ValueError(
            "`ts` must have a static rank of at least 1 with the slopes on "
            f"its last axis. Received: ts.shape={ts.shape}"
        )
    n = ts.shape[-1]
    if n is None or n < 2 or n % 2:
        raise ValueError(
            "The last axis of `ts` must have a static, even length 2*order "
            f"(order >= 1). Received: ts.shape={ts.shape}"
        )
    if ranges.shape[-1] != n:
        raise ValueError(
            "`ranges` and `ts` must have the same length 2*order on their "
            f"last axis. Received: ranges.shape={ranges.shape}, "
            f"ts.shape={ts.shape}"
        )
    if ranges.shape != ts.shape:
        raise ValueError(
            "`ranges` and `ts` must have the same shape. "
            f"Received: ranges.shape={ranges.shape}, ts.shape={ts.shape}"
        )
    if x.shape.rank is None:
        raise ValueError(
            "`x` must have a known rank (the gradients are reduced over the "
            f"axes that `ranges`/`ts` broadcast). Received: x.shape={x.shape}"
        )
    lead = ranges.shape[:-1]
    if not lead.is_fully_defined():
        raise ValueError(
            "The leading dimensions of `ranges` and `ts` must be static. "
            f"Received: ranges.shape={ranges.shape}"
        )
    if lead.rank > x.shape.rank:
        raise ValueError(
            "The leading dimensions of `ranges`/`ts` broadcast against "
            "`x` from the right and cannot have more dimensions than `x`. "
            f"Received: x.shape={x.shape}, ranges.shape={ranges.shape}"
        )
    try:
        tf.broadcast_static_shape(x.shape, lead)
    except ValueError:
        raise ValueError(
            "The leading dimensions of `ranges`/`ts` must broadcast "
            f"against `x`. Received: x.shape={x.shape}, "
            f"ranges.shape={ranges.shape}"
        ) from None
    return n // 2


def _normalize_axis(axis, rank: int | None) -> tuple[int, ...]:
    """Returns `axis` as a tuple of non-negative ints (or raw ints if rank unknown)."""
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if not axes:
        raise ValueError(f"`axis` must name at least one axis. Received: axis={axis}")
    for a in axes:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
            raise TypeError(
                f"`axis` must be an int or a tuple of ints. Received: axis={axis!r}"
            )
    axes = tuple(int(a) for a in axes)
    if rank is None:
        return axes
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"`axis` is out of range for an input of rank {rank}. "
                f"Received: axis={axis}"
            )
        out.append(a % rank)
    if len(set(out)) != len(out):
        raise ValueError(f"`axis` contains a repeated axis. Received: axis={axis}")
    return tuple(out)


def _prepare_mask(mask, x: tf.Tensor) -> tf.Tensor:
    mask = _to_tensor(mask, "mask")
    if mask.dtype != tf.bool:
        if not (mask.dtype.is_floating or mask.dtype.is_integer):
            raise TypeError(
                "`mask` must be boolean or numeric (kept where > 0.5). "
                f"Received: mask.dtype={mask.dtype.name}"
            )
        mask = tf.greater(mask, tf.cast(0.5, mask.dtype))
    if mask.shape.rank is None:
        raise ValueError(
            "`mask` must have a known rank (it broadcasts against `x` from the "
            f"right). Received: mask.shape={mask.shape}, x.shape={x.shape}"
        )
    if mask.shape.rank > x.shape.rank:
        raise ValueError(
            "`mask` must be broadcastable to `x` and must not have more "
            f"dimensions. Received: x.shape={x.shape}, mask.shape={mask.shape}"
        )
    message = (
        "`mask` must be broadcastable to `x`: each mask dimension must be 1 or "
        "match the corresponding dimension of `x`."
    )
    unknown = False
    for m_dim, x_dim in zip(mask.shape[::-1], x.shape[::-1]):
        if m_dim is not None and x_dim is not None and m_dim not in (1, x_dim):
            raise ValueError(
                f"{message} Received: x.shape={x.shape}, mask.shape={mask.shape}"
            )
        unknown |= m_dim is None or (x_dim is None and m_dim != 1)
    if unknown:
        # Shapes only known when the graph runs: check them then, since a
        # mask larger than `x` on some axis would silently grow the output.
        rank = mask.shape.rank
        m_shape = tf.shape(mask)
        x_shape = tf.shape(x)[x.shape.rank - rank :]
        fits = tf.reduce_all(tf.equal(m_shape, 1) | tf.equal(m_shape, x_shape))
        check = tf.debugging.Assert(
            fits,
            [message, "Received: x.shape=", tf.shape(x), "mask.shape=", m_shape],
        )
        with tf.control_dependencies([check]):
            mask = tf.identity(mask)
    return mask


# ---------------------------------------------------------------------------
# The formula
# ---------------------------------------------------------------------------
#
# Performance (measured by benchmarks/bench_ops.py): on CPU each TensorFlow op
# is one pass over memory and the modulator alone is a dozen elementwise ops.
# The elementwise work is therefore written once (`_modulate`, `_partials`)
# and compiled by XLA into one fused kernel per pass: the `_*_kernel`
# functions are inner `tf.function(jit_compile=True)`s (inside an outer XLA
# function they are simply inlined). Reductions stay TensorFlow ops, which on
# CPU are several times faster than XLA's, and the normalisation is
# `tf.nn.softmax`. The parameter gradients are one stacked reduction (from
# order 2, pairs of factors packed as complex numbers), scaled by the slopes
# after it.
#
# Export: a graph that leaves TensorFlow must not contain the forward kernel.
# tf2onnx (through Grappler) does not inline functions marked for XLA and
# fails on them, and a SavedModel server without XLA's CPU JIT (TF Serving's
# default) cannot run them. The forward is therefore built from the same
# formula as plain ops while a graph is traced for export: inside `plain_ops()`
# (which `keras_multimax.export` uses) and, detected from the Python call
# stack at trace time, under Keras' `model.export`/`ExportArchive`,
# `tf.saved_model.save`, tf2onnx and the LiteRT converter (see
# `_EXPORTER_MODULES`). A graph traced before it reaches an exporter keeps
# what it was traced with. Every other graph (`model.predict`, training steps,
# a user's `tf.function`) runs the forward kernel, and so do eager training
# steps. Eager inference uses plain ops: an XLA kernel is compiled for every
# new input shape, which one-off eager calls (e.g. growing sequence lengths)
# would pay each time. The backward kernels only appear in gradient graphs (a
# SavedModel keeps them as the custom gradient, which reloads in TensorFlow).


def _kernel(fn):
    return tf.function(fn, jit_compile=True, autograph=False)


def _split_parameters(p: tf.Tensor, dtype: tf.DType) -> list[tf.Tensor]:
    """Splits a (..., 2K) parameter into 2K tensors that broadcast against x."""
    return _formula.split_parameters(tf.cast(p, dtype))


def _range_scale(order: int, dtype: tf.DType) -> tf.Tensor:
    return tf.constant(_formula.range_scale(order), dtype=dtype)


def _keep(x: tf.Tensor, mask) -> tf.Tensor:
    """The entries that take part in the normalisation: not masked, not −inf.

    (NaN is kept, so that a NaN input shows in the output.)
    """
    keep = tf.not_equal(x, tf.cast(-np.inf, x.dtype))
    return keep if mask is None else tf.logical_and(keep, mask)


def _forward(x, ranges, ts, mask):
    """σ(x) clipped to the finite floats, excluded entries set to the lowest.

    Excluded entries (masked, or −inf) are filled after σ, so their values
    (padding, −inf, NaN) never reach the output. Finite fills only:
    exporters that lower `where` to mul/add (tf2onnx) turn 0·inf into NaN.
    """
    compute = _compute_dtype(x.dtype)
    x = tf.cast(x, compute)
    z = _formula.modulate(
        x, _split_parameters(ranges, compute), _split_parameters(ts, compute)
    )
    # An overflowing σ (±inf) would turn into inf − inf = NaN in the SoftMax.
    z = tf.clip_by_value(z, compute.min, compute.max)
    return tf.where(_keep(x, mask), z, compute.min)


def _zero_excluded(y, x, mask):
    """Exact zeros at excluded entries: a fully excluded slice, filled with the
    lowest float throughout, would otherwise come out of the SoftMax uniform."""
    return tf.where(_keep(x, mask), y, tf.zeros_like(y))


def _seglu_forward(x, ranges, ts):
    compute = _compute_dtype(x.dtype)
    out = _formula.modulate(
        tf.cast(x, compute),
        _split_parameters(ranges, compute),
        _split_parameters(ts, compute),
    )
    return tf.cast(out, x.dtype)


_forward_kernel = _kernel(_forward)
_seglu_kernel = _kernel(_seglu_forward)
_zero_excluded_kernel = _kernel(_zero_excluded)


# Modules (and their submodules) whose functions trace graphs for export.
_EXPORTER_MODULES = (
    "keras.src.export",  # model.export (SavedModel, ONNX, LiteRT), ExportArchive
    "tensorflow.python.saved_model",  # tf.saved_model.save
    "tensorflow.lite",  # TFLiteConverter.from_keras_model / from_concrete_functions
    "tf2onnx",  # tf2onnx.convert.from_keras / from_function
)

# Process-wide, not per thread: tf.distribute traces replicas in threads.
_plain_ops_lock = threading.Lock()
_plain_ops_depth = 0


@contextlib.contextmanager
def plain_ops() -> Iterator[None]:
    """Traces `multimax` and `seglu` as plain TensorFlow ops inside this context.

    In graphs, the forward pass is by default one fused XLA kernel (a nested
    ``tf.function(jit_compile=True)``), except in graphs traced by the
    exporters keras_multimax knows about: Keras' ``model.export`` and
    ``keras.export.ExportArchive``, ``tf.saved_model.save``, tf2onnx and the
    LiteRT (TFLite) converter. A graph traced *before* it reaches an exporter
    keeps the kernel, which tf2onnx cannot convert and TF Serving on CPU does
    not run: trace such graphs inside this context, e.g. a
    ``fn.get_concrete_function()`` passed as ``signatures=`` to
    ``tf.saved_model.save``, a ``tf.function`` already called before
    ``ExportArchive.add_endpoint`` or ``tf2onnx.convert.from_function``:

    >>> import tensorflow as tf
    >>> @tf.function(input_signature=[tf.TensorSpec([None, 3])])
    ... def probabilities(x):
    ...     return multimax(x, [0.0, 0.0], [0.1, -0.1])
    >>> with plain_ops():
    ...     graph = probabilities.get_concrete_function().graph
    >>> "PartitionedCall" in {op.type for op in graph.get_operations()}
    False

    Also useful for graphs whose input shapes change with almost every call:
    XLA compiles the kernel once per shape. The context is process-wide (it
    also covers the threads in which `tf.distribute` traces replicas).
    Gradients keep their fused kernels (gradient graphs only run in
    TensorFlow). Values agree with the kernel to float rounding.
    """
    global _plain_ops_depth
    with _plain_ops_lock:
        _plain_ops_depth += 1
    try:
        yield
    finally:
        with _plain_ops_lock:
            _plain_ops_depth -= 1


def _traced_for_export() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if any(module == m or module.startswith(m + ".") for m in _EXPORTER_MODULES):
            return True
        frame = frame.f_back
    return False


def _use_forward_kernel() -> bool:
    """Whether the forward is the XLA kernel (see "Export" above)."""
    if _plain_ops_depth:
        return False
    if tf.executing_eagerly():
        return _tape_is_recording()
    return not _traced_for_export()


@_kernel
def _upstream_kernel(y, dy, s):
    """∂L/∂σ = y·(dy − Σ dy·y), the SoftMax backward, in the compute dtype."""
    compute = _compute_dtype(y.dtype)
    return tf.cast(y, compute) * (tf.cast(dy, compute) - s)


@_kernel
def _grad_x_kernel(x, gs, ranges, ts):
    """∂L/∂x = gs·σ'(x), in the dtype of x."""
    compute = _compute_dtype(x.dtype)
    gs = tf.cast(gs, compute)
    d_x, _, _ = _formula.partials(
        tf.cast(x, compute),
        _split_parameters(ranges, compute),
        _split_parameters(ts, compute),
    )
    zero = tf.zeros_like(gs)
    # gs = 0 (masked entries) gives 0 whatever x holds there (inf, NaN).
    return tf.cast(tf.where(tf.equal(gs, 0), zero, gs * d_x), x.dtype)


# Up to 2**2 slices are added inside the kernel before the stacked products
# are written: the 4K products then cost a fraction of one pass, not 4K passes.
_MAX_FOLDS = 2


def _fold_plan(shape: tf.TensorShape, parameter_shape: tf.TensorShape):
    """How `_grad_parameters_kernel` pre-sums the products (static).

    Returns ``("flat", n)`` to sum all entries in ``2**n`` strided slices (the
    parameters are shared by every entry), ``("axis0", n)`` to halve axis 0
    ``n`` times (it is summed), or ``("none", 0)``.
    """
    if shape.rank is None:
        return "none", 0
    lead = shape.rank - parameter_shape.rank
    if all(d == 1 for d in parameter_shape):
        size = 1
        for d in shape:
            size *= d if d is not None else 1
        folds = 0
        while folds < _MAX_FOLDS and size % 2 == 0 and size > 2:
            size //= 2
            folds += 1
        return "flat", folds
    if shape.rank > 0 and (lead > 0 or parameter_shape[0] == 1):
        size = shape[0]
        folds = 0
        while size is not None and folds < _MAX_FOLDS and size % 2 == 0:
            size //= 2
            folds += 1
        return "axis0", folds
    return "none", 0


def _halve(v: tf.Tensor, times: int) -> tf.Tensor:
    for _ in range(times):
        half = v.shape[0] // 2
        v = v[:half] + v[half:]
    return v


# From order 2 on, factors go in pairs as the real and imaginary parts of one
# complex number: XLA computes each stacked entry in its own loop (re-reading
# x and gs), so this halves the loops. Measured at order 1 it is slower under
# an outer XLA compilation, so order 1 stacks real numbers.
_COMPLEX_FROM_FACTORS = 8


@_kernel
def _grad_parameters_kernel(x, gs, ranges, ts, plan):
    """gs · factor for the 4K parameter factors, pre-summed (see `_fold_plan`).

    Returns a stack of 4K real or 2K complex entries (see
    `_COMPLEX_FROM_FACTORS`).
    """
    compute = _compute_dtype(x.dtype)
    gs = tf.cast(gs, compute)
    _, ranges_factors, ts_factors = _formula.partials(
        tf.cast(x, compute),
        _split_parameters(ranges, compute),
        _split_parameters(ts, compute),
    )
    zero = tf.zeros_like(gs)
    is_zero = tf.equal(gs, 0)
    factors = [tf.where(is_zero, zero, gs * f) for f in ranges_factors + ts_factors]
    if len(factors) >= _COMPLEX_FROM_FACTORS:
        factors = [tf.complex(a, b) for a, b in zip(factors[0::2], factors[1::2])]
    kind, folds = plan
    out = []
    for p in factors:
        if kind == "flat":
            p = _halve(tf.reshape(p, [2**folds, -1]), folds)[0]
        elif kind == "axis0":
            p = _halve(p, folds)
        out.append(p)
    return tf.stack(out)


def _parameter_gradients(x, gs, ranges, ts):
    """Gradients of ranges and ts, (..., 2K), given gs = ∂L/∂σ."""
    compute = _compute_dtype(x.dtype)
    shape = ranges.shape[:-1]
    plan = _fold_plan(tf.broadcast_static_shape(x.shape, shape), shape)
    stacked = _grad_parameters_kernel(x, gs, ranges, ts, plan)
    if plan[0] == "flat" and not stacked.dtype.is_complex:
        # A matrix-vector product: a multithreaded kernel, also under XLA,
        # whose reductions to a scalar run sequentially on CPU.
        ones = tf.ones(tf.shape(stacked)[1:], stacked.dtype)
        sums = tf.linalg.matvec(stacked, ones)
    elif plan[0] == "flat":
        sums = tf.reduce_sum(stacked, axis=1)
    else:
        lead = stacked.shape.rank - 1 - shape.rank
        axes = [1 + i for i in range(lead)]
        axes += [1 + lead + i for i, d in enumerate(shape) if d == 1]
        sums = tf.reduce_sum(stacked, axis=axes) if axes else stacked
    n = ts.shape[-1]
    if stacked.dtype.is_complex:
        # (2K complex) -> (4K real), back in the order of the factors.
        sums = tf.reshape(sums, [n, *shape])
        sums = tf.stack([tf.math.real(sums), tf.math.imag(sums)], axis=1)
    sums = tf.reshape(sums, [2 * n, *shape])
    sums = tf.transpose(sums, [*range(1, shape.rank + 1), 0])
    ts_c = tf.cast(ts, compute)
    # ∂σ/∂b = (k+1)·t_b·lo^k is exactly 0 where t_b = 0, also if Σ lo^k overflowed.
    d_ranges = tf.where(
        tf.equal(ts_c, 0),
        tf.zeros_like(ts_c),
        sums[..., :n] * ts_c * _range_scale(n // 2, compute),
    )
    return tf.cast(d_ranges, ranges.dtype), tf.cast(sums[..., n:], ts.dtype)


def _sum_to_input_shape(grad: tf.Tensor, x: tf.Tensor, shape) -> tf.Tensor:
    """Sums the gradient of x over the axes where the parameters broadcast x up."""
    offset = x.shape.rank - shape.rank
    axes, dynamic = [], False
    for i, d in enumerate(shape):
        if d != 1:
            x_dim = x.shape[offset + i]
            dynamic |= x_dim is None
            if x_dim == 1:
                axes.append(offset + i)
    if dynamic:
        # Whether x is 1 on such an axis is only known when the graph runs:
        # reduce as TensorFlow's own broadcasting gradients do.
        reduce, _ = tf.raw_ops.BroadcastGradientArgs(s0=tf.shape(x), s1=tf.shape(grad))
        summed = tf.reshape(tf.reduce_sum(grad, reduce), tf.shape(x))
        summed.set_shape(x.shape)
        return summed
    return tf.reduce_sum(grad, axis=axes, keepdims=True) if axes else grad


def _softmax(z: tf.Tensor, axes) -> tf.Tensor:
    if len(axes) == 1:
        return tf.nn.softmax(z, axis=axes[0])
    z = z - tf.reduce_max(z, axis=axes, keepdims=True)
    e = tf.exp(z)
    return e / tf.reduce_sum(e, axis=axes, keepdims=True)


def _prepare(x, ranges, ts):
    x = _float_tensor(x, "x")
    ranges = _float_tensor(ranges, "ranges")
    ts = _float_tensor(ts, "ts")
    _check_parameters(x, ranges, ts)
    return x, ranges, ts


def seglu(x: TensorLike, ranges: TensorLike, ts: TensorLike) -> tf.Tensor:
    r"""The MultiMax modulator σ (a piece-wise "SegLU" of order K).

    Formula:

    $$
    \sigma(x) = x + \sum_{k=0}^{K-1} t_{2k}\,\mathrm{relu}(r_{2k} - x)^{k+1}
        + t_{2k+1}\,\mathrm{relu}(x - r_{2k+1})^{k+1}
    $$

    with ``r = ranges`` (the paper's thresholds ``b``, ``d``) and ``t = ts``
    (their slopes ``t_b``, ``t_d``). With ``ts = 0`` it is the identity.

    Example:

    >>> import numpy as np
    >>> x = np.array([-2.0, 0.0, 2.0], dtype="float32")
    >>> ranges = np.array([-1.0, 1.0], dtype="float32")
    >>> ts = np.array([0.5, 0.5], dtype="float32")
    >>> seglu(x, ranges, ts).numpy()
    array([-1.5,  0. ,  2.5], dtype=float32)

    Args:
        x: Floating-point tensor.
        ranges: Thresholds, shape ``(..., 2*K)``. Leading dimensions broadcast
            against ``x`` from the right (e.g. ``(num_heads, 1, 1, 2*K)`` for
            per-head parameters of ``(batch, heads, query, key)`` scores).
        ts: Slopes, same shape as ``ranges``.

    Returns:
        σ(x) with the broadcast shape of ``x`` and the leading dimensions of
        the parameters, in the dtype of ``x`` (float16/bfloat16 are computed
        in float32).

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """
    x, ranges, ts = _prepare(x, ranges, ts)
    return _seglu(x, ranges, ts)


def _seglu(x, ranges, ts):
    shape = ranges.shape[:-1]
    forward = _seglu_kernel if _use_forward_kernel() else _seglu_forward

    @tf.custom_gradient
    def fn(x_, ranges_, ts_):
        def grad(dy):
            gx = _grad_x_kernel(x_, dy, ranges_, ts_)
            gr, gt = _parameter_gradients(x_, dy, ranges_, ts_)
            return _sum_to_input_shape(gx, x_, shape), gr, gt

        return forward(x_, ranges_, ts_), grad

    return fn(x, ranges, ts)


def multimax(
    x: TensorLike,
    ranges: TensorLike,
    ts: TensorLike,
    axis: int | Sequence[int] = -1,
    mask: TensorLike | None = None,
) -> tf.Tensor:
    r"""MultiMax: SoftMax of the piece-wise modulated input.

    Formula:

    $$
    \mathrm{MultiMax}(x)_i = \frac{\exp(\sigma(x)_i)}{\sum_j \exp(\sigma(x)_j)}
    $$

    where σ is `seglu` (see there for the parameters). With ``ts = 0`` this is
    exactly SoftMax. The gradients for ``x``, ``ranges`` and ``ts`` are given in
    closed form by one `tf.custom_gradient`; the backward pass keeps only the
    input and the output.

    In graphs and eager training steps the forward runs as one fused XLA
    kernel; graphs traced for export and eager inference calls use the same
    formula as plain builtin ops (see `plain_ops`).

    Masked entries (``mask`` False, or <= 0.5 for numeric masks) are removed
    *after* the modulation: they get exactly zero probability and zero
    gradient whatever the sign of ``ts``; a fully masked slice gives zeros.

    Example:

    >>> import numpy as np
    >>> x = np.array([[1.0, 2.0, 1.0]], dtype="float32")
    >>> zeros = np.zeros(4, dtype="float32")
    >>> np.round(multimax(x, zeros, zeros).numpy(), 4)  # ts = 0: SoftMax
    array([[0.2119, 0.5761, 0.2119]], dtype=float32)
    >>> ranges = np.array([1.5, 1.5, 1.5, 1.5], dtype="float32")
    >>> ts = np.array([-1.0, 1.0, 0.0, 0.0], dtype="float32")  # sparser
    >>> np.round(multimax(x, ranges, ts, mask=[[True, True, False]]).numpy(), 4)
    array([[0.1192, 0.8808, 0.    ]], dtype=float32)

    Args:
        x: Floating-point tensor of scores (logits).
        ranges: Thresholds of the modulator, shape ``(..., 2*K)``; leading
            dimensions broadcast against ``x`` from the right.
        ts: Slopes of the modulator, same shape as ``ranges``.
        axis: Integer or tuple of integers: the axes normalised over.
        mask: Optional boolean (or numeric, kept where > 0.5) tensor
            broadcastable to ``x``; True keeps an entry.

    Returns:
        Probabilities with the shape and dtype of ``x`` (float16/bfloat16 are
        computed in float32 internally).

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """
    x, ranges, ts = _prepare(x, ranges, ts)
    axes = _normalize_axis(axis, x.shape.rank)
    if mask is not None:
        mask = _prepare_mask(mask, x)
    return _multimax(x, ranges, ts, axes, mask)


def _multimax(x, ranges, ts, axes, mask):
    dtype = x.dtype
    compute = _compute_dtype(dtype)
    shape = ranges.shape[:-1]
    fused = _use_forward_kernel()
    forward = _forward_kernel if fused else _forward

    @tf.custom_gradient
    def fn(x_, ranges_, ts_):
        y = _softmax(forward(x_, ranges_, ts_, mask), axes)
        if not fused:
            y = _zero_excluded(y, x_, mask)
        elif mask is not None:
            y = _zero_excluded_kernel(y, x_, mask)
        else:
            # Without a mask only −inf entries are excluded, and only a slice
            # with nothing but −inf needs the zeros: skip the extra pass over
            # the output unless x holds a −inf.
            y = tf.cond(
                tf.equal(tf.reduce_min(x_), tf.cast(-np.inf, x_.dtype)),
                lambda: _zero_excluded_kernel(y, x_, None),
                lambda: y,
            )
        # The backward keeps x_ and this output only (no float32 copy).
        y = tf.cast(y, dtype)

        def grad(dy):
            yc = tf.cast(y, compute)
            s = tf.reduce_sum(tf.cast(dy, compute) * yc, axis=axes, keepdims=True)
            # gs = y·(dy − s) is 0 at excluded entries, and so are their gradients.
            gs = _upstream_kernel(y, dy, s)
            gx = _grad_x_kernel(x_, gs, ranges_, ts_)
            gr, gt = _parameter_gradients(x_, gs, ranges_, ts_)
            return _sum_to_input_shape(gx, x_, shape), gr, gt

        return y, grad

    return fn(x, ranges, ts)
