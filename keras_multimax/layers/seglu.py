"""The `SegLU` layer (the MultiMax modulator alone)."""

from __future__ import annotations

from typing import Any

import keras

from keras_multimax import ops
from keras_multimax.layers._modulator import ModulatorParameters
from keras_multimax.modulator import pop_legacy_arguments


@keras.saving.register_keras_serializable(package="keras_multimax")
class SegLU(ModulatorParameters, keras.layers.Layer):
    """The MultiMax modulator σ as a layer, for logits of a `from_logits` loss.

    Formula:

        σ(x) = x + Σ_k t[2k]·relu(r[2k] − x)^(k+1) + t[2k+1]·relu(x − r[2k+1])^(k+1)

    summed over k = 0 … K−1 (K = ``modulator.order``), with ``r`` the weight
    ``ranges`` and ``t`` the weight ``ts``, both of shape ``(2 * order,)``.

    ``softmax(SegLU()(x))`` is ``MultiMax()(x)``: put `SegLU` last and train
    with e.g. ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``,
    which is numerically better than a probability loss after `MultiMax`.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> layer = SegLU()  # starts at ts = 0: the identity
    >>> keras.ops.convert_to_numpy(layer(np.array([[-3.0, 0.5, 4.0]])))
    array([[-3. ,  0.5,  4. ]], dtype=float32)

    Args:
        modulator: The modulator's configuration: a
            `keras_multimax.Modulator`, a name (``"softmax"``, the default:
            ``ts = 0``, the identity at the start; ``"paper"``: the
            official initialisation) or its config dict. Its order K, the
            initializers, regularizers and constraints of ``ranges`` and
            ``ts`` are set there.
        **kwargs: Base layer keyword arguments, such as ``name`` and ``dtype``.

    Call arguments:
        inputs: Floating-point tensor.

    Returns:
        σ(inputs), same shape as ``inputs``.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """

    def __init__(self, modulator: Any = None, **kwargs):
        modulator = pop_legacy_arguments(kwargs, modulator, type(self).__name__)
        super().__init__(**kwargs)
        self.modulator = modulator
        self.supports_masking = True

    def build(self, input_shape):
        self._build_modulator()

    def call(self, inputs):
        return ops.seglu(inputs, self.ranges, self.ts)

    def compute_output_shape(self, input_shape):
        return input_shape
