"""`TransformerLM`: a causal decoder-only language model with SoftMax or MultiMax."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_multimax.layers._modulator import DEFAULT_INITIALIZER
from keras_multimax.layers.multimax_lm_head import MultiMaxLMHead
from keras_multimax.models import _blocks


@keras.saving.register_keras_serializable(package="keras_multimax")
class TransformerLM(_blocks.CompileMixin, keras.Model):
    """Causal decoder-only transformer language model.

    Token embedding, a learned position embedding, ``num_layers`` pre-norm
    blocks with causal self-attention (`keras.layers.MultiHeadAttention` or
    `keras_multimax.layers.MultiMaxAttention`, chosen by ``attention``),
    LayerNormalization and a linear output layer, followed by a `SegLU`
    modulator when ``head="multimax"``. Outputs are next-token **logits** of
    shape ``(batch, length, vocab_size)``.

    With ``fused_head=True`` the head is one `layers.MultiMaxLMHead` (the
    same function) and ``fit`` trains on its fused loss: `compute_loss`
    runs the decoder to the hidden states and calls the head with the
    labels, so the training step never holds the ``(batch, length,
    vocab_size)`` logits (`ops.multimax_cross_entropy`). The logits the
    model outputs are then unused in a compiled training step and pruned,
    as long as no metric reads them: ``compile`` defaults to no metrics for
    this model, and its ``loss`` argument is not used.

    Example:

    >>> model = TransformerLM(vocab_size=20, sequence_length=8, num_layers=1,
    ...                       hidden_dim=8, num_heads=2, mlp_dim=8)
    >>> model(np.zeros((2, 8), "int32")).shape
    TensorShape([2, 8, 20])

    Args:
        vocab_size: Number of token ids.
        sequence_length: Maximum input length.
        num_layers: Number of decoder blocks.
        hidden_dim: Width of the token embeddings (divisible by
            ``num_heads``).
        num_heads: Attention heads.
        mlp_dim: Hidden width of the MLPs.
        dropout: Dropout rate.
        attention: ``"multimax"`` or ``"softmax"``.
        head: ``"multimax"`` (SegLU on the logits) or ``"softmax"``.
        fused_head: Train the MultiMax head with the fused loss (needs
            ``head="multimax"``).
        order: Order of the MultiMax modulators.
        per_head: One modulator per attention head.
        ranges_initializer: Initializer of every ``ranges``.
        ts_initializer: Initializer of every ``ts``.
        **kwargs: `keras.Model` arguments (``name``, ``trainable``).

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """

    def __init__(
        self,
        vocab_size: int,
        sequence_length: int,
        num_layers: int = 2,
        hidden_dim: int = 64,
        num_heads: int = 4,
        mlp_dim: int = 128,
        dropout: float = 0.0,
        attention: str = "multimax",
        head: str = "multimax",
        order: int = 2,
        per_head: bool = False,
        ranges_initializer: Any = DEFAULT_INITIALIZER,
        ts_initializer: Any = DEFAULT_INITIALIZER,
        fused_head: bool = False,
        **kwargs,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("sequence_length", sequence_length),
            ("num_layers", num_layers),
            ("hidden_dim", hidden_dim),
            ("num_heads", num_heads),
            ("mlp_dim", mlp_dim),
        ):
            _blocks.validate_positive(name, value)
        if hidden_dim % num_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_heads`. "
                f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
            )
        dropout = _blocks.validate_rate("dropout", dropout)
        _blocks.validate_choice("attention", attention, _blocks.ATTENTIONS)
        _blocks.validate_choice("head", head, _blocks.HEADS)
        if fused_head and head != "multimax":
            raise ValueError(
                "`fused_head=True` trains the MultiMax head with its fused loss "
                f"and needs head='multimax'. Received: head={head!r}"
            )
        modulator = _blocks.modulator_kwargs(
            order, per_head, ranges_initializer, ts_initializer
        )

        # === Layers ===
        self.token_embedding = keras.layers.Embedding(
            vocab_size, hidden_dim, name="token_embedding"
        )
        self.position_embedding = _blocks.PositionEmbedding(
            sequence_length, name="position_embedding"
        )
        self.blocks = [
            _blocks.TransformerBlock(
                attention,
                hidden_dim,
                num_heads,
                mlp_dim,
                dropout,
                modulator,
                name=f"decoder_block_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_norm = keras.layers.LayerNormalization(
            epsilon=1e-6, name="final_norm"
        )
        if fused_head:
            self.head_layers = [
                MultiMaxLMHead(
                    vocab_size,
                    order=order,
                    ranges_initializer=ranges_initializer,
                    ts_initializer=ts_initializer,
                    name="head",
                )
            ]
        else:
            self.head_layers = _blocks.make_head(head, vocab_size, modulator, "head")

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        logits = self._forward(token_ids)
        super().__init__(inputs=token_ids, outputs=logits, **kwargs)

        # === Config ===
        self.vocab_size = vocab_size
        self.sequence_length = sequence_length
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.attention = attention
        self.head = head
        self.order = order
        self.per_head = per_head
        self.ranges_initializer = ranges_initializer
        self.ts_initializer = ts_initializer
        self.fused_head = bool(fused_head)
        if fused_head:
            self._default_metrics = ()  # a metric on the logits would compute them

    def _forward(self, token_ids, scores=None, training=None):
        x = self._hidden_states(token_ids, scores, training)
        for layer in self.head_layers:
            x = layer(x)
        return x

    def _hidden_states(self, token_ids, scores=None, training=None):
        x = self.position_embedding(self.token_embedding(token_ids))
        for block in self.blocks:
            if scores is None:
                x = block(x, use_causal_mask=True, training=training)
            else:
                x, s = block(
                    x,
                    use_causal_mask=True,
                    return_attention_scores=True,
                    training=training,
                )
                scores[f"{block.name}/self_attention"] = s["self_attention"]
        return self.final_norm(x)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The compiled loss, or with ``fused_head`` the head's fused loss.

        Fused: the mean over the tokens of `layers.MultiMaxLMHead`'s loss of
        the hidden states for ``x`` and the labels ``y`` (weighted by
        ``sample_weight`` as Keras' ``"sum_over_batch_size"``), plus the
        layers' regularization losses; ``y_pred`` is not used.
        """
        if not self.fused_head:
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        hidden = self._hidden_states(x, training=training)
        per_token = self.head_layers[0](hidden, labels=y)
        if sample_weight is not None:
            weight = keras.ops.cast(sample_weight, per_token.dtype)
            for _ in range(len(per_token.shape) - len(weight.shape)):
                weight = keras.ops.expand_dims(weight, -1)
            per_token = per_token * weight
        loss = keras.ops.mean(per_token)
        if self.losses:
            loss = loss + keras.ops.sum(self.losses)
        return loss

    def attention_maps(self, token_ids) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Attention probabilities of every layer for `token_ids`.

        Returns:
            ``{"decoder_block_<i>/self_attention": (probs, mask)}``: ``probs``
            of shape ``(batch, heads, length, length)`` and the causal mask
            ``(1, 1, length, length)`` (True where a query sees a key).
        """
        token_ids = keras.ops.convert_to_tensor(token_ids)
        scores = {}
        self._forward(token_ids, scores, training=False)
        length = int(token_ids.shape[1])
        causal = np.tril(np.ones((length, length), dtype=bool))[None, None]
        return {
            name: (keras.ops.convert_to_numpy(p), causal) for name, p in scores.items()
        }

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "vocab_size": self.vocab_size,
            "sequence_length": self.sequence_length,
            "num_layers": self.num_layers,
            "hidden_dim": self.hidden_dim,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "dropout": self.dropout,
            "attention": self.attention,
            "head": self.head,
            "order": self.order,
            "per_head": self.per_head,
            "ranges_initializer": _blocks.serialize_initializer(
                self.ranges_initializer
            ),
            "ts_initializer": _blocks.serialize_initializer(self.ts_initializer),
            "fused_head": self.fused_head,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def transformer_lm(vocab_size: int, sequence_length: int, **kwargs) -> TransformerLM:
    """Builds a `TransformerLM` (see there for the arguments).

    Example:

    >>> model = transformer_lm(20, 8, num_layers=1, hidden_dim=8, num_heads=2,
    ...                        mlp_dim=8)
    >>> type(model.blocks[0].attention).__name__
    'MultiMaxAttention'
    """
    return TransformerLM(vocab_size, sequence_length, **kwargs)
