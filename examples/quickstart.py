"""Quickstart: a small vision transformer with SoftMax and with MultiMax, side by side.

    python examples/quickstart.py [--output-dir outputs/quickstart] [--results PATH]

Trains the same ViT twice on handwritten digits (tensorflow-datasets' MNIST
when it is already prepared on this machine, otherwise scikit-learn's bundled
8x8 digits, announced by one line): once with SoftMax attention and output,
once with MultiMax (`MultiMaxAttention` in every block and a `SegLU` head).
Then it

- prints a comparison table: test accuracy, attention sparsity and
  multi-modality (the paper's Definitions 3.2/3.3, see
  `keras_multimax.analysis`), median training step time, and the same
  metrics per layer, and writes both tables to a Markdown file (``--results``,
  default ``<output-dir>/results.md``; the README's table is checked against
  it by tests/test_quickstart.py);
- writes PNG plots into the output directory: the learned modulators σ, the
  attention maps of both models for the same image, the simplex picture;
- exports the MultiMax model as `.keras`, SavedModel and `.tflite` there and
  checks each export's outputs against Keras (LiteRT run with
  `ai_edge_litert`), through `keras_multimax.export.export_all`.

About 3-5 minutes on 2 CPU cores. ``--smoke`` runs a seconds-long version
(tiny model, one epoch) used by the tests.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_multimax import analysis  # noqa: E402
from keras_multimax import export  # noqa: E402
from keras_multimax import models  # noqa: E402
from keras_multimax.toolkit import data  # noqa: E402
from keras_multimax.toolkit import plots  # noqa: E402
from keras_multimax.toolkit import timing  # noqa: E402
from keras_multimax.toolkit import training  # noqa: E402

# tf.data pipelines are shuffled already; Keras warns that fit's shuffle is unused.
warnings.filterwarnings("ignore", message=".*shuffle=True.*")

# Output differences tolerated for exported models, relative to the largest
# logit (at least 1): 64 float32 eps, as LiteRT's kernels round in another
# order than TensorFlow's through the whole ViT.
EXPORT_TOLERANCE = 64 * float(np.finfo(np.float32).eps)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        default=os.path.join("outputs", "quickstart"),
        help="where plots and exported models go (default: outputs/quickstart)",
    )
    parser.add_argument(
        "--results",
        default=None,
        help="Markdown file for the results tables "
        "(default: results.md in the output directory)",
    )
    parser.add_argument(
        "--dataset",
        choices=("auto", "mnist", "digits"),
        default="auto",
        help="auto: tfds MNIST if it is prepared locally (or --download), "
        "else sklearn digits",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="let tensorflow-datasets download MNIST if it is missing",
    )
    parser.add_argument("--epochs", type=int, default=None, help="training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, one epoch, few examples: checks that everything runs",
    )
    return parser.parse_args(argv)


def load_data(args):
    name = "digits" if args.dataset == "digits" else "mnist"
    limits = (256, 128) if args.smoke else (6000, 1000)
    task = data.image_classification(
        name,
        batch_size=64,
        max_train_examples=limits[0],
        max_test_examples=limits[1],
        download=args.download,
        seed=args.seed,
    )
    # 8x8 digits in 2x2 patches, 28x28 MNIST in 7x7 patches: 16 tokens each.
    patch_size = 2 if task.info["input_shape"][0] == 8 else 7
    return task, patch_size


def build(kind, task, patch_size, smoke):
    size = (
        {"num_layers": 1, "hidden_dim": 16, "num_heads": 2, "mlp_dim": 32}
        if smoke
        else {"num_layers": 4, "hidden_dim": 64, "num_heads": 4, "mlp_dim": 128}
    )
    model = models.ViTClassifier(
        task.info["input_shape"],
        task.info["num_classes"],
        patch_size=patch_size,
        attention=kind,
        head=kind,
        name=f"vit_{kind}",
        **size,
    )
    training.compile_with_adamw(model, learning_rate=2e-3, weight_decay=0.05)
    return model


def train_and_measure(kind, task, patch_size, args, eval_images):
    keras.utils.set_random_seed(args.seed)
    model = build(kind, task, patch_size, args.smoke)
    epochs = args.epochs or (1 if args.smoke else 30)
    timer = timing.StepTimer(warmup=5)
    callbacks = [timer]
    logger = None
    if kind == "multimax":
        logger = analysis.ModulatorLogger(
            log_dir=os.path.join(args.output_dir, "tensorboard")
        )
        callbacks.append(logger)
    print(f"\n== Training the {kind} ViT ({model.count_params():,} parameters) ==")
    model.fit(
        task.train,
        epochs=epochs,
        validation_data=task.test,
        callbacks=callbacks,
        verbose=1 if sys.stdout.isatty() else 2,
    )
    _, accuracy = model.evaluate(task.test, verbose=0)
    stats = analysis.attention_statistics(model, eval_images)
    return model, {
        "model": "MultiMax" if kind == "multimax" else "SoftMax",
        "accuracy": accuracy,
        "sparsity": float(np.mean([s["sparsity"] for s in stats])),
        "multimodality": float(np.mean([s["multimodality"] for s in stats])),
        "step_ms": 1000 * timer.median(),
        "params": model.count_params(),
        "per_layer": stats,
    }


def print_table(rows):
    header = (
        "| attention + head | test accuracy | attention sparsity | "
        "multi-modality | step time (ms) | parameters |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['accuracy']:.4f} | {r['sparsity']:.3f} | "
            f"{r['multimodality']:.3f} | {r['step_ms']:.1f} | {r['params']:,} |"
        )
    lines += [
        "",
        "| layer | SoftMax sparsity | MultiMax sparsity | SoftMax multi-modality "
        "| MultiMax multi-modality |",
        "|---|---|---|---|---|",
    ]
    for soft, multi in zip(rows[0]["per_layer"], rows[1]["per_layer"]):
        lines.append(
            f"| {soft['layer']} | {soft['sparsity']:.3f} | {multi['sparsity']:.3f} | "
            f"{soft['multimodality']:.3f} | {multi['multimodality']:.3f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    return table


def _cpu() -> str:
    """The CPU's name and, on Linux, its family and model (which set its kernels)."""
    fields = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f", family {fields['cpu family']} model {fields['model']}"
    return f"{name}, {platform.machine()}, {platform.system()}"


def measured_on() -> str:
    """One line: where the figures were measured, for the results file.

    Training results are the same run after run on one machine, but a
    different CPU (other vector instructions in XLA and oneDNN kernels), core
    count or library version changes their last digits.
    """
    backend = keras.backend.backend()
    version = importlib.import_module(backend).__version__
    names = {"tensorflow": "TensorFlow", "jax": "JAX"}
    cores = (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count()
    )
    return (
        f"Measured on {cores} CPU cores ({_cpu()}) with "
        f"{names.get(backend, backend)} {version}, Keras {keras.version()}, "
        f"NumPy {np.__version__}."
    )


def write_plots(softmax_model, multimax_model, eval_images, output_dir):
    paths = {}
    paths["modulators"] = os.path.join(output_dir, "modulators.png")
    plots.plot_modulators(multimax_model, paths["modulators"])
    image = eval_images[:1]
    maps = {}
    for label, model in (("SoftMax", softmax_model), ("MultiMax", multimax_model)):
        first = next(iter(model.attention_maps(image).values()))[0]
        maps[label] = first[0]  # (heads, queries, keys): the head mean is shown
    paths["attention"] = os.path.join(output_dir, "attention_maps.png")
    plots.plot_attention_maps(
        maps, paths["attention"], title="First encoder block, same test image"
    )
    attention = multimax_model.blocks[0].attention
    paths["simplex"] = os.path.join(output_dir, "simplex.png")
    plots.plot_simplex(attention.ranges, attention.ts, paths["simplex"])
    return paths


def export_and_check(model, images, output_dir):
    """Writes the exports with `export.export_all`, which runs each one."""
    results = export.export_all(
        model,
        output_dir,
        images,
        formats=("keras", "tf_saved_model", "litert"),
        repeats=5,
    )
    print("\n" + export.format_table(results))
    scale = max(1.0, float(np.max(np.abs(model.predict(images, verbose=0)))))
    failures = [
        f"{r.format}: {r.max_abs_diff:.2e}"
        for r in results
        if not r.max_abs_diff <= EXPORT_TOLERANCE * scale
    ]
    if failures:
        raise SystemExit("Exported model differs from Keras: " + "; ".join(failures))


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    task, patch_size = load_data(args)
    print(
        f"Data: {task.source}, {task.info['num_train']} training / "
        f"{task.info['num_test']} test images of shape {task.info['input_shape']}"
    )
    eval_images = next(task.test.as_numpy_iterator())[0]

    rows, trained = [], {}
    for kind in ("softmax", "multimax"):
        trained[kind], row = train_and_measure(
            kind, task, patch_size, args, eval_images
        )
        rows.append(row)

    print(
        f"\nSoftMax vs MultiMax ViT on {task.source} "
        f"(attention metrics: mean over layers, {len(eval_images)} test images)"
    )
    table = print_table(rows)
    where = measured_on()
    print(where)
    results = args.results or os.path.join(args.output_dir, "results.md")
    with open(results, "w") as f:
        f.write(f"{where}\n\n{table}\n")
    print(f"Tables written to {results}")

    paths = write_plots(
        trained["softmax"], trained["multimax"], eval_images, args.output_dir
    )
    print("\nPlots: " + ", ".join(paths.values()))
    export_and_check(trained["multimax"], eval_images[:8], args.output_dir)
    print(
        f"\nTensorBoard logs of the modulators: "
        f"tensorboard --logdir {os.path.join(args.output_dir, 'tensorboard')}"
    )
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return rows


if __name__ == "__main__":
    main()
