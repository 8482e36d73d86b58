"""`multimax_dot_product_attention`: MultiMax attention in O(T) memory.

Backend-neutral front: validation, the default block size and the dispatch
to the custom gradient of the backend
(``keras_multimax/backend/<name>/attention.py``); the algorithm, written
once, is `keras_multimax._blockwise`.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from keras_multimax import _blockwise
from keras_multimax._cross_entropy import _float
from keras_multimax._cross_entropy import int_option
from keras_multimax._symbolic import is_symbolic
from keras_multimax._symbolic import spec
from keras_multimax.backend import load_backend_module

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MultiMaxDotProductAttention",
    "multimax_dot_product_attention",
]

# Queries and keys per block when `block_size` is None, measured by
# benchmarks/bench_attention.py (see benchmarks/README.md).
DEFAULT_BLOCK_SIZE = 256


def _dims(x) -> tuple:
    return tuple(d if isinstance(d, (int, np.integer)) else None for d in x.shape)


def _mask(mask, symbolic: bool):
    checked = spec(mask, "mask")  # the dtype before a conversion can fail on it
    kind = getattr(checked.dtype, "kind", None)  # NumPy: strings, objects
    dtype = "string" if kind in ("U", "S", "O") else None
    dtype = dtype or keras.backend.standardize_dtype(checked.dtype)
    if dtype != "bool" and "int" not in dtype and "float" not in dtype:
        raise TypeError(
            "`mask` must be boolean (True: the entry takes part) or numeric "
            f"(kept where > 0.5). Received: mask.dtype={dtype}"
        )
    if symbolic:
        return checked
    mask = keras.ops.convert_to_tensor(mask)
    return mask if dtype == "bool" else keras.ops.greater(mask, 0.5)


def _check_sequences(query, key, value) -> None:
    names = ("query", "key", "value")
    shapes = [_dims(x) for x in (query, key, value)]
    for name, shape in zip(names, shapes):
        if len(shape) != 4:
            raise ValueError(
                f"`{name}` must have rank 4, (batch, length, heads, head_dim) as "
                f"in `keras.ops.dot_product_attention`. Received: {name}.shape={shape}"
            )
        if None in shape[2:]:
            raise ValueError(
                f"The heads and head_dim of `{name}` must be static. "
                f"Received: {name}.shape={shape}"
            )
        if shape[1] == 0:
            raise ValueError(
                f"`{name}` must have at least one position. Received: {name}.shape={shape}"
            )
    (b, _, heads, depth), (kb, kt, kv_heads, k_depth), (vb, vt, v_heads, _) = shapes
    received = f"Received: query.shape={shapes[0]}, key.shape={shapes[1]}, value.shape={shapes[2]}"
    if k_depth != depth:
        raise ValueError(f"`query` and `key` must have the same head_dim. {received}")
    if (vt, v_heads) != (kt, kv_heads) and None not in (vt, kt):
        raise ValueError(f"`value` must have the length and heads of `key`. {received}")
    if v_heads != kv_heads:
        raise ValueError(f"`value` must have the heads of `key`. {received}")
    batches = {d for d in (b, kb, vb) if d is not None}
    if len(batches) > 1:
        raise ValueError(
            f"`query`, `key` and `value` must have the same batch size. {received}"
        )
    if heads % kv_heads:
        raise ValueError(
            "The heads of `query` must be a multiple of those of `key` and "
            f"`value` (grouped-query attention). {received}"
        )


def _check_parameters(ranges, ts, heads: int) -> None:
    r_shape, t_shape = _dims(ranges), _dims(ts)
    if (
        len(t_shape) not in (1, 2)
        or None in t_shape
        or t_shape[-1] < 2
        or t_shape[-1] % 2
        or (len(t_shape) == 2 and t_shape[0] != heads)
    ):
        raise ValueError(
            "`ts` must have a static shape (2*order,), shared by every head, or "
            f"(num_heads={heads}, 2*order), one modulator per head, with order >= 1. "
            f"Received: ts.shape={t_shape}"
        )
    if r_shape != t_shape:
        raise ValueError(
            "`ranges` and `ts` must have the same shape. "
            f"Received: ranges.shape={r_shape}, ts.shape={t_shape}"
        )


def _check_scores(x, name: str, scores: tuple) -> None:
    """``x`` (a bias or a mask) must broadcast to the scores ``(B, H, Tq, Tk)``.

    Its heads dimension must be static: it says whether ``x`` is per head.
    """
    shape = _dims(x)
    aligned = list(zip(shape[::-1], scores[::-1]))
    fits = len(shape) <= 4 and all(
        d == 1 or d == s or s is None or (d is None and axis != 2)
        for axis, (d, s) in enumerate(aligned)
    )
    if not fits:
        raise ValueError(
            f"`{name}` must broadcast to the scores (batch, num_heads, "
            "query_length, key_length), with a static heads dimension. "
            f"Received: {name}.shape={shape}, scores shape={scores}"
        )


def _scale(scale, depth: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(depth)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(
        scale, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            "`scale` must be a Python or NumPy number, or None for "
            f"1/sqrt(head_dim). Received: scale={scale!r}"
        )
    if not math.isfinite(scale):
        raise ValueError(f"`scale` must be finite. Received: scale={scale}")
    return float(scale)


def _is_causal(is_causal) -> bool:
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(
            f"`is_causal` must be a bool. Received: is_causal={is_causal!r}"
        )
    return bool(is_causal)


def _checked(query, key, value, bias, mask, ranges, ts, symbolic: bool = False):
    """The tensors of a call, checked (specs with shape and dtype if ``symbolic``)."""
    query = _float(query, "query", symbolic)
    key = _float(key, "key", symbolic)
    value = _float(value, "value", symbolic)
    ranges = _float(ranges, "ranges", symbolic)
    ts = _float(ts, "ts", symbolic)
    _check_sequences(query, key, value)
    heads = _dims(query)[2]
    _check_parameters(ranges, ts, heads)
    scores = (_dims(query)[0], heads, _dims(query)[1], _dims(key)[1])
    if bias is not None:
        bias = _float(bias, "bias", symbolic)
        _check_scores(bias, "bias", scores)
    if mask is not None:
        mask = _mask(mask, symbolic)
        _check_scores(mask, "mask", scores)
    return query, key, value, bias, mask, ranges, ts


def tiling(query_length, key_length, depth: int, scale, is_causal, block_size):
    """The static `_blockwise.Tiling` of a call; raises for bad options.

    Lengths are ints, or None when only known as the graph runs.
    """
    block = int_option(block_size, "block_size", 1) or DEFAULT_BLOCK_SIZE
    return _blockwise.Tiling(
        scale=_scale(scale, depth),
        is_causal=_is_causal(is_causal),
        q_block=_blockwise.block_size(query_length, block),
        k_block=_blockwise.block_size(key_length, block),
    )


@keras.saving.register_keras_serializable(
    package="keras_multimax", name="ops.MultiMaxDotProductAttention"
)
class MultiMaxDotProductAttention(keras.Operation):
    """The operation behind `multimax_dot_product_attention`: a node of a Functional model."""

    def __init__(self, is_causal=False, block_size=None, *, name=None):
        super().__init__(name=name)
        self.is_causal = _is_causal(is_causal)
        self.block_size = int_option(block_size, "block_size", 1)

    def call(self, query, key, value, bias=None, mask=None, scale=None, *, ranges, ts):
        return multimax_dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            scale,
            self.is_causal,
            ranges=ranges,
            ts=ts,
            block_size=self.block_size,
        )

    def compute_output_spec(
        self, query, key, value, bias=None, mask=None, scale=None, *, ranges, ts
    ):
        query, key, value, *_ = _checked(
            query, key, value, bias, mask, ranges, ts, symbolic=True
        )
        _scale(scale, _dims(query)[3])
        dtype = keras.backend.result_type(query.dtype, key.dtype, value.dtype)
        return keras.KerasTensor((*_dims(query)[:3], _dims(value)[3]), dtype=dtype)

    def get_config(self):
        return {
            "is_causal": self.is_causal,
            "block_size": self.block_size,
            "name": self.name,
        }


def multimax_dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    scale=None,
    is_causal=False,
    *,
    ranges,
    ts,
    block_size=None,
):
    """MultiMax attention computed block by block, in O(T) memory ("flash").

    Formula:

        x = scale·q·kᵀ + bias
        out = MultiMax(x)·v = softmax(σ(x))·v

    with σ the MultiMax modulator (`ops.seglu`), applied per block of
    ``block_size`` queries × ``block_size`` keys, masked *after* σ (masked
    and −inf scores get probability exactly 0, whatever the sign of ``ts``)
    and normalised by an online log-sum-exp over the key blocks. With
    ``ts = 0`` it is `keras.ops.dot_product_attention`. Its arguments,
    layout and causal convention are Keras' (``tril(ones(Tq, Tk))``: query
    ``i`` sees keys ``j <= i``, counted from the first of both), plus the
    modulator's ``ranges`` and ``ts``.

    Neither pass holds a ``(Tq, Tk)`` matrix: the forward keeps the output
    and one log-sum-exp per query and head; the backward (closed form, one
    custom gradient per backend: `tf.custom_gradient`, `jax.custom_vjp`)
    recomputes each block's scores from q and k and gives the gradients of
    ``query``, ``key``, ``value``, ``bias``, ``ranges`` and ``ts``. Causal
    attention skips the blocks above the diagonal. Grouped-query heads read
    their key/value head without K and V being repeated. float16/bfloat16
    inputs are computed in float32, block by block.

    A query that sees no key (fully masked) gets a zero output (SoftMax
    attention would average every value). A ``bias`` or ``mask`` with full
    ``(Tq, Tk)`` dimensions is read block by block, but it is itself
    O(Tq·Tk), and so is the gradient of such a bias: prefer broadcasting
    ones (a ``(B, 1, 1, Tk)`` padding mask, ``is_causal``).

    Example:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q = rng.normal(size=(2, 5, 4, 8)).astype("float32")  # 4 query heads
    >>> k = rng.normal(size=(2, 7, 2, 8)).astype("float32")  # 2 key/value heads
    >>> v = rng.normal(size=(2, 7, 2, 8)).astype("float32")
    >>> ranges = np.array([-1.0, 1.0], "float32")
    >>> ts = np.array([0.2, 0.3], "float32")
    >>> out = multimax_dot_product_attention(
    ...     q, k, v, is_causal=True, ranges=ranges, ts=ts, block_size=4)
    >>> tuple(out.shape)
    (2, 5, 4, 8)
    >>> x = np.einsum("bqhd,bkhd->bhqk", q, np.repeat(k, 2, axis=2)) / np.sqrt(8)
    >>> s = x + 0.2 * np.maximum(-1.0 - x, 0) + 0.3 * np.maximum(x - 1.0, 0)
    >>> s = np.where(np.tril(np.ones((5, 7), bool)), s, -np.inf)
    >>> p = np.exp(s - s.max(-1, keepdims=True))
    >>> p /= p.sum(-1, keepdims=True)
    >>> want = np.einsum("bhqk,bkhd->bqhd", p, np.repeat(v, 2, axis=2))
    >>> bool(np.allclose(out, want, atol=1e-5))
    True

    Args:
        query: Floating-point ``(batch, query_length, num_heads, head_dim)``.
        key: ``(batch, key_length, num_kv_heads, head_dim)``;
            ``num_kv_heads`` divides ``num_heads`` (grouped-query attention:
            query head ``h`` reads key/value head ``h // (num_heads //
            num_kv_heads)``, as Keras does).
        value: ``(batch, key_length, num_kv_heads, value_dim)``.
        bias: Optional float tensor added to the scores, broadcastable to
            ``(batch, num_heads, query_length, key_length)`` with a static
            heads dimension.
        mask: Optional boolean tensor broadcastable like ``bias``; True
            keeps an entry (numeric masks: kept where > 0.5).
        scale: Python number multiplying ``q·kᵀ``; None for
            ``1/sqrt(head_dim)``.
        is_causal: Whether query ``i`` only sees keys ``j <= i``.
        ranges: Thresholds of the modulator: ``(2*order,)`` shared by every
            head, or ``(num_heads, 2*order)`` per head.
        ts: Slopes of the modulator, the shape of ``ranges``.
        block_size: Queries and keys per block (int >= 1); lengths that are
            not a multiple are split into equal blocks of at most this size.
            None: `DEFAULT_BLOCK_SIZE`.

    Returns:
        ``(batch, query_length, num_heads, value_dim)`` in the dtype of
        ``query``, ``key`` and ``value`` together.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """
    if is_symbolic(query, key, value, bias, mask, ranges, ts):
        return MultiMaxDotProductAttention(
            is_causal=is_causal, block_size=block_size
        ).symbolic_call(query, key, value, bias, mask, scale, ranges=ranges, ts=ts)
    query, key, value, bias, mask, ranges, ts = _checked(
        query, key, value, bias, mask, ranges, ts
    )
    plan = tiling(
        _dims(query)[1], _dims(key)[1], _dims(query)[3], scale, is_causal, block_size
    )
    impl = load_backend_module("attention")
    return impl.multimax_dot_product_attention(
        query, key, value, bias, mask, ranges, ts, plan
    )
