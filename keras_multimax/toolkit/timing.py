"""Wall time of training steps, for the speed columns of the examples' tables.

Part of `keras_multimax.toolkit`: a Keras callback that works on every
backend.
"""

from __future__ import annotations

import time

import keras
import numpy as np

__all__ = ["StepTimer"]


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step (``fit`` batch), for speed comparisons.

    ``step_times`` holds the seconds of each batch; `median` skips the first
    ``warmup`` batches (tracing and compilation).

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> timer = StepTimer(warmup=1)
    >>> _ = model.fit(np.ones((8, 3)), np.ones(8), batch_size=2, verbose=0,
    ...               callbacks=[timer])
    >>> len(timer.step_times), timer.median() > 0
    (4, True)

    Args:
        warmup: Number of first batches left out of `median`.
    """

    def __init__(self, warmup: int = 5):
        super().__init__()
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(
                f"`warmup` must be a non-negative integer. Received: warmup={warmup!r}"
            )
        self.warmup = warmup
        self.step_times: list[float] = []
        self._start = None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step_times.append(time.perf_counter() - self._start)

    def median(self) -> float:
        """Median step time in seconds after the warm-up (all steps if fewer).

        Returns:
            Seconds, or NaN before the first step.
        """
        times = self.step_times[self.warmup :] or self.step_times
        return float(np.median(times)) if times else float("nan")
