"""How the examples compile the model builders: AdamW, no decay on the modulators.

The builders are plain Keras models (their outputs are logits), compiled as
any other; this is the recipe the examples share, written out.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from keras_multimax import models

__all__ = ["compile_with_adamw"]


def compile_with_adamw(
    model: keras.Model,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.05,
    ignore_class: int | None = None,
    metrics: Sequence | None = ("accuracy",),
    **kwargs,
) -> keras.optimizers.AdamW:
    """Compiles ``model`` with AdamW and a sparse cross-entropy on its logits.

    The MultiMax ``ranges``/``ts`` (and biases, normalisation scales and
    offsets) are kept out of weight decay with
    `keras_multimax.models.exclude_modulator_from_weight_decay`.

    Example:

    >>> from keras_multimax import models
    >>> model = models.vit_classifier((8, 8, 1), 10, patch_size=4, num_layers=1,
    ...                               hidden_dim=8, num_heads=2, mlp_dim=8)
    >>> optimizer = compile_with_adamw(model, learning_rate=2e-3)
    >>> type(model.loss).__name__, float(optimizer.weight_decay)
    ('SparseCategoricalCrossentropy', 0.05)

    Args:
        model: A model whose outputs are logits (the builders' are).
        learning_rate: AdamW's learning rate.
        weight_decay: AdamW's decoupled weight decay.
        ignore_class: Optional label id left out of the loss (the
            translator's padding id).
        metrics: Metrics of `keras.Model.compile`; None for none (the
            fused LM head, whose logits a metric would compute).
        **kwargs: Other arguments of `keras.Model.compile` (``jit_compile``).

    Returns:
        The optimizer.
    """
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate, weight_decay=weight_decay
    )
    models.exclude_modulator_from_weight_decay(optimizer, model)
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=ignore_class
    )
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=list(metrics) if metrics else None,
        **kwargs,
    )
    return optimizer
