"""Model, data and helpers shared by the distributed tests and their workers.

Importable from the tests (``from distributed_workers import common``) and from
the worker scripts run as ``python tests/distributed_workers/<worker>.py``
(their own folder is then on ``sys.path``). Nothing here runs at import time
except importing Keras, so ``--doctest-modules`` can collect the folder.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import keras
import numpy as np

from keras_multimax import layers as mm_layers

SEQ_LEN = 6
FEATURES = 5
NUM_CLASSES = 3
GLOBAL_BATCH = 8
NUM_EXAMPLES = 32  # 4 global batches per epoch


def build_model(attention: bool = True, batch_size: int | None = None):
    """A small sequence classifier using every MultiMax layer of the package.

    Dense -> MultiMaxAttention (per-head ranges/ts) -> MultiMax attention
    pooling over time -> Dense -> SegLU logits. The SegLU head is float32
    under mixed precision policies, so bf16/fp16 models give float32 logits.
    """
    inputs = keras.Input((SEQ_LEN, FEATURES), batch_size=batch_size, name="tokens")
    h = keras.layers.Dense(8, name="embed")(inputs)
    if attention:
        h = mm_layers.MultiMaxAttention(
            num_heads=2, key_dim=4, per_head=True, name="attention"
        )(h, h)
    scores = keras.layers.Dense(1, name="pool_score")(h)
    weights = mm_layers.MultiMax(axis=1, name="pool_multimax")(scores)
    pooled = keras.layers.Flatten(name="flatten")(
        keras.layers.Dot(axes=1, name="pool")([weights, h])
    )
    logits = keras.layers.Dense(NUM_CLASSES, name="head")(pooled)
    logits = mm_layers.SegLU(name="head_seglu", dtype="float32")(logits)
    return keras.Model(inputs, logits, name="multimax_classifier")


def make_data(seed: int = 0, n: int = NUM_EXAMPLES):
    """A learnable toy task: the label is the argmax of a projection of the mean."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, SEQ_LEN, FEATURES)).astype("float32")
    proj = rng.normal(size=(FEATURES, NUM_CLASSES))
    y = np.argmax(x.mean(axis=1) @ proj, axis=-1).astype("int32")
    return x, y


def compile_sgd(model, jit_compile=False, **kwargs):
    """SGD with momentum: no per-parameter normalisation (unlike Adam), so
    round-off differences between strategies stay round-off sized."""
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.2, momentum=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
        **kwargs,
    )
    return model


def weights_by_path(model) -> dict[str, np.ndarray]:
    """Every model variable by its unique path (e.g. ``pool_multimax/ts``)."""
    return {v.path: np.array(v.numpy()) for v in model.weights}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_tf32() -> None:
    """TensorFloat-32 matmuls (Ampere GPUs and later) round to 10 bits: the
    equality checks against single-device runs need real float32."""
    import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(False)


def split_cpu(num: int = 2) -> str:
    """Before TF initialises its devices: use all GPUs if several are visible,
    else split the CPU into `num` logical devices. Returns the reason."""
    import tensorflow as tf

    no_tf32()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= 2:
        return f"using the {len(gpus)} visible GPUs"
    if gpus:
        # The single-device reference must run where the replicas run.
        tf.config.set_visible_devices([], "GPU")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num)]
    )
    why = "no GPU is visible" if not gpus else "only one GPU is visible (hidden)"
    return f"{why}: split the CPU into {num} logical devices"


def mirrored_devices() -> list[str]:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) >= 2:
        return [d.name for d in gpus]
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


WORKERS_DIR = os.path.dirname(os.path.abspath(__file__))


def worker_env(**extra) -> dict[str, str]:
    """The environment of a worker subprocess: no inherited TF_CONFIG."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_worker(script: str, *args, timeout: float = 240, env=None) -> str:
    """Runs ``python tests/distributed_workers/<script> args...`` to completion.

    Prints the worker's stdout (so its messages reach the test log), raises
    AssertionError with the tail of stderr if it fails or exceeds `timeout`
    (the process is killed then).
    """
    import subprocess

    cmd = [sys.executable, os.path.join(WORKERS_DIR, script), *map(str, args)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or worker_env(),
        cwd=WORKERS_DIR,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"{script} did not finish within {timeout} s; stderr tail:\n{err[-3000:]}"
        ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(out, end="")
    if proc.returncode != 0:
        raise AssertionError(
            f"{script} exited with {proc.returncode}; stderr tail:\n{err[-3000:]}"
        )
    return out


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
