"""Exporting MultiMax models from Keras' JAX backend.

`model.export(format="tf_saved_model")` on JAX goes through jax2tf; the
SavedModel must reload in plain TensorFlow without keras_multimax. (The
model is MultiMax attention and a MultiMax head, not a ViT: jax 0.10 lowers
the ViT's `erf` to a StableHLO composite that TensorFlow 2.21's XLA cannot
deserialize, a version skew of the two packages, not of keras_multimax.) Keras
3.15 exports LiteRT only from TensorFlow (and PyTorch): the second test pins
that documented limit. Each step runs in its own process (the backend is
fixed when Keras is imported), so this file runs from either pytest run.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

EXPORT = """
import sys
import numpy as np
import keras
from keras_multimax import layers
path, fmt = sys.argv[1], sys.argv[2]
keras.utils.set_random_seed(0)
inputs = keras.Input((5, 8))
h = layers.MultiMaxAttention(
    num_heads=2, key_dim=4, per_head=True, ts_initializer="random_normal"
)(inputs, inputs)  # ts = 0 would be SoftMax
h = keras.layers.Dense(6)(h)
outputs = layers.MultiMax(ts_initializer="random_normal")(h)
model = keras.Model(inputs, outputs)
x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype("float32")
np.save(path + ".in.npy", x)
np.save(path + ".keras.npy", keras.ops.convert_to_numpy(model(x)))
try:
    model.export(path, format=fmt, verbose=False)
except ValueError as e:
    print("ValueError:", e)
"""

RELOAD = """
import sys
import numpy as np
import tensorflow as tf
path = sys.argv[1]
loaded = tf.saved_model.load(path)  # must outlive `serve` (owns the variables)
served = loaded.serve(tf.constant(np.load(path + ".in.npy")))
np.save(path + ".served.npy", served.numpy())
assert "keras_multimax" not in sys.modules
"""


def run(code: str, *args: str, backend: str | None = None) -> str:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if backend:
        env["KERAS_BACKEND"] = backend
        env["PYTHONPATH"] = str(ROOT)  # this checkout's keras_multimax
    else:
        env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_saved_model_from_jax_reloads_in_tensorflow_without_keras_multimax(tmp_path):
    path = str(tmp_path / "vit")
    assert "ValueError" not in run(EXPORT, path, "tf_saved_model", backend="jax")
    run(RELOAD, path)
    served, expected = np.load(path + ".served.npy"), np.load(path + ".keras.npy")
    # The same float32 program compiled by XLA (JAX) and run by TensorFlow's
    # kernels: rounding of a few ulp per op; 1e-5 of the largest probability.
    assert np.abs(served - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.slow
def test_litert_export_from_jax_is_not_supported_by_keras(tmp_path):
    """Documented in the README: export LiteRT from the TensorFlow backend."""
    out = run(EXPORT, str(tmp_path / "vit.tflite"), "litert", backend="jax")
    assert "LiteRT export requires TensorFlow" in out
