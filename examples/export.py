"""Deploy: export a MultiMax ViT to every format and check each against Keras.

    python examples/export.py [--output-dir outputs/export] [--model vit.keras]

Trains a small vision transformer with `MultiMaxAttention` in every block and
a `SegLU` head on scikit-learn's handwritten digits (bundled, offline) for a
few epochs, or loads a ``.keras`` file given with ``--model``. Then
`keras_multimax.export.export_all` writes (by default every format whose
runtime is installed; one line names those skipped and the package they need)

- ``model.keras`` (reload: ``import keras_multimax; keras.saving.load_model``),
- ``saved_model/`` (``model.export``: TensorFlow Serving, reloads without
  keras_multimax and keeps the MultiMax gradients),
- ``model.tflite`` and ``model_dynamic_range.tflite`` (LiteRT, builtin ops
  only, float32 and int8 weights),
- ``model.onnx`` (tf2onnx, run with onnxruntime),

runs each in its own runtime on one batch and prints a table: format,
file size, largest absolute difference to the Keras logits, median latency
per batch. The table also goes to ``<output-dir>/export_results.md``. Exits
with an error if a float32 export differs from Keras by more than 1e-4
(logits; kernels sum in different orders) or the int8 one by more than 0.25
(0.07 measured).

The batch is ``--batch-size`` digits test images, or, for a ``--model`` that
does not take 8x8x1 images, random inputs shaped like ``model.inputs``: each
``None`` dimension becomes the batch size (first) or 8 (others); float inputs
are standard normal, integer inputs random token ids in 1..9 (valid for any
vocabulary of at least 10 tokens, and never 0, the usual padding id), boolean
inputs (masks) True with probability 0.8.

About a minute on 2 CPU cores; ``--smoke`` runs a seconds-long version.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_multimax import export  # noqa: E402
from keras_multimax import models  # noqa: E402
from keras_multimax.toolkit import data  # noqa: E402
from keras_multimax.toolkit import training  # noqa: E402

# tf.data pipelines are shuffled already; Keras warns that fit's shuffle is unused.
warnings.filterwarnings("ignore", message=".*shuffle=True.*")
warnings.filterwarnings("ignore", category=FutureWarning, message=".*np.object.*")

FLOAT_ATOL = 1e-4
QUANTIZED_ATOL = 0.25
DIGITS_SHAPE = (8, 8, 1)
PARITY_LENGTH = 8  # every None dimension but the batch
PARITY_IDS = (1, 9)  # integer inputs: token ids drawn from 1..9


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        default=os.path.join("outputs", "export"),
        help="where the exported files go (default: outputs/export)",
    )
    parser.add_argument(
        "--model", default=None, help="a .keras file to export instead of training"
    )
    parser.add_argument("--epochs", type=int, default=None, help="training epochs")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="batch of the parity/latency runs"
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        default=None,
        choices=export.FORMATS,
        help="formats to export (default: all whose runtime is installed)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, one epoch, few timings"
    )
    return parser.parse_args(argv)


def train_model(task, args):
    size = (
        {"num_layers": 1, "hidden_dim": 16, "num_heads": 2, "mlp_dim": 32}
        if args.smoke
        else {"num_layers": 2, "hidden_dim": 64, "num_heads": 4, "mlp_dim": 128}
    )
    model = models.vit_classifier(
        task.info["input_shape"],
        task.info["num_classes"],
        patch_size=2,
        attention="multimax",
        head="multimax",
        name="vit_multimax",
        **size,
    )
    training.compile_with_adamw(model, learning_rate=2e-3, weight_decay=0.05)
    epochs = args.epochs or (1 if args.smoke else 5)
    print(
        f"Training a MultiMax ViT ({model.count_params():,} parameters), {epochs} epochs"
    )
    model.fit(task.train, epochs=epochs, verbose=2)
    _, accuracy = model.evaluate(task.test, verbose=0)
    print(f"Test accuracy: {accuracy:.4f}")
    return model


def choose_formats(requested):
    """The formats to run: `requested` (all must run) or every runnable one.

    Raises `SystemExit` naming the missing packages (or the Keras backend)
    if a format asked for with ``--formats`` cannot run; with the default,
    prints one line naming the formats skipped.
    """
    unsupported = export.unsupported_formats(requested or export.FORMATS)
    if requested and unsupported:
        reasons = "; ".join(dict.fromkeys(unsupported.values()))
        raise SystemExit(f"error: --formats {' '.join(unsupported)}: {reasons}.")
    if unsupported:
        print(f"Skipping {', '.join(unsupported)}: {next(iter(unsupported.values()))}")
    missing = export.unavailable_formats(requested or export.FORMATS)
    needs = "; ".join(f"{f} needs {', '.join(p)}" for f, p in missing.items())
    install = "the export extra: pip install 'keras-multimax[export]'"
    if any("jax2onnx" in p for p in missing.values()):
        install += ", and jax2onnx (ONNX from JAX; not in the extra)"
    if requested:
        if missing:
            raise SystemExit(
                f"error: --formats {' '.join(missing)}: runtime not installed "
                f"({needs}). Install them with {install}."
            )
        return list(requested)
    if missing:
        print(
            f"Skipping {', '.join(missing)}: runtime not installed ({needs}); install {install}"
        )
    return [f for f in export.FORMATS if f not in missing and f not in unsupported]


def _digits_task(args):
    return data.image_classification(
        "digits",
        batch_size=args.batch_size,
        max_train_examples=256 if args.smoke else None,
        seed=args.seed,
    )


def parity_inputs(model, batch_size, seed, task=None):
    """One batch for `model`: digits test images if it takes them, else random.

    Args:
        model: The model to export.
        batch_size: Batch of the random inputs (and of the digits `task`).
        seed: Seed of the random inputs.
        task: The digits task if already loaded (loaded on demand).

    Returns:
        ``(arrays, description)``: a list in the order of ``model.inputs``
        and what it is, for the printed summary.
    """
    specs = [
        (tuple(t.shape), keras.backend.standardize_dtype(t.dtype)) for t in model.inputs
    ]
    if len(specs) == 1 and specs[0][0][1:] == DIGITS_SHAPE and "float" in specs[0][1]:
        task = task or data.image_classification(
            "digits", batch_size=batch_size, seed=seed
        )
        images = next(iter(task.test))[0].numpy()
        return [images], f"{len(images)} {task.source} test images"
    rng = np.random.default_rng(seed)
    arrays = []
    for shape, dtype in specs:
        dims = [
            (batch_size if i == 0 else PARITY_LENGTH) if d is None else d
            for i, d in enumerate(shape)
        ]
        if dtype == "bool":
            arrays.append(rng.random(dims) < 0.8)
        elif "int" in dtype:
            low, high = PARITY_IDS
            arrays.append(rng.integers(low, high + 1, dims).astype(dtype))
        else:
            float_dtype = dtype if dtype in ("float16", "float64") else "float32"
            arrays.append(rng.standard_normal(dims).astype(float_dtype))
    shapes = ", ".join(f"{a.shape} {a.dtype}" for a in arrays)
    return arrays, f"random inputs shaped like the model's, {shapes}"


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    formats = choose_formats(args.formats)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.model:
        model = keras.saving.load_model(args.model)
        print(f"Loaded {args.model}")
        task = None
    else:
        task = _digits_task(args)
        model = train_model(task, args)
    inputs, description = parity_inputs(model, args.batch_size, args.seed, task)

    results = export.export_all(
        model,
        args.output_dir,
        inputs,
        formats=formats,
        repeats=3 if args.smoke else 50,
    )
    table = export.format_table(results)
    print(
        f"\nExports of {model.name} in {args.output_dir}, compared with Keras "
        f"(outputs) on a batch of {description}:\n"
    )
    print(table)
    with open(os.path.join(args.output_dir, "export_results.md"), "w") as f:
        f.write(table + "\n")

    failures = []
    for r in results:
        bound = QUANTIZED_ATOL if r.format == "litert_dynamic_range" else FLOAT_ATOL
        if not r.max_abs_diff <= bound:
            failures.append(f"{r.format}: {r.max_abs_diff:.2e} > {bound:.0e}")
    if failures:
        raise SystemExit("Exported model differs from Keras: " + "; ".join(failures))
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    sys.exit(main())
