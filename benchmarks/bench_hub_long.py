"""A converted KerasHub Llama trained at long context, with and without the flash switch.

Builds a small KerasHub ``LlamaCausalLM`` (KerasHub 0.32, ``preprocessor=None``,
random weights), converts it with ``keras_multimax.convert.to_multimax``, and
measures one compiled training step (``train_on_batch``, Adam, sparse
cross-entropy on logits) at sequence length ``--length`` (default 8192):

- **blockwise**: Keras' flash switch on (its default), so the converted
  attention runs `ops.multimax_dot_product_attention`;
- **materialised**: after ``keras.config.disable_flash_attention()``, the
  scores and probabilities ``[B, heads, T, T]`` of every layer are kept for
  the backward pass.

Each variant runs in its own subprocess (so that one's buffers do not count
for the other): a first step compiles, then the peak RSS of a second step
above the RSS before it is measured (`_common.peak_rss_above_start`) with its
wall time. A materialised variant that would not fit in the memory available
is reported as not run instead of being killed by the system.

Usage::

    python benchmarks/bench_hub_long.py [--length 8192] [--backend tensorflow|jax]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))

VARIANTS = ("blockwise", "materialised")
CONFIG = {
    "vocabulary_size": 256,
    "num_layers": 2,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "hidden_dim": 64,
    "intermediate_dim": 128,
}


def _materialised_bytes(length: int) -> int:
    """What the materialised attention keeps: scores and probabilities, float32,
    per layer, plus as much again for the backward's temporaries."""
    heads, layers = CONFIG["num_query_heads"], CONFIG["num_layers"]
    return 4 * 4 * heads * length * length * layers


def _available_bytes() -> int:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def worker(variant: str, length: int) -> dict:
    import _common
    import keras
    import keras_hub
    import numpy as np

    from keras_multimax.convert import to_multimax

    if variant == "materialised":
        keras.config.disable_flash_attention()
    backbone = keras_hub.models.LlamaBackbone(**CONFIG)
    lm = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    model = to_multimax(lm)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CONFIG["vocabulary_size"], (1, length + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((1, length), bool)}
    y = tokens[:, 1:]
    start = time.perf_counter()
    first = model.train_on_batch(x, y)
    compile_s = time.perf_counter() - start
    timing = {}

    def step():
        begin = time.perf_counter()
        timing["loss"] = float(np.ravel(model.train_on_batch(x, y))[0])
        timing["step_wall_s"] = time.perf_counter() - begin

    memory = _common.peak_rss_above_start(step)
    return {
        **memory,
        **timing,
        "first_step_s": compile_s,
        "first_loss": float(np.ravel(first)[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument(
        "--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow")
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.length)))
        return

    import _common

    results = {}
    for variant in args.variants:
        if variant == "materialised":
            need = _materialised_bytes(args.length)
            if need > 0.8 * _available_bytes():
                results[variant] = {
                    "not_run": f"needs ~{need / 2**30:.1f} GiB, "
                    f"{_available_bytes() / 2**30:.1f} GiB available"
                }
                continue
        env = {**os.environ, "KERAS_BACKEND": args.backend}
        # Freed buffers leave the RSS, so that the peak is what the step holds.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        command = [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--length",
            str(args.length),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            # A negative code is the signal that killed it (9: out of memory?).
            results[variant] = {
                "failed": done.stderr[-2000:],
                "returncode": done.returncode,
            }
            continue
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    rows = []
    for variant, r in results.items():
        if "step_peak_above_start_mib" in r:
            rows.append(
                [
                    variant,
                    f"{r['step_peak_above_start_mib']:.0f}",
                    f"{r['step_wall_s']:.1f}",
                    f"{r['loss']:.4f}",
                ]
            )
        else:
            failure = f"failed (exit {r.get('returncode')})"
            rows.append([variant, r.get("not_run", failure), "", ""])
    print(
        _common.markdown_table(
            ["variant", "step peak above start (MiB)", "step (s)", "loss"], rows
        )
    )
    payload = {
        "environment": _common.environment(),
        "backend": args.backend,
        "length": args.length,
        "config": CONFIG,
        "results": results,
    }
    _common.write_json(f"hub_long_{args.backend}.json", payload, args.output)


if __name__ == "__main__":
    main()
