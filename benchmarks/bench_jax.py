"""Keras' JAX backend: `ops.multimax` vs `jax.nn.softmax`, and a ViT training step.

Op level (everything under `jax.jit`): at attention scores [16, 6, 197, 197],
order 2, modulator ranges (−1, 1, −2, 2), ts (0.3, 0.4, 0.1, 0.2) (the same as
``bench_ops.py``), the forward and forward+backward (gradients of x, ranges
and ts of ``sum(y · upstream)``) of `keras_multimax.ops.multimax`, of
`jax.nn.softmax` (the reference, gradient of x only) and of the plain formula
followed by `jax.nn.softmax`, differentiated by JAX ("plain autodiff").

End to end: `train_on_batch` of the `vit_classifier` of ``bench_e2e.py``
(DeiT-small attention geometry, 2 blocks, batch 8), SoftMax vs MultiMax
(order 2) attention and head, Keras' default ``compile()`` (jitted on JAX).

Usage (sets ``KERAS_BACKEND=jax`` itself; a few minutes on 2 cores)::

    python benchmarks/bench_jax.py [--runs 10] [--no-e2e]

With glibc's default malloc, some processes refault every 15 MB buffer on
every call, which moved the op ratios by up to 40 % here; to measure without
(``benchmarks/README.md``, "Page faults")::

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 \
        python benchmarks/bench_jax.py
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "jax"  # a script: it picks its backend

import argparse  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from keras_multimax import ops  # noqa: E402

SHAPE = (16, 6, 197, 197)
RANGES = (-1.0, 1.0, -2.0, 2.0)
TS = (0.3, 0.4, 0.1, 0.2)
TARGETS = {"forward+backward": 3.0, "forward": 1.5, "train_step": 1.10}


def plain_multimax(x, ranges, ts):
    """The paper's formula in `jax.numpy`, then `jax.nn.softmax`."""
    sigma = x
    for k in range(ts.shape[-1] // 2):
        sigma = (
            sigma
            + ts[2 * k] * jax.nn.relu(ranges[2 * k] - x) ** (k + 1)
            + ts[2 * k + 1] * jax.nn.relu(x - ranges[2 * k + 1]) ** (k + 1)
        )
    return jax.nn.softmax(sigma, axis=-1)


def op_variants() -> dict[str, dict]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    upstream = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    ranges, ts = jnp.asarray(RANGES), jnp.asarray(TS)
    fns = {
        "jax.nn.softmax": lambda x, r, t: jax.nn.softmax(x, axis=-1),
        "plain autodiff": plain_multimax,
        "MultiMax": lambda x, r, t: ops.multimax(x, r, t),
    }

    def run(f):
        return lambda: jax.block_until_ready(f(x, ranges, ts))

    passes = {"forward": {}, "forward+backward": {}}
    for name, fn in fns.items():
        argnums = (0,) if name == "jax.nn.softmax" else (0, 1, 2)
        passes["forward"][name] = run(jax.jit(fn))
        grad = jax.grad(lambda x, r, t, f=fn: jnp.sum(f(x, r, t) * upstream), argnums)
        passes["forward+backward"][name] = run(jax.jit(grad))
    return passes


def train_step_variants() -> dict:
    import bench_e2e

    config = {
        "image_shape": (56, 56, 3),
        "patch_size": 4,
        "num_classes": 100,
        "num_layers": 2,
        "hidden_dim": 384,
        "num_heads": 6,
        "mlp_dim": 1536,
        "batch_size": 8,
    }
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, *config["image_shape"])).astype("float32")
    labels = rng.integers(0, config["num_classes"], size=(8,))
    out = {}
    for kind in bench_e2e.KINDS:
        model = bench_e2e.build(kind, config, jit_compile=True)
        out[kind] = lambda m=model: m.train_on_batch(images, labels)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    env = _common.environment()
    env["jax"] = jax.__version__
    print(f"# {env['date_utc']}  {env['cpu']}; jax {env['jax']}, Keras {env['keras']}")
    print(f"# median of {args.runs} interleaved rounds; (×) = ratio in the same rounds")
    payload = {"environment": env, "runs": args.runs, "shape": SHAPE}
    rows, verdicts = [], []
    for name, variants in op_variants().items():
        # Ops of a few ms: one untimed call per variant and round, and rounds of
        # ≥ 0.1 s of the reference (see `_common.interleaved`).
        res = _common.interleaved(
            variants, "jax.nn.softmax", runs=args.runs, min_seconds=0.1, settle=1
        )
        payload[name] = res
        rows.append(
            [name]
            + [
                f"{res[v]['wall_ms']:.2f} ms ({res[v]['ratio']:.2f}×)"
                for v in ("jax.nn.softmax", "plain autodiff", "MultiMax")
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
        ratio = res["MultiMax"]["ratio"]
        ok = ratio <= TARGETS[name]
        if name == "forward+backward":
            ok = ok and res["MultiMax"]["wall_ms"] < res["plain autodiff"]["wall_ms"]
        low, high = res["MultiMax"]["ratio_quartiles"]
        verdicts.append(
            f"op {name}: {ratio:.2f}× (rounds' quartiles {low:.2f}–{high:.2f}×; "
            f"target {TARGETS[name]}×)"
        )
        verdicts[-1] += ", met" if ok else ", NOT met"
    print()
    header = ["[16, 6, 197, 197], order 2", "jax.nn.softmax", "plain autodiff"]
    print(_common.markdown_table([*header, "MultiMax"], rows))
    if not args.no_e2e:
        res = _common.interleaved(
            train_step_variants(), "softmax", runs=args.runs, warmup=3, min_seconds=0.0
        )
        payload["train_step"] = res
        ratio = res["multimax"]["ratio"]
        print(
            f"\nViT training step (jit): SoftMax {res['softmax']['wall_ms']:.0f} ms, "
            f"MultiMax {res['multimax']['wall_ms']:.0f} ms ({ratio:.3f}×)"
        )
        ok = ratio <= TARGETS["train_step"]
        verdicts.append(f"ViT training step: {ratio:.3f}× (target 1.10×)")
        verdicts[-1] += ", met" if ok else ", NOT met"
    print("\n" + "\n".join(verdicts))
    path = _common.write_json("jax.json", payload, args.output)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
