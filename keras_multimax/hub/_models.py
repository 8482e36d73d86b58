"""Registered MultiMax subclasses of the KerasHub Backbone and Task classes.

``MultiMax<Name>`` (e.g. ``MultiMaxLlamaBackbone``, ``MultiMaxLlamaCausalLM``)
subclasses every KerasHub Backbone and Task class registered with Keras. A
MultiMax backbone takes one extra constructor argument, ``multimax`` (the
modulator options), builds the original architecture, then puts MultiMax
into every attention layer (`keras_multimax.hub._layers.convert_layers`); its
config carries ``multimax``, so ``from_config``, ``.keras`` files and presets
rebuild the MultiMax model. A MultiMax task is the original task with the
MultiMax backbone as its ``backbone_cls``, so that KerasHub's
``CausalLM.from_preset(dir)`` finds it.
"""

from __future__ import annotations

from typing import Any

import h5py
import keras
from keras_hub.models import Backbone
from keras_hub.models import Task

from keras_multimax.hub._layers import convert_layers
from keras_multimax.hub._layers import find_attention
from keras_multimax.hub._layers import modulator_variables
from keras_multimax.hub._layers import unreachable_error
from keras_multimax.hub._layers import validate_options

__all__ = ["MultiMaxBackbone", "is_multimax", "multimax_class", "to_multimax"]

PACKAGE = "keras_multimax"

# KerasHub class -> its MultiMax subclass.
_CLASSES: dict[type, type] = {}


class MultiMaxBackbone:
    """Mixin of the MultiMax backbones: the ``multimax`` argument and config.

    Args:
        multimax: Dictionary of modulator options (``order``, ``per_head``,
            ``ranges_initializer``, ``ts_initializer``, regularizers and
            constraints, as in `keras_multimax.convert.to_multimax`). Missing
            options take the conversion defaults (``ts_initializer="zeros"``:
            the model starts as its SoftMax original).
        *args: The original backbone's positional arguments.
        **kwargs: The original backbone's keyword arguments.
    """

    def __init__(self, *args, multimax: dict[str, Any] | None = None, **kwargs):
        if multimax is not None and not isinstance(multimax, dict):
            raise TypeError(
                "`multimax` must be a dictionary of modulator options or None. "
                f"Received: multimax={multimax!r}"
            )
        options = validate_options(multimax or {})
        super().__init__(*args, **kwargs)
        convert_layers(self, options, f"{type(self).__name__} {self.name!r}")
        self._multimax_options = options

    @property
    def multimax(self) -> dict[str, Any]:
        """The modulator options (serialized) of every attention layer."""
        return dict(self._multimax_options)

    def get_config(self):
        config = super().get_config()
        config["multimax"] = self.multimax
        return config

    def enable_lora(self, rank, target_layer_names=None):
        """`Backbone.enable_lora`, with the MultiMax ``ranges``/``ts`` trainable.

        KerasHub freezes every weight but the LoRA factors; the modulators
        (``2 * order`` numbers per attention layer, or per head) stay
        trainable, since a frozen ``ts = 0`` would keep the model SoftMax.
        """
        super().enable_lora(rank, target_layer_names=target_layer_names)
        for variable in modulator_variables(self):
            variable.trainable = True

    def save_lora_weights(self, filepath):
        """`Backbone.save_lora_weights`, plus the MultiMax ``ranges``/``ts``.

        They are stored under ``multimax/<i>/`` in the same file, ``i``
        counting the modulators in layer order.
        """
        super().save_lora_weights(filepath)
        with h5py.File(filepath, "a") as file:
            group = file.create_group("multimax")
            for i, variable in enumerate(modulator_variables(self)):
                group[f"{i // 2}/{variable.name}"] = keras.ops.convert_to_numpy(
                    variable
                )

    def load_lora_weights(self, filepath):
        """`Backbone.load_lora_weights`, plus the MultiMax ``ranges``/``ts``
        when the file has them (a file saved from a SoftMax backbone leaves
        them as they are)."""
        super().load_lora_weights(filepath)
        with h5py.File(filepath, "r") as file:
            group = file.get("multimax")
            if group is None:
                return
            variables = modulator_variables(self)
            if len(group) * 2 != len(variables):
                raise ValueError(
                    f"The LoRA file {filepath!r} holds {len(group)} MultiMax "
                    f"modulators, but {self.name!r} has {len(variables) // 2}."
                )
            for i, variable in enumerate(variables):
                value = group[f"{i // 2}/{variable.name}"][()]
                if value.shape != tuple(variable.shape):
                    raise ValueError(
                        f"The LoRA file {filepath!r} holds {variable.name} of "
                        f"shape {value.shape} for {variable.path!r}, of shape "
                        f"{tuple(variable.shape)}."
                    )
                variable.assign(value)


def is_multimax(model) -> bool:
    """Whether `model` is an instance of a MultiMax KerasHub class."""
    return type(model) in _CLASSES.values()


def multimax_class(cls: type) -> type:
    """The registered MultiMax subclass of a KerasHub Backbone or Task class.

    Created (and registered with Keras as ``keras_multimax>MultiMax<Name>``)
    on first use; the classes of KerasHub itself are registered when
    `keras_multimax` is imported, so that saved MultiMax models load in a
    fresh process. A subclass of your own must go through this function
    before a model of it is loaded.

    Example:

    >>> import keras_hub
    >>> cls = multimax_class(keras_hub.models.GPT2Backbone)
    >>> cls.__name__, issubclass(cls, keras_hub.models.GPT2Backbone)
    ('MultiMaxGPT2Backbone', True)

    Args:
        cls: A subclass of ``keras_hub.models.Backbone`` or of
            ``keras_hub.models.Task`` with a ``backbone_cls``.

    Returns:
        The MultiMax class (`cls` itself if it is one already).
    """
    if cls in _CLASSES.values():
        return cls
    if cls in _CLASSES:
        return _CLASSES[cls]
    if not isinstance(cls, type) or not issubclass(cls, (Backbone, Task)):
        raise TypeError(
            "`multimax_class` takes a KerasHub Backbone or Task class. "
            f"Received: cls={cls!r}"
        )
    name = f"MultiMax{cls.__name__}"
    doc = (
        f"`{cls.__module__}.{cls.__name__}` with MultiMax attention "
        "(keras_multimax, Zhou, Fritz & Keuper, ICML 2024)."
    )
    if issubclass(cls, Backbone):
        new = type(name, (MultiMaxBackbone, cls), {"__doc__": doc})
    else:
        if cls.backbone_cls is None:
            raise ValueError(
                f"`{cls.__name__}` has no `backbone_cls`, so it has no "
                f"MultiMax variant. Received: cls={cls!r}"
            )
        body = {"__doc__": doc, "backbone_cls": multimax_class(cls.backbone_cls)}
        new = type(name, (cls,), body)
    new.__module__ = "keras_multimax.hub"
    registered = f"{PACKAGE}>{name}"
    taken = keras.saving.get_registered_object(registered)
    if taken is not None:
        raise ValueError(
            f"The Keras name {registered!r} of the MultiMax variant of "
            f"{cls.__module__}.{cls.__name__} is taken by {taken!r}. Rename "
            f"one of the two classes. Received: cls={cls!r}"
        )
    keras.saving.register_keras_serializable(package=PACKAGE)(new)
    _CLASSES[cls] = new
    return new


def register_keras_hub_classes() -> None:
    """Registers the MultiMax variant of every registered KerasHub class."""
    found = [
        obj
        for key, obj in list(keras.saving.get_custom_objects().items())
        if key.startswith("keras_hub>") and isinstance(obj, type)
    ]
    for obj in found:
        if issubclass(obj, Backbone):
            multimax_class(obj)
    for obj in found:
        if issubclass(obj, Task) and obj.backbone_cls is not None:
            multimax_class(obj)


def to_multimax(model, options: dict[str, Any]):
    """`keras_multimax.convert.to_multimax` of a KerasHub Backbone or Task."""
    if is_multimax(model):
        raise ValueError(
            f"Model {model.name!r} is a {type(model).__name__} already: there "
            "is no SoftMax attention left to convert. Received: "
            f"model={model.name!r}"
        )
    options = validate_options(options)
    # Before building anything: name the out-of-reach layers of `model`.
    _, _, unreachable, _ = find_attention(model)
    if unreachable:
        raise unreachable_error(unreachable, f"{type(model).__name__} {model.name!r}")
    if isinstance(model, Backbone):
        cls = multimax_class(type(model))
        new = cls.from_config({**model.get_config(), "multimax": options})
    elif isinstance(model, Task):
        if model.backbone is None:
            raise ValueError(f"Task {model.name!r} has no backbone to convert.")
        backbone = to_multimax(model.backbone, options)
        cls = multimax_class(type(model))
        config = model.get_config()
        config.update(backbone=backbone, preprocessor=model.preprocessor)
        new = cls.from_config(config)
        # Attention outside the backbone (in the task's own layers) too.
        mha, family, unreachable, _ = find_attention(new)
        left = unreachable + [
            (layer, "is outside the backbone") for layer in mha + family
        ]
        if left:
            raise unreachable_error(left, f"{type(model).__name__} {model.name!r}")
    else:
        raise TypeError(
            "Expected a KerasHub Backbone or Task. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    _carry_lora(model, new)
    copy_weights(model, new)
    # A new task is compiled by its constructor with KerasHub's defaults
    # (optimizer, loss, sampler); `new.compile(...)` changes them.
    return new


def _sublayers_by_path(model) -> dict[str, Any]:
    return {layer.path: layer for layer in model._flatten_layers(include_self=False)}


def _carry_lora(old, new):
    """Enables LoRA on `new` where it is enabled on `old`, with the same rank."""
    new_layers = _sublayers_by_path(new)
    for path, layer in _sublayers_by_path(old).items():
        if not getattr(layer, "lora_enabled", False):
            continue
        twin = new_layers.get(path)
        if twin is None:
            raise ValueError(
                f"`to_multimax` cannot find the LoRA layer {path!r} of "
                f"{old.name!r} in its MultiMax copy. Convert first, then call "
                "`enable_lora` on the converted backbone."
            )
        if not twin.lora_enabled:
            twin.enable_lora(layer.lora_rank, lora_alpha=layer.lora_alpha)
    for variable, twin in _pairs(old, new):
        twin.trainable = variable.trainable
    old_backbone = old.backbone if isinstance(old, Task) else old
    new_backbone = new.backbone if isinstance(new, Task) else new
    if getattr(old_backbone, "_lora_enabled_layers", None):
        # KerasHub indexes LoRA layers among the layers with weights.
        with_weights = [
            lyr
            for lyr in new_backbone._flatten_layers(include_self=False)
            if lyr.weights
        ]
        new_backbone._lora_rank = old_backbone._lora_rank
        new_backbone._lora_enabled_layers = [
            i
            for i, lyr in enumerate(with_weights)
            if getattr(lyr, "lora_enabled", False)
        ]
        for variable in modulator_variables(new_backbone):
            variable.trainable = True


def _pairs(old, new):
    """(old variable, new variable) pairs, by path or else in order.

    The new model's extra variables must be exactly its MultiMax
    ``ranges``/``ts``. Variables are matched by path when both models have
    the same unique paths; families that leave layers unnamed get
    auto-numbered names that differ between two instances (Mixtral's
    experts), and then the variables are matched in creation order, as
    ``set_weights`` does (`copy_weights` checks every shape and dtype).
    """
    extra = {id(v) for v in modulator_variables(new)}
    targets = [v for v in new.weights if id(v) not in extra]
    sources = list(old.weights)
    old_paths = [v.path for v in sources]
    new_paths = [v.path for v in targets]
    if len(set(old_paths)) == len(old_paths) and sorted(old_paths) == sorted(new_paths):
        by_path = {v.path: v for v in targets}
        return [(v, by_path[v.path]) for v in sources]
    if len(sources) != len(targets):
        raise ValueError(
            f"`to_multimax` cannot match the weights of {old.name!r} with its "
            f"MultiMax copy: {len(sources)} weights in the original, "
            f"{len(targets)} (besides ranges/ts) in the copy. Only in the "
            f"original: {sorted(set(old_paths) - set(new_paths))}; only in "
            f"the copy: {sorted(set(new_paths) - set(old_paths))}."
        )
    return list(zip(sources, targets))


def copy_weights(old, new):
    """Copies every weight of `old` into the same path of `new`."""
    for variable, target in _pairs(old, new):
        if (
            tuple(variable.shape) != tuple(target.shape)
            or variable.dtype != target.dtype
        ):
            raise ValueError(
                f"`to_multimax` cannot copy weight {variable.path!r}: it is "
                f"{variable.dtype}{tuple(variable.shape)} in the original and "
                f"{target.dtype}{tuple(target.shape)} in the MultiMax copy."
            )
        target.assign(variable)
