"""SoftMax vs MultiMax on three tasks, several seeds: a Markdown table of the results.

    python examples/reproduce.py [--output-dir outputs/reproduce] [--seeds 0 1 2]

Tasks (offline defaults; tensorflow-datasets is used when the dataset is
prepared locally, see `keras_multimax.toolkit.data`):

- image classification: a ViT on handwritten digits (tfds ``mnist``);
- character language modelling: a causal transformer on CPython's English
  documentation (tfds ``tiny_shakespeare``), test perplexity per character;
- translation: an encoder-decoder on generated dates ("28 November 2026" →
  "2026-11-28"; tfds ``ted_hrlr_translate``), exact match of greedy decoding.

Each task trains the same architecture with SoftMax (attention and output)
and with MultiMax (`MultiMaxAttention` everywhere and a `SegLU` head, from
the official initialisation: ``modulator="paper"``), with the same seeds and
data order, and reports mean ± sample standard deviation
over seeds of the task metric, attention sparsity and multi-modality (the
paper's Definitions 3.2/3.3, mean over layers; see `keras_multimax.analysis`)
and the median training step time. The table and the raw numbers (JSON) are
written to the output directory. About 20 minutes on 2 CPU cores;
``--smoke`` runs a tiny version in under a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_multimax import analysis  # noqa: E402
from keras_multimax import models  # noqa: E402
from keras_multimax.models.translator import PAD_ID  # noqa: E402
from keras_multimax.toolkit import data  # noqa: E402
from keras_multimax.toolkit import timing  # noqa: E402
from keras_multimax.toolkit import training  # noqa: E402

warnings.filterwarnings("ignore", message=".*shuffle=True.*")

KINDS = ("softmax", "multimax")
MODEL = {"num_layers": 2, "hidden_dim": 64, "num_heads": 4, "mlp_dim": 128}
TINY = {"num_layers": 1, "hidden_dim": 16, "num_heads": 2, "mlp_dim": 32}

# Per task: data arguments, epochs, learning rate (full and smoke runs).
CONFIG = {
    "image": {"epochs": 25, "lr": 2e-3, "smoke_epochs": 1},
    "lm": {
        "epochs": 6,
        "lr": 2e-3,
        "sequence_length": 64,
        "train_sequences": 3000,
        "test_sequences": 256,
        "smoke_epochs": 1,
    },
    "translation": {
        "epochs": 8,
        "lr": 2e-3,
        "train_pairs": 6000,
        "test_pairs": 500,
        "smoke_epochs": 1,
    },
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=os.path.join("outputs", "reproduce"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=tuple(CONFIG),
        default=list(CONFIG),
        help="tasks to run (default: all)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run")
    parser.add_argument(
        "--download",
        action="store_true",
        help="let tensorflow-datasets download mnist, tiny_shakespeare and "
        "ted_hrlr_translate if missing (default: use them only if prepared)",
    )
    return parser.parse_args(argv)


def _fit(model, task, epochs, seed):
    timer = timing.StepTimer(warmup=5)
    keras.utils.set_random_seed(seed)
    model.fit(task.train, epochs=epochs, callbacks=[timer], verbose=2)
    return 1000 * timer.median()


def _attention(model, inputs):
    stats = analysis.attention_statistics(model, inputs)
    return (
        float(np.mean([s["sparsity"] for s in stats])),
        float(np.mean([s["multimodality"] for s in stats])),
    )


def run_image(kind, seed, smoke, download=False):
    cfg = CONFIG["image"]
    task = data.image_classification(
        "mnist",
        batch_size=64,
        max_train_examples=256 if smoke else 6000,
        max_test_examples=128 if smoke else 1000,
        download=download,
        seed=seed,
    )
    patch_size = 2 if task.info["input_shape"][0] == 8 else 7
    keras.utils.set_random_seed(seed)
    model = models.ViTClassifier(
        task.info["input_shape"],
        task.info["num_classes"],
        patch_size=patch_size,
        attention=kind,
        modulator="paper",  # the official initialisation, as the paper trained
        head=kind,
        **(TINY if smoke else MODEL),
    )
    training.compile_with_adamw(model, cfg["lr"])
    step_ms = _fit(model, task, cfg["smoke_epochs"] if smoke else cfg["epochs"], seed)
    _, accuracy = model.evaluate(task.test, verbose=0)
    images = next(iter(task.test))[0]
    sparsity, modality = _attention(model, images)
    return task.source, {
        "metric": accuracy,
        "sparsity": sparsity,
        "multimodality": modality,
        "step_ms": step_ms,
    }


def run_lm(kind, seed, smoke, download=False):
    cfg = CONFIG["lm"]
    task = data.char_language_model(
        "tiny_shakespeare",
        sequence_length=32 if smoke else cfg["sequence_length"],
        batch_size=32,
        max_train_sequences=128 if smoke else cfg["train_sequences"],
        max_test_sequences=64 if smoke else cfg["test_sequences"],
        download=download,
        seed=seed,
    )
    keras.utils.set_random_seed(seed)
    model = models.TransformerLM(
        task.info["vocab_size"],
        task.info["sequence_length"],
        attention=kind,
        modulator="paper",  # the official initialisation, as the paper trained
        head=kind,
        **(TINY if smoke else MODEL),
    )
    training.compile_with_adamw(model, cfg["lr"])
    step_ms = _fit(model, task, cfg["smoke_epochs"] if smoke else cfg["epochs"], seed)
    loss, _ = model.evaluate(task.test, verbose=0)
    tokens = next(iter(task.test))[0]
    sparsity, modality = _attention(model, tokens)
    return task.source, {
        "metric": float(np.exp(loss)),
        "sparsity": sparsity,
        "multimodality": modality,
        "step_ms": step_ms,
    }


def exact_match(model, task) -> float:
    vocab = task.info["target_vocabulary"]
    hits, total = 0, 0
    references = iter(task.info["test_targets"])
    for (source_ids, _), _ in task.test:
        generated = model.greedy_decode(source_ids).numpy()
        for ids in generated:
            hits += vocab.decode(ids) == next(references)
            total += 1
    return hits / total


def run_translation(kind, seed, smoke, download=False):
    cfg = CONFIG["translation"]
    task = data.translation(
        "ted_hrlr_translate/pt_to_en",
        batch_size=64,
        num_date_examples=(256, 64)
        if smoke
        else (cfg["train_pairs"], cfg["test_pairs"]),
        max_train_examples=256 if smoke else cfg["train_pairs"],
        max_test_examples=64 if smoke else cfg["test_pairs"],
        download=download,
        seed=seed,
    )
    keras.utils.set_random_seed(seed)
    model = models.TransformerTranslator(
        task.info["source_vocab_size"],
        task.info["target_vocab_size"],
        source_length=task.info["source_length"],
        target_length=task.info["target_length"],
        num_encoder_layers=(TINY if smoke else MODEL)["num_layers"],
        num_decoder_layers=(TINY if smoke else MODEL)["num_layers"],
        hidden_dim=(TINY if smoke else MODEL)["hidden_dim"],
        num_heads=(TINY if smoke else MODEL)["num_heads"],
        mlp_dim=(TINY if smoke else MODEL)["mlp_dim"],
        attention=kind,
        modulator="paper",  # the official initialisation, as the paper trained
        head=kind,
    )
    training.compile_with_adamw(
        model, cfg["lr"], ignore_class=PAD_ID, metrics=[models.masked_token_accuracy]
    )
    step_ms = _fit(model, task, cfg["smoke_epochs"] if smoke else cfg["epochs"], seed)
    match = exact_match(model, task)
    inputs = next(iter(task.test))[0]
    sparsity, modality = _attention(model, inputs)
    return task.source, {
        "metric": match,
        "sparsity": sparsity,
        "multimodality": modality,
        "step_ms": step_ms,
    }


RUNNERS = {
    "image": (run_image, "test accuracy ↑"),
    "lm": (run_lm, "test perplexity per char ↓"),
    "translation": (run_translation, "exact match ↑"),
}
NAMES = {
    "image": "Image classification (ViT)",
    "lm": "Character LM (causal transformer)",
    "translation": "Translation (encoder-decoder, greedy)",
}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        cores = str(os.cpu_count())
    return f"{cores} cores ({cpu}), no GPU"


def _fmt(values, digits):
    values = np.asarray(values, dtype=float)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.{digits}f} ± {std:.{digits}f}"


def markdown(results, seeds, elapsed) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Measured {when} on {machine()}; TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}; seeds {', '.join(map(str, seeds))} "
        f"(mean ± sample std); {elapsed / 60:.1f} min in total.",
        "",
        "| task (data) | attention + head | metric | value | attention sparsity "
        "| multi-modality | step time (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, (source, per_kind) in results.items():
        metric = RUNNERS[task][1]
        for kind in KINDS:
            runs = per_kind[kind]
            lines.append(
                f"| {NAMES[task]} ({source}) | "
                f"{'MultiMax' if kind == 'multimax' else 'SoftMax'} | {metric} | "
                f"{_fmt([r['metric'] for r in runs], 4 if task != 'lm' else 3)} | "
                f"{_fmt([r['sparsity'] for r in runs], 3)} | "
                f"{_fmt([r['multimodality'] for r in runs], 3)} | "
                f"{_fmt([r['step_ms'] for r in runs], 1)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    results = {}
    for task in args.tasks:
        runner = RUNNERS[task][0]
        per_kind = {kind: [] for kind in KINDS}
        source = None
        for seed in args.seeds:
            for kind in KINDS:
                print(f"\n== {NAMES[task]}: {kind}, seed {seed} ==", flush=True)
                source, row = runner(kind, seed, args.smoke, args.download)
                print(f"   {row}", flush=True)
                per_kind[kind].append(row)
        results[task] = (source, per_kind)
    elapsed = time.perf_counter() - start
    table = markdown(results, args.seeds, elapsed)
    print("\n" + table)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(
            {"config": CONFIG, "model": MODEL, "seeds": args.seeds, "results": results},
            f,
            indent=1,
        )
    return results


if __name__ == "__main__":
    main()
