"""Memory and time of a MultiMax LM head's training step: fused vs unfused.

One forward+backward of the head (gradients for hidden, kernel, bias, ranges
and ts of the mean token loss), in a `tf.function`:

- ``unfused``: `keras.layers.Dense` → `keras_multimax.layers.SegLU` →
  `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`, the path of a
  keras_multimax LM before `ops.multimax_cross_entropy`;
- ``fused``: `keras_multimax._cross_entropy.multimax_cross_entropy` (default
  chunk size) averaged over the tokens.

Memory: each variant runs in its own subprocess, which builds the inputs,
resets the resident-set high-water mark (``/proc/self/clear_refs``), runs
two steps (tracing and XLA compilation included) and reports the peak RSS
(VmHWM) above the RSS before the steps: TensorFlow, Keras and the inputs are
not counted, nor the NumPy temporaries that built them (which, at the large
shape, exceed a fused step and hid it in ``ru_maxrss`` minus an idle
process). The JSON also keeps each process's ``ru_maxrss`` and that of an
``idle`` process that builds the inputs and runs no step.
Time: both variants in one more subprocess, interleaved (`_common.interleaved`).
``--lm`` adds the same two measurements for a `keras_multimax.models.TransformerLM`
training step (``train_on_batch``) with and without ``fused_head``.

Usage::

    python benchmarks/bench_lm_head.py            # [4096, 256, 32768], [8192, 512, 131072]
    python benchmarks/bench_lm_head.py --quick    # [512, 64, 4096]
    python benchmarks/bench_lm_head.py --lm       # and the TransformerLM step
    python benchmarks/bench_lm_head.py --shapes 4096,256,32768 --memory-only
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

# The benchmarks folder (for _common) and the checkout it belongs to (so that
# the workers, run as scripts, import this checkout's keras_multimax).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))

VARIANTS = ("unfused", "fused")
LM_WORKERS = ("lm_idle", "lm_unfused", "lm_fused", "lm_time")
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
    import _common

    hidden, labels, dense, ranges, ts = _setup(shape)

    def run():
        if variant != "idle":
            step = _step(variant, hidden, labels, dense, ranges, ts)
            step()
            float(step())

    return {"variant": variant, "shape": shape, **_common.peak_rss_above_start(run)}


def _lm_step(fused: bool, config):
    import numpy as np

    from keras_multimax import models
    from keras_multimax.toolkit import training

    batch, length, width, vocab = config
    model = models.TransformerLM(
        vocab,
        length,
        num_layers=1,
        hidden_dim=width,
        num_heads=4,
        mlp_dim=2 * width,
        fused_head=fused,
    )
    training.compile_with_adamw(model, metrics=None)  # the fused head ignores the loss
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab, size=(batch, length)).astype("int32")
    y = rng.integers(0, vocab, size=(batch, length)).astype("int32")
    return lambda: model.train_on_batch(x, y)


def lm_memory_worker(variant: str, config) -> dict:
    import _common

    step = _lm_step(variant == "lm_fused", config)

    def run():
        if variant != "lm_idle":
            step()
            step()

    return {"variant": variant, **_common.peak_rss_above_start(run)}


def lm_time_worker(config, runs: int) -> dict:
    import _common

    steps = {"unfused": _lm_step(False, config), "fused": _lm_step(True, config)}
    return _common.interleaved(steps, reference="unfused", runs=runs, warmup=1)


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


def _group(prefix: str, shape: str, variants, timed: bool, runs: int):
    """Memory of each variant (and of an idle process), then their times.

    Returns the JSON record and the table cells after the first column.
    """
    idle = _run(["--worker", f"{prefix}idle", "--shape", shape])
    memory = {v: _run(["--worker", f"{prefix}{v}", "--shape", shape]) for v in variants}
    timing = None
    if timed:
        timing = _run(
            ["--worker", f"{prefix}time", "--shape", shape, "--runs", str(runs)]
        )
    above = {v: m["step_peak_above_start_mib"] for v, m in memory.items()}
    ratio = above["fused"] / above["unfused"] if len(above) == 2 else None
    record = {
        "idle": idle,
        "memory": memory,
        "step_peak_above_start_mib": above,
        "memory_ratio": ratio,
        "timing": timing,
    }
    row = [f"{above[v]:.0f}" if v in above else "not run" for v in VARIANTS] + [
        f"{ratio:.3f}×" if ratio else ""
    ]
    if timing:
        row += [f"{timing[v]['wall_ms']:.0f} ms" for v in VARIANTS]
        row.append(f"{timing['fused']['ratio']:.2f}×")
    else:
        row += ["", "", ""]
    return record, row


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
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="memory only for a subset (e.g. fused alone where unfused needs more RAM)",
    )
    parser.add_argument(
        "--lm",
        action="store_true",
        help="add the TransformerLM training step (train_on_batch) with and "
        "without fused_head: batch 8 × 512 tokens, width 256, vocab 32768, "
        "1 layer (--quick: 2 × 64, 64, 4096)",
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--worker",
        choices=("idle", *VARIANTS, "time", *LM_WORKERS),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        shape = [int(v) for v in args.shape.split(",")]
        if args.worker == "time":
            result = time_worker(shape, args.runs)
        elif args.worker == "lm_time":
            result = lm_time_worker(shape, args.runs)
        elif args.worker.startswith("lm_"):
            result = lm_memory_worker(args.worker, shape)
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
        timed = text not in memory_only and len(args.variants) == len(VARIANTS)
        record, row = _group("", text, args.variants, timed, args.runs)
        records.append({"shape": [int(v) for v in text.split(",")], **record})
        rows.append(["×".join(text.split(",")), *row])
        print(json.dumps(records[-1]), flush=True)
    if args.lm:
        config = "2,64,64,4096" if args.quick else "8,512,256,32768"
        record, row = _group("lm_", config, VARIANTS, True, args.runs)
        records.append(
            {"transformer_lm": [int(v) for v in config.split(",")], **record}
        )
        label = f"TransformerLM train_on_batch (batch×length×width×vocab {config})"
        rows.append([label, *row])
        print(json.dumps(records[-1]), flush=True)
    print()
    print(
        _common.markdown_table(
            [
                "tokens×width×vocab",
                "unfused step peak above start (MiB)",
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
