"""Weights and configuration shared by every layer that owns a modulator."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

DEFAULT_INITIALIZER = {
    "class_name": "TruncatedNormal",
    "config": {"mean": 0.0, "stddev": 0.02, "seed": None},
}


def validate_order(order: Any) -> int:
    if (
        isinstance(order, (bool, np.bool_))
        or not isinstance(order, (int, np.integer))
        or order < 1
    ):
        raise ValueError(f"`order` must be an integer >= 1. Received: order={order!r}")
    return int(order)


class ModulatorParameters:
    """Mixin for a `keras.layers.Layer` with MultiMax `ranges` and `ts` weights.

    The subclass calls `_init_modulator(...)` in `__init__`, `_build_modulator(
    shape)` in `build`, and merges `_modulator_config()` into `get_config`.
    The weights are created with `autocast=False`, so they stay float32 under
    `mixed_float16`/`mixed_bfloat16` policies (the ops compute in float32).
    """

    def _init_modulator(
        self,
        order,
        ranges_initializer,
        ts_initializer,
        ranges_regularizer,
        ts_regularizer,
        ranges_constraint,
        ts_constraint,
    ):
        self.order = validate_order(order)
        self.ranges_initializer = keras.initializers.get(ranges_initializer)
        self.ts_initializer = keras.initializers.get(ts_initializer)
        self.ranges_regularizer = keras.regularizers.get(ranges_regularizer)
        self.ts_regularizer = keras.regularizers.get(ts_regularizer)
        self.ranges_constraint = keras.constraints.get(ranges_constraint)
        self.ts_constraint = keras.constraints.get(ts_constraint)

    def _build_modulator(self, leading_shape: tuple[int, ...] = ()):
        shape = tuple(leading_shape) + (2 * self.order,)
        self.ranges = self.add_weight(
            name="ranges",
            shape=shape,
            initializer=self.ranges_initializer,
            regularizer=self.ranges_regularizer,
            constraint=self.ranges_constraint,
            dtype="float32",
            autocast=False,
        )
        self.ts = self.add_weight(
            name="ts",
            shape=shape,
            initializer=self.ts_initializer,
            regularizer=self.ts_regularizer,
            constraint=self.ts_constraint,
            dtype="float32",
            autocast=False,
        )

    def _modulator_config(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "ranges_initializer": keras.initializers.serialize(self.ranges_initializer),
            "ts_initializer": keras.initializers.serialize(self.ts_initializer),
            "ranges_regularizer": keras.regularizers.serialize(self.ranges_regularizer),
            "ts_regularizer": keras.regularizers.serialize(self.ts_regularizer),
            "ranges_constraint": keras.constraints.serialize(self.ranges_constraint),
            "ts_constraint": keras.constraints.serialize(self.ts_constraint),
        }
