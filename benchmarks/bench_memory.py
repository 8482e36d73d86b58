"""Peak memory of an attention training step: SoftMax, plain autodiff, MultiMax.

Each variant runs in its own subprocess: a `tf.function` training step of one
attention layer, ``softmax(q·kᵀ/√d)·v`` with the normalisation swapped, with
gradients for q, k, v (and ranges, ts). After a warm-up step (tracing, XLA
compilation) TensorFlow's allocator statistics are reset and one more step is
run; its peak allocation is reported, together with the peak resident set
size (RSS) of the whole process (which also counts TensorFlow itself and
compilation).

Usage::

    python benchmarks/bench_memory.py            # [32, 12, 197, 197] scores
    python benchmarks/bench_memory.py --quick    # [8, 12, 197, 197]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

VARIANTS = ("softmax", "plain", "multimax")
HEAD_DIM = 64


def worker(variant: str, shape: list[int], mode: str) -> dict:
    import _common
    import numpy as np
    import tensorflow as tf

    from keras_multimax import ops

    batch, heads, length, _ = shape
    rng = np.random.default_rng(0)

    def var(*s):
        return tf.Variable(rng.normal(size=s).astype("float32"))

    q, k, v = (var(batch, heads, length, HEAD_DIM) for _ in range(3))
    ranges = tf.Variable(np.array([-1.0, 1.0, -2.0, 2.0], "float32"))
    ts = tf.Variable(np.array([0.3, 0.4, 0.1, 0.2], "float32"))
    weights = [q, k, v] if variant == "softmax" else [q, k, v, ranges, ts]

    def normalise(scores):
        if variant == "softmax":
            return tf.nn.softmax(scores)
        if variant == "plain":
            return _common.plain_multimax(scores, ranges, ts)
        return ops.multimax(scores, ranges, ts)

    def step():
        with tf.GradientTape() as tape:
            scores = tf.einsum("bhqd,bhkd->bhqk", q, k) / HEAD_DIM**0.5
            out = tf.einsum("bhqk,bhkd->bhqd", normalise(scores), v)
            loss = tf.reduce_mean(tf.square(out))
        grads = tape.gradient(loss, weights)
        for w, g in zip(weights, grads):
            w.assign_sub(1e-3 * g)
        return loss

    step = _common.compile_fn(step, mode)
    step()
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    step()
    info = tf.config.experimental.get_memory_info("CPU:0")
    return {
        "variant": variant,
        "mode": mode,
        "shape": shape,
        "tf_peak_mib": info["peak"] / 2**20,
        "tf_peak_above_start_mib": (info["peak"] - before) / 2**20,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shape", type=int, nargs=4, default=None)
    parser.add_argument("--modes", nargs="+", default=["graph", "xla"])
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = args.shape or ([8, 12, 197, 197] if args.quick else [32, 12, 197, 197])
    if args.worker:
        print(json.dumps(worker(args.worker, shape, args.modes[0])))
        return 0

    import _common
    import numpy as np

    env = _common.environment()
    size = np.prod(shape) * 4 / 2**20
    print(f"# {env['date_utc']}  {env['cpu']}; TF {env['tensorflow']}")
    print(f"# scores {shape} float32 = {size:.0f} MiB per tensor; head_dim {HEAD_DIM}")
    records = []
    for mode in args.modes:
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--worker", variant, "--modes", mode]
            cmd += ["--shape", *map(str, shape)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"worker {variant}/{mode} failed")
            records.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(records[-1]), flush=True)
    rows = []
    for mode in args.modes:
        base = next(
            r for r in records if r["mode"] == mode and r["variant"] == "softmax"
        )
        for r in records:
            if r["mode"] != mode:
                continue
            rows.append(
                [
                    mode,
                    r["variant"],
                    f"{r['tf_peak_above_start_mib']:.0f}",
                    f"{r['tf_peak_above_start_mib'] / base['tf_peak_above_start_mib']:.2f}×",
                    f"{r['max_rss_mib']:.0f}",
                ]
            )
    print()
    print(
        _common.markdown_table(
            [
                "mode",
                "normalisation",
                "step peak (MiB, TF allocator)",
                "vs SoftMax",
                "process max RSS (MiB)",
            ],
            rows,
        )
    )
    path = _common.write_json(
        "memory.json",
        {"environment": env, "shape": shape, "results": records},
        args.output,
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
