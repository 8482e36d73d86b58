"""The `MultiMax` layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from keras_multimax import ops
from keras_multimax.layers._modulator import ModulatorParameters
from keras_multimax.modulator import pop_legacy_arguments


@keras.saving.register_keras_serializable(package="keras_multimax")
class MultiMax(ModulatorParameters, keras.layers.Layer):
    """MultiMax activation layer: SoftMax of a learned piece-wise modulation.

    Formula:

        σ(x) = x + Σ_k t[2k]·relu(r[2k] − x)^(k+1) + t[2k+1]·relu(x − r[2k+1])^(k+1)
        MultiMax(x) = softmax(σ(x))

    summed over k = 0 … K−1 (K = ``modulator.order``). ``r`` is the weight
    ``ranges`` (the paper's thresholds ``b``, ``d`` of each order) and ``t``
    the weight ``ts`` (their slopes ``t_b``, ``t_d``), both of shape
    ``(2 * order,)``. With ``ts = 0`` (where the default modulator starts)
    the layer is exactly `keras.layers.Softmax`.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> layer = MultiMax()
    >>> y = layer(np.array([[1.0, 2.0, 1.0]]))
    >>> np.round(keras.ops.convert_to_numpy(y), 4)
    array([[0.2119, 0.5761, 0.2119]], dtype=float32)
    >>> from keras_multimax import Modulator
    >>> MultiMax(modulator=Modulator(order=3)).order
    3

    Args:
        axis: Integer or tuple of integers, the axes normalised over.
        modulator: The modulator's configuration: a
            `keras_multimax.Modulator`, a name (``"softmax"``, the default:
            ``ts = 0``, exactly SoftMax at the start; ``"paper"``: the
            official initialisation) or its config dict. Its order K, the
            initializers, regularizers and constraints of ``ranges`` and
            ``ts`` are set there.
        **kwargs: Base layer keyword arguments, such as ``name`` and ``dtype``.

    Call arguments:
        inputs: Floating-point scores (logits).
        mask: Optional boolean mask broadcastable to ``inputs`` (True keeps an
            entry). Masked entries get exactly zero probability, a fully
            masked slice gives zeros. A Keras mask is used when no explicit
            ``mask`` is given. As in `keras.layers.Softmax`, a mask of lower
            rank broadcasts from the *right*: a ``(B, T)`` timestep mask fits
            ``(B, T)`` scores, but for ``(B, T, C)`` inputs expand it to
            ``(B, T, 1)`` first (or use `keras_multimax.convert.
            ActivationMultiMax`, which ignores Keras masks like
            ``Dense(activation="softmax")``).

    Returns:
        Probabilities with the shape of ``inputs``.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        modulator: Any = None,
        **kwargs,
    ):
        modulator = pop_legacy_arguments(kwargs, modulator, type(self).__name__)
        super().__init__(**kwargs)
        # Type check (range checked in build); NumPy integers become ints.
        axes = ops._normalize_axis(axis, None)
        self.axis = axes if isinstance(axis, (tuple, list)) else axes[0]
        self.modulator = modulator
        self.supports_masking = True

    def build(self, input_shape):
        ops._normalize_axis(self.axis, len(input_shape))
        self._build_modulator()

    def call(self, inputs, mask=None):
        return ops.multimax(inputs, self.ranges, self.ts, axis=self.axis, mask=mask)

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["axis"] = self.axis
        return config
