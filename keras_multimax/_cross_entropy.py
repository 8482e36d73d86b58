"""`multimax_cross_entropy`: a MultiMax LM-head loss that never holds the logits.

Backend-neutral front: validation, the choice of the chunk size and the
dispatch on `keras.backend.backend()` to the custom gradient of the backend
(``keras_multimax/backend/<name>/cross_entropy.py``).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_multimax._symbolic import is_symbolic
from keras_multimax._symbolic import spec

__all__ = ["MultiMaxCrossEntropy", "default_chunk_size", "multimax_cross_entropy"]

# The chunk's float32 buffers (logits, σ, probabilities, ∂L/∂σ, ∂L/∂z and the
# parameter factors: about 8 of [tokens, chunk] at once in the backward) are
# kept under this budget when `chunk_size` is None.
CHUNK_BUDGET_BYTES = 128 * 2**20
_BUFFERS_PER_CHUNK = 8
# Chunk sizes are multiples of this (matrix-product tiles), at least this.
_CHUNK_MULTIPLE = 128
# Tokens assumed when their number is unknown while a graph is traced.
_ASSUMED_TOKENS = 8192


def default_chunk_size(tokens: int | None, vocab_size: int) -> int:
    """The chunk size used when ``chunk_size=None``.

    The largest multiple of 128 such that about 8 float32 buffers of
    ``[tokens, chunk]`` fit in `CHUNK_BUDGET_BYTES` (128 MiB), at least 128 and
    at most ``vocab_size``; ``tokens`` is taken as 8192 when unknown (a graph
    traced with a dynamic batch).

    Example:

    >>> default_chunk_size(4096, 32768)
    1024
    >>> default_chunk_size(16, 1000)
    1000
    """
    tokens = _ASSUMED_TOKENS if tokens is None else max(int(tokens), 1)
    per_column = tokens * 4 * _BUFFERS_PER_CHUNK
    chunk = CHUNK_BUDGET_BYTES // per_column // _CHUNK_MULTIPLE * _CHUNK_MULTIPLE
    return int(min(max(chunk, _CHUNK_MULTIPLE), vocab_size))


def _float(x, name: str, symbolic: bool = False):
    if x is None:
        raise TypeError(
            f"`{name}` must be a floating-point tensor, not None. Received: {name}=None"
        )
    x = spec(x, name) if symbolic else keras.ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    if "float" not in dtype:
        raise TypeError(
            f"`{name}` must be a floating-point tensor (float16, bfloat16, "
            f"float32 or float64). Received: {name}.dtype={dtype}"
        )
    return x


def int_option(value, name: str, minimum: int | None):
    """``value`` as an int (>= ``minimum``) or None; raises naming ``name``."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int or None. Received: {name}={value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(
            f"`{name}` must be an integer >= {minimum} or None. Received: {name}={value}"
        )
    return int(value)


def _check_labels(values, vocab: int, ignore_index) -> None:
    """Raises for labels outside ``[0, vocab)`` other than ignore_index.

    ``values`` is None inside a traced graph, where the labels are unknown.
    """
    if values is None:
        return
    bad = (values < 0) | (values >= vocab)
    if ignore_index is not None:
        bad &= values != ignore_index
    if bad.any():
        raise ValueError(
            f"`labels` must be in [0, vocab_size={vocab}) or equal to "
            f"`ignore_index` ({ignore_index}). Received: labels with "
            f"{int(bad.sum())} value(s) out of range, e.g. {values[bad][:5].tolist()}"
        )


def _checked(
    hidden, kernel, labels, ranges, ts, bias, chunk_size, ignore_index, symbolic=False
):
    """The arguments of `multimax_cross_entropy`, checked (tensors, or specs
    with ``shape`` and ``dtype`` if ``symbolic``)."""
    hidden = _float(hidden, "hidden", symbolic)
    kernel = _float(kernel, "kernel", symbolic)
    ranges = _float(ranges, "ranges", symbolic)
    ts = _float(ts, "ts", symbolic)
    if bias is not None:
        bias = _float(bias, "bias", symbolic)
    if labels is None:
        raise TypeError(
            "`labels` must be an integer tensor, not None. Received: labels=None"
        )
    labels = spec(labels, "labels") if symbolic else keras.ops.convert_to_tensor(labels)
    label_dtype = keras.backend.standardize_dtype(labels.dtype)
    if "int" not in label_dtype:
        raise TypeError(
            f"`labels` must be an integer tensor of token ids. "
            f"Received: labels.dtype={label_dtype}"
        )
    chunk_size = int_option(chunk_size, "chunk_size", 1)
    ignore_index = int_option(ignore_index, "ignore_index", None)

    h_shape = tuple(hidden.shape)
    k_shape = tuple(kernel.shape)
    if len(h_shape) < 1 or h_shape[-1] is None:
        raise ValueError(
            "`hidden` must have rank >= 1 and a static last dimension (the "
            f"width). Received: hidden.shape={h_shape}"
        )
    if len(k_shape) != 2 or None in k_shape:
        raise ValueError(
            "`kernel` must be a (width, vocab_size) matrix with a static shape. "
            f"Received: kernel.shape={k_shape}"
        )
    if k_shape[0] != h_shape[-1]:
        raise ValueError(
            "The first dimension of `kernel` must equal the last dimension of "
            f"`hidden`. Received: hidden.shape={h_shape}, kernel.shape={k_shape}"
        )
    l_shape = tuple(labels.shape)
    if len(l_shape) != len(h_shape) - 1 or any(
        a is not None and b is not None and a != b for a, b in zip(l_shape, h_shape)
    ):
        raise ValueError(
            "`labels` must have the shape of `hidden` without its last "
            f"dimension. Received: hidden.shape={h_shape}, labels.shape={l_shape}"
        )
    r_shape, t_shape = tuple(ranges.shape), tuple(ts.shape)
    if len(t_shape) != 1 or t_shape[0] is None or t_shape[0] < 2 or t_shape[0] % 2:
        raise ValueError(
            "`ts` must be a vector of static, even length 2*order (order >= 1), "
            f"shared by every logit. Received: ts.shape={t_shape}"
        )
    if r_shape != t_shape:
        raise ValueError(
            "`ranges` and `ts` must have the same shape. "
            f"Received: ranges.shape={r_shape}, ts.shape={t_shape}"
        )
    vocab = k_shape[1]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(
            "`bias` must have shape (vocab_size,) = (kernel.shape[1],). "
            f"Received: bias.shape={tuple(bias.shape)}, kernel.shape={k_shape}"
        )

    return hidden, kernel, labels, ranges, ts, bias, chunk_size, ignore_index


@keras.saving.register_keras_serializable(
    package="keras_multimax", name="ops.MultiMaxCrossEntropy"
)
class MultiMaxCrossEntropy(keras.Operation):
    """The operation behind `multimax_cross_entropy`: a node of a Functional model."""

    def __init__(self, chunk_size=None, ignore_index=None, *, name=None):
        super().__init__(name=name)
        self.chunk_size = int_option(chunk_size, "chunk_size", 1)
        self.ignore_index = int_option(ignore_index, "ignore_index", None)

    def call(self, hidden, kernel, labels, ranges, ts, bias=None):
        return multimax_cross_entropy(
            hidden,
            kernel,
            labels,
            ranges,
            ts,
            bias,
            chunk_size=self.chunk_size,
            ignore_index=self.ignore_index,
        )

    def compute_output_spec(self, hidden, kernel, labels, ranges, ts, bias=None):
        hidden, _, labels, *_ = _checked(
            hidden,
            kernel,
            labels,
            ranges,
            ts,
            bias,
            self.chunk_size,
            self.ignore_index,
            symbolic=True,
        )
        dtype = keras.backend.standardize_dtype(hidden.dtype)
        return keras.KerasTensor(
            labels.shape, dtype="float64" if dtype == "float64" else "float32"
        )

    def get_config(self):
        return {
            "chunk_size": self.chunk_size,
            "ignore_index": self.ignore_index,
            "name": self.name,
        }


def multimax_cross_entropy(
    hidden,
    kernel,
    labels,
    ranges,
    ts,
    bias=None,
    *,
    chunk_size: int | None = None,
    ignore_index: int | None = None,
):
    """Per-token MultiMax cross-entropy of a linear head, without the full logits.

    Formula:

        z = hidden · kernel + bias
        loss = logsumexp(σ(z)) − σ(z)[label]

    with σ the MultiMax modulator (`ops.seglu`): this is exactly SegLU
    followed by sparse softmax cross-entropy from logits, i.e. the negative
    log-likelihood of the label under MultiMax(z). With ``ts = 0`` it is the
    plain softmax cross-entropy of the linear head.

    The logits are computed ``chunk_size`` vocabulary columns at a time, one
    chunk after the other, with an online logsumexp; neither the forward nor
    the backward holds the ``[tokens, vocab_size]`` logits. The gradients for
    ``hidden``, ``kernel``, ``bias``, ``ranges`` and ``ts`` are closed-form
    (one custom gradient per backend: `tf.custom_gradient`,
    `jax.custom_vjp`); the backward recomputes each chunk's logits from
    ``hidden`` and the saved logsumexp, and keeps nothing of size
    ``[tokens, vocab_size]`` either. ``float16``/``bfloat16`` inputs are
    computed in float32, chunk by chunk.

    Labels outside ``[0, vocab_size)`` (other than ``ignore_index``) raise a
    ValueError when called eagerly. Inside a traced graph (`tf.function`,
    `jax.jit`) they cannot be checked without a host round trip: such tokens
    get a NaN loss and NaN gradients, so that they show.

    Example:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> hidden = rng.normal(size=(2, 3, 4)).astype("float32")
    >>> kernel = rng.normal(size=(4, 10)).astype("float32")
    >>> labels = np.array([[1, 2, 9], [0, -100, 5]])
    >>> ranges = np.array([-1.0, 1.0, -2.0, 2.0], "float32")
    >>> ts = np.array([0.1, 0.1, 0.0, 0.0], "float32")
    >>> loss = multimax_cross_entropy(hidden, kernel, labels, ranges, ts,
    ...                               chunk_size=4, ignore_index=-100)
    >>> tuple(loss.shape), keras.backend.standardize_dtype(loss.dtype)
    ((2, 3), 'float32')
    >>> float(loss[1, 1])  # ignored token
    0.0
    >>> z = hidden @ kernel  # the same from the full logits (σ of these ts):
    >>> s = z + 0.1 * np.maximum(-1.0 - z, 0) + 0.1 * np.maximum(z - 1.0, 0)
    >>> picked = np.take_along_axis(s, labels[..., None] % 10, -1)[..., 0]
    >>> np.allclose(loss[0], np.log(np.exp(s).sum(-1))[0] - picked[0], atol=1e-5)
    True

    Args:
        hidden: Floating-point tensor ``(..., width)``, the last hidden
            states (leading dimensions such as batch and sequence allowed).
        kernel: Floating-point ``(width, vocab_size)`` matrix with static
            shape, the head's weights (for tied embeddings, the embedding
            matrix transposed).
        labels: Integer tensor of shape ``hidden.shape[:-1]``, the target
            token ids.
        ranges: Thresholds of the modulator, shape ``(2*K,)``, shared by
            every logit.
        ts: Slopes of the modulator, same shape as ``ranges``.
        bias: Optional ``(vocab_size,)`` bias.
        chunk_size: Vocabulary columns per chunk. ``None`` picks it with
            `default_chunk_size` from a 128 MiB budget.
        ignore_index: Optional label value whose tokens get loss 0 and no
            gradient (e.g. ``-100`` for padding).

    Returns:
        The loss of every token with the shape of ``labels``: float32
        (float64 for float64 ``hidden``, e.g. for gradient checks).

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """
    if is_symbolic(hidden, kernel, labels, ranges, ts, bias):
        return MultiMaxCrossEntropy(
            chunk_size=chunk_size, ignore_index=ignore_index
        ).symbolic_call(hidden, kernel, labels, ranges, ts, bias)
    hidden, kernel, labels, ranges, ts, bias, chunk_size, ignore_index = _checked(
        hidden, kernel, labels, ranges, ts, bias, chunk_size, ignore_index
    )
    h_shape, vocab = tuple(hidden.shape), kernel.shape[1]
    tokens = None if None in h_shape[:-1] else int(np.prod(h_shape[:-1], dtype=int))
    chunk = min(chunk_size, vocab) if chunk_size else default_chunk_size(tokens, vocab)

    name = keras.backend.backend()
    if name == "tensorflow":
        from keras_multimax.backend.tensorflow import cross_entropy as impl
    elif name == "jax":
        from keras_multimax.backend.jax import cross_entropy as impl
    else:
        raise NotImplementedError(
            "multimax_cross_entropy is implemented for the TensorFlow and JAX "
            f"backends. Received: keras.backend.backend()={name!r}"
        )
    _check_labels(impl.concrete_values(labels), vocab, ignore_index)
    flat_hidden = keras.ops.reshape(hidden, (-1, h_shape[-1]))
    flat_labels = keras.ops.reshape(labels, (-1,))
    loss = impl.multimax_cross_entropy(
        flat_hidden, kernel, flat_labels, ranges, ts, bias, chunk, ignore_index
    )
    return keras.ops.reshape(loss, keras.ops.shape(labels))
