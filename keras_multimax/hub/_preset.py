"""`from_preset`: any KerasHub preset straight into a MultiMax model."""

from __future__ import annotations

from typing import Any

import keras_hub

from keras_multimax.hub._convert import convert_model
from keras_multimax.hub._models import is_multimax
from keras_multimax.layers.multimax_attention import validate_per_head
from keras_multimax.modulator import MODULATOR_ARGUMENTS
from keras_multimax.modulator import pop_legacy_arguments


def from_preset(
    preset: str,
    model_class: Any = None,
    *,
    load_weights: bool = True,
    modulator: Any = None,
    per_head: bool | None = None,
    **kwargs,
):
    """Loads a KerasHub preset as a MultiMax model.

    ``model_class.from_preset(preset, ...)`` (KerasHub's own loader, so any
    preset it reads: a local directory, or a handle KerasHub can download),
    then `keras_multimax.convert.to_multimax` with ``modulator`` and
    ``per_head``. A preset saved from a MultiMax model (``save_to_preset``)
    comes back as it was saved; giving MultiMax options for it raises a
    ``ValueError``, since they would be ignored.

    Formula: every attention layer computes ``softmax(σ(s))`` instead of
    ``softmax(s)``, with

        σ(s) = s + Σ_k t[2k]·relu(r[2k] − s)^(k+1) + t[2k+1]·relu(s − r[2k+1])^(k+1)

    With the default modulator (``ts = 0``) the loaded model computes what
    the preset's SoftMax model computes.

    Example:

    >>> import tempfile, keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(
    ...     vocabulary_size=20, num_layers=1, num_heads=2, hidden_dim=8,
    ...     intermediate_dim=16, max_sequence_length=8)
    >>> preset = tempfile.mkdtemp()
    >>> backbone.save_to_preset(preset)
    >>> from keras_multimax import Modulator
    >>> model = from_preset(preset, modulator=Modulator(order=1))
    >>> type(model).__name__, model.modulator.order
    ('MultiMaxGPT2Backbone', 1)

    Args:
        preset: A KerasHub preset: a local preset directory or a handle.
        model_class: The KerasHub class to load with, e.g.
            ``keras_hub.models.CausalLM`` or ``keras_hub.models.
            GPT2CausalLM``. Defaults to ``keras_hub.models.Backbone``.
        load_weights: Boolean, whether to load the preset's weights.
        modulator: The modulator's configuration, as in
            `keras_multimax.convert.to_multimax` (default: ``ts = 0``).
        per_head: One modulator per attention head (default False).
        **kwargs: Any other argument of ``model_class.from_preset`` (e.g.
            ``dtype``).

    Returns:
        An instance of the MultiMax subclass of the preset's class.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """
    if model_class is None:
        model_class = keras_hub.models.Backbone
    if not isinstance(model_class, type) or not issubclass(
        model_class, (keras_hub.models.Backbone, keras_hub.models.Task)
    ):
        raise TypeError(
            "`model_class` must be a KerasHub Backbone or Task class. "
            f"Received: model_class={model_class!r}"
        )
    given = {
        name: value
        for name, value in {"modulator": modulator, "per_head": per_head}.items()
        if value is not None
    }
    given.update({k: kwargs[k] for k in MODULATOR_ARGUMENTS if k in kwargs})
    modulator = pop_legacy_arguments(kwargs, modulator, "from_preset")
    per_head = False if per_head is None else validate_per_head(per_head)
    model = model_class.from_preset(preset, load_weights=load_weights, **kwargs)
    if is_multimax(model):
        if given:
            backbone = getattr(model, "backbone", None) or model
            raise ValueError(
                f"Preset {preset!r} holds a MultiMax model already "
                f"({type(model).__name__}, modulator {backbone.modulator.get_config()}, "
                f"per_head={backbone.per_head}); the MultiMax options given "
                f"would be ignored. Received: {given!r}"
            )
        return model
    return convert_model(model, modulator, per_head)
