"""What `import keras_multimax` loads, by backend, checked in fresh interpreters."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fresh(code: str, backend: str) -> dict:
    """Runs ``code`` in a new interpreter on ``backend``; it prints one JSON line."""
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


LOADED = """
import json, sys
import keras_multimax
from keras_multimax import layers, ops, models, convert, config
import keras_multimax.export, keras_multimax.distribute
print(json.dumps({m: m in sys.modules for m in ("tensorflow", "keras_hub")}))
"""


@pytest.mark.slow
@pytest.mark.only_backend("jax", reason="what a JAX process loads")
def test_jax_import_loads_neither_tensorflow_nor_keras_hub():
    """Also the modules that only need TensorFlow for some formats or strategies."""
    assert _fresh(LOADED, "jax") == {"tensorflow": False, "keras_hub": False}


@pytest.mark.slow
@pytest.mark.only_backend(
    "tensorflow",
    reason="on JAX, test_jax_import_loads_neither_tensorflow_nor_keras_hub "
    "checks that keras_hub is not loaded either",
)
def test_keras_hub_loads_only_when_used():
    assert _fresh(LOADED, "tensorflow")["keras_hub"] is False


HUB_FILE = """
import json, sys
import keras, numpy as np
import keras_multimax.hub  # the one import a saved MultiMax KerasHub model needs
model = keras.saving.load_model({path!r})
data = np.load({data!r})
y = model.predict({{"token_ids": data["token_ids"], "padding_mask": data["padding_mask"]}},
                  verbose=0)
print(json.dumps({{"class": type(model).__name__,
                   "error": float(np.max(np.abs(y - data["y"]))),
                   "scale": float(np.max(np.abs(data["y"])))}}))
"""


@pytest.mark.slow  # on the backend of this run: CI runs the suite on both
def test_a_saved_keras_hub_model_loads_after_one_documented_import():
    pytest.importorskip("keras_hub")
    data = ROOT / "tests" / "data" / "v0_2_0"
    out = _fresh(
        HUB_FILE.format(
            path=str(data / "hub_gpt2_backbone.keras"),
            data=str(data / "hub_gpt2_backbone.npz"),
        ),
        keras.backend.backend(),
    )
    assert out["class"] == "MultiMaxGPT2Backbone"
    # The same float32 model as when the file was written (TensorFlow), maybe
    # in another summation order: 64 eps of the outputs' scale (as
    # test_compatibility.py).
    assert out["error"] <= 64 * 2.0**-23 * max(out["scale"], 1.0)
