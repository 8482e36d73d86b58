"""Memory and time of a MultiMax LM head's training step: fused vs unfused.

One forward+backward of the head (gradients for hidden, kernel, bias, ranges
and ts of the mean token loss), in a `tf.function`:

- ``unfused``: `keras.layers.Dense` → `keras_multimax.layers.SegLU` →
  `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`, the path of a
  keras_multimax LM before `ops.multimax_cross_entropy`;
- ``fused``: `keras_multimax._cross_entropy.multimax_cross_entropy` (default
  chunk size) averaged over the tokens.

Memory: each variant runs in its own subprocess, which builds the inputs,
runs two steps and reports its peak resident set size
(`resource.getrusage(...).ru_maxrss`); the figure is that peak minus the peak
of an ``idle`` subprocess that builds the same inputs and runs no step
(TensorFlow, Keras and the inputs themselves are not counted).
Time: both variants in one more subprocess, interleaved (`_common.interleaved`).

Usage::

    python benchmarks/bench_lm_head.py            # [4096, 256, 32768], [8192, 512, 131072]
    python benchmarks/bench_lm_head.py --quick    # [512, 64, 4096]
    python benchmarks/bench_lm_head.py --shapes 4096,256,32768 --memory-only
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys

# The benchmarks folder (for _common) and the checkout it belongs to (so that
# the workers, run as scripts, import this checkout's keras_multimax).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))

VARIANTS = ("unfused", "fused")
ORDER2 = ([-1.0, 1.0, -2.0, 2.0], [0.3, 0.4, 0.1, 0.2])


def _setup(shape):
    import keras
    import numpy as np
    import tensorflow as tf

    tokens, width, vocab = shape
    rng = np.random.default_rng(0)
    hidden = tf.constant(rng.normal(size=(tokens, width)).astype("float32"))
    labels = tf.constant(rng.integers(0, vocab, size=tokens).astype("int32"))
    dense = keras.layers.Dense(vocab, name="head_dense")
    dense.build((None, width))
    dense.kernel.assign(rng.normal(size=(width, vocab)).astype("float32") / width**0.5)
    ranges, ts = (tf.Variable(np.array(v, "float32")) for v in ORDER2)
    return hidden, labels, dense, ranges, ts


def _step(variant, hidden, labels, dense, ranges, ts):
    import keras
    import tensorflow as tf

    from keras_multimax import layers
    from keras_multimax._cross_entropy import multimax_cross_entropy

    seglu = layers.SegLU()
    seglu.build(None)
    seglu.ranges.assign(ranges)
    seglu.ts.assign(ts)
    scce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    weights = [dense.kernel, dense.bias, seglu.ranges, seglu.ts]

    @tf.function(autograph=False)
    def step():
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            if variant == "unfused":
                loss = scce(labels, seglu(dense(hidden)))
            else:
                loss = tf.reduce_mean(
                    multimax_cross_entropy(
                        hidden, dense.kernel, labels, seglu.ranges, seglu.ts, dense.bias
                    )
                )
        grads = tape.gradient(loss, [hidden, *weights])
        # Return a scalar that depends on every gradient, so that none is pruned.
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads]) * 0.0

    return step


def memory_worker(variant: str, shape) -> dict:
    hidden, labels, dense, ranges, ts = _setup(shape)
    if variant != "idle":
        step = _step(variant, hidden, labels, dense, ranges, ts)
        step()
        float(step())
    return {
        "variant": variant,
        "shape": shape,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
    }


def time_worker(shape, runs: int) -> dict:
    import _common

    inputs = _setup(shape)
    steps = {v: _step(v, *inputs) for v in VARIANTS}
    return _common.interleaved(steps, reference="unfused", runs=runs, warmup=1)


def _run(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"worker {args} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", nargs="+", default=None, help="tokens,width,vocab")
    parser.add_argument(
        "--memory-only",
        nargs="*",
        default=None,
        help="shapes (tokens,width,vocab) measured for memory only",
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--worker", choices=("idle", *VARIANTS, "time"), help=argparse.SUPPRESS
    )
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        shape = [int(v) for v in args.shape.split(",")]
        if args.worker == "time":
            result = time_worker(shape, args.runs)
        else:
            result = memory_worker(args.worker, shape)
        print(json.dumps(result))
        return 0

    import _common

    if args.shapes:
        shapes = args.shapes
    elif args.quick:
        shapes = ["512,64,4096"]
    else:
        shapes = ["4096,256,32768"]
    memory_only = args.memory_only
    if memory_only is None:
        memory_only = [] if args.quick or args.shapes else ["8192,512,131072"]
    env = _common.environment()
    print(f"# {env['date_utc']}  {env['cpu']}; TF {env['tensorflow']}")
    records, rows = [], []
    for text in [*shapes, *memory_only]:
        shape = [int(v) for v in text.split(",")]
        idle = _run(["--worker", "idle", "--shape", text])
        memory = {v: _run(["--worker", v, "--shape", text]) for v in VARIANTS}
        timing = None
        if text not in memory_only:
            timing = _run(
                ["--worker", "time", "--shape", text, "--runs", str(args.runs)]
            )
        above = {v: memory[v]["max_rss_mib"] - idle["max_rss_mib"] for v in VARIANTS}
        record = {
            "shape": shape,
            "idle_max_rss_mib": idle["max_rss_mib"],
            "peak_above_idle_mib": above,
            "memory_ratio": above["fused"] / above["unfused"],
            "timing": timing,
        }
        records.append(record)
        print(json.dumps(record), flush=True)
        time_cells = ["", "", ""]
        if timing:
            time_cells = [
                f"{timing['unfused']['wall_ms']:.0f} ms",
                f"{timing['fused']['wall_ms']:.0f} ms",
                f"{timing['fused']['ratio']:.2f}×",
            ]
        rows.append(
            [
                "×".join(map(str, shape)),
                f"{above['unfused']:.0f}",
                f"{above['fused']:.0f}",
                f"{record['memory_ratio']:.3f}×",
                *time_cells,
            ]
        )
    print()
    print(
        _common.markdown_table(
            [
                "tokens×width×vocab",
                "unfused peak above idle (MiB)",
                "fused (MiB)",
                "fused/unfused memory",
                "unfused step",
                "fused step",
                "fused/unfused time",
            ],
            rows,
        )
    )
    path = _common.write_json(
        "lm_head_quick.json" if args.quick else "lm_head.json",
        {"environment": env, "results": records},
        args.output,
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
