"""MultiMax KerasHub models: the backbone mixin and the model-class registry.

A MultiMax backbone is a subclass of a KerasHub backbone class and of
`MultiMaxBackbone`: it builds the original architecture, then puts the twin
of every attention layer in its place (`enable_multimax_in`). Its config adds
``modulator`` and ``per_head`` to the original's, so that ``from_config``,
``.keras`` files and presets rebuild it, in a fresh process too, once its
class is registered with Keras (``import keras_multimax.hub`` registers the
classes of `keras_multimax.hub._families`). A MultiMax task is the original
task class with the MultiMax backbone as its ``backbone_cls``, which is how
KerasHub's ``CausalLM.from_preset(...)`` finds it.
"""

from __future__ import annotations

from typing import Any

import h5py
import keras
from keras_hub.models import Backbone
from keras_hub.models import Task

from keras_multimax._transfer import modulator_variables
from keras_multimax.hub._attention import enable_multimax_in
from keras_multimax.layers.multimax_attention import validate_per_head
from keras_multimax.modulator import Modulator
from keras_multimax.modulator import get as get_modulator

__all__ = ["MultiMaxBackbone", "is_multimax", "multimax_class", "register_model"]

# KerasHub Backbone or Task class -> its MultiMax class.
_MODELS: dict[type, type] = {}


class MultiMaxBackbone:
    """Mixin of the MultiMax backbones: ``modulator``/``per_head`` and the twins.

    ``class MultiMaxXBackbone(MultiMaxBackbone, XBackbone)`` takes the
    arguments of ``XBackbone`` plus the two below, builds ``XBackbone``, and
    puts the registered MultiMax twin of every attention layer in its place.

    Args:
        modulator: The configuration of every attention layer's modulator
            (`keras_multimax.Modulator`, a name or its config; default
            ``ts = 0``: the model computes what ``XBackbone`` computes).
        per_head: Boolean, one modulator per query head.
        *args: The original backbone's positional arguments.
        **kwargs: The original backbone's keyword arguments.
    """

    def __init__(self, *args, modulator: Any = None, per_head: bool = False, **kwargs):
        modulator = get_modulator(modulator)
        validate_per_head(per_head)
        super().__init__(*args, **kwargs)
        enable_multimax_in(self, modulator, per_head)
        self._modulator = modulator
        self._per_head = per_head

    @property
    def modulator(self) -> Modulator:
        """The configuration of every attention layer's modulator."""
        return self._modulator

    @property
    def per_head(self) -> bool:
        """Whether each query head has its own modulator."""
        return self._per_head

    def get_config(self):
        config = super().get_config()
        config["modulator"] = keras.saving.serialize_keras_object(self.modulator)
        config["per_head"] = self.per_head
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # keras_multimax 0.2.0 wrote one flat dict: per_head and the
        # modulator's arguments.
        legacy = config.pop("multimax", None)
        if legacy is not None:
            legacy = dict(legacy)
            config["per_head"] = legacy.pop("per_head", False)
            config["modulator"] = Modulator(**legacy)
        return super().from_config(config)

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


def register_model(kerashub_class: type, multimax_class: type) -> None:
    """Registers the MultiMax class of a KerasHub Backbone or Task class.

    `keras_multimax.convert.to_multimax` converts a model of exactly
    ``kerashub_class`` into a ``multimax_class``. keras_multimax registers
    the classes of the KerasHub 0.32 families it supports
    (`keras_multimax.hub._families`); this hook adds another family. Register
    ``multimax_class`` with Keras too
    (`keras.saving.register_keras_serializable`), so that saved models and
    presets of it load.

    Args:
        kerashub_class: A subclass of ``keras_hub.models.Backbone`` or
            ``keras_hub.models.Task``.
        multimax_class: For a backbone, a subclass of `MultiMaxBackbone` and
            ``kerashub_class``; for a task, a subclass of ``kerashub_class``
            whose ``backbone_cls`` is the registered MultiMax class of
            ``kerashub_class.backbone_cls``.
    """
    if not (
        isinstance(kerashub_class, type)
        and issubclass(kerashub_class, (Backbone, Task))
    ):
        raise TypeError(
            "`kerashub_class` must be a KerasHub Backbone or Task class. "
            f"Received: kerashub_class={kerashub_class!r}"
        )
    if not (
        isinstance(multimax_class, type) and issubclass(multimax_class, kerashub_class)
    ):
        raise TypeError(
            f"`multimax_class` must subclass `kerashub_class` "
            f"({kerashub_class.__name__}). Received: multimax_class={multimax_class!r}"
        )
    if issubclass(kerashub_class, Backbone) and not issubclass(
        multimax_class, MultiMaxBackbone
    ):
        raise TypeError(
            "The MultiMax class of a backbone must subclass "
            "`keras_multimax.hub.MultiMaxBackbone`. "
            f"Received: multimax_class={multimax_class!r}"
        )
    if issubclass(kerashub_class, Task) and (
        multimax_class.backbone_cls is not _MODELS.get(kerashub_class.backbone_cls)
    ):
        raise TypeError(
            f"The MultiMax class of the task {kerashub_class.__name__} must "
            "have the registered MultiMax class of "
            f"{getattr(kerashub_class.backbone_cls, '__name__', None)} as its "
            f"`backbone_cls`. Received: {multimax_class.__name__}.backbone_cls="
            f"{multimax_class.backbone_cls!r}"
        )
    _MODELS[kerashub_class] = multimax_class


def is_multimax(model) -> bool:
    """Whether `model` is an instance of a registered MultiMax KerasHub class."""
    return type(model) in _MODELS.values()


def multimax_class(cls: type) -> type:
    """The registered MultiMax class of a KerasHub Backbone or Task class.

    Example:

    >>> import keras_hub
    >>> cls = multimax_class(keras_hub.models.GPT2Backbone)
    >>> cls.__name__, issubclass(cls, keras_hub.models.GPT2Backbone)
    ('MultiMaxGPT2Backbone', True)

    Args:
        cls: A KerasHub Backbone or Task class (or a MultiMax one, returned
            as it is).

    Returns:
        Its MultiMax class. A class with none raises a ``ValueError`` naming
        `register_model`.
    """
    if cls in _MODELS.values():
        return cls
    if not (isinstance(cls, type) and issubclass(cls, (Backbone, Task))):
        raise TypeError(
            "`multimax_class` takes a KerasHub Backbone or Task class. "
            f"Received: cls={cls!r}"
        )
    found = _MODELS.get(cls)
    if found is None:
        supported = sorted(c.__name__ for c in _MODELS if issubclass(c, Backbone))
        raise ValueError(
            f"{cls.__module__}.{cls.__qualname__} has no MultiMax class. "
            f"keras_multimax converts the KerasHub families {supported}; for "
            "another, write MultiMax twins of its attention classes "
            "(`keras_multimax.hub.register_attention`) and a MultiMax model "
            "class (`keras_multimax.hub.register_model`)."
        )
    return found
