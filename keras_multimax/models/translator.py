"""`TransformerTranslator`: encoder-decoder with SoftMax or MultiMax, greedy decoding."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_multimax.models import _blocks
from keras_multimax.modulator import from_legacy_config
from keras_multimax.modulator import get as get_modulator
from keras_multimax.modulator import pop_legacy_arguments

PAD_ID, START_ID, END_ID = 0, 1, 2


@keras.saving.register_keras_serializable(package="keras_multimax")
class TransformerTranslator(keras.Model):
    """Encoder-decoder transformer for sequence-to-sequence translation.

    The encoder embeds the source ids (learned positions) and runs
    ``num_encoder_layers`` pre-norm self-attention blocks (padding id 0 masked
    as keys); the decoder embeds the decoder input ids and runs
    ``num_decoder_layers`` blocks of causal self-attention, cross-attention to
    the encoder output and an MLP, then LayerNormalization and a linear layer
    (plus `SegLU` when ``head="multimax"``). Every attention layer is
    `keras.layers.MultiHeadAttention` or
    `keras_multimax.layers.MultiMaxAttention` according to ``attention``.
    Inputs are ``[source_ids, decoder_ids]``, outputs next-token **logits**
    ``(batch, target_length, target_vocab_size)``. Ids: 0 padding, 1 start,
    2 end (as `keras_multimax.data.CharVocabulary`).

    `greedy_decode` generates with the same layers: MultiMax is applied at
    every decoding step (the official fairseq integration skips it in its
    incremental decoding path).

    Example:

    >>> model = TransformerTranslator(12, 10, source_length=6, target_length=4,
    ...     num_encoder_layers=1, num_decoder_layers=1, hidden_dim=8,
    ...     num_heads=2, mlp_dim=8)
    >>> src = np.array([[5, 6, 7, 0, 0, 0]], "int32")
    >>> tuple(model([src, np.array([[1, 4, 5, 0]], "int32")]).shape)
    (1, 4, 10)
    >>> tuple(model.greedy_decode(src).shape)
    (1, 4)

    Args:
        source_vocab_size: Number of source token ids.
        target_vocab_size: Number of target token ids.
        source_length: Maximum source length.
        target_length: Maximum decoder length.
        num_encoder_layers: Encoder blocks.
        num_decoder_layers: Decoder blocks.
        hidden_dim: Width of the embeddings (divisible by ``num_heads``).
        num_heads: Attention heads.
        mlp_dim: Hidden width of the MLPs.
        dropout: Dropout rate.
        attention: ``"multimax"`` or ``"softmax"``.
        head: ``"multimax"`` (SegLU on the logits) or ``"softmax"``.
        modulator: The configuration of every MultiMax modulator (attention
            and head): a `keras_multimax.Modulator`, a name (``"softmax"``,
            the default: ``ts = 0``; ``"paper"``: the official
            initialisation) or its config dict.
        per_head: One modulator per attention head.
        **kwargs: `keras.Model` arguments (``name``, ``trainable``).

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024; Vaswani et al., "Attention Is All You Need",
        NeurIPS 2017.
    """

    def __init__(
        self,
        source_vocab_size: int,
        target_vocab_size: int,
        source_length: int = 32,
        target_length: int = 12,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 2,
        hidden_dim: int = 64,
        num_heads: int = 4,
        mlp_dim: int = 128,
        dropout: float = 0.0,
        attention: str = "multimax",
        head: str = "multimax",
        modulator: Any = None,
        per_head: bool = False,
        **kwargs,
    ):
        for name, value in (
            ("source_vocab_size", source_vocab_size),
            ("target_vocab_size", target_vocab_size),
            ("source_length", source_length),
            ("target_length", target_length),
            ("num_encoder_layers", num_encoder_layers),
            ("num_decoder_layers", num_decoder_layers),
            ("hidden_dim", hidden_dim),
            ("num_heads", num_heads),
            ("mlp_dim", mlp_dim),
        ):
            _blocks.validate_positive(name, value)
        if target_vocab_size <= END_ID:
            raise ValueError(
                "`target_vocab_size` must include the padding, start and end "
                f"ids 0, 1, 2. Received: target_vocab_size={target_vocab_size}"
            )
        if hidden_dim % num_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_heads`. "
                f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
            )
        dropout = _blocks.validate_rate("dropout", dropout)
        _blocks.validate_choice("attention", attention, _blocks.ATTENTIONS)
        _blocks.validate_choice("head", head, _blocks.HEADS)
        modulator = get_modulator(
            pop_legacy_arguments(kwargs, modulator, type(self).__name__)
        )

        def blocks(prefix, n, cross):
            return [
                _blocks.TransformerBlock(
                    attention,
                    hidden_dim,
                    num_heads,
                    mlp_dim,
                    dropout,
                    modulator,
                    per_head,
                    cross_attention=cross,
                    name=f"{prefix}_{i}",
                )
                for i in range(n)
            ]

        # === Layers ===
        self.source_embedding = keras.layers.Embedding(
            source_vocab_size, hidden_dim, name="source_embedding"
        )
        self.source_position_embedding = _blocks.PositionEmbedding(
            source_length, name="source_position_embedding"
        )
        self.encoder_blocks = blocks("encoder_block", num_encoder_layers, False)
        self.encoder_norm = keras.layers.LayerNormalization(
            epsilon=1e-6, name="encoder_norm"
        )
        self.target_embedding = keras.layers.Embedding(
            target_vocab_size, hidden_dim, name="target_embedding"
        )
        self.target_position_embedding = _blocks.PositionEmbedding(
            target_length, name="target_position_embedding"
        )
        self.decoder_blocks = blocks("decoder_block", num_decoder_layers, True)
        self.decoder_norm = keras.layers.LayerNormalization(
            epsilon=1e-6, name="decoder_norm"
        )
        self.head_layers = _blocks.make_head(head, target_vocab_size, modulator, "head")

        # === Functional model ===
        source_ids = keras.Input(shape=(None,), dtype="int32", name="source_ids")
        decoder_ids = keras.Input(shape=(None,), dtype="int32", name="decoder_ids")
        context, source_valid = self._encode(source_ids)
        logits = self._decode(decoder_ids, context, source_valid)
        super().__init__(inputs=[source_ids, decoder_ids], outputs=logits, **kwargs)

        # === Config ===
        self.source_vocab_size = source_vocab_size
        self.target_vocab_size = target_vocab_size
        self.source_length = source_length
        self.target_length = target_length
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.attention = attention
        self.head = head
        self.modulator = modulator
        self.per_head = per_head
        # Compiled decoding loops of `greedy_decode`, one per `max_length`.
        self._greedy_functions = {}

    @staticmethod
    def _key_mask(query_ids, key_valid):
        """(batch, queries, keys) mask: every query sees the valid keys."""
        queries = keras.ops.expand_dims(keras.ops.ones_like(query_ids, dtype="bool"), 2)
        return keras.ops.logical_and(queries, keras.ops.expand_dims(key_valid, 1))

    def _encode(self, source_ids, scores=None, training=None):
        source_valid = keras.ops.not_equal(source_ids, PAD_ID)
        mask = self._key_mask(source_ids, source_valid)
        x = self.source_position_embedding(self.source_embedding(source_ids))
        for block in self.encoder_blocks:
            if scores is None:
                x = block(x, attention_mask=mask, training=training)
            else:
                x, s = block(
                    x,
                    attention_mask=mask,
                    return_attention_scores=True,
                    training=training,
                )
                scores[f"{block.name}/self_attention"] = (
                    s["self_attention"],
                    mask[:, None],
                )
        return self.encoder_norm(x), source_valid

    def _decode(self, decoder_ids, context, source_valid, scores=None, training=None):
        cross_mask = self._key_mask(decoder_ids, source_valid)
        y = self.target_position_embedding(self.target_embedding(decoder_ids))
        for block in self.decoder_blocks:
            kwargs = {
                "cross_attention_mask": cross_mask,
                "use_causal_mask": True,
                "training": training,
            }
            if scores is None:
                y = block(y, context, **kwargs)
            else:
                y, s = block(y, context, return_attention_scores=True, **kwargs)
                length = int(y.shape[1])
                causal = np.tril(np.ones((length, length), dtype=bool))[None, None]
                scores[f"{block.name}/self_attention"] = (s["self_attention"], causal)
                scores[f"{block.name}/cross_attention"] = (
                    s["cross_attention"],
                    cross_mask[:, None],
                )
        y = self.decoder_norm(y)
        for layer in self.head_layers:
            y = layer(y)
        return y

    def attention_maps(self, inputs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Attention probabilities and masks of every layer for ``[source, decoder]`` ids.

        Returns:
            ``{"<block>/<self|cross>_attention": (probs, mask)}`` with probs
            ``(batch, heads, queries, keys)`` and a boolean mask that
            broadcasts against it (padding keys, causal decoder mask).
        """
        source_ids, decoder_ids = (keras.ops.convert_to_tensor(t) for t in inputs)
        scores = {}
        context, source_valid = self._encode(source_ids, scores, training=False)
        self._decode(decoder_ids, context, source_valid, scores, training=False)
        return {
            name: (
                keras.ops.convert_to_numpy(p),
                np.asarray(keras.ops.convert_to_numpy(m)),
            )
            for name, (p, m) in scores.items()
        }

    def greedy_decode(self, source_ids, max_length: int | None = None):
        """Greedy decoding with a key/value cache, MultiMax at every step.

        The source is encoded once, and the keys and values of every
        cross-attention layer are projected from it once. Step ``i`` then
        runs only the newest token (the start id at step 0) through the
        decoder: its self-attention keys and values are appended to a cache
        and it attends causally to the cached ones, so every attention layer
        and the output head apply their MultiMax modulators exactly as the
        full forward pass (the official fairseq integration skips MultiMax in
        its incremental decoding). The argmax of the logits is the next
        token; after the end id a sequence continues with padding. The loop
        is one compiled function per ``max_length`` (`tf.function` on
        TensorFlow, XLA-compiled when ``model.jit_compile`` is True;
        ``jax.jit`` on JAX).

        Args:
            source_ids: int ``(batch, source_length)`` source ids.
            max_length: Tokens to generate; defaults to ``target_length``.

        Returns:
            int32 ``(batch, max_length)`` generated ids (without the start id).
        """
        max_length = self.target_length if max_length is None else max_length
        _blocks.validate_positive("max_length", max_length)
        if max_length > self.target_length:
            raise ValueError(
                "`max_length` cannot exceed the model's `target_length`. "
                f"Received: max_length={max_length}, target_length={self.target_length}"
            )
        compiled = (max_length, self.jit_compile, self.run_eagerly)
        if compiled not in self._greedy_functions:
            self._greedy_functions[compiled] = _blocks.compile_for_backend(
                self, self._greedy_function(max_length)
            )
        source_ids = keras.ops.convert_to_tensor(source_ids, "int32")
        return self._greedy_functions[compiled](source_ids)

    def _greedy_function(self, max_length):
        """The cached greedy loop generating ``max_length`` tokens."""
        ops = keras.ops

        def greedy(source_ids):
            context, source_valid = self._encode(source_ids, training=False)
            cross_caches = [
                b.cross_attention_cache(context) for b in self.decoder_blocks
            ]
            cross_mask = ops.expand_dims(source_valid, 1)
            batch = ops.shape(source_ids)[0]
            cache = _blocks.empty_cache(
                batch, self.decoder_blocks, max_length, self.compute_dtype
            )
            # tokens[:, 0] is the start id, tokens[:, i + 1] the i-th output.
            tokens = ops.concatenate(
                [
                    ops.full((batch, 1), START_ID, "int32"),
                    ops.full((batch, max_length), PAD_ID, "int32"),
                ],
                axis=1,
            )
            finished = ops.zeros((batch,), "bool")

            def cond(index, tokens, cache, finished):
                return ops.logical_and(
                    ops.less(index, max_length), ops.logical_not(ops.all(finished))
                )

            def body(index, tokens, cache, finished):
                y = self.target_embedding(ops.slice(tokens, [0, index], [batch, 1]))
                y = self.target_position_embedding(y, start_index=index)
                mask = _blocks.causal_cache_mask(index, 1, max_length)
                y, cache = _blocks.blocks_with_cache(
                    self.decoder_blocks, y, cache, index, mask, cross_caches, cross_mask
                )
                y = self.decoder_norm(y)
                for layer in self.head_layers:
                    y = layer(y)
                chosen = ops.cast(ops.argmax(y[:, 0], axis=-1), "int32")
                chosen = ops.where(finished, PAD_ID, chosen)
                finished = ops.logical_or(finished, ops.equal(chosen, END_ID))
                tokens = ops.slice_update(tokens, [0, index + 1], chosen[:, None])
                return index + 1, tokens, cache, finished

            state = (ops.convert_to_tensor(0, "int32"), tokens, cache, finished)
            return ops.while_loop(cond, body, state)[1][:, 1:]

        return greedy

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "source_vocab_size": self.source_vocab_size,
            "target_vocab_size": self.target_vocab_size,
            "source_length": self.source_length,
            "target_length": self.target_length,
            "num_encoder_layers": self.num_encoder_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "hidden_dim": self.hidden_dim,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "dropout": self.dropout,
            "attention": self.attention,
            "head": self.head,
            "modulator": keras.saving.serialize_keras_object(self.modulator),
            "per_head": self.per_head,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**from_legacy_config(dict(config)))


def transformer_translator(
    source_vocab_size: int, target_vocab_size: int, **kwargs
) -> TransformerTranslator:
    """Builds a `TransformerTranslator` (see there for the arguments).

    Example:

    >>> model = transformer_translator(12, 10, num_encoder_layers=1,
    ...     num_decoder_layers=1, hidden_dim=8, num_heads=2, mlp_dim=8)
    >>> [i.name for i in model.inputs]
    ['source_ids', 'decoder_ids']
    """
    return TransformerTranslator(source_vocab_size, target_vocab_size, **kwargs)
