"""Measuring what MultiMax does: attention sparsity and multi-modality, a logger.

- `attention_sparsity` and `attention_multimodality`: the paper's metrics
  (Definitions 3.2 and 3.3), per attention row, averaged;
- `attention_statistics`: both metrics for every attention layer of a model
  built by `keras_multimax.models` (which expose ``attention_maps``);
- `modulator_layers`: every layer of a model with ``ranges`` and ``ts``;
- `ModulatorLogger`: a Keras callback that records every layer's ``ranges``
  and ``ts`` and can write them as TensorBoard scalars.

All of it works on every Keras backend; TensorFlow is imported only by a
`ModulatorLogger` that writes TensorBoard files. The plots and `StepTimer`
moved to `keras_multimax.toolkit` (`toolkit.plots`, `toolkit.timing`); their
old names here still work until 0.4.0, with a `DeprecationWarning`.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

import keras
import numpy as np

__all__ = [
    "ModulatorLogger",
    "attention_multimodality",
    "attention_sparsity",
    "attention_statistics",
    "modulator_layers",
]

# Names that moved to the toolkit in 0.3.0: name -> module that holds it now.
_MOVED = {
    "StepTimer": "keras_multimax.toolkit.timing",
    "plot_attention_maps": "keras_multimax.toolkit.plots",
    "plot_modulators": "keras_multimax.toolkit.plots",
    "plot_simplex": "keras_multimax.toolkit.plots",
}


def __getattr__(name: str):
    """The moved names, with a `DeprecationWarning` (removed in 0.4.0)."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"`keras_multimax.analysis.{name}` moved to `{_MOVED[name]}.{name}`; "
        "the old name will be removed in 0.4.0.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(_MOVED[name]), name)


DEFAULT_RELATIVE_EPSILON = 0.1


def _numpy(x) -> np.ndarray:
    """A tensor of any Keras backend, or an array-like, as a NumPy array."""
    return keras.ops.convert_to_numpy(x) if keras.ops.is_tensor(x) else np.asarray(x)


def _rows(probs, mask) -> tuple[np.ndarray, np.ndarray]:
    """Returns probabilities and a boolean validity mask, both (rows, L)."""
    probs = _numpy(probs).astype(np.float64)
    if probs.ndim < 1 or probs.shape[-1] < 1:
        raise ValueError(
            "`probs` must have the entries of each distribution on its last "
            f"axis. Received: probs.shape={probs.shape}"
        )
    if mask is None:
        mask = np.ones(probs.shape, dtype=bool)
    else:
        mask = _numpy(mask)
        try:
            mask = np.broadcast_to(mask.astype(bool), probs.shape)
        except ValueError:
            raise ValueError(
                "`mask` must be broadcastable to `probs`. Received: "
                f"probs.shape={probs.shape}, mask.shape={mask.shape}"
            ) from None
    length = probs.shape[-1]
    probs = probs.reshape(-1, length)
    mask = mask.reshape(-1, length)
    keep = mask.any(axis=-1)  # Fully masked rows (e.g. padded queries) are dropped.
    return probs[keep], mask[keep]


def _epsilon(epsilon, counts: np.ndarray) -> np.ndarray:
    if epsilon is None:
        return DEFAULT_RELATIVE_EPSILON / counts
    if not np.isscalar(epsilon) or not epsilon > 0:
        raise ValueError(f"`epsilon` must be a positive number. Received: {epsilon=}")
    return np.full(counts.shape, float(epsilon))


def attention_sparsity(
    probs,
    mask=None,
    epsilon: float | None = None,
    scale: float | None = None,
) -> float:
    """Sparsity of attention distributions (the paper's Definition 3.2).

    Formula:

    For one distribution φ over its ``L`` valid entries,

        S(φ) = (1/L) · Σ_{l: φ_l < ε} exp((s − φ_l)/s − 1)
             = (1/L) · Σ_{l: φ_l < ε} exp(−φ_l/s)

    averaged over all rows (every query of every head and example). An exact
    zero counts 1, an entry just below ε counts ``exp(-ε/s)``, entries at or
    above ε count 0, so ``S ∈ [0, 1]`` is the (soft) fraction of negligible
    entries; SoftMax never gives exact zeros but can have S > 0.

    Choices (the definition, quoted with inputs ``x_l`` in the condition,
    leaves them open): the condition is on the **probability** φ_l (a
    threshold on unnormalised scores would depend on their offset); ε
    defaults to ``0.1 / L``, a tenth of the uniform share, so rows of
    different lengths (e.g. causal rows) are comparable; the scale ``s``
    defaults to ε, so counted entries weigh between ``1/e`` and 1. Masked
    entries are not counted and do not count in L; fully masked rows are
    skipped.

    Example:

    >>> phi = [0.5, 0.3, 0.2, 0.0]  # L = 4, ε = 0.025: only the zero counts
    >>> attention_sparsity(phi)
    0.25
    >>> round(attention_sparsity([0.5, 0.49, 0.01], epsilon=0.02, scale=0.01), 4)
    0.1226

    Args:
        probs: Probabilities, entries of each distribution on the last axis,
            e.g. attention scores of shape ``(batch, heads, queries, keys)``.
        mask: Optional boolean array broadcastable to `probs`; False marks
            entries that are not part of the distribution (padding, future
            positions of a causal mask).
        epsilon: Absolute threshold; None for ``0.1 / L`` per row.
        scale: The scale ``s``; None for ``s = ε``.

    Returns:
        The mean sparsity over rows, a float in ``[0, 1]``.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024, Definition 3.2.
    """
    phi, valid = _rows(probs, mask)
    if not len(phi):
        return float("nan")
    counts = valid.sum(axis=-1)
    eps = _epsilon(epsilon, counts)[:, None]
    if scale is None:
        s = eps
    elif not np.isscalar(scale) or not scale > 0:
        raise ValueError(f"`scale` must be a positive number. Received: {scale=}")
    else:
        s = np.full_like(eps, float(scale))
    terms = np.where(valid & (phi < eps), np.exp((s - phi) / s - 1.0), 0.0)
    return float(np.mean(terms.sum(axis=-1) / counts))


def attention_multimodality(probs, mask=None, epsilon: float | None = None) -> float:
    """Multi-modality of attention distributions (the paper's Definition 3.3).

    Formula:

    For one distribution φ over its ``N`` valid entries with maximum φ_max,

        M(φ) = 1 − (1/N) · Σ_{n: ε < φ_n < φ_max} (φ_max − φ_n)

    averaged over all rows. Entries that are neither negligible (≤ ε) nor
    tied with the maximum pull M down by their gap to the maximum: M is 1
    when every non-negligible entry is a peak of the same height (several
    equal modes, and also a single mode or a uniform row), and lower the
    more mass sits in intermediate entries. Read it together with
    `attention_sparsity`: a one-hot row has M = 1 and is sparse, a
    multi-modal row has M = 1 with several peaks.

    Choices: the conditions are on probabilities (the quoted definition writes
    ``ε < x_n < x_max`` with inputs ``x``; for a monotone modulator the order
    is the same, but the threshold ε only has a meaning for probabilities);
    ε defaults to ``0.1 / N`` as in `attention_sparsity`; ties with the
    maximum (exact floating-point equality) count as peaks.

    Example:

    >>> phi = [0.5, 0.3, 0.2, 0.0]  # ε = 0.025: gaps 0.2 + 0.3 over N = 4
    >>> attention_multimodality(phi)
    0.875
    >>> attention_multimodality([0.5, 0.5, 0.0, 0.0])  # two equal modes
    1.0

    Args:
        probs: Probabilities, entries of each distribution on the last axis.
        mask: Optional boolean array broadcastable to `probs` (False: not an
            entry of the distribution).
        epsilon: Absolute threshold; None for ``0.1 / N`` per row.

    Returns:
        The mean multi-modality over rows, a float in ``[0, 1]``.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024, Definition 3.3.
    """
    phi, valid = _rows(probs, mask)
    if not len(phi):
        return float("nan")
    counts = valid.sum(axis=-1)
    eps = _epsilon(epsilon, counts)[:, None]
    phi_max = np.max(np.where(valid, phi, -np.inf), axis=-1, keepdims=True)
    between = valid & (phi > eps) & (phi < phi_max)
    gaps = np.where(between, phi_max - phi, 0.0).sum(axis=-1)
    return float(np.mean(1.0 - gaps / counts))


def attention_statistics(
    model: keras.Model,
    inputs,
    epsilon: float | None = None,
    scale: float | None = None,
) -> list[dict[str, Any]]:
    """Sparsity and multi-modality of every attention layer of a model.

    Example:

    >>> from keras_multimax import models
    >>> model = models.ViTClassifier((8, 8, 1), 10, patch_size=4, num_layers=1,
    ...                              hidden_dim=8, num_heads=2, mlp_dim=8)
    >>> stats = attention_statistics(model, np.zeros((2, 8, 8, 1), "float32"))
    >>> [sorted(s) for s in stats]
    [['layer', 'multimodality', 'sparsity']]

    Args:
        model: A model with an ``attention_maps(inputs)`` method returning
            ``{layer_name: (probs, mask)}``, as the `keras_multimax.models`
            builders do.
        inputs: A batch of model inputs.
        epsilon: See `attention_sparsity`.
        scale: See `attention_sparsity`.

    Returns:
        One dict per attention layer: ``layer``, ``sparsity``,
        ``multimodality``.
    """
    if not hasattr(model, "attention_maps"):
        raise TypeError(
            "`model` must provide `attention_maps(inputs)` (the models of "
            "keras_multimax.models do). Received: "
            f"model={type(model).__name__}"
        )
    stats = []
    for name, (probs, mask) in model.attention_maps(inputs).items():
        stats.append(
            {
                "layer": name,
                "sparsity": attention_sparsity(probs, mask, epsilon, scale),
                "multimodality": attention_multimodality(probs, mask, epsilon),
            }
        )
    return stats


# ---------------------------------------------------------------------------
# Modulator parameters
# ---------------------------------------------------------------------------


def modulator_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer of `model` (nested ones included) with ``ranges``/``ts``.

    Example:

    >>> from keras_multimax import layers
    >>> model = keras.Sequential([keras.Input((4,)), layers.SegLU(name="head")])
    >>> [layer.name for layer in modulator_layers(model)]
    ['head']
    """
    found = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        ranges = getattr(layer, "ranges", None)
        ts = getattr(layer, "ts", None)
        if isinstance(ranges, keras.Variable) and isinstance(ts, keras.Variable):
            found.append(layer)
    return found


class _ScalarWriter:
    """TensorBoard scalars written with TensorFlow alone, imported here.

    `tf.summary.scalar` needs the `tensorboard` package installed; this writes
    the same events (float32 tensor summaries tagged for TensorBoard's
    ``scalars`` plugin) with the core `tf.summary.write`.
    """

    def __init__(self, log_dir: str):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        self._metadata = summary_pb2.SummaryMetadata()
        self._metadata.plugin_data.plugin_name = "scalars"
        self._writer = tf.summary.create_file_writer(log_dir)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        tf = self._tf
        with self._writer.as_default(step=step):
            for tag, value in scalars.items():
                tf.summary.write(
                    tag,
                    tf.constant(value, dtype=tf.float32),
                    step=step,
                    metadata=self._metadata,
                )

    def flush(self) -> None:
        self._writer.flush()


class ModulatorLogger(keras.callbacks.Callback):
    """Records every MultiMax layer's ``ranges`` and ``ts`` during training.

    Values are kept in ``history`` (``{layer_path: {"ranges": [...], "ts":
    [...]}}``, one array per log step, step numbers in ``steps``) and, with
    ``log_dir``, written as TensorBoard scalars named
    ``modulator/<layer_path>/ranges_<i>`` (``ranges_h<head>_<i>`` for
    per-head parameters), so ``tensorboard --logdir <log_dir>`` shows how the
    thresholds and slopes move.

    Works on every Keras backend. Writing TensorBoard files needs TensorFlow
    (its summary writer): it is imported when training starts, and only if
    ``log_dir`` is given; without ``log_dir`` TensorFlow is not used.

    Example:

    >>> from keras_multimax import layers
    >>> model = keras.Sequential([keras.Input((3,)), layers.SegLU(name="s")],
    ...                          name="net")
    >>> model.compile("sgd", "mse")
    >>> logger = ModulatorLogger()
    >>> _ = model.fit(np.ones((4, 3)), np.ones((4, 3)), epochs=2, verbose=0,
    ...               callbacks=[logger])
    >>> logger.steps, logger.history["net/s"]["ts"][0].shape
    ([0, 1, 2], (4,))

    Args:
        log_dir: Optional TensorBoard log directory (a ``modulator``
            sub-directory is written); needs TensorFlow. None keeps the
            values in ``history`` only.
        update_freq: ``"epoch"`` or an integer: log every that many batches.
    """

    def __init__(self, log_dir: str | None = None, update_freq: str | int = "epoch"):
        super().__init__()
        if update_freq != "epoch" and (
            isinstance(update_freq, bool)
            or not isinstance(update_freq, int)
            or update_freq < 1
        ):
            raise ValueError(
                "`update_freq` must be 'epoch' or a positive integer. "
                f"Received: update_freq={update_freq!r}"
            )
        self.log_dir = log_dir
        self.update_freq = update_freq
        self.history: dict[str, dict[str, list[np.ndarray]]] = {}
        self.steps: list[int] = []
        self._writer = None
        self._batches = 0

    def on_train_begin(self, logs=None):
        if self.log_dir is not None and self._writer is None:
            self._writer = _ScalarWriter(os.path.join(self.log_dir, "modulator"))
        if not self.steps:
            self._record(0)

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self.update_freq != "epoch" and self._batches % self.update_freq == 0:
            self._record(self._batches)

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            self._record(epoch + 1)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def _record(self, step: int):
        self.steps.append(step)
        scalars = {}
        for layer in modulator_layers(self.model):
            entry = self.history.setdefault(layer.path, {"ranges": [], "ts": []})
            for name in ("ranges", "ts"):
                value = np.array(keras.ops.convert_to_numpy(getattr(layer, name)))
                entry[name].append(value)
                for index in np.ndindex(value.shape):
                    label = "_".join([f"h{i}" for i in index[:-1]] + [str(index[-1])])
                    scalars[f"modulator/{layer.path}/{name}_{label}"] = float(
                        value[index]
                    )
        if self._writer is not None:
            self._writer.write(step, scalars)
