"""`from_preset`: any KerasHub preset straight into a MultiMax model."""

from __future__ import annotations

from typing import Any

import keras_hub

from keras_multimax.hub._layers import MODULATOR_ARGUMENTS
from keras_multimax.hub._models import is_multimax


def from_preset(
    preset: str, model_class: Any = None, *, load_weights: bool = True, **kwargs
):
    """Loads a KerasHub preset as a MultiMax model.

    ``model_class.from_preset(preset, ...)`` (KerasHub's own loader, so any
    preset it reads: a local directory, or a handle KerasHub can download),
    then `keras_multimax.convert.to_multimax` with the MultiMax options
    among ``kwargs``. A preset saved from a MultiMax model (``save_to_preset``)
    comes back as it was saved; giving MultiMax options for it raises a
    ``ValueError``, since they would be ignored.

    Formula: every attention layer computes ``softmax(σ(s))`` instead of
    ``softmax(s)``, with

        σ(s) = s + Σ_k t[2k]·relu(r[2k] − s)^(k+1) + t[2k+1]·relu(s − r[2k+1])^(k+1)

    With the default ``ts_initializer="zeros"`` the loaded model computes what
    the preset's SoftMax model computes.

    Example:

    >>> import tempfile, keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(
    ...     vocabulary_size=20, num_layers=1, num_heads=2, hidden_dim=8,
    ...     intermediate_dim=16, max_sequence_length=8)
    >>> preset = tempfile.mkdtemp()
    >>> backbone.save_to_preset(preset)
    >>> model = from_preset(preset, order=1)
    >>> type(model).__name__, model.multimax["order"]
    ('MultiMaxGPT2Backbone', 1)

    Args:
        preset: A KerasHub preset: a local preset directory or a handle.
        model_class: The KerasHub class to load with, e.g.
            ``keras_hub.models.CausalLM`` or ``keras_hub.models.
            GPT2CausalLM``. Defaults to ``keras_hub.models.Backbone``.
        load_weights: Boolean, whether to load the preset's weights.
        **kwargs: MultiMax options (``order``, ``per_head``,
            ``ranges_initializer``, ``ts_initializer``, ``ranges_regularizer``,
            ``ts_regularizer``, ``ranges_constraint``, ``ts_constraint``; as in
            `keras_multimax.convert.to_multimax`), and any other argument of
            ``model_class.from_preset`` (e.g. ``dtype``).

    Returns:
        An instance of the MultiMax subclass of the preset's class.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """
    from keras_multimax.convert import to_multimax

    if model_class is None:
        model_class = keras_hub.models.Backbone
    if not isinstance(model_class, type) or not issubclass(
        model_class, (keras_hub.models.Backbone, keras_hub.models.Task)
    ):
        raise TypeError(
            "`model_class` must be a KerasHub Backbone or Task class. "
            f"Received: model_class={model_class!r}"
        )
    options = {k: kwargs.pop(k) for k in MODULATOR_ARGUMENTS if k in kwargs}
    model = model_class.from_preset(preset, load_weights=load_weights, **kwargs)
    if is_multimax(model):
        if options:
            raise ValueError(
                f"Preset {preset!r} holds a MultiMax model already "
                f"({type(model).__name__}, options {model_multimax(model)}); "
                "the MultiMax options given would be ignored. Received: "
                f"{options!r}"
            )
        return model
    return to_multimax(model, **options)


def model_multimax(model) -> dict[str, Any]:
    backbone = getattr(model, "backbone", None) or model
    return backbone.multimax
