"""Figures of what MultiMax learns: modulators, attention maps, the simplex picture.

Part of `keras_multimax.toolkit` (not imported by ``keras_multimax``).
matplotlib comes with the ``examples`` extra (``pip install
keras-multimax[examples]``) and is imported when a figure is made; the
figures are drawn with ``matplotlib.pyplot`` in whatever backend the user
chose (nothing here calls ``matplotlib.use``). The inputs may be tensors of
any Keras backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_multimax import ops
from keras_multimax.analysis import modulator_layers

__all__ = ["plot_attention_maps", "plot_modulators", "plot_simplex"]


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

    Example:

    >>> from keras_multimax import layers
    >>> model = keras.Sequential([keras.Input((4,)), layers.SegLU(name="head")],
    ...                          name="net")
    >>> fig = plot_modulators(model)
    >>> [ax.get_title() for ax in fig.axes]
    ['net/head']

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
            sigma = keras.ops.convert_to_numpy(ops.seglu(x, r, t))
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

    Example:

    >>> probs = np.full((2, 4, 4), 0.25)  # (heads, queries, keys)
    >>> fig = plot_attention_maps({"SoftMax": probs, "MultiMax": probs[0]})
    >>> [ax.get_title() for ax in fig.axes[:2]]
    ['SoftMax', 'MultiMax']

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
        raise ValueError(
            f"`maps` must contain at least one attention map. Received: maps={maps!r}"
        )
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

    Example:

    >>> fig = plot_simplex(temperatures=(1.0,))
    >>> [line.get_label() for line in fig.axes[0].lines[1:]]
    ['SoftMax, T=1', 'MultiMax']

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
        raise ValueError(
            "Pass both `ranges` and `ts`, or neither. Received: "
            f"ranges={'None' if ranges is None else 'an array'}, "
            f"ts={'None' if ts is None else 'an array'}"
        )
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
        p = keras.ops.convert_to_numpy(keras.ops.softmax(v / temp, axis=-1))
        ax.plot(*_barycentric(p).T, "-", lw=1.2, label=f"SoftMax, T={temp:g}")
    p = keras.ops.convert_to_numpy(ops.multimax(v, ranges, ts))
    ax.plot(*_barycentric(p).T, "r-", lw=2.0, label="MultiMax")
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.62, 1.0))
    ax.set_title("v = (1, u, -1), u from -1 to 1", fontsize=9)
    return _save(fig, path)
