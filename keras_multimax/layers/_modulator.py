"""What every layer that owns a modulator shares: its weights and its config."""

from __future__ import annotations

import keras

from keras_multimax.modulator import from_legacy_config


class ModulatorParameters:
    """Mixin for a `keras.layers.Layer` with MultiMax `ranges` and `ts` weights.

    The subclass sets ``self.modulator`` (a `keras_multimax.Modulator`) in
    ``__init__`` and calls `_build_modulator(shape)` in ``build``. The mixin
    adds ``modulator`` to ``get_config`` and reads configs written by 0.2.0,
    which held the modulator's arguments one by one.
    """

    @property
    def order(self) -> int:
        """The order K of the modulator."""
        return self.modulator.order

    def _build_modulator(self, leading_shape: tuple[int, ...] = ()):
        self.ranges, self.ts = self.modulator.add_weights(self, leading_shape)

    def get_config(self):
        config = super().get_config()
        config["modulator"] = keras.saving.serialize_keras_object(self.modulator)
        return config

    @classmethod
    def from_config(cls, config):
        return super().from_config(from_legacy_config(dict(config)))
