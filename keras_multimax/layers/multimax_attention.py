"""The `MultiMaxAttention` layer: `keras.layers.MultiHeadAttention` with MultiMax."""

from __future__ import annotations

import math
from typing import Any

import keras

from keras_multimax import ops
from keras_multimax.layers._modulator import ModulatorParameters
from keras_multimax.modulator import pop_legacy_arguments

__all__ = ["MultiMaxAttention"]


def validate_per_head(per_head: Any) -> bool:
    if not isinstance(per_head, bool):
        raise TypeError(
            f"`per_head` must be a boolean. Received: per_head={per_head!r}"
        )
    return per_head


# With `flash_attention=None` (Keras' default, "attempt"), the blockwise
# computation is used from this many score entries (batch x heads x queries x
# keys) on; below, the materialised one. benchmarks/bench_attention.py
# (benchmarks/README.md) measured a training step from 1 x 8 x 1024 x 1024
# entries up: there the blockwise step was already 0.66-0.69x the time of the
# materialised one (0.38x causal) and 0.15-0.27x its memory, on TensorFlow and
# JAX. Below that size it has not been measured, so it stays materialised.
BLOCKWISE_MIN_SCORES = 8 * 1024 * 1024

# Keras' own message (`MultiHeadAttention._compute_attention`), word for word.
_SCORES_WITH_FLASH = (
    "Returning attention scores is not supported when flash "
    "attention is enabled. Please disable flash attention to access"
    " attention scores."
)


def use_blockwise_attention(
    flash_attention: bool | None,
    scores_shape: tuple,
    dropout: float = 0.0,
    return_attention_scores: bool = False,
    attention_axes: int = 1,
) -> bool:
    """Whether a MultiMax attention layer computes its attention block by block.

    The layers take Keras' ``flash_attention`` switch with Keras' meaning,
    ``flash_attention or keras.config.is_flash_attention_enabled()``; the
    value that gives is passed here.

    - ``True``: the blockwise computation,
      `keras_multimax.ops.multimax_dot_product_attention`: O(T) memory, no
      ``(T, S)`` matrix of scores. Keras' errors for dropout (raised when the
      layer is built) and for returned scores apply; several attention axes
      raise a ``ValueError`` (the blockwise op takes one).
    - ``False``: the materialised computation, scores then
      `keras_multimax.ops.multimax`.
    - ``None``: blockwise where it can run (no dropout in this call, no
      returned scores, one attention axis, static lengths; the layers pass
      their dropout rate when training, 0 otherwise) and the scores would
      have at least 8 · 1024² entries (``BLOCKWISE_MIN_SCORES``);
      materialised otherwise. Both compute the same function. From that
      size on ``benchmarks/bench_attention.py`` measured the blockwise
      training step faster (0.7× or less) and smaller (0.3× or less) than
      the materialised one on the CPU, with TensorFlow and JAX; smaller
      sizes have not been measured.

    Example:

    >>> use_blockwise_attention(None, (1, 8, 8192, 8192))
    True
    >>> use_blockwise_attention(None, (16, 4, 197, 197))
    False
    >>> use_blockwise_attention(None, (1, 8, 8192, 8192), dropout=0.1)
    False

    Args:
        flash_attention: The layer's effective switch: True, False or None.
        scores_shape: ``(batch, heads, query_length, key_length)``; None for
            a dimension only known when the graph runs.
        dropout: The layer's dropout on the attention weights.
        return_attention_scores: Whether the call returns the weights.
        attention_axes: How many axes attention runs over.

    Returns:
        True for the blockwise computation, False for the materialised one.
    """
    if flash_attention:
        if return_attention_scores:
            raise ValueError(_SCORES_WITH_FLASH)
        if attention_axes != 1:
            raise ValueError(
                "Flash (blockwise) MultiMax attention runs over one attention "
                "axis; set `flash_attention=False` (or None) for attention over "
                f"several axes. Received: {attention_axes} attention axes"
            )
        return True
    if flash_attention is not None:
        return False
    if dropout > 0 or return_attention_scores or attention_axes != 1:
        return False
    # None (TensorFlow) or a symbolic dimension (JAX's shape-polymorphic
    # export): the size is not known while tracing.
    if not all(isinstance(d, int) for d in scores_shape):
        return False
    return math.prod(scores_shape) >= BLOCKWISE_MIN_SCORES


def expand_mask(mask, scores_rank: int, num_attention_axes: int):
    """Inserts the head (and missing batch) axes into a Keras attention mask.

    Keras attention masks have shape ``(B, <query dims>, <key dims>)`` (or
    fewer leading dimensions); the scores have the heads just before the
    query dimensions. Same expansion as `MultiHeadAttention._masked_softmax`.
    """
    if mask is None:
        return None
    mask = keras.ops.cast(mask, "bool")
    axis = -2 * num_attention_axes - 1
    for _ in range(scores_rank - len(mask.shape)):
        mask = keras.ops.expand_dims(mask, axis=axis)
    return mask


class AttentionModulator(ModulatorParameters):
    """Mixin for the attention layers: the modulator and the MultiMax weights.

    Shared by `MultiMaxAttention` and `MultiMaxGroupQueryAttention`: the
    subclass calls `_init_attention_modulator(...)` after the parent's
    ``__init__``, `_build_attention_modulator(num_heads)` in `build`, and
    `_attention_weights` from its ``_masked_softmax``; `get_config` adds
    ``per_head`` and the modulator.
    """

    def _init_attention_modulator(self, per_head, modulator):
        self.per_head = validate_per_head(per_head)
        self.modulator = modulator

    def _build_attention_modulator(self, num_heads: int):
        self._build_modulator((num_heads,) if self.per_head else ())

    def _check_input_ranks(self, exact: bool, **shapes):
        """Rejects inputs without (batch, <attention axes>, features) dims.

        The parent would fail later with an unrelated message (an empty
        ``axis`` of the normalisation, or an index error).
        """
        layout = "exactly 3" if exact else "at least 3"
        for name, shape in shapes.items():
            if shape is None:
                continue
            rank = len(shape)
            if rank < 3 or (exact and rank != 3):
                raise ValueError(
                    f"`{name}` of {type(self).__name__} {self.name!r} must have "
                    f"{layout} dimensions (batch, <attention axes>, features). "
                    f"Received: {name}.shape={tuple(shape)} (rank {rank}). "
                    "Add a length-1 sequence axis, e.g. `x[:, None, :]`."
                )

    def _attention_weights(
        self, scores, attention_mask, num_heads: int, num_attention_axes: int
    ):
        """MultiMax over the key axes, masking after the modulation.

        ``scores`` are ``(<batch dims>, heads, <query axes>, <key axes>)``
        with ``num_attention_axes`` query and key axes.
        """
        ranges, ts = self.ranges, self.ts
        if self.per_head:
            shape = (num_heads,) + (1,) * (2 * num_attention_axes) + (2 * self.order,)
            ranges, ts = keras.ops.reshape(ranges, shape), keras.ops.reshape(ts, shape)
        mask = expand_mask(attention_mask, len(scores.shape), num_attention_axes)
        axes = tuple(range(-num_attention_axes, 0))
        return ops.multimax(scores, ranges, ts, axis=axes, mask=mask)

    def _blockwise_attention(
        self, query, key, value, attention_mask, use_causal_mask, scale
    ):
        """MultiMax attention of projected ``(B, T, H, D)`` queries and
        ``(B, S, H_kv, D)`` keys and values, block by block
        (`keras_multimax.ops.multimax_dot_product_attention`)."""
        return ops.multimax_dot_product_attention(
            query,
            key,
            value,
            mask=expand_mask(attention_mask, 4, 1),
            scale=scale,
            is_causal=bool(use_causal_mask),
            ranges=self.ranges,
            ts=self.ts,
        )

    def _with_causal_mask(self, query, value, attention_mask):
        """`attention_mask` (if any) and the parent's causal mask, combined."""
        causal_mask = self._compute_causal_mask(query, value)
        if attention_mask is None:
            return causal_mask
        return keras.ops.logical_and(
            keras.ops.cast(attention_mask, "bool"), causal_mask
        )

    def load_own_variables(self, store):
        if getattr(self, "ranges", None) is not None and not len(store.keys()):
            # Keras keys a layer's weights in a file by its class name, so a
            # file saved with the SoftMax parent has nothing under this
            # layer's key; its projections would stay random.
            parent = self._softmax_parent.__name__
            raise ValueError(
                f"No weights for {type(self).__name__} {self.name!r} in this "
                "file. Weights files (`.weights.h5`, `.keras`) key each layer "
                "by its class name, so weights saved from a model with "
                f"`keras.layers.{parent}` cannot load into its MultiMax twin. "
                "Load them into the SoftMax model, then convert it: "
                "`keras_multimax.convert.to_multimax(model)` copies every "
                "projection and starts with ts = 0 (exactly the old outputs)."
            )
        super().load_own_variables(store)

    def get_config(self):
        config = super().get_config()
        config["per_head"] = self.per_head
        return config


@keras.saving.register_keras_serializable(package="keras_multimax")
class MultiMaxAttention(AttentionModulator, keras.layers.MultiHeadAttention):
    """Multi-head attention whose attention weights are MultiMax, not SoftMax.

    A drop-in `keras.layers.MultiHeadAttention`: same arguments, same weights
    (plus ``ranges`` and ``ts``), same call signature. Every call path (with or
    without dropout, returned scores, masks, causal masks, several attention
    axes, gating, LoRA on the projections, a sliding window) normalises the
    scores with `keras_multimax.ops.multimax`; the fused SoftMax kernel of the
    parent is never used.

    Formula:

        Attention(Q, K, V) = MultiMax(Q·Kᵀ / √d_k)·V
        MultiMax(s) = softmax(σ(s))
        σ(s) = s + Σ_k t[2k]·relu(r[2k] − s)^(k+1) + t[2k+1]·relu(s − r[2k+1])^(k+1)

    with ``r`` the weight ``ranges`` and ``t`` the weight ``ts``. Masked keys
    are removed *after* the modulation: they get exactly zero weight whatever
    the sign of ``ts``, and a query with no visible key attends to nothing (its
    weights are all zero; SoftMax attention would spread them uniformly). With ``ts = 0`` the layer
    computes exactly `keras.layers.MultiHeadAttention`, except for queries that
    see no key (all-zero weights here, uniform in SoftMax).

    Example:

    >>> import numpy as np
    >>> layer = MultiMaxAttention(num_heads=2, key_dim=4, name="attention")
    >>> x = np.random.default_rng(0).normal(size=(1, 3, 8)).astype("float32")
    >>> out, scores = layer(x, x, return_attention_scores=True)
    >>> tuple(out.shape), tuple(scores.shape)
    ((1, 3, 8), (1, 2, 3, 3))
    >>> layer.ranges.path, tuple(layer.ts.shape)
    ('attention/ranges', (4,))

    Args:
        num_heads: Number of attention heads.
        key_dim: Size of each attention head for query and key.
        value_dim: Size of each attention head for value.
        dropout: Dropout probability, applied to the MultiMax weights.
        use_bias: Boolean, whether the projections use biases.
        output_shape: The shape of the output besides the batch and sequence
            dimensions; defaults to the query's last dimension.
        attention_axes: Axes over which attention (and MultiMax) is applied.
            ``None`` means all axes but batch, heads and features. With
            several axes MultiMax normalises over all of them jointly.
        sliding_window: Optional positive integer: each query attends only
            to the keys within ``sliding_window - 1`` positions of itself (a
            symmetric band, as in the parent). Defaults to ``None``.
        flash_attention: Keras' switch, with Keras' meaning: the layer
            uses ``flash_attention or
            keras.config.is_flash_attention_enabled()``. ``True`` computes
            the attention block by block in O(T) memory
            (`keras_multimax.ops.multimax_dot_product_attention`; no dropout,
            no returned scores, as in Keras), ``False`` materialises the
            scores, ``None`` lets `use_blockwise_attention` choose by size.
        kernel_initializer: Initializer of the projection kernels.
        bias_initializer: Initializer of the projection biases.
        kernel_regularizer: Regularizer of the projection kernels.
        bias_regularizer: Regularizer of the projection biases.
        activity_regularizer: Regularizer of the output.
        kernel_constraint: Constraint of the projection kernels.
        bias_constraint: Constraint of the projection biases.
        use_gate: Boolean, whether to gate the attention output with a
            sigmoid-activated projection of the query, as in the parent.
        seed: Optional integer, the dropout seed.
        modulator: The modulator's configuration, keyword-only like the
            following argument (all the arguments above can be given
            positionally in the parent's order): a
            `keras_multimax.Modulator`, a name (``"softmax"``, the default:
            ``ts = 0``, exactly the SoftMax layer at the start; ``"paper"``:
            the official initialisation) or its config dict. Its order K and
            the initializers, regularizers and constraints of ``ranges`` and
            ``ts`` are set there.
        per_head: Boolean. If True, each head has its own modulator:
            ``ranges``/``ts`` have shape ``(num_heads, 2 * order)`` instead of
            ``(2 * order,)``.
        **kwargs: Base layer arguments (``name``, ``dtype``, ...).

    Call arguments:
        query: Query tensor of shape ``(B, T, dim)``.
        value: Value tensor of shape ``(B, S, dim)``.
        key: Optional key tensor of shape ``(B, S, dim)``; defaults to
            ``value``.
        attention_mask: Optional boolean mask of shape ``(B, T, S)`` (True
            lets a query attend to a key); broadcasts over missing batch and
            head dimensions.
        return_attention_scores: If True, also return the MultiMax attention
            weights (before dropout).
        training: Python boolean, whether dropout is active.
        use_causal_mask: If True, each position attends only to itself and
            earlier positions. Combines with every other mask.

    Returns:
        attention_output: Tensor of shape ``(B, T, E)``, ``E`` the query's last
            dimension unless ``output_shape`` is given.
        attention_scores: (If ``return_attention_scores``) MultiMax weights of
            shape ``(B, num_heads, T, S)`` (more axes with several
            ``attention_axes``).

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """

    _softmax_parent = keras.layers.MultiHeadAttention

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        value_dim: int | None = None,
        dropout: float = 0.0,
        use_bias: bool = True,
        output_shape: Any = None,
        attention_axes: Any = None,
        sliding_window: int | None = None,
        flash_attention: bool | None = None,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        bias_regularizer: Any = None,
        activity_regularizer: Any = None,
        kernel_constraint: Any = None,
        bias_constraint: Any = None,
        use_gate: bool = False,
        seed: int | None = None,
        *,
        modulator: Any = None,
        per_head: bool = False,
        **kwargs,
    ):
        modulator = pop_legacy_arguments(kwargs, modulator, type(self).__name__)
        super().__init__(
            num_heads=num_heads,
            key_dim=key_dim,
            value_dim=value_dim,
            dropout=dropout,
            use_bias=use_bias,
            output_shape=output_shape,
            attention_axes=attention_axes,
            sliding_window=sliding_window,
            flash_attention=flash_attention,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            use_gate=use_gate,
            seed=seed,
            **kwargs,
        )
        self._init_attention_modulator(per_head, modulator)

    def build(self, query_shape, value_shape, key_shape=None):
        # Keras' own shape checks first, so that inputs the parent rejects get
        # its error (class and message); then ours.
        self.compute_output_shape(query_shape, value_shape, key_shape)
        self._check_input_ranks(
            False, query=query_shape, value=value_shape, key=key_shape
        )
        super().build(query_shape, value_shape, key_shape)
        self._build_attention_modulator(self._num_heads)

    def _masked_softmax(self, attention_scores, attention_mask=None):
        """MultiMax over the attention axes, masking after the modulation."""
        return self._attention_weights(
            attention_scores,
            attention_mask,
            self._num_heads,
            len(self._attention_axes),
        )

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        """Scaled dot-product attention normalised by MultiMax, on every path.

        Block by block or with the scores materialised, as
        `use_blockwise_attention` says for the layer's ``flash_attention``.
        """
        scores_shape = (query.shape[0], self._num_heads, query.shape[1], key.shape[1])
        if use_blockwise_attention(
            self._flash_attention,
            scores_shape,
            self._dropout if training else 0.0,
            return_attention_scores,
            len(self._attention_axes),
        ):
            output = self._blockwise_attention(
                query,
                key,
                value,
                attention_mask,
                use_causal_mask,
                self._inverse_sqrt_key_dim,
            )
            return output, None
        if use_causal_mask:
            attention_mask = self._with_causal_mask(query, value, attention_mask)
        query = keras.ops.multiply(
            query, keras.ops.cast(self._inverse_sqrt_key_dim, query.dtype)
        )
        scores = keras.ops.einsum(self._dot_product_equation, key, query)
        scores = self._masked_softmax(scores, attention_mask)
        if self._dropout > 0.0:
            dropped = self._dropout_layer(scores, training=training)
        else:
            dropped = scores
        output = keras.ops.einsum(self._combine_equation, dropped, value)
        return output, scores

    def compute_output_spec(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        output_spec = super().compute_output_spec(query, value, key)
        if not return_attention_scores:
            return output_spec
        # The parent reports (B, heads, T, T); the scores are really
        # (<batch dims>, heads, <query attention dims>, <key attention dims>).
        key = value if key is None else key
        rank = len(query.shape) + 1  # rank of the projected query
        axes = self._attention_axes
        if axes is None:
            axes = tuple(range(1, rank - 2))
        else:
            axes = tuple(a if a >= 0 else (rank - 1) + a for a in axes)
        shape = (
            tuple(query.shape[i] for i in range(rank - 2) if i not in axes)
            + (self._num_heads,)
            + tuple(query.shape[a] for a in axes)
            + tuple(key.shape[a] for a in axes)
        )
        return output_spec, keras.KerasTensor(shape, dtype=self.compute_dtype)
