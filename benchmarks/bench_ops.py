"""Op-level benchmark: `ops.multimax` vs `tf.nn.softmax` vs autodiff of the formula.

For each shape and execution mode (eager, `tf.function`, `tf.function(
jit_compile=True)`) and for the forward pass alone and forward+backward
(gradients of x, ranges and ts; of x only for SoftMax), five variants are
timed in interleaved rounds: `tf.nn.softmax`, the plain formula through
autodiff (`_common.plain_multimax`) and `keras_multimax.ops.multimax`, each at
order 1 and 2. Ratios are to `tf.nn.softmax` of the same round. Forward passes
also time `tf.nn.softmax(x + 1.0)` with the addition as a TensorFlow op and as
an XLA kernel: the floors of a modulator that takes its own pass over the
tensor before the SoftMax.

Usage::

    python benchmarks/bench_ops.py            # 3 shapes x 3 modes, a few minutes
    python benchmarks/bench_ops.py --quick    # attention shape, graph and XLA
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _common  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_multimax import config  # noqa: E402
from keras_multimax import ops  # noqa: E402

SHAPES = {
    "attention": (16, 6, 197, 197),  # DeiT-small scores: batch 16, 6 heads
    "lm_head": (2048, 8192),  # 2048 tokens over an 8192-word vocabulary
    "small": (256, 10),  # a 10-class output layer
}
MODES = ("eager", "graph", "xla")
# "forward" is inference (plain ops by default since 0.3.0, in training and
# inference alike; the fused kernel after
# `keras_multimax.config.enable_fused_forward()`); "forward (plain ops)" is
# the forward that exported graphs hold (traced inside
# `config.plain_forward()`); "forward (tape)" is the forward of a training
# step, recorded by a tape without computing gradients.
PASSES = ("forward", "forward (plain ops)", "forward (tape)", "forward+backward")
# Active modulator: thresholds at ±1 (order 1) and ±2 (order 2), slopes > 0.
RANGES = np.array([-1.0, 1.0, -2.0, 2.0], "float32")
TS = np.array([0.3, 0.4, 0.1, 0.2], "float32")

# Issue 7 targets at the attention shape, order 2 (ratios to tf.nn.softmax).
TARGETS = (
    ("graph", "forward+backward", 3.0),
    ("xla", "forward+backward", 3.0),
    ("graph", "forward", 1.5),
)


_add_one_kernel = tf.function(lambda x: x + 1.0, jit_compile=True, autograph=False)


def _variant(kind: str, order: int | None, x, dy, pass_: str):
    ranges = tf.constant(RANGES[: 2 * (order or 1)])
    ts = tf.constant(TS[: 2 * (order or 1)])

    def forward(x, ranges, ts):
        if kind == "softmax":
            return tf.nn.softmax(x)
        if kind == "softmax_pass":
            # Floors of a modulator computed in its own pass: SoftMax after
            # one elementwise op (a read and a write of the tensor), as a
            # TensorFlow op and as an XLA kernel like the one of ops.py.
            return tf.nn.softmax(x + 1.0)
        if kind == "softmax_xla_pass":
            return tf.nn.softmax(_add_one_kernel(x))
        if kind == "plain":
            return _common.plain_multimax(x, ranges, ts)
        return ops.multimax(x, ranges, ts)

    if pass_ == "forward":
        return lambda: forward(x, ranges, ts)
    if pass_ == "forward (plain ops)":

        def exported():
            with config.plain_forward():  # entered while tracing in graph/XLA modes
                return forward(x, ranges, ts)

        return exported
    if pass_ == "forward (tape)":

        def recorded():
            with tf.GradientTape() as tape:
                tape.watch([x, ranges, ts])
                return forward(x, ranges, ts)

        return recorded

    def step():
        sources = [x] if kind == "softmax" else [x, ranges, ts]
        with tf.GradientTape() as tape:
            tape.watch(sources)
            y = forward(x, ranges, ts)
        return tape.gradient(y, sources, output_gradients=dy)

    return step


def run_group(shape, mode: str, pass_: str, runs: int) -> dict:
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(scale=2.0, size=shape).astype("float32"))
    dy = tf.constant(rng.normal(size=shape).astype("float32"))
    variants = {"softmax": _variant("softmax", None, x, dy, pass_)}
    if pass_.startswith("forward ") or pass_ == "forward":
        for kind in ("softmax_pass", "softmax_xla_pass"):
            variants[kind] = _variant(kind, None, x, dy, pass_)
    for order in (1, 2):
        for kind in ("plain", "multimax"):
            fn = _variant(kind, order, x, dy, pass_)
            variants[f"{kind}_o{order}"] = fn
    variants = {k: _common.compile_fn(v, mode) for k, v in variants.items()}
    result = _common.interleaved(variants, "softmax", runs=runs)
    for order in (1, 2):
        plain = result[f"plain_o{order}"]["rounds_wall_ms"]
        ours = result[f"multimax_o{order}"]["rounds_wall_ms"]
        ratios = sorted(a / b for a, b in zip(ours, plain))
        result[f"multimax_o{order}"]["ratio_to_plain"] = ratios[len(ratios) // 2]
    return result


def _cell(r: dict) -> str:
    return f"{r['wall_ms']:.2f} ms ({r['ratio']:.2f}×, cpu {r['cpu_ratio']:.2f}×)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="attention, graph+xla")
    parser.add_argument("--runs", type=int, default=None, help="rounds (>= 10)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None)
    parser.add_argument("--output", default=None, help="JSON path")
    args = parser.parse_args(argv)
    shapes = args.shapes or (["attention"] if args.quick else list(SHAPES))
    modes = args.modes or (["graph", "xla"] if args.quick else list(MODES))
    runs = args.runs or (10 if args.quick else 15)

    env = _common.environment()
    print(f"# {env['date_utc']}  {env['cpu']} ({env['logical_cpus']} logical CPUs)")
    print(
        f"# TensorFlow {env['tensorflow']}, Keras {env['keras']}; load {env['load_average_at_start']}"
    )
    print(f"# median of {runs} interleaved rounds; (×) = ratio to tf.nn.softmax")
    records = []
    header = ["shape", "mode", "pass", "tf.nn.softmax"]
    header += ["softmax + 1 TF pass", "softmax + 1 XLA pass"]
    header += [f"{k} o{o}" for o in (1, 2) for k in ("plain autodiff", "MultiMax")]
    header += ["MultiMax/plain o2"]
    rows = []
    groups = {}  # (shape name, mode, pass) -> results of that group
    for name in shapes:
        for mode in modes:
            for pass_ in PASSES:
                res = groups[name, mode, pass_] = run_group(
                    SHAPES[name], mode, pass_, runs
                )
                row = [str(list(SHAPES[name])), mode, pass_]
                row.append(f"{res['softmax']['wall_ms']:.2f} ms")
                for kind in ("softmax_pass", "softmax_xla_pass"):
                    row.append(_cell(res[kind]) if kind in res else "")
                for order in (1, 2):
                    row.append(_cell(res[f"plain_o{order}"]))
                    row.append(_cell(res[f"multimax_o{order}"]))
                row.append(f"{res['multimax_o2']['ratio_to_plain']:.2f}")
                rows.append(row)
                print(" | ".join(row), flush=True)
                for variant, r in res.items():
                    records.append(
                        {"shape": SHAPES[name], "mode": mode, "pass": pass_}
                        | {"variant": variant}
                        | r
                    )
    print()
    print(_common.markdown_table(header, rows))

    verdicts = []
    if "attention" in shapes:
        print("\nIssue 7 targets ([16, 6, 197, 197], order 2):")
        for mode, pass_, limit in TARGETS:
            if mode not in modes:
                continue
            res = groups["attention", mode, pass_]
            r = res["multimax_o2"]
            met = r["ratio"] <= limit
            line = (
                f"  {mode:5s} {pass_:16s} {r['ratio']:.2f}× softmax "
                f"(cpu {r['cpu_ratio']:.2f}×; target <= {limit}×): "
                f"{'met' if met else 'NOT met'}"
            )
            if pass_ == "forward":
                line += (
                    "; softmax after one elementwise pass: "
                    f"{res['softmax_pass']['ratio']:.2f}× (TF op), "
                    f"{res['softmax_xla_pass']['ratio']:.2f}× (XLA kernel)"
                )
            if pass_ == "forward+backward":
                faster = r["ratio_to_plain"] < 1
                line += (
                    f"; {r['ratio_to_plain']:.2f}× plain autodiff: "
                    f"{'faster' if faster else 'NOT faster'}"
                )
                met = met and faster
            verdicts.append({"mode": mode, "pass": pass_, "limit": limit, "met": met})
            print(line)
    path = _common.write_json(
        "ops.json",
        {
            "environment": env,
            "runs": runs,
            "ranges": RANGES.tolist(),
            "ts": TS.tolist(),
            "results": records,
            "targets": verdicts,
        },
        args.output,
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
