"""`ViTClassifier`: a small vision transformer with SoftMax or MultiMax attention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_multimax.models import _blocks
from keras_multimax.modulator import from_legacy_config
from keras_multimax.modulator import get as get_modulator
from keras_multimax.modulator import pop_legacy_arguments


@keras.saving.register_keras_serializable(package="keras_multimax")
class ViTClassifier(keras.Model):
    """Vision transformer classifier (DeiT-style, global average pooling).

    Patch embedding (a strided convolution), a learned position embedding,
    ``num_layers`` pre-norm transformer encoder blocks, LayerNormalization,
    global average pooling over the patches (the paper's DeiT baseline uses
    GAP instead of a class token) and a linear classifier. ``attention``
    chooses `keras.layers.MultiHeadAttention` (SoftMax) or
    `keras_multimax.layers.MultiMaxAttention`; ``head="multimax"`` puts a
    `SegLU` modulator on the logits, so ``softmax(outputs)`` is MultiMax of
    the linear layer. The outputs are **logits** either way: train with
    ``from_logits=True``.

    Example:

    >>> model = ViTClassifier((8, 8, 1), num_classes=10, patch_size=4,
    ...                       num_layers=1, hidden_dim=8, num_heads=2, mlp_dim=8)
    >>> tuple(model(np.zeros((2, 8, 8, 1), "float32")).shape)
    (2, 10)

    Args:
        image_shape: ``(height, width, channels)`` of the inputs; height and
            width divisible by ``patch_size``.
        num_classes: Number of classes.
        patch_size: Side of the square patches.
        num_layers: Number of encoder blocks.
        hidden_dim: Width of the token embeddings (divisible by
            ``num_heads``).
        num_heads: Attention heads.
        mlp_dim: Hidden width of the MLPs.
        dropout: Dropout rate (attention probabilities, residual branches).
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
        Learning", ICML 2024; Dosovitskiy et al., "An Image is Worth 16x16
        Words", ICLR 2021.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        patch_size: int = 2,
        num_layers: int = 2,
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
        image_shape = tuple(image_shape)
        if len(image_shape) != 3:
            raise ValueError(
                "`image_shape` must be (height, width, channels). "
                f"Received: image_shape={image_shape}"
            )
        for name, value in (
            ("num_classes", num_classes),
            ("patch_size", patch_size),
            ("num_layers", num_layers),
            ("hidden_dim", hidden_dim),
            ("num_heads", num_heads),
            ("mlp_dim", mlp_dim),
        ):
            _blocks.validate_positive(name, value)
        if image_shape[0] % patch_size or image_shape[1] % patch_size:
            raise ValueError(
                "The image height and width must be divisible by `patch_size`. "
                f"Received: image_shape={image_shape}, patch_size={patch_size}"
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
        num_patches = (image_shape[0] // patch_size) * (image_shape[1] // patch_size)

        # === Layers ===
        self.patch_embedding = keras.layers.Conv2D(
            hidden_dim, patch_size, strides=patch_size, name="patch_embedding"
        )
        self.patch_reshape = keras.layers.Reshape(
            (num_patches, hidden_dim), name="patches"
        )
        self.position_embedding = _blocks.PositionEmbedding(
            num_patches, name="position_embedding"
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
                name=f"encoder_block_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_norm = keras.layers.LayerNormalization(
            epsilon=1e-6, name="final_norm"
        )
        self.pool = keras.layers.GlobalAveragePooling1D(name="pool")
        self.head_layers = _blocks.make_head(head, num_classes, modulator, "head")

        # === Functional model ===
        images = keras.Input(shape=image_shape, name="images")
        logits = self._forward(images)
        super().__init__(inputs=images, outputs=logits, **kwargs)

        # === Config ===
        self.image_shape = image_shape
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.attention = attention
        self.head = head
        self.modulator = modulator
        self.per_head = per_head

    def _forward(self, images, scores=None, training=None):
        x = self.patch_reshape(self.patch_embedding(images))
        x = self.position_embedding(x)
        for block in self.blocks:
            if scores is None:
                x = block(x, training=training)
            else:
                x, s = block(x, return_attention_scores=True, training=training)
                scores[f"{block.name}/self_attention"] = (s["self_attention"], None)
        x = self.pool(self.final_norm(x))
        for layer in self.head_layers:
            x = layer(x)
        return x

    def attention_maps(self, images) -> dict[str, tuple[np.ndarray, None]]:
        """Attention probabilities of every layer for `images`.

        Returns:
            ``{"encoder_block_<i>/self_attention": (probs, None)}`` with
            ``probs`` of shape ``(batch, heads, patches, patches)`` (NumPy)
            and no mask (every patch attends to every patch).
        """
        scores = {}
        self._forward(keras.ops.convert_to_tensor(images), scores, training=False)
        return {
            name: (keras.ops.convert_to_numpy(p), m) for name, (p, m) in scores.items()
        }

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "image_shape": self.image_shape,
            "num_classes": self.num_classes,
            "patch_size": self.patch_size,
            "num_layers": self.num_layers,
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


def vit_classifier(
    image_shape: Sequence[int], num_classes: int, **kwargs
) -> ViTClassifier:
    """Builds a `ViTClassifier` (see there for the arguments).

    Example:

    >>> model = vit_classifier((8, 8, 1), 10, attention="softmax", head="softmax",
    ...                        num_layers=1, hidden_dim=8, num_heads=2, mlp_dim=8)
    >>> type(model.blocks[0].attention).__name__
    'CachedMultiHeadAttention'
    """
    return ViTClassifier(image_shape, num_classes, **kwargs)
