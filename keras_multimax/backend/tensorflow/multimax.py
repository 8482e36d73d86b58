"""MultiMax and SegLU on TensorFlow: `tf.custom_gradient` and fused XLA kernels.

The formula is `keras_multimax._formula`; this module adds what TensorFlow
needs around it: the compute dtype, the exclusion of masked and −inf entries,
the closed-form backward from the saved input and output, and the fused XLA
forward that `keras_multimax.config.enable_fused_forward` turns on (see "When
the forward is fused" below). Arguments arrive validated by
`keras_multimax.ops`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_multimax import _formula
from keras_multimax import config

# Inputs in these dtypes are computed in float32 and returned in their own
# dtype: order-2 squares of |x| > 256 overflow float16.
_UPCAST_DTYPES = (tf.float16, tf.bfloat16)


def _compute_dtype(dtype: tf.DType) -> tf.DType:
    return tf.float32 if dtype in _UPCAST_DTYPES else dtype


def convert_to_tensor(x) -> tf.Tensor:
    return tf.convert_to_tensor(x)


def greater_than_half(mask: tf.Tensor) -> tf.Tensor:
    return tf.greater(mask, tf.cast(0.5, mask.dtype))


def check_mask_at_run_time(mask: tf.Tensor, x: tf.Tensor, message: str) -> tf.Tensor:
    """`mask`, after an assertion that it broadcasts to `x` when the graph runs."""
    rank = mask.shape.rank
    m_shape = tf.shape(mask)
    x_shape = tf.shape(x)[x.shape.rank - rank :]
    fits = tf.reduce_all(tf.equal(m_shape, 1) | tf.equal(m_shape, x_shape))
    check = tf.debugging.Assert(
        fits,
        [message, "Received: x.shape=", tf.shape(x), "mask.shape=", m_shape],
    )
    with tf.control_dependencies([check]):
        return tf.identity(mask)


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
# `tf.nn.softmax`. The parameter gradients are reductions of gs times each
# factor, scaled by the slopes after them: for parameters shared by every
# entry of a tensor that fits a CPU cache, one folded sum per factor
# (`_separate_sums_kernel`); otherwise one stacked reduction (from order 2,
# pairs of factors packed as complex numbers).
#
# When the forward is fused: one switch decides, the same in training and
# inference, `keras_multimax.config.enable_fused_forward()` (off by default).
# Off, the forward is the formula as plain builtin ops, which every exporter
# and runtime takes: tf2onnx (through Grappler) does not inline functions
# marked for XLA and fails on them, and a SavedModel server without XLA's CPU
# JIT (TF Serving's default) cannot run them. In a training step that Keras
# compiles with XLA (`jit_compile="auto"`, its default) both are one program.
# The backward kernels only appear in gradient graphs, which only run in
# TensorFlow (a SavedModel keeps the custom gradient).


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


def _fold_flat(v: tf.Tensor, folds: int) -> tf.Tensor:
    """``v`` flattened, cut in ``2**folds`` equal parts, and the parts added."""
    return _halve(tf.reshape(v, [2**folds, -1]), folds)[0]


# From order 2 on, factors go in pairs as the real and imaginary parts of one
# complex number: XLA computes each stacked entry in its own loop (re-reading
# x and gs), so this halves the loops. Measured at order 1 it is slower under
# an outer XLA compilation, so order 1 stacks real numbers.
_COMPLEX_FROM_FACTORS = 8


def _products(x, gs, ranges, ts) -> list[tf.Tensor]:
    """gs · factor for the 4K parameter factors, in the compute dtype.

    gs = 0 (masked entries) gives 0 whatever the factor holds there.
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
    return [tf.where(is_zero, zero, gs * f) for f in ranges_factors + ts_factors]


def _paired(factors: list[tf.Tensor]) -> list[tf.Tensor]:
    """Consecutive factors as the real and imaginary parts of one complex number."""
    return [tf.complex(a, b) for a, b in zip(factors[0::2], factors[1::2])]


def _unpaired(sums: tf.Tensor, shape) -> tf.Tensor:
    """Sums of `_paired` factors, (2K, *shape) complex, as (2K, 2, *shape) real:
    the 4K sums in the order of the factors."""
    sums = tf.reshape(sums, [-1, *shape])
    return tf.stack([tf.math.real(sums), tf.math.imag(sums)], axis=1)


@_kernel
def _grad_parameters_kernel(x, gs, ranges, ts, plan):
    """gs · factor for the 4K parameter factors, pre-summed (see `_fold_plan`).

    Returns a stack of 4K real or 2K complex entries (see
    `_COMPLEX_FROM_FACTORS`).
    """
    factors = _products(x, gs, ranges, ts)
    if len(factors) >= _COMPLEX_FROM_FACTORS:
        factors = _paired(factors)
    kind, folds = plan
    out = []
    for p in factors:
        if kind == "flat":
            p = _fold_flat(p, folds)
        elif kind == "axis0":
            p = _halve(p, folds)
        out.append(p)
    return tf.stack(out)


# Parameters shared by every entry: the factors are summed in pairs, the
# real and imaginary parts of one complex number, each pair in a loop of its
# own over x and gs cut in 2**_SEPARATE_FOLDS equal parts, which adds the
# parts' products as it goes and writes a partial sum 2**-_SEPARATE_FOLDS
# the size of x. XLA's CPU backend hands reductions to a library kernel
# that reads a materialised input: a product computed first and folded
# after is written out at full size, one buffer per factor, and a process
# whose allocator hands freed blocks back to the system page-faults each of
# them afresh at every call. Measured forward and backward under XLA, each
# variant in its own process: at [16, 4, 128, 128], 6-8 ms here against
# 9-28 ms for full-size products (8257 minor page faults per call in the
# slow processes, none here); at [16, 6, 197, 197], 21-25 ms against the
# stacked products' 27-28 ms; at [2, 8, 1024, 1024], 182 ms against 332 ms.
# In a KerasHub Gemma training step the pairs' 16 loops took 4.3 ms, one
# loop per factor 11.5 ms (profiled; benchmarks/README.md).
# Below _FOLD_AS_COMPUTED_MIN_ENTRIES (256 KiB of float32, under glibc's
# threshold for mapping a block of its own) each product is summed whole:
# the parts' products make a graph 2**_SEPARATE_FOLDS times larger, whose
# compilation costs more than the small buffers (the blockwise attention
# op differentiates one small block at a time).
_SEPARATE_FOLDS = 4
_FOLD_AS_COMPUTED_MIN_ENTRIES = 2**16


@_kernel
def _separate_sums_kernel(x, gs, ranges, ts):
    """Σ gs · factor over every entry, for the 2K `_paired` factors: (2K,) complex."""
    if x.shape.num_elements() < _FOLD_AS_COMPUTED_MIN_ENTRIES:
        folded = _paired(_products(x, gs, ranges, ts))
    else:
        parts = 2**_SEPARATE_FOLDS
        x_parts = tf.reshape(x, [parts, -1])
        gs_parts = tf.reshape(gs, [parts, -1])
        folded = _paired(_products(x_parts[0], gs_parts[0], ranges, ts))
        for i in range(1, parts):
            products = _paired(_products(x_parts[i], gs_parts[i], ranges, ts))
            folded = [f + p for f, p in zip(folded, products)]
    return tf.stack([tf.reduce_sum(f) for f in folded])


def _separate_sums_apply(x_shape, shape) -> bool:
    entries = x_shape.num_elements()
    return (
        entries is not None
        and entries > 0
        and entries % 2**_SEPARATE_FOLDS == 0
        and all(d == 1 for d in shape)
    )


def _parameter_gradients(x, gs, ranges, ts):
    """Gradients of ranges and ts, (..., 2K), given gs = ∂L/∂σ."""
    compute = _compute_dtype(x.dtype)
    shape = ranges.shape[:-1]
    if _separate_sums_apply(x.shape, shape):
        sums = _unpaired(_separate_sums_kernel(x, gs, ranges, ts), shape)
        return _scale_parameter_sums(sums, ranges, ts, shape, compute)
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
    if stacked.dtype.is_complex:
        sums = _unpaired(sums, shape)
    return _scale_parameter_sums(sums, ranges, ts, shape, compute)


def _scale_parameter_sums(sums, ranges, ts, shape, compute):
    """∂L/∂ranges and ∂L/∂ts, (..., 2K), from the 4K sums (factor first)."""
    n = ts.shape[-1]
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


def seglu(x, ranges, ts):
    """SegLU of validated tensors (`keras_multimax.ops.seglu`)."""
    shape = ranges.shape[:-1]
    forward = _seglu_kernel if config.is_fused_forward_enabled() else _seglu_forward

    @tf.custom_gradient
    def fn(x_, ranges_, ts_):
        def grad(dy):
            gx = _grad_x_kernel(x_, dy, ranges_, ts_)
            gr, gt = _parameter_gradients(x_, dy, ranges_, ts_)
            return _sum_to_input_shape(gx, x_, shape), gr, gt

        return forward(x_, ranges_, ts_), grad

    return fn(x, ranges, ts)


def multimax(x, ranges, ts, axes, mask):
    """MultiMax of validated tensors (`keras_multimax.ops.multimax`)."""
    dtype = x.dtype
    compute = _compute_dtype(dtype)
    shape = ranges.shape[:-1]
    fused = config.is_fused_forward_enabled()
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
