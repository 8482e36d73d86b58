"""Shared helpers of the benchmarks: environment, baseline, interleaved timing.

Timing protocol (every benchmark): each variant is warmed up (tracing, XLA
compilation, allocator growth), then the variants of one group are run in
turn, ``runs`` rounds of one call (or ``number`` calls) each, so that load from
other processes hits all of them alike. The order of the variants rotates
from round to round, so that no variant always runs after the same one: a
variant's first call after another pays for the caches and allocator state
the other left behind. Each round gives each variant's wall and process CPU
time; the reported figure is the median over rounds, and the ratio to the
reference is the median of the per-round ratios (computed within the same
round, never across runs of the script).
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import pathlib
import platform
import resource
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Date, CPU, core count, load and library versions, for the JSON files."""
    cpu = platform.processor() or "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "load_average_at_start": load,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        **_version("jax"),
        **_version("keras_hub"),
    }


def _version(package: str) -> dict:
    """``{package: version}`` if it is installed, else nothing."""
    try:
        return {package: importlib.metadata.version(package.replace("_", "-"))}
    except importlib.metadata.PackageNotFoundError:
        return {}


def plain_multimax(x, ranges, ts, axis=-1):
    """The baseline: MultiMax written with plain TF ops, differentiated by autodiff.

    This is what one writes from the paper's formula (as the official code
    does in PyTorch): the modulator, then `tf.nn.softmax`.
    """
    sigma = x
    for k in range(ts.shape[-1] // 2):
        sigma = (
            sigma
            + ts[..., 2 * k] * tf.nn.relu(ranges[..., 2 * k] - x) ** (k + 1)
            + ts[..., 2 * k + 1] * tf.nn.relu(x - ranges[..., 2 * k + 1]) ** (k + 1)
        )
    return tf.nn.softmax(sigma, axis=axis)


def compile_fn(fn: Callable, mode: str) -> Callable:
    """``eager`` (as is), ``graph`` (`tf.function`) or ``xla`` (jit_compile)."""
    if mode == "eager":
        return fn
    if mode == "graph":
        return tf.function(fn, autograph=False)
    if mode == "xla":
        return tf.function(fn, jit_compile=True, autograph=False)
    raise ValueError(f"Unknown mode. Received: mode={mode!r}")


def _time_once(fn: Callable, number: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(number):
        fn()
    return (time.perf_counter() - wall) / number, (time.process_time() - cpu) / number


def interleaved(
    variants: dict[str, Callable],
    reference: str,
    runs: int = 10,
    warmup: int = 2,
    min_seconds: float = 0.02,
    settle: int = 0,
) -> dict[str, dict]:
    """Times `variants` in interleaved rounds; ratios are to `reference`.

    ``settle`` untimed calls precede each variant's timed calls in every
    round, for ops of a few milliseconds whose first call after another
    variant is dominated by the state that variant left (see the module
    docstring).

    Returns, per variant, ``wall_ms``/``cpu_ms`` (medians over rounds),
    ``ratio``/``cpu_ratio`` (medians of the per-round ratios to the
    reference), ``ratio_quartiles`` (the first and third quartiles of the
    per-round ratios), ``number`` (calls per round) and the raw per-round
    times.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    # Calls per round: enough for the reference to take `min_seconds`.
    ref_wall, _ = _time_once(variants[reference], 1)
    number = max(1, min(1000, int(min_seconds / max(ref_wall, 1e-6))))
    names = list(variants)
    walls = {k: [] for k in variants}
    cpus = {k: [] for k in variants}
    for i in range(runs):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            fn = variants[name]
            for _ in range(settle):
                fn()
            wall, cpu = _time_once(fn, number)
            walls[name].append(wall)
            cpus[name].append(cpu)
    out = {}
    for name in variants:
        ratios = [a / b for a, b in zip(walls[name], walls[reference])]
        cpu_ratios = [a / b for a, b in zip(cpus[name], cpus[reference]) if b > 0]
        out[name] = {
            "wall_ms": 1e3 * statistics.median(walls[name]),
            "cpu_ms": 1e3 * statistics.median(cpus[name]),
            "ratio": statistics.median(ratios),
            # The spread of the per-round ratios: their quartiles.
            "ratio_quartiles": _quartiles(ratios),
            "cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
            "number": number,
            "rounds_wall_ms": [round(1e3 * w, 4) for w in walls[name]],
        }
    return out


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    low, _, high = statistics.quantiles(values, n=4)
    return [low, high]


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(name: str, payload: dict, path: str | None = None) -> pathlib.Path:
    target = pathlib.Path(path) if path else RESULTS / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=1) + "\n")
    return target


def _status_mib(key: str) -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**10
    raise KeyError(key)


def peak_rss_above_start(run: Callable[[], object]) -> dict:
    """Peak RSS of ``run()`` above the RSS before it, and the process's peak.

    Linux resets the high-water mark (VmHWM) to the current RSS on writing 5
    to /proc/self/clear_refs: the peak of ``run`` alone, not of building its
    inputs (whose NumPy temporaries can exceed what is measured).
    """
    gc.collect()
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    start = _status_mib("VmRSS")
    run()
    return {
        "step_peak_above_start_mib": _status_mib("VmHWM") - start,
        "rss_before_mib": start,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
    }
