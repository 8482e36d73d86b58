"""Blockwise MultiMax attention against the materialised one and Keras' SoftMax.

One training step of attention alone, forward+backward (gradients for q, k
and v, and for ranges and ts where there are some), at batch 1, 8 heads,
head_dim 64, sequence lengths T from 1k to 32k, causal and not, on the
TensorFlow (`tf.function`, the default plain-op forward) and JAX (`jax.jit`)
backends:

- ``flash``: `keras_multimax.ops.multimax_dot_product_attention`;
- ``materialised``: ``einsum`` → `keras_multimax.ops.multimax` (with the
  causal mask) → ``einsum``, the scores held whole;
- ``softmax``: `keras.ops.dot_product_attention` (SoftMax, materialised by
  both backends on the CPU).

Memory: one subprocess per backend, variant, length and causal flag builds
the inputs, runs one step (tracing, compilation, allocator growth), resets
the resident-set high-water mark (``/proc/self/clear_refs``) and runs one
more step: its peak RSS above the RSS before it is the "peak above idle".
The workers run with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc returns
every freed buffer to the system and the warm-up step's buffers do not hide
inside the RSS before the measured step. A variant is not run where it
would not fit: the materialised variants need `_MATERIALISED_COPIES`
score-sized buffers, checked against ``MemAvailable`` (less 1 GiB).

Time: the variants that fit, in one more subprocess per backend, length and
causal flag, interleaved (`_common.interleaved`); up to ``--time-max``
(lengths above it are timed by the measured step of the memory worker,
alone). Ratios are to the materialised MultiMax attention.

Usage::

    python benchmarks/bench_attention.py                  # both backends, 1k..32k
    python benchmarks/bench_attention.py --quick          # 256 and 512, smoke test
    python benchmarks/bench_attention.py --backends jax --lengths 4096 \\
        --variants flash --block-sizes 128 256 512 1024    # the block-size sweep
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

# The benchmarks folder (for _common) and the checkout it belongs to.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))

VARIANTS = ("flash", "materialised", "softmax")
BACKENDS = ("tensorflow", "jax")
BATCH, HEADS, HEAD_DIM = 1, 8, 64
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
ORDER2 = ([-1.0, 1.0, -2.0, 2.0], [0.3, 0.4, 0.1, 0.2])
# Score-sized float32 buffers a materialised step holds at its peak (scores,
# probabilities, their gradients and the backends' temporaries), measured: on
# JAX 6.1 at T=8192 (13.2 GiB peak RSS); on TensorFlow 7.7 at T=4096 (2.8 GiB
# above the RSS after a warm-up step that kept 1.1 GiB more).
_MATERIALISED_COPIES = {"jax": 7, "tensorflow": 8}
# Left to the other processes of the machine.
_MARGIN_BYTES = 2**30


def _inputs(length: int):
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (BATCH, length, HEADS, HEAD_DIM)
    q, k, v = (rng.normal(size=shape).astype("float32") for _ in range(3))
    ranges, ts = (np.array(p, "float32") for p in ORDER2)
    return q, k, v, ranges, ts


def _attention(variant: str, length: int, causal: bool, block_size):
    import keras
    import numpy as np

    from keras_multimax import ops

    if variant == "flash":
        return lambda q, k, v, r, t: ops.multimax_dot_product_attention(
            q, k, v, is_causal=causal, ranges=r, ts=t, block_size=block_size
        )
    if variant == "softmax":
        return lambda q, k, v, r, t: keras.ops.dot_product_attention(
            q, k, v, is_causal=causal
        )
    mask = np.tril(np.ones((length, length), bool)) if causal else None

    def materialised(q, k, v, r, t):
        x = keras.ops.einsum("bqhd,bkhd->bhqk", q, k) / HEAD_DIM**0.5
        p = ops.multimax(x, r, t, axis=-1, mask=mask)
        return keras.ops.einsum("bhqk,bkhd->bqhd", p, v)

    return materialised


def _step(variant: str, length: int, causal: bool, block_size):
    """A compiled forward+backward step and its arguments; returns ``run()``."""
    import keras
    import numpy as np

    attention = _attention(variant, length, causal, block_size)
    arrays = _inputs(length)
    wrt = 3 if variant == "softmax" else 5
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        args = [tf.constant(a) for a in arrays]

        @tf.function(autograph=False)
        def step(*a):
            with tf.GradientTape() as tape:
                tape.watch(a[:wrt])
                loss = tf.reduce_mean(tf.square(attention(*a)))
            grads = tape.gradient(loss, a[:wrt])
            # A scalar that depends on every gradient, so that none is pruned.
            return loss + tf.add_n([tf.reduce_sum(g) for g in grads]) * 0.0

        return lambda: float(step(*args))
    import jax
    import jax.numpy as jnp

    args = [jnp.asarray(a) for a in arrays]

    def loss(*a):
        return jnp.mean(jnp.square(attention(*a)))

    grad = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(wrt))))
    compiled = grad.lower(*args).compile()
    return lambda: float(np.asarray(compiled(*args)[0]))


def memory_worker(variant, length, causal, block_size) -> dict:
    import _common

    run = _step(variant, length, causal, block_size)
    run()  # tracing, compilation, allocator growth
    times = {}

    def timed():
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        times["step_wall_s"] = time.perf_counter() - wall
        times["step_cpu_s"] = time.process_time() - cpu

    return {**_common.peak_rss_above_start(timed), **times}


def time_worker(variants, length, causal, block_size, runs: int) -> dict:
    import _common

    steps = {v: _step(v, length, causal, block_size) for v in variants}
    reference = "materialised" if "materialised" in steps else variants[0]
    return _common.interleaved(steps, reference=reference, runs=runs, warmup=1)


def _available_bytes() -> int:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


def _fits(backend: str, variant: str, length: int) -> tuple[bool, str]:
    if variant == "flash":
        return True, ""
    copies = _MATERIALISED_COPIES[backend]
    need = copies * 4 * BATCH * HEADS * length**2
    available = _available_bytes() - _MARGIN_BYTES
    if need <= available:
        return True, ""
    return False, (
        f"not run: needs about {need / 2**30:.0f} GiB ({copies} score-sized "
        f"buffers), {available / 2**30:.1f} GiB available (1 GiB left aside)"
    )


def _run(args: list[str], backend: str, malloc: bool) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        killed = done.returncode < 0
        reason = "killed (out of memory?)" if killed else "failed"
        print(f"worker {args} {reason}:\n{done.stderr[-2000:]}", file=sys.stderr)
        return {"error": f"{reason}, exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _config(backend, length, causal, block_size, variants, time_max, runs):
    common = ["--length", str(length), "--causal", str(int(causal))]
    if block_size:
        common += ["--block-size", str(block_size)]
    memory, skipped = {}, {}
    for variant in variants:
        fits, reason = _fits(backend, variant, length)
        if not fits:
            skipped[variant] = reason
            continue
        args = ["--worker", "memory", "--variant", variant, *common]
        memory[variant] = _run(args, backend, malloc=True)
    timed = [v for v in memory if "error" not in memory[v]]
    timing = None
    if length <= time_max and timed:
        args = ["--worker", "time", "--variants", *timed, *common, "--runs", str(runs)]
        timing = _run(args, backend, malloc=False)
    return {
        "backend": backend,
        "length": length,
        "causal": causal,
        "block_size": block_size,
        "memory": memory,
        "skipped": skipped,
        "timing": timing,
    }


def _mib(record, variant):
    m = record["memory"].get(variant)
    if m is None:
        return None
    return m.get("step_peak_above_start_mib")


def _seconds(record, variant):
    timing = record["timing"]
    if timing and variant in timing:
        return timing[variant]["wall_ms"] / 1e3
    m = record["memory"].get(variant)
    return None if m is None or "error" in m else m["step_wall_s"]


def _row(record) -> list:
    flash, mat, soft = (_mib(record, v) for v in VARIANTS)
    times = [_seconds(record, v) for v in VARIANTS]
    timing = record["timing"] or {}

    def cell(value, unit=""):
        if value is None:
            return "—"
        return f"{value:.0f}{unit}" if unit != " s" else f"{value:.2f} s"

    def ratio(a, b):
        return f"{a / b:.3f}×" if a is not None and b else "—"

    time_ratio = "—"
    if "flash" in timing and "materialised" in timing:
        time_ratio = f"{timing['flash']['ratio']:.2f}×"
    soft_ratio = "—"
    if "flash" in timing and "softmax" in timing:
        soft_ratio = f"{timing['flash']['wall_ms'] / timing['softmax']['wall_ms']:.2f}×"
    return [
        record["backend"],
        "causal" if record["causal"] else "full",
        record["length"],
        cell(flash),
        cell(mat),
        ratio(flash, mat),
        cell(soft),
        cell(times[0], " s"),
        cell(times[1], " s"),
        time_ratio,
        cell(times[2], " s"),
        soft_ratio,
    ]


HEADER = [
    "backend",
    "mask",
    "T",
    "flash peak above idle (MiB)",
    "materialised (MiB)",
    "flash/materialised memory",
    "softmax (MiB)",
    "flash step",
    "materialised step",
    "flash/materialised time",
    "softmax step",
    "flash/softmax time",
]


def _targets(records) -> list[str]:
    """The issue's targets on this CPU, checked on what was measured."""
    lines = []
    for backend in {r["backend"] for r in records}:
        for causal in (False, True):
            mine = {
                r["length"]: r
                for r in records
                if r["backend"] == backend and r["causal"] == causal
            }
            label = f"{backend}, {'causal' if causal else 'full'}:"
            at8k = mine.get(8192)
            if at8k:
                flash, mat = _mib(at8k, "flash"), _mib(at8k, "materialised")
                if flash and mat:
                    lines.append(
                        f"{label} 8k memory {flash / mat:.3f}× (target ≤ 0.05)"
                    )
                timing = at8k["timing"] or {}
                if "materialised" in timing:
                    target = 0.8 if causal else 1.3
                    lines.append(
                        f"{label} 8k time {timing['flash']['ratio']:.2f}× "
                        f"(target ≤ {target})"
                    )
            if 32768 in mine and _mib(mine[32768], "flash"):
                gib = _mib(mine[32768], "flash") / 1024
                lines.append(f"{label} 32k memory {gib:.2f} GiB (target ≤ 2)")
            # A worker that failed (killed, out of memory) has no figure.
            if (
                16384 in mine
                and at8k
                and _mib(at8k, "flash")
                and _mib(mine[16384], "flash")
            ):
                growth = _mib(mine[16384], "flash") / _mib(at8k, "flash")
                lines.append(f"{label} 16k/8k memory {growth:.2f}× (target ≤ 2.2)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=BACKENDS)
    parser.add_argument("--lengths", nargs="+", type=int, default=None)
    parser.add_argument("--causal", nargs="+", type=int, choices=(0, 1), default=(0, 1))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument(
        "--block-sizes",
        nargs="+",
        type=int,
        default=[0],
        help="flash block sizes to compare (0: the default)",
    )
    parser.add_argument("--time-max", type=int, default=8192)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", choices=("memory", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--block-size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        causal = bool(args.causal[0])
        if args.worker == "memory":
            result = memory_worker(args.variant, args.length, causal, args.block_size)
        else:
            result = time_worker(
                args.variants, args.length, causal, args.block_size, args.runs
            )
        print(json.dumps(result))
        return 0

    import _common

    lengths = args.lengths or ((256, 512) if args.quick else LENGTHS)
    env = _common.environment()
    print(f"# {env['date_utc']}  {env['cpu']}; TF {env['tensorflow']}", flush=True)
    records = []
    for backend in args.backends:
        for causal in args.causal:
            for length in lengths:
                for block in args.block_sizes:
                    record = _config(
                        backend,
                        length,
                        bool(causal),
                        block or None,
                        args.variants,
                        args.time_max,
                        args.runs,
                    )
                    records.append(record)
                    print(json.dumps(record), flush=True)
    print()
    rows = [_row(r) for r in records]
    if len(args.block_sizes) > 1:
        header = ["block", *HEADER]
        rows = [[r["block_size"] or "default", *row] for r, row in zip(records, rows)]
    else:
        header = HEADER
    print(_common.markdown_table(header, rows))
    for line in _targets(records):
        print(line)
    name = "attention_quick.json" if args.quick else "attention.json"
    path = _common.write_json(
        name, {"environment": env, "results": records}, args.output
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
