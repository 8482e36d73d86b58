"""Measuring what MultiMax does: attention sparsity and multi-modality, logs, plots.

- `attention_sparsity` and `attention_multimodality`: the paper's metrics
  (Definitions 3.2 and 3.3), per attention row, averaged;
- `attention_statistics`: both metrics for every attention layer of a model
  built by `keras_multimax.models` (which expose ``attention_maps``);
- `ModulatorLogger`: a Keras callback that records every layer's ``ranges``
  and ``ts`` and writes them as TensorBoard scalars;
- `plot_modulators`, `plot_attention_maps`, `plot_simplex`: matplotlib figures
  (matplotlib is an optional extra, ``pip install keras-multimax[examples]``;
  it is imported only when a plot is made).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_multimax import ops

__all__ = [
    "ModulatorLogger",
    "StepTimer",
    "attention_multimodality",
    "attention_sparsity",
    "attention_statistics",
    "modulator_layers",
    "plot_attention_maps",
    "plot_modulators",
    "plot_simplex",
]

DEFAULT_RELATIVE_EPSILON = 0.1


def _rows(probs, mask) -> tuple[np.ndarray, np.ndarray]:
    """Returns probabilities and a boolean validity mask, both (rows, L)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim < 1 or probs.shape[-1] < 1:
        raise ValueError(
            "`probs` must have the entries of each distribution on its last "
            f"axis. Received: probs.shape={probs.shape}"
        )
    if mask is None:
        mask = np.ones(probs.shape, dtype=bool)
    else:
        mask = np.asarray(mask)
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


def _write_scalar(tag: str, value: float, step: int) -> None:
    """Writes a TensorBoard scalar with TensorFlow alone.

    `tf.summary.scalar` needs the `tensorboard` package installed; this writes
    the same event (a float32 tensor summary tagged for TensorBoard's
    ``scalars`` plugin) with the core `tf.summary.write`.
    """
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    tf.summary.write(
        tag, tf.constant(value, dtype=tf.float32), step=step, metadata=metadata
    )


class ModulatorLogger(keras.callbacks.Callback):
    """Records every MultiMax layer's ``ranges`` and ``ts`` during training.

    Values are kept in ``history`` (``{layer_path: {"ranges": [...], "ts":
    [...]}}``, one array per log step, step numbers in ``steps``) and, with
    ``log_dir``, written as TensorBoard scalars named
    ``modulator/<layer_path>/ranges_<i>`` (``ranges_h<head>_<i>`` for
    per-head parameters), so ``tensorboard --logdir <log_dir>`` shows how the
    thresholds and slopes move.

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
            sub-directory is written).
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
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "modulator")
            )
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
        for layer in modulator_layers(self.model):
            entry = self.history.setdefault(layer.path, {"ranges": [], "ts": []})
            for name in ("ranges", "ts"):
                value = keras.ops.convert_to_numpy(getattr(layer, name))
                entry[name].append(np.array(value))
                if self._writer is not None:
                    with self._writer.as_default(step=step):
                        for index in np.ndindex(value.shape):
                            label = "_".join(
                                [f"h{i}" for i in index[:-1]] + [str(index[-1])]
                            )
                            _write_scalar(
                                f"modulator/{layer.path}/{name}_{label}",
                                float(value[index]),
                                step,
                            )


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
        self.warmup = warmup
        self.step_times: list[float] = []
        self._start = None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step_times.append(time.perf_counter() - self._start)

    def median(self) -> float:
        """Median step time in seconds after the warm-up (all steps if fewer)."""
        times = self.step_times[self.warmup :] or self.step_times
        return float(np.median(times)) if times else float("nan")


# ---------------------------------------------------------------------------
# Plots (matplotlib imported lazily)
# ---------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "Plots need matplotlib: pip install 'keras-multimax[examples]'"
        ) from e
    return plt


def _save(fig, path):
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
        _pyplot().close(fig)
    return fig


def plot_modulators(
    model: keras.layers.Layer,
    path: str | None = None,
    x_range: tuple[float, float] = (-6.0, 6.0),
):
    """Plots the learned modulator σ(x) of every MultiMax layer of `model`.

    One panel per layer (one curve per head for per-head parameters), with the
    identity (SoftMax) dashed: σ below the identity for small x pushes those
    entries towards zero (sparsity), σ flattening for large x keeps several
    large entries comparable (multi-modality).

    Args:
        model: A model or layer containing MultiMax layers.
        path: PNG file to write; None returns the figure open.
        x_range: Range of inputs x.

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    found = modulator_layers(model)
    if not found:
        raise ValueError(
            "`model` has no layer with `ranges` and `ts` weights. "
            f"Received: model={model.name!r}"
        )
    cols = min(4, len(found))
    rows = -(-len(found) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False
    )
    x = np.linspace(*x_range, 401).astype("float32")
    for ax, layer in zip(axes.flat, found):
        ranges = keras.ops.convert_to_numpy(layer.ranges)
        ts = keras.ops.convert_to_numpy(layer.ts)
        params = [(ranges, ts)] if ranges.ndim == 1 else list(zip(ranges, ts))
        for h, (r, t) in enumerate(params):
            sigma = ops.seglu(x, r, t).numpy()
            ax.plot(x, sigma, label=f"head {h}" if len(params) > 1 else "σ(x)")
        ax.plot(x, x, "k--", lw=0.8, label="identity (SoftMax)")
        ax.set_title(layer.path, fontsize=8)
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=6)
    for ax in list(axes.flat)[len(found) :]:
        ax.axis("off")
    fig.suptitle("Learned MultiMax modulators σ")
    fig.tight_layout()
    return _save(fig, path)


def plot_attention_maps(
    maps: Mapping[str, Any],
    path: str | None = None,
    title: str | None = None,
):
    """Plots attention maps side by side, e.g. SoftMax and MultiMax for one input.

    Args:
        maps: ``{label: probs}`` with ``probs`` of shape ``(queries, keys)``
            (or ``(heads, queries, keys)``: the head mean is shown).
        path: PNG file to write; None returns the figure open.
        title: Optional figure title.

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    if not maps:
        raise ValueError("`maps` must contain at least one attention map.")
    fig, axes = plt.subplots(
        1,
        len(maps),
        figsize=(3.6 * len(maps) + 0.8, 3.3),
        squeeze=False,
        constrained_layout=True,
    )
    vmax = 0.0
    arrays = {}
    for label, probs in maps.items():
        probs = np.asarray(probs, dtype="float64")
        if probs.ndim == 3:
            probs = probs.mean(axis=0)
        if probs.ndim != 2:
            raise ValueError(
                "Each attention map must have shape (queries, keys) or (heads, "
                f"queries, keys). Received: {label!r} with shape {probs.shape}"
            )
        arrays[label] = probs
        vmax = max(vmax, float(probs.max()))
    for ax, (label, probs) in zip(axes.flat, arrays.items()):
        image = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(label)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _barycentric(p: np.ndarray) -> np.ndarray:
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    return p @ corners


def plot_simplex(
    ranges=None,
    ts=None,
    path: str | None = None,
    temperatures: Sequence[float] = (0.25, 1.0, 4.0),
):
    """The paper's simplex picture: SoftMax vs MultiMax on 3-entry inputs.

    Inputs ``v = (1, u, -1)`` for ``u`` from -1 to 1 are mapped by SoftMax at
    several temperatures and by MultiMax with the given modulator, and the
    output distributions are drawn on the probability simplex Δ² (vertices:
    unimodal, edges: bimodal, interior: trimodal). A good normaliser moves
    towards the edge between the first two entries as ``u`` grows (keeps the
    second mode) while ignoring the negative entry (sparsity).

    Args:
        ranges: Modulator thresholds of shape ``(2*order,)`` (e.g. a trained
            layer's ``ranges``); None for an illustrative order-2 modulator.
        ts: Modulator slopes, same shape.
        path: PNG file to write; None returns the figure open.
        temperatures: SoftMax temperatures drawn for comparison.

    Returns:
        The matplotlib figure.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024, Figure 1.
    """
    plt = _pyplot()
    if (ranges is None) != (ts is None):
        raise ValueError("Pass both `ranges` and `ts`, or neither.")
    if ranges is None:
        # Illustrative: steeper below 0 (sparsity), flatter above 0.5
        # (multi-modality), as the trained modulators of the paper.
        ranges = np.array([0.0, 0.5, 0.0, 0.5], dtype="float32")
        ts = np.array([3.0, -0.5, 0.0, 0.0], dtype="float32")
    ranges = np.asarray(keras.ops.convert_to_numpy(ranges), dtype="float32")
    ts = np.asarray(keras.ops.convert_to_numpy(ts), dtype="float32")
    u = np.linspace(-1.0, 1.0, 41, dtype="float32")
    v = np.stack([np.ones_like(u), u, -np.ones_like(u)], axis=-1)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    triangle = _barycentric(np.eye(3))
    ax.plot(*np.vstack([triangle, triangle[:1]]).T, "k-", lw=0.8)
    for label, corner in zip(("entry 1", "entry 2", "entry 3 (negative)"), triangle):
        ax.annotate(label, corner, fontsize=8, ha="center", va="bottom")
    for temp in temperatures:
        p = tf.nn.softmax(v / temp).numpy()
        ax.plot(*_barycentric(p).T, "-", lw=1.2, label=f"SoftMax, T={temp:g}")
    p = ops.multimax(v, ranges, ts).numpy()
    ax.plot(*_barycentric(p).T, "r-", lw=2.0, label="MultiMax")
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.62, 1.0))
    ax.set_title("v = (1, u, -1), u from -1 to 1", fontsize=9)
    return _save(fig, path)
