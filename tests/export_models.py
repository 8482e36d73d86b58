"""Small models and inputs shared by the export tests, and a fresh-process runner.

Every model holds one kind of keras_multimax layer with parameters far from
their near-zero defaults (so the modulator really changes the output and an
export that dropped it would be caught), and takes inputs whose batch and
sequence dimensions are dynamic.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
from switches import fused_forward

from keras_multimax import Modulator
from keras_multimax import layers

# name -> what the model exercises.
MODELS = {
    "multimax": "Dense -> MultiMax (order 2) over the last axis",
    "seglu": "Dense -> SegLU (order 3) logits",
    "masked_multimax": "MultiMax (order 2) of scores with a boolean mask input",
    "attention": "MultiMaxAttention (per-head modulator, causal) -> Dense",
}

FEATURES = 8


def active_modulator(seed: int, order: int = 2) -> Modulator:
    """Thresholds ~ N(0, 1) and slopes ~ N(0, 0.5): an active modulator."""
    return Modulator(
        order=order,
        ranges_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=seed),
        ts_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=seed + 1),
    )


def build_model(name: str) -> keras.Model:
    """Returns the functional model called `name` (see `MODELS`)."""
    if name == "multimax":
        x = keras.Input((None, FEATURES), name="x")
        h = keras.layers.Dense(FEATURES, name="dense")(x)
        y = layers.MultiMax(name="multimax", modulator=active_modulator(1))(h)
        return keras.Model(x, y, name=name)
    if name == "seglu":
        x = keras.Input((None, FEATURES), name="x")
        h = keras.layers.Dense(6, name="dense")(x)
        y = layers.SegLU(name="seglu", modulator=active_modulator(3, order=3))(h)
        return keras.Model(x, y, name=name)
    if name == "masked_multimax":
        x = keras.Input((None, 5), name="x")
        mask = keras.Input((None, 5), name="mask", dtype="bool")
        y = layers.MultiMax(name="multimax", modulator=active_modulator(5))(
            x, mask=mask
        )
        return keras.Model([x, mask], y, name=name)
    if name == "attention":
        x = keras.Input((None, FEATURES), name="x")
        h = layers.MultiMaxAttention(
            num_heads=2,
            key_dim=4,
            per_head=True,
            name="attention",
            modulator=active_modulator(7),
        )(x, x, use_causal_mask=True)
        y = keras.layers.Dense(3, name="head")(h)
        return keras.Model(x, y, name=name)
    raise ValueError(f"Unknown model. Received: name={name!r}")


def sample_inputs(
    name: str, batch: int = 3, length: int = 7, seed: int = 0
) -> list[np.ndarray]:
    """Inputs of model `name` as a list (in the order of `model.inputs`).

    Scores are spread (standard deviation 3) so that every piece of the
    modulator is visited. The mask of `masked_multimax` keeps ~60% of the
    entries and leaves every row at least one; see `fully_masked_inputs`.
    """
    rng = np.random.default_rng(seed)
    if name == "masked_multimax":
        x = (3.0 * rng.standard_normal((batch, length, 5))).astype("float32")
        mask = rng.random((batch, length, 5)) < 0.6
        mask[..., 0] = True
        return [x, mask]
    x = (3.0 * rng.standard_normal((batch, length, FEATURES))).astype("float32")
    return [x]


def fully_masked_inputs(batch: int = 2, length: int = 4) -> list[np.ndarray]:
    """`masked_multimax` inputs with fully masked rows and huge masked scores."""
    x, mask = sample_inputs("masked_multimax", batch, length, seed=1)
    mask[0, 0] = False  # a row without any visible entry: all zeros expected
    mask[1, 1, 1:] = False
    x[1, 1, 1:] = [300.0, -300.0, 90.0, -90.0]  # masked, far from the kept one
    return [x, mask]


def keras_outputs(
    model: keras.Model, inputs: list[np.ndarray], plain: bool = True
) -> np.ndarray:
    """The model's outputs, by default from the plain-op forward of exports.

    Exported graphs hold the plain-op forward (the default); the fused forward
    (the XLA kernel, ``plain=False``) agrees with it to float32 rounding,
    which exp() amplifies where the modulator reaches hundreds. That
    agreement is tested in test_ops.py (every mode against float64 references).
    """
    with fused_forward(not plain):
        return keras.ops.convert_to_numpy(
            model(inputs if len(inputs) > 1 else inputs[0], training=False)
        )


def run_fresh_python(code: str, cwd: str, timeout: float = 300) -> str:
    """Runs `code` in a new interpreter (cwd `cwd`) and returns its stdout.

    Fails the calling test with the child's stderr if the child fails.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    # The child must not see this checkout through the tests' sys.path.
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"Fresh Python process failed (exit {proc.returncode}).\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
        )
    return proc.stdout
