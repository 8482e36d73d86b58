"""The KerasHub strategy of `keras_multimax.convert.to_multimax`.

A KerasHub Backbone or Task rebuilds from its config: the MultiMax copy is
the registered MultiMax class (`multimax_class`) built from the original's
config plus the modulator's, which puts the twin of every attention layer in
its place as it is built; then `keras_multimax._transfer.transfer_state` gives it the
original's LoRA adapters and weights (a quantized original's config already
builds the copy quantized).
"""

from __future__ import annotations

from keras_hub.models import Backbone
from keras_hub.models import Task

from keras_multimax._transfer import modulator_variables
from keras_multimax._transfer import transfer_state
from keras_multimax.hub._attention import describe
from keras_multimax.hub._attention import find_attention
from keras_multimax.hub._models import is_multimax
from keras_multimax.hub._models import multimax_class
from keras_multimax.modulator import Modulator

__all__ = ["convert_model"]


def convert_model(model, modulator: Modulator, per_head: bool):
    """The MultiMax copy of a KerasHub Backbone or Task (see `to_multimax`)."""
    if is_multimax(model):
        raise ValueError(
            f"Model {model.name!r} is a {type(model).__name__} already: there "
            f"is no SoftMax attention left to convert. Received: model={model.name!r}"
        )
    if isinstance(model, Backbone):
        new = _backbone(model, modulator, per_head)
    elif isinstance(model, Task):
        if model.backbone is None:
            raise ValueError(
                f"Task {model.name!r} has no backbone to convert. "
                f"Received: model={model.name!r} with backbone=None"
            )
        cls = multimax_class(type(model))
        backbone = _backbone(model.backbone, modulator, per_head)
        config = model.get_config()
        config.update(backbone=backbone, preprocessor=model.preprocessor)
        new = cls.from_config(config)
        inside = {id(layer) for layer in backbone._flatten_layers()}
        upgrade, missing = find_attention(
            layer
            for layer in new._flatten_layers(include_self=False)
            if id(layer) not in inside
        )
        if upgrade or missing:
            raise ValueError(
                f"{type(model).__name__} {model.name!r} has attention layers "
                "outside its backbone, which `to_multimax` does not convert "
                f"(they would stay SoftMax):\n{describe(upgrade + missing)}"
            )
    else:
        raise TypeError(
            "Expected a KerasHub Backbone or Task. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    _enable_lora_like(model, new)
    transfer_state(model, new, created=modulator_variables(new))
    # A new task is compiled by its constructor with KerasHub's defaults
    # (optimizer, loss, sampler); `new.compile(...)` changes them.
    return new


def _backbone(model, modulator, per_head):
    cls = multimax_class(type(model))
    return cls.from_config(
        {**model.get_config(), "modulator": modulator, "per_head": per_head}
    )


def _enable_lora_like(old, new):
    """LoRA the KerasHub way on `new` if the original's backbone has it.

    ``Backbone.enable_lora(rank, names)`` freezes the backbone and adds
    adapters to its layers of these names, recording them for
    ``save_lora_weights``. When every layer of `old`'s backbone with such a
    name has LoRA of one rank (and the default alpha), so does `new`'s,
    through the same public call (its MultiMax modulators stay trainable);
    LoRA enabled layer by layer is carried over by `transfer_state`.
    """
    old_backbone = old.backbone if isinstance(old, Task) else old
    new_backbone = new.backbone if isinstance(new, Task) else new
    lora = [
        layer
        for layer in old_backbone._flatten_layers(include_self=False)
        if getattr(layer, "lora_enabled", False)
    ]
    ranks = {(layer.lora_rank, layer.lora_alpha) for layer in lora}
    if len(ranks) != 1:
        return
    ((rank, alpha),) = ranks
    names = sorted({layer.name for layer in lora})
    same_names = [
        layer
        for layer in old_backbone._flatten_layers(include_self=False)
        if layer.name in names and layer.weights and hasattr(layer, "enable_lora")
    ]
    if alpha == rank and all(layer.lora_enabled for layer in same_names):
        new_backbone.enable_lora(rank, target_layer_names=names)
