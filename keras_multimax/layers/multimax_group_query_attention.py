"""The `MultiMaxGroupQueryAttention` layer: `keras.layers.GroupQueryAttention` with MultiMax."""

from __future__ import annotations

from typing import Any

import keras

from keras_multimax.layers.multimax_attention import AttentionModulator
from keras_multimax.layers.multimax_attention import use_blockwise_attention
from keras_multimax.modulator import pop_legacy_arguments

__all__ = ["MultiMaxGroupQueryAttention"]


@keras.saving.register_keras_serializable(package="keras_multimax")
class MultiMaxGroupQueryAttention(AttentionModulator, keras.layers.GroupQueryAttention):
    """Grouped-query attention whose attention weights are MultiMax, not SoftMax.

    A drop-in `keras.layers.GroupQueryAttention` (Ainslie et al., 2023): same
    arguments, same weights (plus ``ranges`` and ``ts``), same call signature.
    Every call path (with or without dropout, returned scores, masks, causal
    masks, gating, a sliding window) normalises the scores with
    `keras_multimax.ops.multimax`; the fused SoftMax kernel of the parent is
    never used.

    Formula:

        Attention(Q, K, V) = MultiMax(Q·Kᵀ / √d_h)·V
        MultiMax(s) = softmax(σ(s))

    where each group of ``num_query_heads / num_key_value_heads`` query heads
    shares one key/value head, and σ is the piece-wise modulator with the
    weights ``ranges`` (thresholds) and ``ts`` (slopes), see
    `keras_multimax.layers.MultiMax`. Masked keys get exactly zero weight
    whatever the sign of ``ts``; a query with no visible key attends to
    nothing. With ``ts = 0`` the layer computes exactly
    `keras.layers.GroupQueryAttention`, except for queries that see no key
    (all-zero weights here, uniform in SoftMax).

    Example:

    >>> import numpy as np
    >>> layer = MultiMaxGroupQueryAttention(
    ...     head_dim=4, num_query_heads=4, num_key_value_heads=2, per_head=True)
    >>> x = np.random.default_rng(0).normal(size=(1, 3, 8)).astype("float32")
    >>> out, scores = layer(x, x, return_attention_scores=True)
    >>> tuple(out.shape), tuple(scores.shape), tuple(layer.ts.shape)
    ((1, 3, 8), (1, 4, 3, 3), (4, 4))

    Args:
        head_dim: Size of each attention head.
        num_query_heads: Number of query heads.
        num_key_value_heads: Number of key and value heads; must divide
            ``num_query_heads``.
        dropout: Dropout probability, applied to the MultiMax weights.
        use_bias: Boolean, whether the projections use biases.
        sliding_window: Optional positive integer: each query attends only
            to the keys within ``sliding_window - 1`` positions of itself (a
            symmetric band, as in the parent). Defaults to ``None``.
        flash_attention: Keras' switch, with Keras' meaning (see
            `MultiMaxAttention`): ``True`` computes the attention block by
            block in O(T) memory, reading each key/value head once for its
            group of query heads; ``False`` materialises the scores; ``None``
            lets `use_blockwise_attention` choose by size.
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
            lets a query attend to a key).
        return_attention_scores: If True, also return the MultiMax attention
            weights (before dropout).
        training: Python boolean, whether dropout is active.
        use_causal_mask: If True, each position attends only to itself and
            earlier positions. Combines with every other mask.

    Returns:
        attention_output: Tensor of shape ``(B, T, dim)``.
        attention_scores: (If ``return_attention_scores``) MultiMax weights of
            shape ``(B, num_query_heads, T, S)``.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """

    _softmax_parent = keras.layers.GroupQueryAttention

    def __init__(
        self,
        head_dim: int,
        num_query_heads: int,
        num_key_value_heads: int,
        dropout: float = 0.0,
        use_bias: bool = True,
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
        for name, value in (
            ("head_dim", head_dim),
            ("num_query_heads", num_query_heads),
            ("num_key_value_heads", num_key_value_heads),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"`{name}` must be a positive integer. Received: {name}={value!r}"
                )
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                "`num_query_heads` must be divisible by `num_key_value_heads`. "
                f"Received: num_query_heads={num_query_heads}, "
                f"num_key_value_heads={num_key_value_heads}"
            )
        super().__init__(
            head_dim=head_dim,
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            dropout=dropout,
            use_bias=use_bias,
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
            True, query=query_shape, value=value_shape, key=key_shape
        )
        super().build(query_shape, value_shape, key_shape)
        self._build_attention_modulator(self.num_query_heads)

    def _masked_softmax(self, scores, attention_mask=None):
        """MultiMax over the keys of (B, heads, T, S) scores."""
        return self._attention_weights(scores, attention_mask, self.num_query_heads, 1)

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        use_causal_mask=False,
    ):
        """Scaled dot-product attention normalised by MultiMax, on every path.

        Block by block or with the scores materialised, as
        `use_blockwise_attention` says for the layer's ``flash_attention``.
        """
        return_scores = getattr(self, "_return_attention_scores", False)
        scores_shape = (
            query.shape[0],
            self.num_query_heads,
            query.shape[1],
            key.shape[1],
        )
        if use_blockwise_attention(
            self._flash_attention,
            scores_shape,
            self.dropout if training else 0.0,
            return_scores,
        ):
            # Keras' `call` repeats each key/value head for its group of query
            # heads; every `num_repeats`-th head is the unrepeated one, which
            # the blockwise op reads once per group.
            output = self._blockwise_attention(
                query,
                key[:, :, :: self.num_repeats],
                value[:, :, :: self.num_repeats],
                attention_mask,
                use_causal_mask,
                self._inverse_sqrt_head_dim,
            )
            return output, None
        if use_causal_mask:
            attention_mask = self._with_causal_mask(query, value, attention_mask)
        query = keras.ops.multiply(
            query, keras.ops.cast(self._inverse_sqrt_head_dim, query.dtype)
        )
        scores = keras.ops.einsum(self._dot_product_equation, query, key)
        scores = self._masked_softmax(scores, attention_mask)
        if self.dropout > 0.0:
            dropped = self._dropout_layer(scores, training=training)
        else:
            dropped = scores
        output = keras.ops.einsum(self._combine_equation, dropped, value)
        return output, scores
