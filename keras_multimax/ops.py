"""MultiMax math: the piece-wise modulator (SegLU), MultiMax and their gradients.

This module is the only place in keras_multimax where the formula lives. Layers
hold weights and configuration and call the functions below.

Notation (Zhou, Fritz & Keuper, ICML 2024): for order ``K`` the parameters are
two vectors of length ``2K``. ``ranges[2k]``/``ranges[2k+1]`` are the lower and
upper thresholds ``b`` and ``d`` of order ``k+1``; ``ts[2k]``/``ts[2k+1]`` are
their slopes ``t_b`` and ``t_d``.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

TensorLike = tf.types.experimental.TensorLike

__all__ = ["multimax", "seglu"]

# Inputs in these dtypes are computed in float32 and returned in their own
# dtype: order-2 squares of |x| > 256 overflow float16.
_UPCAST_DTYPES = (tf.float16, tf.bfloat16)


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _float_tensor(x, name: str) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
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
        if isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(
                f"`axis` must be an int or a tuple of ints. Received: axis={axis!r}"
            )
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
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        if not (mask.dtype.is_floating or mask.dtype.is_integer):
            raise TypeError(
                "`mask` must be boolean or numeric (kept where > 0.5). "
                f"Received: mask.dtype={mask.dtype.name}"
            )
        mask = tf.greater(mask, tf.cast(0.5, mask.dtype))
    if mask.shape.rank is not None and x.shape.rank is not None:
        if mask.shape.rank > x.shape.rank:
            raise ValueError(
                "`mask` must be broadcastable to `x` and must not have more "
                f"dimensions. Received: x.shape={x.shape}, mask.shape={mask.shape}"
            )
        for m_dim, x_dim in zip(mask.shape[::-1], x.shape[::-1]):
            if m_dim is not None and x_dim is not None and m_dim not in (1, x_dim):
                raise ValueError(
                    "`mask` must be broadcastable to `x`: each mask dimension "
                    "must be 1 or match the corresponding dimension of `x`. "
                    f"Received: x.shape={x.shape}, mask.shape={mask.shape}"
                )
    return mask


# ---------------------------------------------------------------------------
# The formula
# ---------------------------------------------------------------------------


def _unstack_parameters(p: tf.Tensor, dtype: tf.DType) -> list[tf.Tensor]:
    """Splits a (..., 2K) parameter into 2K tensors that broadcast against x."""
    return tf.unstack(tf.cast(p, dtype), axis=-1)


def _modulate(x: tf.Tensor, r: list[tf.Tensor], t: list[tf.Tensor]) -> tf.Tensor:
    """σ(x) = x + Σ_k t[2k]·relu(r[2k] − x)^(k+1) + t[2k+1]·relu(x − r[2k+1])^(k+1)."""
    out = x
    for k in range(len(t) // 2):
        lower = tf.nn.relu(r[2 * k] - x)
        upper = tf.nn.relu(x - r[2 * k + 1])
        if k:
            lower_k, upper_k = lower, upper
            for _ in range(k):
                lower = lower * lower_k
                upper = upper * upper_k
        out = out + t[2 * k] * lower + t[2 * k + 1] * upper
    return out


def _modulator_partials(x, r, t):
    """Yields (∂σ/∂ranges[i], ∂σ/∂ts[i]) for i = 0 … 2K−1.

    With ``lo = relu(b − x)`` and ``hi = relu(x − d)`` at order ``k+1``:
    ``∂σ/∂b = (k+1)·t_b·lo^k``, ``∂σ/∂d = −(k+1)·t_d·hi^k`` (``lo^0``/``hi^0``
    being the step function, as relu' in autodiff), ``∂σ/∂t_b = lo^(k+1)``,
    ``∂σ/∂t_d = hi^(k+1)``. Note ``∂σ/∂x = 1 − Σ_i ∂σ/∂ranges[i]``.
    """
    for k in range(len(t) // 2):
        lower = tf.nn.relu(r[2 * k] - x)
        upper = tf.nn.relu(x - r[2 * k + 1])
        if k == 0:
            lower_pow_k = tf.cast(lower > 0, x.dtype)
            upper_pow_k = tf.cast(upper > 0, x.dtype)
            lower_pow_k1, upper_pow_k1 = lower, upper
        else:
            lower_pow_k, upper_pow_k = lower, upper
            for _ in range(k - 1):
                lower_pow_k = lower_pow_k * lower
                upper_pow_k = upper_pow_k * upper
            lower_pow_k1 = lower_pow_k * lower
            upper_pow_k1 = upper_pow_k * upper
        yield (k + 1) * t[2 * k] * lower_pow_k, lower_pow_k1
        yield -(k + 1) * t[2 * k + 1] * upper_pow_k, upper_pow_k1


def _sum_to_shape(value: tf.Tensor, shape: tf.TensorShape) -> tf.Tensor:
    """Sums a broadcast gradient back to a (static) parameter shape."""
    lead = value.shape.rank - shape.rank
    axes = list(range(lead)) + [lead + i for i, d in enumerate(shape) if d == 1]
    if axes:
        value = tf.reduce_sum(value, axis=axes)
    return tf.reshape(value, shape)


def _sum_to_input_shape(grad: tf.Tensor, x_shape: tf.TensorShape, shape) -> tf.Tensor:
    """Sums the gradient of x over the axes where the parameters broadcast x up."""
    offset = x_shape.rank - shape.rank
    axes = [
        offset + i for i, d in enumerate(shape) if d != 1 and x_shape[offset + i] == 1
    ]
    return tf.reduce_sum(grad, axis=axes, keepdims=True) if axes else grad


def _keep(x: tf.Tensor, mask) -> tf.Tensor:
    """Replaces masked entries by 0 before σ sees them.

    Their values (padding, -inf, NaN, 1e30) must not reach the partial
    derivatives, where 0·inf would turn the sums for `ranges`/`ts` into NaN.
    """
    return x if mask is None else tf.where(mask, x, tf.zeros_like(x))


def _parameter_gradients(gs, x, r, t, shape):
    """Gradients of x, ranges and ts given gs = ∂L/∂σ (in the compute dtype)."""
    d_ranges, d_ts = [], []
    grad_x = gs
    for d_sigma_d_r, d_sigma_d_t in _modulator_partials(x, r, t):
        u = gs * d_sigma_d_r
        grad_x = grad_x - u
        d_ranges.append(_sum_to_shape(u, shape))
        d_ts.append(_sum_to_shape(gs * d_sigma_d_t, shape))
    grad_x = _sum_to_input_shape(grad_x, x.shape, shape)
    return grad_x, tf.stack(d_ranges, axis=-1), tf.stack(d_ts, axis=-1)


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
    dtype = x.dtype
    compute = _compute_dtype(dtype)
    shape = ranges.shape[:-1]

    @tf.custom_gradient
    def fn(x_, ranges_, ts_):
        xc = tf.cast(x_, compute)
        r = _unstack_parameters(ranges_, compute)
        t = _unstack_parameters(ts_, compute)
        out = tf.cast(_modulate(xc, r, t), dtype)

        def grad(dy):
            gs = tf.cast(dy, compute)
            # Recast rather than keep a float32 copy of a float16 input alive.
            xg = tf.cast(x_, compute)
            gx, gr, gt = _parameter_gradients(gs, xg, r, t, shape)
            return (
                tf.cast(gx, x_.dtype),
                tf.cast(gr, ranges_.dtype),
                tf.cast(gt, ts_.dtype),
            )

        return out, grad

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
    largest, lowest = compute.max, compute.min

    @tf.custom_gradient
    def fn(x_, ranges_, ts_):
        xc = _keep(tf.cast(x_, compute), mask)
        r = _unstack_parameters(ranges_, compute)
        t = _unstack_parameters(ts_, compute)
        # An overflowing σ (+inf) would turn into inf - inf = NaN below.
        z = tf.minimum(_modulate(xc, r, t), largest)
        if mask is None:
            z = z - tf.reduce_max(z, axis=axes, keepdims=True)
            e = tf.exp(z)
        else:
            # Finite fills only: exporters that lower `where` to mul/add
            # (tf2onnx) turn 0·inf into NaN. exp(...) <= 1 here, so the mask
            # product is exact and a fully masked slice sums to 0.
            z = tf.where(mask, z, lowest)
            e = tf.exp(z - tf.reduce_max(z, axis=axes, keepdims=True))
            e = e * tf.cast(mask, compute)
        total = tf.reduce_sum(e, axis=axes, keepdims=True)
        if mask is not None:
            total = tf.where(total > 0, total, tf.ones_like(total))
        y = e * tf.math.reciprocal(total)

        def grad(dy):
            dy = tf.cast(dy, compute)
            # Softmax backward; y = 0 at masked entries, so they get 0.
            gs = y * (dy - tf.reduce_sum(dy * y, axis=axes, keepdims=True))
            # Recast rather than keep a float32 copy of a float16 input alive.
            xg = _keep(tf.cast(x_, compute), mask)
            gx, gr, gt = _parameter_gradients(gs, xg, r, t, shape)
            return (
                tf.cast(gx, x_.dtype),
                tf.cast(gr, ranges_.dtype),
                tf.cast(gt, ts_.dtype),
            )

        return tf.cast(y, dtype), grad

    return fn(x, ranges, ts)
