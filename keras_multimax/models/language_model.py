"""`TransformerLM`: a causal decoder-only language model with SoftMax or MultiMax."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_multimax.layers.multimax_lm_head import MultiMaxLMHead
from keras_multimax.models import _blocks
from keras_multimax.modulator import from_legacy_config
from keras_multimax.modulator import get as get_modulator
from keras_multimax.modulator import pop_legacy_arguments


@keras.saving.register_keras_serializable(package="keras_multimax")
class TransformerLM(keras.Model):
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
    as long as no metric reads them: compile it without metrics on the
    outputs; its ``loss`` argument is not used.

    Example:

    >>> model = TransformerLM(vocab_size=20, sequence_length=8, num_layers=1,
    ...                       hidden_dim=8, num_heads=2, mlp_dim=8)
    >>> tuple(model(np.zeros((2, 8), "int32")).shape)
    (2, 8, 20)

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
        modulator: The configuration of every MultiMax modulator (attention
            and head): a `keras_multimax.Modulator`, a name (``"softmax"``,
            the default: ``ts = 0``; ``"paper"``: the official
            initialisation) or its config dict.
        per_head: One modulator per attention head.
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
        modulator: Any = None,
        per_head: bool = False,
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
        modulator = get_modulator(
            pop_legacy_arguments(kwargs, modulator, type(self).__name__)
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
                per_head,
                name=f"decoder_block_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_norm = keras.layers.LayerNormalization(
            epsilon=1e-6, name="final_norm"
        )
        if fused_head:
            self.head_layers = [
                MultiMaxLMHead(vocab_size, modulator=modulator, name="head")
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
        self.modulator = modulator
        self.per_head = per_head
        # Compiled decoding loops of `generate`, one per option set.
        self._generate_functions = {}
        self.fused_head = bool(fused_head)

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

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """Logits of new tokens, reading and updating a key/value cache.

        The tokens ``token_ids`` sit at positions ``cache_update_index ...
        cache_update_index + T - 1``; their keys and values are written into
        ``cache`` there, and each attends causally to the cached positions
        before it and to itself. Every attention layer normalises with its
        MultiMax (or SoftMax) exactly as the full forward pass, which gives
        the same logits up to float rounding. Inference only (no dropout).

        Example:

        >>> model = TransformerLM(vocab_size=20, sequence_length=8, num_layers=1,
        ...                       hidden_dim=8, num_heads=2, mlp_dim=8)
        >>> cache = model.empty_cache(batch_size=2)
        >>> logits, cache = model.call_with_cache(np.ones((2, 3), "int32"), cache, 0)
        >>> tuple(logits.shape), tuple(cache.shape)
        ((2, 3, 20), (2, 1, 2, 8, 2, 4))

        Args:
            token_ids: int ``(B, T)`` ids of the new positions.
            cache: ``(B, num_layers, 2, S, num_heads, hidden_dim // num_heads)``
                keys and values (`empty_cache`); ``S <= sequence_length``.
            cache_update_index: int or scalar int tensor, the position of
                ``token_ids[:, 0]``. The caller keeps
                ``cache_update_index + T <= S``.

        Returns:
            ``(logits, cache)``: ``(B, T, vocab_size)`` next-token logits and
            the updated cache.
        """
        length, cache_length = token_ids.shape[1], cache.shape[3]
        if (
            isinstance(cache_update_index, int)
            and length is not None
            and cache_length is not None
            and not 0 <= cache_update_index <= cache_length - length
        ):
            raise ValueError(
                "`cache_update_index` must place the new tokens inside the "
                f"cache: 0 <= cache_update_index <= {cache_length} (cache "
                f"length) - {length} (new tokens). Received: "
                f"cache_update_index={cache_update_index}"
            )
        x = self.token_embedding(token_ids)
        x = self.position_embedding(x, start_index=cache_update_index)
        mask = _blocks.causal_cache_mask(
            cache_update_index, keras.ops.shape(token_ids)[1], keras.ops.shape(cache)[3]
        )
        x, cache = _blocks.blocks_with_cache(
            self.blocks, x, cache, cache_update_index, mask
        )
        x = self.final_norm(x)
        for layer in self.head_layers:
            x = layer(x)
        return x, cache

    def empty_cache(self, batch_size: int, length: int | None = None):
        """Zero key/value cache for `call_with_cache`.

        Args:
            batch_size: Number of sequences.
            length: Cached positions; defaults to ``sequence_length``.

        Returns:
            Zeros ``(batch_size, num_layers, 2, length, num_heads,
            hidden_dim // num_heads)`` in the model's compute dtype.
        """
        length = self.sequence_length if length is None else length
        _blocks.validate_positive("batch_size", batch_size)
        _blocks.validate_positive("length", length)
        if length > self.sequence_length:
            raise ValueError(
                "`length` cannot exceed the model's `sequence_length`. "
                f"Received: length={length}, sequence_length={self.sequence_length}"
            )
        return _blocks.empty_cache(batch_size, self.blocks, length, self.compute_dtype)

    def generate(
        self,
        prompt_ids,
        max_length: int | None = None,
        padding_mask=None,
        end_token_id: int | None = None,
        pad_token_id: int = 0,
        temperature: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ):
        """Continues the prompts token by token, with a key/value cache.

        The prompt is run once through `call_with_cache` to fill the cache;
        then each step runs only the newest token through every layer
        (MultiMax attention and head included) against the cached keys and
        values. The whole loop is one compiled function (`tf.function` on
        TensorFlow, XLA-compiled when ``model.jit_compile`` is True, which is
        faster on CPU too but not Keras' CPU default; ``jax.jit`` on JAX),
        traced once per prompt shape and option set. ``use_cache=False`` runs the same loop without a cache:
        each step recomputes the full forward pass on the whole
        ``max_length`` buffer (causal attention, so the later, not yet
        generated positions have no effect) and reads the logits at the
        current position; it exists as a reference and baseline.

        Prompts of different lengths: pad them on the right to a common width
        and pass ``padding_mask`` (True on the prompt tokens, a prefix of
        each row). Generation starts after the shortest prompt; a row keeps
        its own prompt tokens where its mask is True, so every row continues
        exactly as it would alone.

        Example:

        >>> model = TransformerLM(vocab_size=20, sequence_length=8, num_layers=1,
        ...                       hidden_dim=8, num_heads=2, mlp_dim=8)
        >>> out = model.generate(np.array([[3, 4, 5]], "int32"), max_length=6)
        >>> out.shape, bool((out[:, :3] == [3, 4, 5]).all())
        ((1, 6), True)

        Args:
            prompt_ids: int ``(batch, prompt_length)`` prompt ids,
                ``prompt_length >= 1``.
            max_length: Length of the returned sequences, prompt included:
                ``prompt_length <= max_length <= sequence_length``. Defaults to
                ``sequence_length``.
            padding_mask: Optional boolean ``(batch, prompt_length)``, True on
                the prompt tokens; each row must be True then False, with at
                least one True. Defaults to all True.
            end_token_id: Optional id that ends a sequence: after a row
                generates it, the rest of the row is ``pad_token_id``; the
                loop stops when every row has ended.
            pad_token_id: Id written after ``end_token_id``.
            temperature: None (default) picks the most likely token (greedy);
                a positive float samples from ``softmax(logits /
                temperature)``.
            seed: Optional integer seed of the sampling (with
                ``temperature``); the same seed gives the same tokens.
            use_cache: False recomputes the full forward pass at every step
                (see above); the tokens are the same as with the cache.

        Returns:
            int32 numpy array ``(batch, max_length)``: the prompts (padding
            positions replaced by generated tokens) and the generated tokens.
        """
        prompt, fixed = self._check_prompt(prompt_ids, padding_mask)
        batch, width = prompt.shape
        max_length = self.sequence_length if max_length is None else max_length
        _blocks.validate_positive("max_length", max_length)
        if not width <= max_length <= self.sequence_length:
            raise ValueError(
                "`max_length` must be at least the prompt length and at most "
                "the model's `sequence_length`. Received: "
                f"max_length={max_length}, prompt length={width}, "
                f"sequence_length={self.sequence_length}"
            )
        for name, value in (
            ("end_token_id", end_token_id),
            ("pad_token_id", pad_token_id),
        ):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, np.integer))
                or not 0 <= value < self.vocab_size
            ):
                raise ValueError(
                    f"`{name}` must be a token id in [0, {self.vocab_size}). "
                    f"Received: {name}={value!r}"
                )
        if temperature is not None and (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not temperature > 0
        ):
            raise ValueError(
                "`temperature` must be None (greedy) or a positive float. "
                f"Received: temperature={temperature!r}"
            )
        if seed is not None and temperature is None:
            raise ValueError(
                "`seed` only applies to sampling: pass a `temperature` too. "
                f"Received: seed={seed!r}, temperature=None"
            )
        if not isinstance(use_cache, bool):
            raise TypeError(
                f"`use_cache` must be a boolean. Received: use_cache={use_cache!r}"
            )
        tokens = np.full((batch, max_length), pad_token_id, "int32")
        tokens[:, :width] = np.where(fixed, prompt, pad_token_id)
        keep = np.zeros((batch, max_length), bool)
        keep[:, :width] = fixed
        start = int(fixed.sum(axis=1).min())
        if temperature is None:
            uniform = np.zeros((max_length, batch), "float32")
        else:
            uniform = keras.ops.convert_to_numpy(
                keras.random.uniform((max_length, batch), seed=seed)
            )
        key = (use_cache, width, end_token_id, pad_token_id, temperature)
        compiled = (key, self.jit_compile, self.run_eagerly)
        if compiled not in self._generate_functions:
            self._generate_functions[compiled] = _blocks.compile_for_backend(
                self, self._generate_function(*key)
            )
        start = np.array(start, "int32")
        out = self._generate_functions[compiled](tokens, keep, start, uniform)
        return keras.ops.convert_to_numpy(out).astype("int32")

    def _check_prompt(self, prompt_ids, padding_mask):
        prompt = np.asarray(keras.ops.convert_to_numpy(prompt_ids))
        if prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1:
            raise ValueError(
                "`prompt_ids` must have shape (batch, prompt_length) with both "
                f"at least 1. Received: prompt_ids.shape={prompt.shape}"
            )
        if not np.issubdtype(prompt.dtype, np.integer):
            raise TypeError(
                "`prompt_ids` must hold integer token ids. "
                f"Received: prompt_ids.dtype={prompt.dtype}"
            )
        if padding_mask is None:
            fixed = np.ones(prompt.shape, bool)
        else:
            fixed = np.asarray(keras.ops.convert_to_numpy(padding_mask))
            if fixed.shape != prompt.shape:
                raise ValueError(
                    "`padding_mask` must have the shape of `prompt_ids`. Received: "
                    f"padding_mask.shape={fixed.shape}, prompt_ids.shape={prompt.shape}"
                )
            fixed = fixed.astype(bool)
            lengths = fixed.sum(axis=1)
            prefix = np.arange(prompt.shape[1])[None] < lengths[:, None]
            if not (fixed == prefix).all() or lengths.min() < 1:
                raise ValueError(
                    "Each row of `padding_mask` must be True on its prompt and "
                    "False after it (prompts padded on the right), with at least "
                    f"one True. Received: padding_mask={fixed.tolist()}"
                )
        ids = prompt[fixed]
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(
                f"`prompt_ids` must be token ids in [0, {self.vocab_size}). "
                f"Received: ids from {ids.min()} to {ids.max()}"
            )
        return prompt.astype("int32"), fixed

    def _generate_function(
        self, use_cache, width, end_token_id, pad_token_id, temperature
    ):
        """The decoding loop for one option set, for `compile_for_backend`."""
        ops = keras.ops

        def choose(logits, u):
            logits = ops.cast(logits, "float32")
            if temperature is None:
                return ops.cast(ops.argmax(logits, axis=-1), "int32")
            # Inverse-CDF sampling with one uniform draw u in [0, 1) per row
            # and step: the first token whose cumulative probability exceeds
            # u times the total (never a zero-probability token).
            cdf = ops.cumsum(ops.softmax(logits / temperature, axis=-1), axis=-1)
            below = ops.less_equal(cdf, u[:, None] * cdf[:, -1:])
            return ops.sum(ops.cast(below, "int32"), axis=-1)

        def generate(tokens, keep, start, uniform):
            tokens = ops.convert_to_tensor(tokens, "int32")
            keep = ops.convert_to_tensor(keep, "bool")
            batch, length = ops.shape(tokens)[0], ops.shape(tokens)[1]
            if use_cache:
                cache = _blocks.empty_cache(
                    batch, self.blocks, length, self.compute_dtype
                )
                # Fill the cache with the prompt (width is static).
                _, cache = self.call_with_cache(tokens[:, :width], cache, 0)
            else:
                cache = ops.zeros((), self.compute_dtype)
            finished = ops.zeros((batch,), "bool")

            def cond(index, tokens, cache, finished):
                running = ops.less(index, length)
                if end_token_id is None:
                    return running
                return ops.logical_and(running, ops.logical_not(ops.all(finished)))

            def body(index, tokens, cache, finished):
                if use_cache:
                    last = ops.slice(tokens, [0, index - 1], [batch, 1])
                    logits, cache = self.call_with_cache(last, cache, index - 1)
                    logits = logits[:, 0]
                else:
                    logits = ops.take(self(tokens, training=False), index - 1, axis=1)
                chosen = choose(logits, ops.take(uniform, index, axis=0))
                kept = ops.take(keep, index, axis=1)
                chosen = ops.where(finished, pad_token_id, chosen)
                chosen = ops.where(kept, ops.take(tokens, index, axis=1), chosen)
                if end_token_id is not None:
                    ended = ops.logical_and(
                        ops.logical_not(kept), ops.equal(chosen, end_token_id)
                    )
                    finished = ops.logical_or(finished, ended)
                tokens = ops.slice_update(tokens, [0, index], chosen[:, None])
                return index + 1, tokens, cache, finished

            state = (ops.convert_to_tensor(start, "int32"), tokens, cache, finished)
            return ops.while_loop(cond, body, state)[1]

        return generate

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
            "modulator": keras.saving.serialize_keras_object(self.modulator),
            "per_head": self.per_head,
            "fused_head": self.fused_head,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**from_legacy_config(dict(config)))


def transformer_lm(vocab_size: int, sequence_length: int, **kwargs) -> TransformerLM:
    """Builds a `TransformerLM` (see there for the arguments).

    Example:

    >>> model = transformer_lm(20, 8, num_layers=1, hidden_dim=8, num_heads=2,
    ...                        mlp_dim=8)
    >>> type(model.blocks[0].attention).__name__
    'CachedMultiMaxAttention'
    """
    return TransformerLM(vocab_size, sequence_length, **kwargs)
