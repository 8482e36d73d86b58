"""Distributed training of a MultiMax model: TPU > several GPUs > CPU, or many workers.

    python examples/train_distributed.py                     # picks the hardware
    python examples/train_distributed.py --strategy cpu      # override the choice
    python examples/train_distributed.py --local-workers 2   # a 2-worker job here

The strategy comes from `keras_multimax.distribute.choose_strategy`: a
reachable TPU (`TPUStrategy`, ``--tpu`` names a TPU or pod slice), a
``TF_CONFIG`` naming several workers (`MultiWorkerMirroredStrategy`), several
GPUs (`MirroredStrategy`), else the CPU. The precision follows the hardware
unless ``--precision`` says otherwise: ``mixed_bfloat16`` on TPUs,
``mixed_float16`` (with loss scaling) on GPUs, float32 on CPUs.

Multi-worker on several machines: run this same command on every machine, each
with a ``TF_CONFIG`` listing all workers and its own index, e.g. on the first::

    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}'

Worker 0 is the chief: it writes the exported model; the others save into a
temporary folder (every worker must take part in saving) that is deleted.
``--local-workers N`` shows the set-up on one machine: it starts N copies of
this script on 127.0.0.1 with free ports and such a ``TF_CONFIG`` each, and
the same ``--strategy`` (``auto`` by default, as on real machines).

The model is a small sequence classifier over the rows of scikit-learn's 8x8
digits (offline; scikit-learn comes with the ``examples`` extra):
`MultiMaxAttention`, `MultiMax` attention pooling and a `SegLU`
head. AdamW decays every weight except the MultiMax ``ranges`` and ``ts``.
`BackupAndRestore` makes an interrupted run resume where it left off.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_multimax import distribute  # noqa: E402
from keras_multimax import layers  # noqa: E402

warnings.filterwarnings("ignore", message=".*shuffle=True.*")

STRATEGIES = ("auto", "tpu", "multi_worker", "gpus", "cpu")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto")
    parser.add_argument("--tpu", default=None, help="TPU name or grpc:// address")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--batch-size-per-replica",
        type=int,
        default=32,
        help="the global batch is this times the number of replicas",
    )
    parser.add_argument("--output-dir", default=os.path.join("outputs", "distributed"))
    parser.add_argument(
        "--local-workers",
        type=int,
        default=0,
        help="start this many workers on 127.0.0.1 (multi-worker demonstration)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds for --local-workers"
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# Hardware, precision, data, model, optimizer
# ---------------------------------------------------------------------------


def pick_strategy(args) -> tf.distribute.Strategy:
    strategy = distribute.choose_strategy(args.strategy, tpu=args.tpu)
    name = type(strategy).__name__
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        name = "MultiWorkerMirroredStrategy"
    elif strategy is tf.distribute.get_strategy():
        name = "default strategy (CPU)"
    chosen = (
        tf.distribute.TPUStrategy,
        tf.distribute.MirroredStrategy,
        tf.distribute.MultiWorkerMirroredStrategy,
    )
    if args.strategy == "auto" and not isinstance(strategy, chosen):
        _, why_no_tpu = distribute.tpu_reachable(args.tpu)
        gpus = len(tf.config.list_logical_devices("GPU"))
        name += f" ({why_no_tpu}; {gpus} GPU(s) visible)"
    print(f"strategy: {name}, {strategy.num_replicas_in_sync} replica(s)")
    return strategy


def pick_precision(args, strategy) -> str:
    if args.precision != "auto":
        return args.precision
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16"
    if tf.config.list_logical_devices("GPU") and args.strategy != "cpu":
        return "mixed_float16"
    return "float32"


def load_data(seed: int = 0):
    """Digit images as sequences: 8 rows (tokens) of 8 pixels (features)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit(
            "This example trains on scikit-learn's bundled digits: "
            'pip install -e ".[examples]"'
        ) from error
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def make_dataset(x, y, global_batch: int, training: bool) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        dataset = dataset.shuffle(len(x), seed=0, reshuffle_each_iteration=True)
    # Static shapes (TPUs need them): every batch has global_batch rows.
    dataset = dataset.batch(global_batch, drop_remainder=True).prefetch(2)
    # Several workers: tf.distribute splits each global batch into per-replica
    # slices and hands worker i the i-th one (in-memory data has no files to
    # shard by).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


def build_model(num_classes: int = 10) -> keras.Model:
    inputs = keras.Input((8, 8), name="rows")
    h = keras.layers.Dense(32, name="embed")(inputs)
    attended = layers.MultiMaxAttention(
        num_heads=4, key_dim=8, per_head=True, name="attention"
    )(h, h)
    h = keras.layers.LayerNormalization(name="norm")(h + attended)
    # Attention pooling over the rows with MultiMax weights.
    weights = layers.MultiMax(axis=1, name="pool_multimax")(
        keras.layers.Dense(1, name="pool_score")(h)
    )
    pooled = keras.layers.Flatten()(keras.layers.Dot(axes=1)([weights, h]))
    logits = keras.layers.Dense(num_classes, name="head")(pooled)
    # float32 logits under mixed precision: stable loss, float32 serving.
    logits = layers.SegLU(name="head_seglu", dtype="float32")(logits)
    return keras.Model(inputs, logits, name="multimax_digits")


def multimax_parameters(model: keras.Model) -> list:
    """The ``ranges``/``ts`` variables of every MultiMax layer."""
    return [v for v in model.trainable_variables if v.name in ("ranges", "ts")]


def make_optimizer(model: keras.Model) -> keras.optimizers.Optimizer:
    """AdamW that decays every weight except the MultiMax ``ranges``/``ts``.

    ``var_list`` names the variables themselves. (``var_names`` patterns are
    searched in TensorFlow variable paths such as ``"logits/kernel:0"``:
    ``["ranges", "ts"]`` would also exempt every weight of a layer whose
    name contains "ts", and ``["^ts$"]`` would exempt nothing.)
    """
    optimizer = keras.optimizers.AdamW(learning_rate=3e-3, weight_decay=0.05)
    excluded = multimax_parameters(model)
    optimizer.exclude_from_weight_decay(var_list=excluded)
    print(f"no weight decay for: {', '.join(v.path for v in excluded)}")
    return optimizer


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _task() -> tuple[str, int]:
    config = json.loads(os.environ.get("TF_CONFIG", "") or "{}")
    task = config.get("task", {})
    return task.get("type", "worker"), int(task.get("index", 0))


def train(args) -> dict:
    strategy = pick_strategy(args)
    precision = pick_precision(args, strategy)
    keras.mixed_precision.set_global_policy(precision)
    print(f"precision: {precision}")
    is_tpu = isinstance(strategy, tf.distribute.TPUStrategy)
    task_type, task_index = _task()
    is_chief = task_type == "chief" or (task_type == "worker" and task_index == 0)

    global_batch = args.batch_size_per_replica * strategy.num_replicas_in_sync
    (x_train, y_train), (x_test, y_test) = load_data()
    train_ds = make_dataset(x_train, y_train, global_batch, training=True)
    test_ds = make_dataset(x_test, y_test, global_batch, training=False)

    keras.utils.set_random_seed(0)  # same initial weights on every worker
    with strategy.scope():
        model = build_model()
        model.compile(
            optimizer=make_optimizer(model),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            # TPUs always compile with XLA; run several steps per host call.
            steps_per_execution=16 if is_tpu else 1,
        )

    # Fault tolerance: each worker keeps its own backup (they are identical).
    backup_dir = os.path.join(args.output_dir, "backup", f"{task_type}{task_index}")
    history = model.fit(
        train_ds,
        epochs=args.epochs,
        validation_data=test_ds,
        callbacks=[keras.callbacks.BackupAndRestore(backup_dir)],
        verbose=2 if is_chief else 0,
    )
    results = {
        "loss": history.history["loss"],
        "val_accuracy": history.history["val_accuracy"][-1],
        "replicas": strategy.num_replicas_in_sync,
        "ranges": model.get_layer("pool_multimax").ranges.numpy().tolist(),
    }

    # Every worker saves; only the chief keeps its copy.
    export_dir = os.path.join(args.output_dir, "saved_model")
    if not is_chief:
        export_dir = tempfile.mkdtemp(prefix=f"worker{task_index}_")
    with strategy.scope():
        model.export(export_dir, verbose=False)
    if is_chief:
        print(f"exported the SavedModel to {export_dir}")
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    else:
        shutil.rmtree(export_dir, ignore_errors=True)
    print(
        f"{task_type} {task_index}: loss {results['loss'][0]:.3f} -> "
        f"{results['loss'][-1]:.3f}, test accuracy {results['val_accuracy']:.3f}"
    )
    keras.mixed_precision.set_global_policy("float32")
    return results


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_workers(args) -> int:
    """Starts ``args.local_workers`` copies of this script as one job.

    Each copy runs with ``--strategy`` as given (default ``auto``, the same
    command a real multi-machine job runs on every machine).
    """
    if args.strategy not in ("auto", "multi_worker"):
        print(
            "--local-workers needs --strategy auto or multi_worker. "
            f"Received: --strategy {args.strategy}"
        )
        return 2
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(args.local_workers)]
    print(f"starting {len(workers)} workers: {', '.join(workers)}")
    argv = [a for a in sys.argv[1:] if not a.startswith("--local-workers")]
    if "--local-workers" in sys.argv:  # drop its value too
        i = sys.argv.index("--local-workers")
        argv = sys.argv[1:i] + sys.argv[i + 2 :]
    procs = []
    try:
        for index in range(len(workers)):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps(
                {
                    "cluster": {"worker": workers},
                    "task": {"type": "worker", "index": index},
                }
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, *argv, "--strategy", args.strategy],
                    env=env,
                )
            )
        for proc in procs:
            proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"the workers did not finish within {args.timeout} s")
        return 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    codes = [proc.returncode for proc in procs]
    print(f"worker exit codes: {codes}")
    return 0 if all(code == 0 for code in codes) else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.local_workers:
        return run_local_workers(args)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
