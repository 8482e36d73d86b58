"""`.keras` files load in a fresh process after `import keras_multimax` (and not
before), and on the other backend."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from export_models import MODELS
from export_models import build_model
from export_models import keras_outputs
from export_models import run_fresh_python
from export_models import sample_inputs
from tolerances import EPS

ROOT = str(pathlib.Path(__file__).resolve().parents[1])

CHILD = """
import json, sys
import numpy as np
import keras

names = json.load(open("names.json"))
# Control: before `import keras_multimax` the layers are unknown to Keras.
try:
    keras.saving.load_model(f"{names[0]}.keras")
    raise AssertionError("loaded without keras_multimax")
except (TypeError, ValueError):
    assert "keras_multimax" not in sys.modules
print("control failed-without-import")

import keras_multimax  # the only project import: it registers the layers

assert "export_models" not in sys.modules
for name in names:
    model = keras.saving.load_model(f"{name}.keras")
    data = np.load(f"{name}.npz")
    inputs = [data[f"input_{i}"] for i in range(len(model.inputs))]
    got = keras.ops.convert_to_numpy(
        model(inputs if len(inputs) > 1 else inputs[0], training=False)
    )
    np.testing.assert_array_equal(got, data["expected"], err_msg=name)
    for w in model.weights:
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(w), data["w:" + w.path], err_msg=w.path
        )
    kinds = sorted(
        type(l).__name__ for l in model.layers
        if type(l).__module__.startswith("keras_multimax.")
    )
    # Variable batch and sequence length after loading.
    more = [np.concatenate([a, a], axis=0)[:, :3] for a in inputs]
    out = model(more if len(more) > 1 else more[0], training=False)
    print(name, ",".join(kinds), tuple(out.shape))
"""


@pytest.mark.slow
def test_keras_file_loads_in_fresh_process(tmp_path):
    expected_kinds = {}
    for name in MODELS:
        model = build_model(name)
        inputs = sample_inputs(name)
        model.save(tmp_path / f"{name}.keras")
        arrays = {f"input_{i}": a for i, a in enumerate(inputs)}
        # The reloaded model runs the same (default, fused) forward: bitwise.
        arrays["expected"] = keras_outputs(model, inputs, plain=False)
        arrays.update({"w:" + w.path: w.numpy() for w in model.weights})
        np.savez(tmp_path / f"{name}.npz", **arrays)
        expected_kinds[name] = ",".join(
            sorted(
                type(layer).__name__
                for layer in model.layers
                if type(layer).__module__.startswith("keras_multimax.")
            )
        )
    (tmp_path / "names.json").write_text(json.dumps(list(MODELS)))

    stdout = run_fresh_python(CHILD, cwd=str(tmp_path))

    control, *rows = stdout.strip().splitlines()
    assert control == "control failed-without-import"
    lines = dict(line.split(" ", 1) for line in rows)
    assert set(lines) == set(MODELS)
    for name, rest in lines.items():
        kinds, shape = rest.split(" ", 1)
        assert kinds == expected_kinds[name]  # reloaded as keras_multimax layers
        assert shape.startswith("(6, 3")


LOAD_AND_PREDICT = """
import sys
import numpy as np
import keras
import keras_multimax  # registers the layers
path = sys.argv[1]
model = keras.saving.load_model(path + ".keras")
x = np.load(path + ".x.npy")
np.save(path + ".loaded.npy", keras.ops.convert_to_numpy(model(x)))
"""


@pytest.mark.slow
@pytest.mark.only_backend(
    "jax",
    reason="saved here on JAX, loaded in a TensorFlow process; files saved on "
    "TensorFlow load on JAX in test_compatibility.py (the 0.2.0 files)",
)
def test_keras_file_saved_on_jax_loads_on_tensorflow(tmp_path):
    from keras_multimax import Modulator
    from keras_multimax import models

    path = str(tmp_path / "vit")
    model = models.vit_classifier(
        (8, 8, 1), 10, patch_size=4, num_layers=1, hidden_dim=16, num_heads=2,
        mlp_dim=16, attention="multimax", head="multimax",
        modulator=Modulator(ts_initializer="random_normal"),  # ts = 0: SoftMax
    )  # fmt: skip
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype("float32")
    saved = keras_outputs(model, [x])
    model.save(path + ".keras")
    np.save(path + ".x.npy", x)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT  # this checkout's keras_multimax
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOAD_AND_PREDICT), path],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = np.load(path + ".loaded.npy")
    # Two backends, float32, two blocks of matmuls: ~100 ulp of the output.
    rtol = 100 * EPS["float32"]
    np.testing.assert_allclose(loaded, saved, rtol=rtol, atol=rtol)
