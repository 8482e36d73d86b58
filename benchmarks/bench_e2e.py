"""End to end: ViT training step and LiteRT latency, SoftMax vs MultiMax.

The models are `keras_multimax.models.vit_classifier` builders with the same
configuration, once with SoftMax attention and head and once with MultiMax in
every attention layer and the head (order 2, the paper's setting). Training
steps (`train_on_batch`, default ``compile()``: AdamW, from-logits loss) are
timed in interleaved rounds, in graph mode (Keras' default on CPU) and with
``jit_compile=True``, then inference of one batch (`predict_on_batch`, graph
mode). Then both models are exported to LiteRT with builtin ops only and the
latency of one image is timed in `ai_edge_litert`'s interpreter.

The default configuration is DeiT-small's attention geometry (196 tokens,
6 heads of 64, MLP 4x) with 2 blocks and batch 8, to fit a 2-core machine.

Usage::

    python benchmarks/bench_e2e.py            # a few minutes
    python benchmarks/bench_e2e.py --quick    # 1 block, batch 4, no jit
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_multimax.models import vit_classifier  # noqa: E402
from keras_multimax.toolkit import training  # noqa: E402

KINDS = ("softmax", "multimax")
TARGET = 1.15  # issue 7: ViT training step <= 1.15x SoftMax


def build(kind: str, config: dict, jit_compile: bool) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = vit_classifier(
        config["image_shape"],
        config["num_classes"],
        patch_size=config["patch_size"],
        num_layers=config["num_layers"],
        hidden_dim=config["hidden_dim"],
        num_heads=config["num_heads"],
        mlp_dim=config["mlp_dim"],
        attention=kind,
        head=kind,
    )
    training.compile_with_adamw(model, jit_compile=jit_compile)
    return model


def time_training(config: dict, jit_compile: bool, runs: int) -> dict:
    rng = np.random.default_rng(0)
    batch = config["batch_size"]
    images = rng.normal(size=(batch, *config["image_shape"])).astype("float32")
    labels = rng.integers(0, config["num_classes"], size=(batch,))
    models = {kind: build(kind, config, jit_compile) for kind in KINDS}
    steps = {
        kind: (lambda m=m: m.train_on_batch(images, labels))
        for kind, m in models.items()
    }
    return _common.interleaved(steps, "softmax", runs=runs, warmup=3, min_seconds=0.0)


def time_inference(config: dict, runs: int) -> dict:
    """`predict_on_batch` (Keras' graph-mode inference on CPU) of one batch."""
    images = np.random.default_rng(2).normal(
        size=(config["batch_size"], *config["image_shape"])
    )
    images = images.astype("float32")
    models = {kind: build(kind, config, jit_compile=False) for kind in KINDS}
    calls = {
        kind: (lambda m=m: m.predict_on_batch(images)) for kind, m in models.items()
    }
    return _common.interleaved(calls, "softmax", runs=runs, warmup=3, min_seconds=0.0)


def litert_latency(config: dict, runs: int) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    image = np.random.default_rng(1).normal(size=(1, *config["image_shape"]))
    image = image.astype("float32")
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            model = build(kind, config, jit_compile=False)
            model(image)
            path = f"{tmp}/{kind}.tflite"
            model.export(
                path,
                format="litert",
                verbose=False,
                target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]},
            )
            interpreter = Interpreter(path, num_threads=2)
            runner = interpreter.get_signature_runner("serving_default")
            name = next(iter(runner.get_input_details()))
            want = model(image).numpy()
            got = next(iter(runner(**{name: image}).values()))
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
            runners[kind] = lambda r=runner, n=name: r(**{n: image})
    time.sleep(0)
    return _common.interleaved(runners, "softmax", runs=runs, warmup=3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--no-litert", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    config = {
        "image_shape": (56, 56, 3),
        "patch_size": 4,  # 14 x 14 = 196 tokens
        "num_classes": 100,
        "num_layers": 1 if args.quick else 2,
        "hidden_dim": 384,
        "num_heads": 6,
        "mlp_dim": 1536,
        "batch_size": 4 if args.quick else 8,
    }
    runs = args.runs or (5 if args.quick else 10)
    jit_modes = (False,) if args.quick else (False, True)

    env = _common.environment()
    print(
        f"# {env['date_utc']}  {env['cpu']}; TF {env['tensorflow']}, Keras {env['keras']}"
    )
    print(f"# ViT {config}; median of {runs} interleaved rounds")
    rows, payload = [], {"environment": env, "config": config, "runs": runs}

    def report(key: str, label: str, res: dict, digits: int) -> None:
        payload[key] = res
        ratio = f"{res['multimax']['ratio']:.3f}×"
        if "litert" not in key:
            ratio += f" (cpu {res['multimax']['cpu_ratio']:.3f}×)"
        rows.append(
            [
                label,
                f"{res['softmax']['wall_ms']:.{digits}f} ms",
                f"{res['multimax']['wall_ms']:.{digits}f} ms",
                ratio,
            ]
        )
        print(" | ".join(rows[-1]), flush=True)

    for jit in jit_modes:
        mode = "jit_compile=True" if jit else "graph (Keras' CPU default)"
        res = time_training(config, jit, runs)
        report(f"train_step_jit_{jit}", f"training step, {mode}", res, 0)
    res = time_inference(config, runs=max(runs, 20))
    report("inference_graph", "inference (`predict_on_batch`), graph", res, 1)
    if not args.no_litert:
        res = litert_latency(config, runs=max(runs, 20))
        report("litert_latency", "LiteRT inference, 1 image", res, 2)
    print()
    print(_common.markdown_table(["", "SoftMax", "MultiMax", "ratio"], rows))
    graph = payload["train_step_jit_False"]["multimax"]["ratio"]
    verdict = "met" if graph <= TARGET else "NOT met"
    print(
        f"\nIssue 7 target: training step <= {TARGET}× SoftMax: {graph:.3f}×, {verdict}"
    )
    payload["target"] = {"limit": TARGET, "ratio": graph, "met": graph <= TARGET}
    path = _common.write_json("e2e.json", payload, args.output)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
