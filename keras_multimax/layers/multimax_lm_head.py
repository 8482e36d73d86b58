"""`MultiMaxLMHead`: a language-model head whose training loss never holds the logits."""

from __future__ import annotations

from typing import Any

import keras

from keras_multimax import ops
from keras_multimax._cross_entropy import int_option
from keras_multimax._cross_entropy import multimax_cross_entropy
from keras_multimax.layers._modulator import ModulatorParameters
from keras_multimax.modulator import from_legacy_config
from keras_multimax.modulator import pop_legacy_arguments


@keras.saving.register_keras_serializable(package="keras_multimax")
class MultiMaxLMHead(ModulatorParameters, keras.layers.Layer):
    """Output head of a language model with MultiMax on the vocabulary logits.

    Formula:

        z = inputs · kernel + bias
        logits = σ(z)                                  (inference)
        loss = logsumexp(σ(z)) − σ(z)[label]           (with labels)

    with σ the MultiMax modulator (`SegLU`) and its own ``ranges``/``ts``:
    ``softmax(logits)`` is MultiMax of the linear head. Called with
    ``labels``, the layer returns the per-token loss from
    `multimax_cross_entropy`, computed vocabulary chunk by chunk without the
    ``[tokens, vocab_size]`` logits (nor in the backward). Called without,
    it returns the modulated logits, or with ``top_k`` their ``top_k``
    largest values and ids. Equal, at the same weights, to ``Dense`` →
    ``SegLU`` → ``SparseCategoricalCrossentropy(from_logits=True)``.

    Tied embeddings: pass the token embedding layer (a
    `keras.layers.Embedding` or KerasHub ``ReversibleEmbedding``, anything
    with an ``embeddings`` matrix of shape ``(vocab_size, width)``) as
    ``tied_embedding``; its matrix transposed is the kernel, and the head
    creates none. The embedding layer is tracked by the head and serialized
    with it; a model that owns both layers passes its own embedding again
    when it is rebuilt.

    Example:

    >>> import numpy as np
    >>> head = MultiMaxLMHead(vocab_size=10)
    >>> hidden = np.random.default_rng(0).normal(size=(2, 3, 4))
    >>> tuple(head(hidden).shape)  # logits
    (2, 3, 10)
    >>> tuple(head(hidden, labels=np.zeros((2, 3), "int32")).shape)  # token losses
    (2, 3)
    >>> values, ids = head(hidden, top_k=2)
    >>> tuple(ids.shape)
    (2, 3, 2)

    Args:
        vocab_size: Number of token ids (output columns).
        use_bias: Whether the linear head has a bias.
        tied_embedding: Optional embedding layer whose ``embeddings``
            ``(vocab_size, width)`` transposed is the kernel.
        chunk_size: Vocabulary columns per chunk of the loss; ``None``
            picks it from a memory budget (see `multimax_cross_entropy`).
        ignore_index: Optional label whose tokens get loss 0 and no gradient.
        kernel_initializer: Initializer of the kernel (untied heads).
        bias_initializer: Initializer of the bias.
        modulator: The modulator's configuration: a
            `keras_multimax.Modulator`, a name (``"softmax"``, the default:
            ``ts = 0``, exactly SoftMax at the start; ``"paper"``: the
            official initialisation) or its config dict.
        **kwargs: Base layer keyword arguments, such as ``name`` and ``dtype``.

    Call arguments:
        inputs: Hidden states ``(..., width)``.
        labels: Optional integer token ids of shape ``inputs.shape[:-1]``.
        top_k: Optional int: without labels, return the ``top_k`` largest
            logits and their ids instead of all logits.

    Returns:
        With ``labels``: the float32 loss of every token, shape of ``labels``.
        Otherwise the logits ``(..., vocab_size)`` (or ``(values, ids)`` of
        shape ``(..., top_k)``), in the compute dtype.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """

    def __init__(
        self,
        vocab_size: int,
        use_bias: bool = True,
        tied_embedding: keras.layers.Layer | None = None,
        chunk_size: int | None = None,
        ignore_index: int | None = None,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        modulator: Any = None,
        **kwargs,
    ):
        modulator = pop_legacy_arguments(kwargs, modulator, type(self).__name__)
        super().__init__(**kwargs)
        if (
            isinstance(vocab_size, bool)
            or not isinstance(vocab_size, int)
            or vocab_size < 1
        ):
            raise ValueError(
                f"`vocab_size` must be an integer >= 1. Received: vocab_size={vocab_size!r}"
            )
        chunk_size = int_option(chunk_size, "chunk_size", minimum=1)
        ignore_index = int_option(ignore_index, "ignore_index", minimum=None)
        if tied_embedding is not None and not isinstance(
            tied_embedding, keras.layers.Layer
        ):
            raise TypeError(
                "`tied_embedding` must be an embedding layer (with an `embeddings` "
                f"matrix) or None. Received: tied_embedding={tied_embedding!r}"
            )
        self.vocab_size = vocab_size
        self.use_bias = bool(use_bias)
        self.tied_embedding = tied_embedding
        self.chunk_size = chunk_size
        self.ignore_index = ignore_index
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.modulator = modulator

    def build(self, inputs_shape, labels_shape=None):
        width = inputs_shape[-1]
        if self.tied_embedding is None:
            self.kernel = self.add_weight(
                name="kernel",
                shape=(width, self.vocab_size),
                initializer=self.kernel_initializer,
            )
        else:
            tied = self.tied_embedding
            if not tied.built:
                tied.build((None,))
            shape = tuple(getattr(tied, "embeddings", None).shape)
            if shape != (self.vocab_size, width):
                raise ValueError(
                    "The tied embedding matrix must have shape (vocab_size, width) = "
                    f"({self.vocab_size}, {width}). Received: embeddings.shape={shape}"
                )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.vocab_size,), initializer=self.bias_initializer
            )
        self._build_modulator()

    def _kernel(self):
        if self.tied_embedding is None:
            return self.kernel
        embeddings = keras.ops.cast(self.tied_embedding.embeddings, self.compute_dtype)
        return keras.ops.transpose(embeddings)

    def call(self, inputs, labels=None, top_k=None):
        kernel = self._kernel()
        if labels is not None:
            return multimax_cross_entropy(
                inputs,
                kernel,
                labels,
                self.ranges,
                self.ts,
                self.bias,
                chunk_size=self.chunk_size,
                ignore_index=self.ignore_index,
            )
        z = keras.ops.matmul(inputs, kernel)
        if self.bias is not None:
            z = z + self.bias
        logits = ops.seglu(z, self.ranges, self.ts)
        if top_k is None:
            return logits
        return keras.ops.top_k(logits, top_k)

    def compute_output_shape(self, input_shape, labels_shape=None, top_k=None):
        if labels_shape is not None:
            return tuple(labels_shape)
        if top_k is not None:
            shape = (*input_shape[:-1], top_k)
            return shape, shape
        return (*input_shape[:-1], self.vocab_size)

    def compute_output_spec(self, inputs, labels=None, top_k=None):
        if labels is not None:
            return keras.KerasTensor(labels.shape, dtype="float32")
        shape = (*inputs.shape[:-1], top_k or self.vocab_size)
        logits = keras.KerasTensor(shape, dtype=self.compute_dtype)
        if top_k is None:
            return logits
        return logits, keras.KerasTensor(shape, dtype="int32")

    def get_config(self):
        config = super().get_config()
        tied = self.tied_embedding
        config.update(
            {
                "vocab_size": self.vocab_size,
                "use_bias": self.use_bias,
                "tied_embedding": None
                if tied is None
                else keras.saving.serialize_keras_object(tied),
                "chunk_size": self.chunk_size,
                "ignore_index": self.ignore_index,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = from_legacy_config(dict(config))
        if config.get("tied_embedding") is not None:
            config["tied_embedding"] = keras.saving.deserialize_keras_object(
                config["tied_embedding"]
            )
        return cls(**config)
