"""MultiMax ops: the piece-wise modulator (SegLU) and MultiMax, for every backend.

This module is the public API and the validation that every backend shares;
the computation (a custom gradient per backend) lives beside Keras' own
backends in ``keras_multimax/backend/<name>/multimax.py``, and the formula in
``keras_multimax/_formula.py``. Layers hold weights and configuration and
call the functions below. Supported backends: TensorFlow and JAX.

As in `keras.ops`, each function is also a `keras.Operation` (`MultiMax`,
`SegLU`, `MultiMaxCrossEntropy`): called on symbolic inputs
(``keras.Input``), it checks their shapes and dtypes and returns a
`keras.KerasTensor`, so that Functional models can be built from it and
saved (the operations are registered serializable).

Notation (Zhou, Fritz & Keuper, ICML 2024): for order ``K`` the parameters are
two vectors of length ``2K``. ``ranges[2k]``/``ranges[2k+1]`` are the lower and
upper thresholds ``b`` and ``d`` of order ``k+1``; ``ts[2k]``/``ts[2k+1]`` are
their slopes ``t_b`` and ``t_d``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import backend

from keras_multimax import config
from keras_multimax._attention import MultiMaxDotProductAttention
from keras_multimax._attention import multimax_dot_product_attention
from keras_multimax._cross_entropy import MultiMaxCrossEntropy
from keras_multimax._cross_entropy import multimax_cross_entropy
from keras_multimax._symbolic import broadcast_shapes
from keras_multimax._symbolic import is_symbolic
from keras_multimax._symbolic import spec
from keras_multimax.backend import load_backend_module

_impl = load_backend_module("multimax")

TensorLike = Any

__all__ = [
    "MultiMax",
    "MultiMaxCrossEntropy",
    "MultiMaxDotProductAttention",
    "SegLU",
    "multimax",
    "multimax_cross_entropy",
    "multimax_dot_product_attention",
    "plain_ops",
    "seglu",
]


# ---------------------------------------------------------------------------
# Validation helpers (backend-neutral: static shapes as tuples, None unknown)
# ---------------------------------------------------------------------------


def _rank(t) -> int | None:
    shape = t.shape
    return shape.rank if hasattr(shape, "rank") else len(shape)


def _dims(t) -> tuple:
    """Static dimensions; None where unknown (TensorFlow's None, and JAX's
    symbolic dimensions when `jax.export` traces for a polymorphic batch)."""
    return tuple(d if isinstance(d, (int, np.integer)) else None for d in t.shape)


def _dtype_name(dtype) -> str:
    if isinstance(dtype, np.dtype) and dtype.kind in "USO":
        return "string" if dtype.kind in "US" else "object"
    return backend.standardize_dtype(dtype)


def _to_tensor(value, name: str):
    try:
        return _impl.convert_to_tensor(value)
    except (TypeError, ValueError) as error:  # e.g. a None inside a list
        raise TypeError(
            f"`{name}` could not be converted to a tensor ({error}). "
            f"Received: {name}={value!r}"
        ) from None


def _float_tensor(x, name: str, symbolic: bool = False):
    """``x`` as a tensor (a spec with ``shape`` and ``dtype`` if ``symbolic``),
    checked to be floating-point."""
    if x is None:
        raise TypeError(
            f"`{name}` must be a floating-point tensor, not None. Received: {name}=None"
        )
    x = spec(x, name) if symbolic else _to_tensor(x, name)
    dtype = _dtype_name(x.dtype)
    if dtype in ("string", "object") or not backend.is_float_dtype(dtype):
        raise TypeError(
            f"`{name}` must be a floating-point tensor "
            f"(float16, bfloat16, float32 or float64). "
            f"Received: {name}.dtype={dtype}"
        )
    return x


def _broadcastable(a: tuple, b: tuple) -> bool:
    """Whether static shapes `a` and `b` can broadcast (None: unknown, fits)."""
    for m, n in zip(a[::-1], b[::-1]):
        if m is not None and n is not None and m != n and 1 not in (m, n):
            return False
    return True


def _check_parameters(x, ranges, ts) -> int:
    """Validates `ranges`/`ts` against `x` and returns the order K."""
    if _rank(ranges) in (0, None):
        raise ValueError(
            "`ranges` must have a static rank of at least 1 with the "
            f"thresholds on its last axis. Received: ranges.shape={ranges.shape}"
        )
    if _rank(ts) in (0, None):
        raise ValueError(
            "`ts` must have a static rank of at least 1 with the slopes on "
            f"its last axis. Received: ts.shape={ts.shape}"
        )
    n = _dims(ts)[-1]
    if n is None or n < 2 or n % 2:
        raise ValueError(
            "The last axis of `ts` must have a static, even length 2*order "
            f"(order >= 1). Received: ts.shape={ts.shape}"
        )
    if _dims(ranges)[-1] != n:
        raise ValueError(
            "`ranges` and `ts` must have the same length 2*order on their "
            f"last axis. Received: ranges.shape={ranges.shape}, "
            f"ts.shape={ts.shape}"
        )
    if _dims(ranges) != _dims(ts):
        raise ValueError(
            "`ranges` and `ts` must have the same shape. "
            f"Received: ranges.shape={ranges.shape}, ts.shape={ts.shape}"
        )
    if _rank(x) is None:
        raise ValueError(
            "`x` must have a known rank (the gradients are reduced over the "
            f"axes that `ranges`/`ts` broadcast). Received: x.shape={x.shape}"
        )
    lead = _dims(ranges)[:-1]
    if None in lead:
        raise ValueError(
            "The leading dimensions of `ranges` and `ts` must be static. "
            f"Received: ranges.shape={ranges.shape}"
        )
    if len(lead) > _rank(x):
        raise ValueError(
            "The leading dimensions of `ranges`/`ts` broadcast against "
            "`x` from the right and cannot have more dimensions than `x`. "
            f"Received: x.shape={x.shape}, ranges.shape={ranges.shape}"
        )
    if not _broadcastable(_dims(x), lead):
        raise ValueError(
            "The leading dimensions of `ranges`/`ts` must broadcast "
            f"against `x`. Received: x.shape={x.shape}, "
            f"ranges.shape={ranges.shape}"
        )
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


_MASK_MESSAGE = (
    "`mask` must be broadcastable to `x`: each mask dimension must be 1 or "
    "match the corresponding dimension of `x`."
)


def _mask_dtype(dtype) -> str:
    dtype = _dtype_name(dtype)
    if dtype != "bool" and (
        dtype in ("string", "object")
        or not (backend.is_float_dtype(dtype) or backend.is_int_dtype(dtype))
    ):
        raise TypeError(
            "`mask` must be boolean or numeric (kept where > 0.5). "
            f"Received: mask.dtype={dtype}"
        )
    return dtype


def _check_mask(mask, x) -> bool:
    """Checks the static shape of `mask` against `x`; returns whether some
    dimension is only known when the graph runs."""
    if _rank(mask) is None:
        raise ValueError(
            "`mask` must have a known rank (it broadcasts against `x` from the "
            f"right). Received: mask.shape={mask.shape}, x.shape={x.shape}"
        )
    if _rank(mask) > _rank(x):
        raise ValueError(
            "`mask` must be broadcastable to `x` and must not have more "
            f"dimensions. Received: x.shape={x.shape}, mask.shape={mask.shape}"
        )
    unknown = False
    for m_dim, x_dim in zip(_dims(mask)[::-1], _dims(x)[::-1]):
        if m_dim is not None and x_dim is not None and m_dim not in (1, x_dim):
            raise ValueError(
                f"{_MASK_MESSAGE} Received: x.shape={x.shape}, mask.shape={mask.shape}"
            )
        unknown |= m_dim is None or (x_dim is None and m_dim != 1)
    return unknown


def _prepare_mask(mask, x):
    mask = _to_tensor(mask, "mask")
    if _mask_dtype(mask.dtype) != "bool":
        mask = _impl.greater_than_half(mask)
    if _check_mask(mask, x):
        # Shapes only known when the graph runs (TensorFlow graphs with
        # `None` dimensions): check them then, since a mask larger than `x`
        # on some axis would silently grow the output.
        mask = _impl.check_mask_at_run_time(mask, x, _MASK_MESSAGE)
    return mask


def _prepare(x, ranges, ts, symbolic: bool = False):
    x = _float_tensor(x, "x", symbolic)
    ranges = _float_tensor(ranges, "ranges", symbolic)
    ts = _float_tensor(ts, "ts", symbolic)
    _check_parameters(x, ranges, ts)
    return x, ranges, ts


def _output_spec(x, ranges) -> keras.KerasTensor:
    """Shape (``x`` broadcast against the parameters' leading dimensions) and
    dtype of the outputs of `seglu` and `multimax`."""
    shape = broadcast_shapes(_dims(x), _dims(ranges)[:-1])
    return keras.KerasTensor(shape, dtype=_dtype_name(x.dtype))


# ---------------------------------------------------------------------------
# Operations (symbolic calls, as `keras.ops`)
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_multimax", name="ops.SegLU")
class SegLU(keras.Operation):
    """The operation behind `seglu`: a node of a Functional model."""

    def call(self, x, ranges, ts):
        return seglu(x, ranges, ts)

    def compute_output_spec(self, x, ranges, ts):
        x, ranges, ts = _prepare(x, ranges, ts, symbolic=True)
        return _output_spec(x, ranges)


@keras.saving.register_keras_serializable(package="keras_multimax", name="ops.MultiMax")
class MultiMax(keras.Operation):
    """The operation behind `multimax`: a node of a Functional model."""

    def __init__(self, axis: int | Sequence[int] = -1, *, name: str | None = None):
        super().__init__(name=name)
        axes = _normalize_axis(axis, None)
        self.axis = axes if isinstance(axis, (tuple, list)) else axes[0]

    def call(self, x, ranges, ts, mask=None):
        return multimax(x, ranges, ts, axis=self.axis, mask=mask)

    def compute_output_spec(self, x, ranges, ts, mask=None):
        x, ranges, ts = _prepare(x, ranges, ts, symbolic=True)
        _normalize_axis(self.axis, _rank(x))
        if mask is not None:
            mask = spec(mask, "mask")
            _mask_dtype(mask.dtype)
            _check_mask(mask, x)
        return _output_spec(x, ranges)

    def get_config(self):
        return {"axis": self.axis, "name": self.name}


# ---------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------


def seglu(x: TensorLike, ranges: TensorLike, ts: TensorLike):
    """The MultiMax modulator σ (a piece-wise "SegLU" of order K).

    Formula:

        σ(x) = x + Σ_{k<K} t[2k]·relu(r[2k] − x)^(k+1) + t[2k+1]·relu(x − r[2k+1])^(k+1)

    with ``r = ranges`` (the paper's thresholds ``b``, ``d``) and ``t = ts``
    (their slopes ``t_b``, ``t_d``). With ``ts = 0`` it is the identity.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> x = np.array([-2.0, 0.0, 2.0], dtype="float32")
    >>> ranges = np.array([-1.0, 1.0], dtype="float32")
    >>> ts = np.array([0.5, 0.5], dtype="float32")
    >>> keras.ops.convert_to_numpy(seglu(x, ranges, ts))
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
        in float32). The gradients are closed-form (a custom gradient of the
        backend).

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """
    if is_symbolic(x, ranges, ts):
        return SegLU().symbolic_call(x, ranges, ts)
    x, ranges, ts = _prepare(x, ranges, ts)
    return _impl.seglu(x, ranges, ts)


def multimax(
    x: TensorLike,
    ranges: TensorLike,
    ts: TensorLike,
    axis: int | Sequence[int] = -1,
    mask: TensorLike | None = None,
):
    """MultiMax: SoftMax of the piece-wise modulated input.

    Formula:

        MultiMax(x)_i = exp(σ(x)_i) / Σ_j exp(σ(x)_j)

    where σ is `seglu` (see there for the parameters). With ``ts = 0`` this is
    exactly SoftMax. The gradients for ``x``, ``ranges`` and ``ts`` are given in
    closed form by one custom gradient (`tf.custom_gradient` on TensorFlow,
    `jax.custom_vjp` on JAX); the backward pass keeps only the input and the
    output.

    On TensorFlow the forward is the formula as plain builtin ops, in
    training and inference alike, unless
    `keras_multimax.config.enable_fused_forward` was called (see there); the
    backward is fused XLA kernels. On JAX, `jax.jit` fuses the whole op.

    Masked entries (``mask`` False, or <= 0.5 for numeric masks) are removed
    *after* the modulation: they get exactly zero probability and zero
    gradient whatever the sign of ``ts``; a fully masked slice gives zeros.
    ``-inf`` entries of ``x`` are excluded the same way.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> x = np.array([[1.0, 2.0, 1.0]], dtype="float32")
    >>> zeros = np.zeros(4, dtype="float32")
    >>> y = multimax(x, zeros, zeros)  # ts = 0: SoftMax
    >>> np.round(keras.ops.convert_to_numpy(y), 4)
    array([[0.2119, 0.5761, 0.2119]], dtype=float32)
    >>> ranges = np.array([1.5, 1.5, 1.5, 1.5], dtype="float32")
    >>> ts = np.array([-1.0, 1.0, 0.0, 0.0], dtype="float32")  # sparser
    >>> y = multimax(x, ranges, ts, mask=np.array([[True, True, False]]))
    >>> np.round(keras.ops.convert_to_numpy(y), 4)
    array([[0.1192, 0.8808, 0.    ]], dtype=float32)

    On symbolic inputs it returns a symbolic output, as `keras.ops.softmax`
    does, so Functional models can be built from it:

    >>> inputs = keras.Input((3,))
    >>> outputs = multimax(inputs, ranges, ts)
    >>> outputs.shape, outputs.dtype
    ((None, 3), 'float32')
    >>> model = keras.Model(inputs, outputs)

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
    if is_symbolic(x, ranges, ts, mask):
        return MultiMax(axis).symbolic_call(x, ranges, ts, mask)
    x, ranges, ts = _prepare(x, ranges, ts)
    axes = _normalize_axis(axis, _rank(x))
    if mask is not None:
        mask = _prepare_mask(mask, x)
    return _impl.multimax(x, ranges, ts, axes, mask)


@contextlib.contextmanager
def plain_ops() -> Iterator[None]:
    """Deprecated: the TensorFlow forward is plain builtin ops by default now.

    In 0.2.0 the forward of a training step was a fused XLA kernel, and
    graphs traced for export had to be traced inside this context. Since
    0.3.0 the forward is plain builtin ops unless
    `keras_multimax.config.enable_fused_forward` was called. This context
    still does what it did: it turns that switch off (in this thread) while
    it is entered, as `keras_multimax.config.plain_forward` does. It will be
    removed in 0.4.0: use `keras_multimax.config.plain_forward` instead.
    """
    warnings.warn(
        "`keras_multimax.ops.plain_ops` is deprecated and will be removed in "
        "0.4.0: the TensorFlow forward is plain builtin ops unless "
        "`keras_multimax.config.enable_fused_forward()` was called. Use "
        "`keras_multimax.config.plain_forward()` instead.",
        DeprecationWarning,
        stacklevel=3,
    )
    with config.plain_forward():
        yield
