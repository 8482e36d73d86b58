"""Export a model with MultiMax layers to every deployment format and check it.

`export_all` writes ``.keras``, a TensorFlow SavedModel, LiteRT (``.tflite``,
float32 and dynamic-range quantized, builtin ops only) and ONNX files, runs
each in its own runtime on the same inputs, and reports file size, the largest
difference to the Keras model and the latency per batch; `format_table`
prints that as a Markdown table. On Keras' JAX backend the ``.keras`` file,
the SavedModel (through jax2tf) and ONNX (through jax2onnx) are written;
Keras exports LiteRT only from TensorFlow, see `unsupported_formats`.

TensorFlow is imported when a SavedModel or LiteRT file is written and run,
not with this module: on JAX, ``.keras`` and ONNX files need no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
import warnings
from collections.abc import Callable
from collections.abc import Sequence

import keras
import numpy as np

from keras_multimax import config

__all__ = [
    "FORMATS",
    "ExportResult",
    "export_all",
    "format_table",
    "unavailable_formats",
    "unsupported_formats",
]

FORMATS = ("keras", "tf_saved_model", "litert", "litert_dynamic_range", "onnx")

_LABELS = {
    "keras": "Keras (.keras)",
    "tf_saved_model": "SavedModel",
    "litert": "LiteRT float32 (.tflite)",
    "litert_dynamic_range": "LiteRT dynamic-range int8 (.tflite)",
    "onnx": "ONNX (.onnx)",
}
_FILES = {
    "keras": "model.keras",
    "tf_saved_model": "saved_model",
    "litert": "model.tflite",
    "litert_dynamic_range": "model_dynamic_range.tflite",
    "onnx": "model.onnx",
}
_EXTRA = "the `export` extra: pip install 'keras-multimax[export]'"
# format -> (module to import, package that provides it) for running it.
_RUNTIMES = {
    "litert": (("ai_edge_litert.interpreter", "ai-edge-litert"),),
    "litert_dynamic_range": (("ai_edge_litert.interpreter", "ai-edge-litert"),),
    "onnx": (("onnxruntime", "onnxruntime"),),
}
# Keras backend -> the converter `model.export(format="onnx")` uses there
# (module and package alike). jax2onnx is not in the `export` extra.
_ONNX_CONVERTERS = {"tensorflow": "tf2onnx", "jax": "jax2onnx"}
# format -> the backends (of those keras_multimax runs on) whose
# `model.export` writes it; formats not listed export from every backend.
_EXPORT_BACKENDS = {
    "litert": ("tensorflow",),
    "litert_dynamic_range": ("tensorflow",),
}


@dataclasses.dataclass
class ExportResult:
    """One exported file and how it compares with the Keras model.

    Attributes:
        format: One of `FORMATS`.
        path: The file (a directory for ``tf_saved_model``).
        size_bytes: Size on disk (all files of a directory).
        max_abs_diff: Largest absolute difference between the exported
            model's outputs and the Keras model's, on the inputs given.
        latency_ms: Median wall time of one call on those inputs (one batch),
            in milliseconds, after two warm-up calls.
    """

    format: str
    path: str
    size_bytes: int
    max_abs_diff: float
    latency_ms: float


def _as_list(inputs) -> list[np.ndarray]:
    if isinstance(inputs, (list, tuple)):
        return [np.asarray(a) for a in inputs]
    return [np.asarray(inputs)]


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(path)
        for f in files
    )


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _keras_runner(model, path, arrays):
    model.save(path)
    reloaded = keras.saving.load_model(path)
    args = arrays if len(arrays) > 1 else arrays[0]
    return lambda: np.asarray(reloaded.predict_on_batch(args))


def _saved_model_runner(model, path, arrays):
    import tensorflow as tf

    model.export(path, format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(path)  # must outlive `serve` (owns the variables)
    tensors = [tf.constant(a) for a in arrays]
    args = tensors if len(tensors) > 1 else tensors[0]
    return lambda: loaded.serve(args).numpy()


def _check_float32_compute(model) -> None:
    """LiteRT builtins have no float16/bfloat16 matmuls: fail with the recipe."""
    low = sorted(
        {
            layer.dtype_policy.compute_dtype
            for layer in [model, *model.layers]
            if layer.dtype_policy.compute_dtype in ("float16", "bfloat16")
        }
    )
    if low:
        raise ValueError(
            "LiteRT export with builtin ops needs a model that computes in "
            "float32 (the builtin float16/bfloat16 kernels lack matmuls). "
            "Rebuild the model under keras.mixed_precision.set_global_policy("
            '"float32") (e.g. `Model.from_config(model.get_config())` for the '
            "keras_multimax builders) and copy the weights with "
            "`set_weights(model.get_weights())`. "
            f"Received: a model with layers computing in {low}"
        )


def _litert_runner(model, path, arrays, quantize=False):
    import tensorflow as tf

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise ImportError(f"Running LiteRT models needs {_EXTRA}.") from e
    _check_float32_compute(model)
    kwargs = {}
    if quantize:
        kwargs["optimizations"] = [tf.lite.Optimize.DEFAULT]
    # Builtin ops only: conversion fails rather than needing the Flex delegate.
    model.export(
        path,
        format="litert",
        verbose=False,
        target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]},
        **kwargs,
    )
    runner = Interpreter(model_path=path).get_signature_runner()
    names = list(runner.get_input_details())
    if len(names) == 1:
        feeds = {names[0]: arrays[0]}
    else:
        feeds = {t.name: a for t, a in zip(model.inputs, arrays)}
    return lambda: next(iter(runner(**feeds).values()))


def _replace_erfc(path: str) -> None:
    """Rewrites the ``Erfc`` nodes of an ONNX file as ``1 - Erf`` (ONNX has no Erfc).

    Keras' exact GELU (``activation="gelu"``; the model builders use an
    erf-based GELU instead, `keras_multimax.models._blocks.exact_gelu`) is
    ``0.5 * x * erfc(-x / sqrt(2))`` in TensorFlow. tf2onnx 1.17 has no
    converter for ``Erfc`` and writes the node as it is, which onnxruntime
    rejects ("No Op registered for Erfc"). Rewriting the written file, rather
    than registering a handler in tf2onnx's process-wide registry, leaves
    tf2onnx as it was.
    """
    import onnx
    from onnx import helper
    from onnx import numpy_helper

    model = onnx.load(path)
    nodes = list(model.graph.node)
    if not any(n.op_type == "Erfc" and n.domain in ("", "ai.onnx") for n in nodes):
        return
    rewritten = []
    for node in nodes:
        if node.op_type != "Erfc" or node.domain not in ("", "ai.onnx"):
            rewritten.append(node)
            continue
        erf, one = f"{node.name}/erf", f"{node.name}/one"
        model.graph.initializer.append(
            numpy_helper.from_array(np.array(1.0, np.float32), one)
        )
        rewritten.append(helper.make_node("Erf", list(node.input), [erf], name=erf))
        rewritten.append(
            helper.make_node("Sub", [one, erf], list(node.output), name=node.name)
        )
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    onnx.save(model, path)


def _runtimes(fmt: str) -> tuple[tuple[str, str], ...]:
    """(module, package) pairs that running `fmt` needs on this backend."""
    runtimes = _RUNTIMES.get(fmt, ())
    if fmt == "onnx":
        converter = _ONNX_CONVERTERS[keras.backend.backend()]
        runtimes += ((converter, converter),)
    return runtimes


def _install_hint(packages: Sequence[str]) -> str:
    if "jax2onnx" in packages:
        return f"{_EXTRA}, and jax2onnx (ONNX from JAX; not in the extra)"
    return _EXTRA


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def unsupported_formats(formats: Sequence[str] = FORMATS) -> dict[str, str]:
    """The formats among `formats` that Keras cannot export on this backend.

    Keras 3.15 writes LiteRT files only from the TensorFlow (and PyTorch)
    backend: on ``KERAS_BACKEND=jax`` both LiteRT formats are unsupported.
    Every other format exports from both backends keras_multimax runs on.
    `export_all` leaves these formats out of its default (with a warning)
    and raises a `ValueError` if they are asked for.

    Example:

    >>> reasons = unsupported_formats()
    >>> on_jax = keras.backend.backend() == "jax"
    >>> sorted(reasons) == (["litert", "litert_dynamic_range"] if on_jax else [])
    True

    Args:
        formats: Any of `FORMATS`.

    Returns:
        A dict from each unsupported format to the reason, naming the
        backend, in the order of ``formats``; empty when every one exports.
    """
    backend = keras.backend.backend()
    return {
        fmt: (
            f'`model.export(format="litert")` needs the TensorFlow backend; '
            f"Keras refuses it on the {backend!r} backend. Save a .keras file "
            "and export it under KERAS_BACKEND=tensorflow"
        )
        for fmt in formats
        if backend not in _EXPORT_BACKENDS.get(fmt, (backend,))
    }


def _reasons(reasons: dict[str, str]) -> str:
    return "; ".join(dict.fromkeys(reasons.values()))


def unavailable_formats(
    formats: Sequence[str] = FORMATS,
) -> dict[str, tuple[str, ...]]:
    """The formats among `formats` whose runtime cannot be imported.

    ``keras`` and ``tf_saved_model`` only need TensorFlow; the LiteRT
    formats need ``ai-edge-litert``, ``onnx`` needs ``onnxruntime`` and the
    converter of the Keras backend: ``tf2onnx`` on TensorFlow (all in the
    ``export`` extra), ``jax2onnx`` on JAX (not in it). Each is checked by
    importing it, so a broken install counts as missing. Formats this
    backend cannot export at all are not listed here but in
    `unsupported_formats`.

    Example:

    >>> unavailable_formats(("keras", "tf_saved_model"))
    {}

    Args:
        formats: Any of `FORMATS`.

    Returns:
        A dict from each unavailable format to the names of the packages
        that could not be imported, in the order of ``formats``; empty when
        everything can run.
    """
    missing = {}
    unsupported = unsupported_formats(formats)
    for fmt in formats:
        if fmt in unsupported:
            continue
        packages = tuple(
            package for module, package in _runtimes(fmt) if not _importable(module)
        )
        if packages:
            missing[fmt] = packages
    return missing


def _onnx_runner(model, path, arrays):
    converter = _ONNX_CONVERTERS[keras.backend.backend()]
    try:
        import onnxruntime

        importlib.import_module(converter)  # model.export(format="onnx") uses it
    except ImportError as e:
        raise ImportError(
            f"Exporting and running ONNX models needs onnxruntime and {converter}; "
            f"could not import {e.name or e}. Install {_install_hint([converter])}."
        ) from e
    model.export(path, format="onnx", verbose=False)
    _replace_erfc(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) == 1:
        feeds = {names[0]: arrays[0]}
    else:
        feeds = {t.name: a for t, a in zip(model.inputs, arrays)}
    return lambda: session.run(None, feeds)[0]


_RUNNERS = {
    "keras": _keras_runner,
    "tf_saved_model": _saved_model_runner,
    "litert": _litert_runner,
    "litert_dynamic_range": lambda m, p, a: _litert_runner(m, p, a, quantize=True),
    "onnx": _onnx_runner,
}


def export_all(
    model: keras.Model,
    directory: str,
    inputs,
    formats: Sequence[str] | None = None,
    repeats: int = 20,
) -> list[ExportResult]:
    """Exports `model` to each format, runs it there and compares with Keras.

    Every file is loaded back in its own runtime: Keras, TensorFlow
    (`tf.saved_model.load`), the LiteRT interpreter of ``ai-edge-litert`` and
    ``onnxruntime``. LiteRT files are converted with builtin ops only (no
    Flex/Select-TF ops), so they run with the plain LiteRT runtime; the
    ``litert_dynamic_range`` variant stores large weight matrices as int8.
    The SavedModel keeps the closed-form MultiMax gradients and reloads
    without keras_multimax; the ``.keras`` file needs ``import
    keras_multimax`` before `keras.saving.load_model`. Graphs are traced with
    the plain-op TensorFlow forward: if
    `keras_multimax.config.enable_fused_forward` is on, it is turned off
    while each format is written and back on after.

    On ``KERAS_BACKEND=jax`` the SavedModel is converted by jax2tf and
    checked in TensorFlow the same way, and ONNX is converted by jax2onnx;
    Keras cannot export LiteRT there, so the default ``formats`` leaves both
    LiteRT formats out with a `UserWarning` giving the reason (see
    `unsupported_formats`), and asking for them raises a `ValueError`.

    Example:

    >>> import tempfile
    >>> import numpy as np
    >>> from keras_multimax import layers
    >>> model = keras.Sequential([keras.Input((5,)), layers.MultiMax()])
    >>> x = np.random.default_rng(0).normal(size=(2, 5)).astype("float32")
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     results = export_all(
    ...         model, directory, x, formats=("keras", "tf_saved_model"), repeats=1
    ...     )
    >>> [(r.format, r.max_abs_diff < 1e-6) for r in results]
    [('keras', True), ('tf_saved_model', True)]

    Args:
        model: A built Keras model with one output.
        directory: Where the files are written (created if missing).
        inputs: One batch: an array, or a list of arrays in the order of
            ``model.inputs``.
        formats: Any of `FORMATS`: ``"keras"``, ``"tf_saved_model"``,
            ``"litert"``, ``"litert_dynamic_range"``, ``"onnx"``. Defaults
            to every format the Keras backend can export (all of `FORMATS`
            on TensorFlow).
        repeats: Timed calls per format (the median is reported).

    Returns:
        One `ExportResult` per format, in the order of ``formats``.

    Raises:
        ValueError: For an unknown format, a format the Keras backend cannot
            export (LiteRT on JAX), ``repeats < 1``, a model with several
            outputs, or LiteRT formats for a model that computes in
            float16/bfloat16 (mixed precision; rebuild it in float32 first).
        ImportError: If the runtime of a requested format is not installed
            (``ai-edge-litert``, ``onnxruntime``/``tf2onnx``), before
            anything is exported; `unavailable_formats` tells in advance.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """
    skipped = {}
    if formats is None:
        skipped = unsupported_formats()
        formats = tuple(f for f in FORMATS if f not in skipped)
    formats = tuple(formats)
    unknown = [f for f in formats if f not in _RUNNERS]
    if unknown or not formats:
        raise ValueError(
            f"`formats` must be a non-empty sequence of {FORMATS}. "
            f"Received: formats={formats}"
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(
            f"`repeats` must be an integer >= 1. Received: repeats={repeats!r}"
        )
    if len(model.outputs) != 1:
        raise ValueError(
            "`export_all` compares a single output. "
            f"Received: a model with {len(model.outputs)} outputs"
        )
    unsupported = unsupported_formats(formats)
    if unsupported:
        raise ValueError(
            f"Cannot export {', '.join(unsupported)}: {_reasons(unsupported)}. "
            f"Received: formats={formats}"
        )
    if skipped:
        warnings.warn(
            f"keras_multimax.export.export_all leaves out {', '.join(skipped)}: "
            f"{_reasons(skipped)}. `unsupported_formats()` tells in advance.",
            stacklevel=2,
        )
    missing = unavailable_formats(formats)
    if missing:
        needs = "; ".join(f"{f} needs {', '.join(p)}" for f, p in missing.items())
        packages = [p for names in missing.values() for p in names]
        raise ImportError(
            f"Runtime not installed: {needs}. Install {_install_hint(packages)}, "
            f"or leave these formats out. Received: formats={formats}"
        )
    arrays = _as_list(inputs)
    reference = np.asarray(
        model(arrays if len(arrays) > 1 else arrays[0], training=False)
    )
    os.makedirs(directory, exist_ok=True)
    results = []
    for fmt in formats:
        path = os.path.join(directory, _FILES[fmt])
        with config.plain_forward():  # exported graphs hold no XLA kernels
            run = _RUNNERS[fmt](model, path, arrays)
        diff = float(np.max(np.abs(np.asarray(run(), np.float64) - reference)))
        results.append(
            ExportResult(fmt, path, _size(path), diff, _median_ms(run, repeats))
        )
    return results


def format_table(results: Sequence[ExportResult]) -> str:
    """A Markdown table of `export_all` results.

    Example:

    >>> print(format_table([ExportResult("onnx", "m.onnx", 2048, 3e-8, 0.12)]))
    | format | file | size | max abs diff to Keras | latency per batch |
    |---|---|---:|---:|---:|
    | ONNX (.onnx) | m.onnx | 2.0 KiB | 3.0e-08 | 0.12 ms |

    Args:
        results: What `export_all` returned.

    Returns:
        The table as a string, one row per result.
    """
    lines = [
        "| format | file | size | max abs diff to Keras | latency per batch |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        size = r.size_bytes / 1024
        size_text = f"{size:.1f} KiB" if size < 1024 else f"{size / 1024:.2f} MiB"
        lines.append(
            f"| {_LABELS[r.format]} | {os.path.basename(r.path)} | {size_text} | "
            f"{r.max_abs_diff:.1e} | {r.latency_ms:.2f} ms |"
        )
    return "\n".join(lines)
