"""`Modulator`: the configuration of a MultiMax modulator σ, in one object.

Every entry point that creates MultiMax parameters takes one: the layers
(``modulator=``), `keras_multimax.convert.to_multimax`, the KerasHub
conversion and the model builders. It is carried the way Keras carries a
`keras.DTypePolicy`: one object (or a name, or its config), validated once,
serialised once in each layer's ``get_config``.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np

__all__ = ["Modulator", "get", "MODULATOR_ARGUMENTS"]

# The official code's initialisation: a truncated normal, standard deviation 0.02.
_OFFICIAL_INITIALIZER = {
    "class_name": "TruncatedNormal",
    "config": {"mean": 0.0, "stddev": 0.02, "seed": None},
}

MODULATOR_ARGUMENTS = (
    "order",
    "ranges_initializer",
    "ts_initializer",
    "ranges_regularizer",
    "ts_regularizer",
    "ranges_constraint",
    "ts_constraint",
)
"""The arguments of `Modulator`, in order: the keys a dict ``modulator=`` may have.

0.2.0 took them one by one on every layer and converter; passing them that way
still works until 0.4.0, with a ``DeprecationWarning``.
"""


def _order(order: Any) -> int:
    if (
        isinstance(order, (bool, np.bool_))
        or not isinstance(order, (int, np.integer))
        or order < 1
    ):
        raise ValueError(f"`order` must be an integer >= 1. Received: order={order!r}")
    return int(order)


@keras.saving.register_keras_serializable(package="keras_multimax")
class Modulator:
    """How a MultiMax modulator σ is parameterised and initialised.

    Formula:

        σ(x) = x + Σ_{k<K} t[2k]·relu(r[2k] − x)^(k+1) + t[2k+1]·relu(x − r[2k+1])^(k+1)

    ``K`` is ``order``; ``r`` is the weight ``ranges`` (the paper's
    thresholds ``b``, ``d`` of each order) and ``t`` the weight ``ts``
    (their slopes ``t_b``, ``t_d``), each of length ``2K`` (per head for
    ``per_head`` attention).

    The default starts every modulator at ``ts = 0``, where MultiMax is
    exactly SoftMax: a converted pretrained model computes what it computed
    before, and a new layer starts as its SoftMax twin and learns ``ts``
    (its gradient is not zero there). ``get("paper")`` gives the official
    code's initialisation instead (``ts`` truncated normal, standard
    deviation 0.02), the one the paper trained with.

    Example:

    >>> modulator = Modulator(order=2)
    >>> modulator.order, type(modulator.ts_initializer).__name__
    (2, 'Zeros')
    >>> Modulator.from_config(modulator.get_config()) == modulator
    True
    >>> type(get("paper").ts_initializer).__name__
    'TruncatedNormal'

    Args:
        order: Integer >= 1, the order K (the paper uses 2).
        ranges_initializer: Initializer of ``ranges``. Defaults to the
            official code's truncated normal (standard deviation 0.02).
        ts_initializer: Initializer of ``ts``. Defaults to zeros (exactly
            SoftMax at the start).
        ranges_regularizer: Optional regularizer of ``ranges``.
        ts_regularizer: Optional regularizer of ``ts``.
        ranges_constraint: Optional constraint of ``ranges``.
        ts_constraint: Optional constraint of ``ts``.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """

    def __init__(
        self,
        order: int = 2,
        ranges_initializer: Any = _OFFICIAL_INITIALIZER,
        ts_initializer: Any = "zeros",
        ranges_regularizer: Any = None,
        ts_regularizer: Any = None,
        ranges_constraint: Any = None,
        ts_constraint: Any = None,
    ):
        self.order = _order(order)
        self.ranges_initializer = keras.initializers.get(ranges_initializer)
        self.ts_initializer = keras.initializers.get(ts_initializer)
        self.ranges_regularizer = keras.regularizers.get(ranges_regularizer)
        self.ts_regularizer = keras.regularizers.get(ts_regularizer)
        self.ranges_constraint = keras.constraints.get(ranges_constraint)
        self.ts_constraint = keras.constraints.get(ts_constraint)

    def add_weights(self, layer: keras.layers.Layer, leading_shape: tuple = ()):
        """Creates ``ranges`` and ``ts`` on ``layer``, shape ``leading_shape + (2K,)``.

        The weights are float32 with ``autocast=False``: they stay float32
        under ``mixed_float16``/``mixed_bfloat16`` (the ops compute in
        float32). Returns ``(ranges, ts)``.
        """
        shape = tuple(leading_shape) + (2 * self.order,)
        weights = []
        for name in ("ranges", "ts"):
            weights.append(
                layer.add_weight(
                    name=name,
                    shape=shape,
                    initializer=getattr(self, f"{name}_initializer"),
                    regularizer=getattr(self, f"{name}_regularizer"),
                    constraint=getattr(self, f"{name}_constraint"),
                    dtype="float32",
                    autocast=False,
                )
            )
        return tuple(weights)

    def get_config(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "ranges_initializer": keras.initializers.serialize(self.ranges_initializer),
            "ts_initializer": keras.initializers.serialize(self.ts_initializer),
            "ranges_regularizer": keras.regularizers.serialize(self.ranges_regularizer),
            "ts_regularizer": keras.regularizers.serialize(self.ts_regularizer),
            "ranges_constraint": keras.constraints.serialize(self.ranges_constraint),
            "ts_constraint": keras.constraints.serialize(self.ts_constraint),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Modulator:
        return cls(**config)

    def __eq__(self, other) -> bool:
        return isinstance(other, Modulator) and other.get_config() == self.get_config()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        names = {
            name: type(getattr(self, name)).__name__
            for name in MODULATOR_ARGUMENTS[1:]
            if getattr(self, name) is not None
        }
        parts = ", ".join(f"{k}={v}" for k, v in names.items())
        return f"<Modulator order={self.order}, {parts}>"


# Named modulators, as Keras names dtype policies ("mixed_float16").
_NAMED = {
    "softmax": {},
    "paper": {"ts_initializer": _OFFICIAL_INITIALIZER},
}


def get(identifier: Any = None) -> Modulator:
    """Retrieves a `Modulator`, as `keras.initializers.get` retrieves an initializer.

    Args:
        identifier: ``None`` (the default `Modulator()`: ``ts = 0``, exactly
            SoftMax at the start), a name (``"softmax"``: the default;
            ``"paper"``: the official initialisation, ``ts`` truncated
            normal), a config dict (``Modulator.get_config()`` or its
            serialised form), or a `Modulator`.

    Returns:
        A `Modulator`.

    Example:

    >>> get(None) == get("softmax") == Modulator()
    True
    >>> get({"order": 3}).order
    3
    """
    if identifier is None:
        return Modulator()
    if isinstance(identifier, Modulator):
        return identifier
    if isinstance(identifier, str):
        if identifier not in _NAMED:
            raise ValueError(
                f"Unknown modulator name. Expected one of {sorted(_NAMED)}, a "
                f"dict or a `Modulator`. Received: modulator={identifier!r}"
            )
        return Modulator(**_NAMED[identifier])
    if isinstance(identifier, dict):
        if "class_name" in identifier:
            modulator = keras.saving.deserialize_keras_object(identifier)
            if not isinstance(modulator, Modulator):
                raise TypeError(
                    "`modulator` must describe a `Modulator`. "
                    f"Received: modulator={identifier!r}"
                )
            return modulator
        unknown = sorted(set(identifier) - set(MODULATOR_ARGUMENTS))
        if unknown:
            raise ValueError(
                f"Unknown modulator arguments {unknown}. Expected some of "
                f"{list(MODULATOR_ARGUMENTS)}. Received: modulator={identifier!r}"
            )
        return Modulator(**identifier)
    raise TypeError(
        "`modulator` must be None, a name, a dict or a `Modulator`. "
        f"Received: modulator={identifier!r}"
    )


def pop_legacy_arguments(kwargs: dict, modulator: Any, owner: str) -> Modulator:
    """The `Modulator` of a call that may still pass 0.2.0's separate arguments.

    Removes ``order``, ``ranges_initializer``... from ``kwargs``. If any was
    given, warns (`DeprecationWarning`, removal in 0.4.0) and builds the
    modulator from them; giving both them and ``modulator`` is an error.
    """
    legacy = {name: kwargs.pop(name) for name in MODULATOR_ARGUMENTS if name in kwargs}
    if not legacy:
        return get(modulator)
    if modulator is not None:
        raise ValueError(
            f"`{owner}` takes the modulator's configuration as `modulator=` or "
            f"(deprecated) as separate arguments, not both. Received: "
            f"modulator={modulator!r} and {sorted(legacy)}"
        )
    warnings.warn(
        f"Passing {sorted(legacy)} to `{owner}` is deprecated and will be "
        "removed in 0.4.0: pass `modulator=keras_multimax.Modulator("
        + ", ".join(f"{k}=..." for k in legacy)
        + ")` instead.",
        DeprecationWarning,
        stacklevel=3,
    )
    return Modulator(**legacy)


def from_legacy_config(config: dict) -> dict:
    """A layer config of 0.2.0 (the modulator's arguments at the top level)
    turned into today's (one ``modulator`` entry); other configs unchanged."""
    legacy = {name: config.pop(name) for name in MODULATOR_ARGUMENTS if name in config}
    if legacy and "modulator" not in config:
        config["modulator"] = Modulator(**legacy).get_config()
    return config
