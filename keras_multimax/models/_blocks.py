"""Building blocks shared by the model builders: attention factory, embeddings, blocks."""

from __future__ import annotations

from typing import Any

import keras

from keras_multimax.layers import SegLU
from keras_multimax.models._cached_attention import CachedMultiHeadAttention
from keras_multimax.models._cached_attention import CachedMultiMaxAttention
from keras_multimax.modulator import Modulator

ATTENTIONS = ("multimax", "softmax")
HEADS = ("multimax", "softmax")

# Variables kept out of weight decay: the MultiMax modulator, plus biases and
# LayerNormalization scales/offsets as in DeiT/timm. They are passed to the
# optimizer as a `var_list` (exact variables): `var_names` patterns are
# searched in `variable.name`, which is "ts" for the Keras variable but the
# full path "block/attention/ts:0" for the tf.Variable seen inside `fit`, so
# "^ts$" misses and "ts" also hits e.g. "outputs/kernel".
NO_DECAY_NAMES = ("ranges", "ts", "bias", "gamma", "beta")


def validate_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {choices}. Received: {name}={value!r}"
        )
    return value


def validate_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return value


def validate_rate(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value < 1
    ):
        raise ValueError(
            f"`{name}` must be a float in [0, 1). Received: {name}={value!r}"
        )
    return float(value)


# The position embeddings' initializer (DeiT's).
_EMBEDDING_INITIALIZER = {
    "class_name": "TruncatedNormal",
    "config": {"mean": 0.0, "stddev": 0.02, "seed": None},
}


def make_attention(
    kind: str,
    num_heads: int,
    hidden_dim: int,
    dropout: float,
    modulator: Modulator,
    per_head: bool,
    name: str,
) -> keras.layers.MultiHeadAttention:
    """`MultiMaxAttention` or `keras.layers.MultiHeadAttention`, same shapes,
    with the key/value cache of `_cached_attention.CachedAttention`."""
    common = {
        "num_heads": num_heads,
        "key_dim": hidden_dim // num_heads,
        "dropout": dropout,
        "name": name,
    }
    if kind == "multimax":
        return CachedMultiMaxAttention(**common, modulator=modulator, per_head=per_head)
    return CachedMultiHeadAttention(**common)


def make_head(
    kind: str, units: int, modulator: Modulator, name: str
) -> list[keras.layers.Layer]:
    """Output logits: Dense, followed by SegLU for the MultiMax head."""
    dense = keras.layers.Dense(units, name=f"{name}_dense")
    if kind == "softmax":
        return [dense]
    return [dense, SegLU(modulator=modulator, name=f"{name}_seglu")]


@keras.saving.register_keras_serializable(package="keras_multimax")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned position embedding to a ``(batch, length, dim)`` input.

    Shorter inputs use the first positions. An input longer than
    ``sequence_length`` raises a ``ValueError`` when its length is known
    statically (eager calls, or traced with a fixed length); the models pass
    their ``sequence_length``, ``source_length`` or ``target_length`` here.

    Args:
        sequence_length: Maximum input length.
        initializer: Initializer of the embedding table.
        **kwargs: Base layer keyword arguments.
    """

    def __init__(
        self,
        sequence_length: int,
        initializer: Any = _EMBEDDING_INITIALIZER,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.sequence_length = validate_positive("sequence_length", sequence_length)
        self.initializer = keras.initializers.get(initializer)
        self.supports_masking = True

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.sequence_length, input_shape[-1]),
            initializer=self.initializer,
        )

    def call(self, inputs, start_index=None):
        """Adds positions ``start_index, start_index + 1, ...`` (default 0).

        A non-default ``start_index`` (an int or scalar int tensor, used by the
        cached decoding paths) is not checked against ``sequence_length``:
        the caller validates the decoding length.
        """
        if start_index is not None:
            length = keras.ops.shape(inputs)[1]
            embeddings = keras.ops.convert_to_tensor(self.embeddings)
            positions = keras.ops.slice(
                embeddings, [start_index, 0], [length, embeddings.shape[1]]
            )
            return inputs + keras.ops.cast(positions, inputs.dtype)
        static_length = inputs.shape[1]
        if static_length is not None and static_length > self.sequence_length:
            raise ValueError(
                f"Layer '{self.name}' received inputs of length {static_length}, "
                f"longer than its maximum length sequence_length="
                f"{self.sequence_length} (the model's `sequence_length`, "
                "`source_length` or `target_length`): pass shorter inputs or "
                "build the model with a larger maximum length. Received: "
                f"inputs.shape={tuple(inputs.shape)}"
            )
        length = keras.ops.shape(inputs)[1]
        positions = self.embeddings[:length]
        return inputs + keras.ops.cast(positions, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sequence_length": self.sequence_length,
                "initializer": keras.initializers.serialize(self.initializer),
            }
        )
        return config


def exact_gelu(x):
    """GELU, x·Φ(x), written with erf.

    Keras' exact GELU is written with erfc, which tf2onnx cannot convert, so
    `model.export(format="onnx")` would fail on every builder; erf converts to
    ONNX and the LiteRT converter still fuses it into its GELU op. Equal to
    Keras' GELU within 1e-6 on [-10, 10] in float32.
    """
    return 0.5 * x * (1.0 + keras.ops.erf(x * 0.7071067811865476))


class _MLP(keras.layers.Layer):
    def __init__(self, hidden_dim, mlp_dim, dropout, **kwargs):
        super().__init__(**kwargs)
        self.fc1 = keras.layers.Dense(mlp_dim, activation=exact_gelu, name="fc1")
        self.fc2 = keras.layers.Dense(hidden_dim, name="fc2")
        self.drop = keras.layers.Dropout(dropout, name="dropout")

    def build(self, input_shape):
        self.fc1.build(input_shape)
        self.fc2.build(tuple(input_shape[:-1]) + (self.fc1.units,))

    def call(self, x, training=None):
        return self.drop(self.fc2(self.fc1(x)), training=training)


class TransformerBlock(keras.layers.Layer):
    """Pre-norm transformer block: self-attention, optional cross-attention, MLP.

    ``x + Attn(LN(x))``, then (decoder) ``x + CrossAttn(LN(x), context)``,
    then ``x + MLP(LN(x))``. Not serialized on its own: the models rebuild it
    from their configuration.
    """

    def __init__(
        self,
        attention: str,
        hidden_dim: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float,
        modulator: Modulator,
        per_head: bool,
        cross_attention: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.cross = cross_attention
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-6, name="norm1")
        arguments = (attention, num_heads, hidden_dim, dropout, modulator, per_head)
        self.attention = make_attention(*arguments, "self_attention")
        if cross_attention:
            self.norm_cross = keras.layers.LayerNormalization(
                epsilon=1e-6, name="norm_cross"
            )
            self.cross_attention = make_attention(*arguments, "cross_attention")
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-6, name="norm2")
        self.mlp = _MLP(hidden_dim, mlp_dim, dropout, name="mlp")
        self.drop = keras.layers.Dropout(dropout, name="dropout")

    def build(self, x_shape, context_shape=None):
        self.norm1.build(x_shape)
        self.attention.build(x_shape, x_shape)
        if self.cross:
            self.norm_cross.build(x_shape)
            self.cross_attention.build(x_shape, context_shape)
        self.norm2.build(x_shape)
        self.mlp.build(x_shape)

    def call(
        self,
        x,
        context=None,
        attention_mask=None,
        cross_attention_mask=None,
        use_causal_mask=False,
        return_attention_scores=False,
        training=None,
    ):
        scores = {}
        h = self.norm1(x)
        h = self.attention(
            h,
            h,
            attention_mask=attention_mask,
            use_causal_mask=use_causal_mask,
            return_attention_scores=return_attention_scores,
            training=training,
        )
        if return_attention_scores:
            h, scores["self_attention"] = h
        x = x + self.drop(h, training=training)
        if self.cross:
            h = self.cross_attention(
                self.norm_cross(x),
                context,
                attention_mask=cross_attention_mask,
                return_attention_scores=return_attention_scores,
                training=training,
            )
            if return_attention_scores:
                h, scores["cross_attention"] = h
            x = x + self.drop(h, training=training)
        x = x + self.mlp(self.norm2(x), training=training)
        if return_attention_scores:
            return x, scores
        return x

    def compute_output_shape(self, x_shape, context_shape=None):
        return x_shape

    def cross_attention_cache(self, context):
        """The cross-attention keys and values of ``context``, ``[B, 2, S, H, D]``."""
        return self.cross_attention.key_value_cache(context)

    def call_with_cache(
        self,
        x,
        cache,
        cache_update_index,
        attention_mask,
        cross_attention_cache=None,
        cross_attention_mask=None,
    ):
        """The block at inference on new positions, with a key/value cache.

        Args:
            x: ``(B, T, hidden_dim)`` inputs at positions
                ``cache_update_index ... cache_update_index + T - 1``.
            cache: ``[B, 2, S, H, D]`` self-attention keys and values.
            cache_update_index: Where the keys/values of ``x`` go in ``cache``.
            attention_mask: ``(B or 1, T, S)`` self-attention mask, e.g.
                `causal_cache_mask`.
            cross_attention_cache: ``[B, 2, S_context, H, D]``
                (`cross_attention_cache`), for blocks with cross-attention.
            cross_attention_mask: ``(B, T or 1, S_context)`` mask of the
                context keys.

        Returns:
            ``(outputs, updated cache)``.
        """
        h = self.norm1(x)
        h, cache = self.attention(
            h,
            h,
            attention_mask=attention_mask,
            cache=cache,
            cache_update_index=cache_update_index,
            training=False,
        )
        x = x + h
        if self.cross:
            h = self.norm_cross(x)
            # A cache with no update index: the cached context is read only.
            h, _ = self.cross_attention(
                h,
                h,
                attention_mask=cross_attention_mask,
                cache=cross_attention_cache,
                training=False,
            )
            x = x + h
        x = x + self.mlp(self.norm2(x), training=False)
        return x, cache


def causal_cache_mask(cache_update_index, query_length, cache_length):
    """``(1, T, S)``: query ``cache_update_index + i`` sees keys ``<= itself``."""
    queries = keras.ops.arange(query_length, dtype="int32") + keras.ops.cast(
        cache_update_index, "int32"
    )
    keys = keras.ops.arange(cache_length, dtype="int32")
    return keras.ops.expand_dims(
        keras.ops.less_equal(keys[None, :], queries[:, None]), 0
    )


def blocks_with_cache(
    blocks, x, cache, cache_update_index, mask, cross_caches=None, cross_mask=None
):
    """Runs `TransformerBlock.call_with_cache` of each block in turn.

    ``cache`` is ``[B, len(blocks), 2, S, H, D]`` and ``cross_caches`` (for
    decoder blocks) one ``[B, 2, S_context, H, D]`` per block. Returns the
    outputs and the updated cache.
    """
    caches = []
    for i, block in enumerate(blocks):
        cross = None if cross_caches is None else cross_caches[i]
        x, layer_cache = block.call_with_cache(
            x, cache[:, i], cache_update_index, mask, cross, cross_mask
        )
        caches.append(layer_cache)
    return x, keras.ops.stack(caches, axis=1)


def empty_cache(batch_size, blocks, length, dtype):
    """Zeros ``[B, len(blocks), 2, length, H, D]`` for the blocks' self-attention."""
    attention = blocks[0].attention
    shape = [batch_size, len(blocks), 2, length, attention.num_heads]
    return keras.ops.zeros(shape + [attention.key_dim], dtype=dtype)


def compile_for_backend(model: keras.Model, fn):
    """``fn(*tensors)`` compiled for Keras' backend, as KerasHub's generate.

    TensorFlow: a `tf.function`, XLA-compiled when ``model.jit_compile``
    (Keras' default: False on CPU-only machines; set it, or
    ``compile(jit_compile=True)``, to opt in). JAX: ``jax.jit`` of a pure
    function of the model's variables (passed in through a
    `keras.StatelessScope`, so later weight updates are seen). With
    ``model.run_eagerly`` or another backend: ``fn`` itself. The backend
    module is imported here only, when that backend is the active one.
    """
    backend = keras.config.backend()
    if model.run_eagerly:
        return fn
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(
            fn, jit_compile=bool(model.jit_compile), reduce_retracing=True
        )
    if backend == "jax":
        import jax

        variables = model.variables

        @jax.jit
        def pure(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        return lambda *args: pure([v.value for v in variables], *args)
    return fn


@keras.saving.register_keras_serializable(package="keras_multimax")
def masked_token_accuracy(y_true, y_pred):
    """Token accuracy over non-padding targets (id 0 is padding)."""
    y_true = keras.ops.cast(y_true, "int32")
    pred = keras.ops.cast(keras.ops.argmax(y_pred, axis=-1), "int32")
    valid = keras.ops.cast(keras.ops.not_equal(y_true, 0), "float32")
    hits = keras.ops.cast(keras.ops.equal(y_true, pred), "float32") * valid
    return keras.ops.sum(hits) / keras.ops.maximum(keras.ops.sum(valid), 1.0)


def exclude_modulator_from_weight_decay(
    optimizer: keras.optimizers.Optimizer, model: keras.Model
) -> list:
    """Keeps `model`'s ranges/ts (and biases, norms) out of the optimizer's weight decay.

    Call it before ``model.compile(optimizer, ...)`` (Keras configures
    exclusions only before the optimizer is built). It calls Keras' public
    ``optimizer.exclude_from_weight_decay(var_list=...)`` with the variables
    named in `NO_DECAY_NAMES`, by identity; as that method does, it
    replaces exclusions set earlier on the optimizer (to add your own, call
    it yourself with this function's list plus yours).

    Example:

    >>> import keras
    >>> from keras_multimax import models
    >>> model = models.vit_classifier((8, 8, 1), 10, patch_size=4, num_layers=1,
    ...                               hidden_dim=8, num_heads=2, mlp_dim=8)
    >>> optimizer = keras.optimizers.AdamW(1e-3, weight_decay=0.05)
    >>> excluded = exclude_modulator_from_weight_decay(optimizer, model)
    >>> sorted({v.name for v in excluded})
    ['beta', 'bias', 'gamma', 'ranges', 'ts']
    >>> model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(
    ...     from_logits=True))

    Args:
        optimizer: An optimizer with weight decay, not yet built.
        model: The model whose variables are excluded.

    Returns:
        The excluded variables.
    """
    if not getattr(optimizer, "weight_decay", None):
        raise ValueError(
            "`optimizer` has no weight decay, so there is nothing to exclude "
            "from it: pass an optimizer with `weight_decay`, e.g. "
            "`keras.optimizers.AdamW`. Received: "
            f"optimizer={type(optimizer).__name__} with "
            f"weight_decay={getattr(optimizer, 'weight_decay', None)!r}"
        )
    excluded = [v for v in model.trainable_variables if v.name in NO_DECAY_NAMES]
    optimizer.exclude_from_weight_decay(var_list=excluded)
    return excluded
