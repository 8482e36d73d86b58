"""The `SegLU` layer (the MultiMax modulator alone)."""

from __future__ import annotations

from typing import Any

import keras

from keras_multimax import ops
from keras_multimax.layers._modulator import DEFAULT_INITIALIZER
from keras_multimax.layers._modulator import ModulatorParameters


@keras.saving.register_keras_serializable(package="keras_multimax")
class SegLU(ModulatorParameters, keras.layers.Layer):
    """The MultiMax modulator σ as a layer, for logits of a `from_logits` loss.

    Formula:

        σ(x) = x + Σ_k t[2k]·relu(r[2k] − x)^(k+1) + t[2k+1]·relu(x − r[2k+1])^(k+1)

    summed over k = 0 … K−1 (K = ``order``), with ``r`` the weight ``ranges``
    and ``t`` the weight ``ts``, both of shape ``(2 * order,)``.

    ``softmax(SegLU()(x))`` is ``MultiMax()(x)``: put `SegLU` last and train
    with e.g. ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``,
    which is numerically better than a probability loss after `MultiMax`.

    Example:

    >>> import numpy as np
    >>> layer = SegLU(ts_initializer="zeros")
    >>> layer(np.array([[-3.0, 0.5, 4.0]])).numpy()  # ts = 0: identity
    array([[-3. ,  0.5,  4. ]], dtype=float32)

    Args:
        order: Integer >= 1, the order K of the modulator (the paper uses 2).
        ranges_initializer: Initializer of ``ranges`` (the thresholds ``b``,
            ``d``). Defaults to a truncated normal with standard deviation 0.02.
        ts_initializer: Initializer of ``ts`` (the slopes ``t_b``, ``t_d``).
            Defaults as ``ranges``; ``"zeros"`` starts as the identity.
        ranges_regularizer: Optional regularizer of ``ranges``.
        ts_regularizer: Optional regularizer of ``ts``.
        ranges_constraint: Optional constraint of ``ranges``.
        ts_constraint: Optional constraint of ``ts``.
        **kwargs: Base layer keyword arguments, such as ``name`` and ``dtype``.

    Call arguments:
        inputs: Floating-point tensor.

    Returns:
        σ(inputs), same shape as ``inputs``.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """

    def __init__(
        self,
        order: int = 2,
        ranges_initializer: Any = DEFAULT_INITIALIZER,
        ts_initializer: Any = DEFAULT_INITIALIZER,
        ranges_regularizer: Any = None,
        ts_regularizer: Any = None,
        ranges_constraint: Any = None,
        ts_constraint: Any = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._init_modulator(
            order,
            ranges_initializer,
            ts_initializer,
            ranges_regularizer,
            ts_regularizer,
            ranges_constraint,
            ts_constraint,
        )
        self.supports_masking = True

    def build(self, input_shape):
        self._build_modulator()

    def call(self, inputs):
        return ops.seglu(inputs, self.ranges, self.ts)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(self._modulator_config())
        return config
