"""Layers, attention, `to_multimax`, builders and analysis on Keras' JAX backend.

Runs with ``KERAS_BACKEND=jax`` (CI's second pytest run); skipped on other
backends. References: Keras' own SoftMax layers at ``ts = 0`` (MultiMax is
then exactly SoftMax), the NumPy reference, and the other backend (a
``.keras`` file saved on TensorFlow, loaded here, in a subprocess).
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import numpy_reference as ref
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("needs KERAS_BACKEND=jax", allow_module_level=True)

import jax  # noqa: E402

from keras_multimax import analysis  # noqa: E402
from keras_multimax import layers  # noqa: E402
from keras_multimax import models  # noqa: E402
from keras_multimax.convert import to_multimax  # noqa: E402

pytestmark = pytest.mark.backends

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
# float32, a few matmuls and a SoftMax over O(1) values: ~100 ulp relative.
F32_RTOL = 100 * np.finfo(np.float32).eps


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


def test_multimax_and_seglu_layers_equal_the_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(scale=2, size=(3, 4, 6)).astype("float32")
    mm = layers.MultiMax(axis=-1, ranges_initializer="random_normal")
    seglu = layers.SegLU(ts_initializer="random_normal")
    y, s = _numpy(mm(x)), _numpy(seglu(x))
    assert isinstance(mm(x), jax.Array)
    r, t = (_numpy(mm.ranges), _numpy(mm.ts))
    np.testing.assert_allclose(y, ref.multimax(x, r, t), rtol=1e-5, atol=1e-7)
    r, t = (_numpy(seglu.ranges), _numpy(seglu.ts))
    np.testing.assert_allclose(s, ref.seglu(x, r, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_attention_at_zero_ts_equals_keras_softmax_attention(kind):
    """ts = 0: the same outputs as Keras' layer with the same weights.

    On JAX Keras' layers may take their fused `dot_product_attention` path;
    MultiMax must still compute its own weights (checked by ts != 0 below).
    """
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 5, 8)).astype("float32")
    if kind == "mha":
        ours = layers.MultiMaxAttention(num_heads=2, key_dim=4, ts_initializer="zeros")
        theirs = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    else:
        args = {"head_dim": 4, "num_query_heads": 4, "num_key_value_heads": 2}
        ours = layers.MultiMaxGroupQueryAttention(**args, ts_initializer="zeros")
        theirs = keras.layers.GroupQueryAttention(**args)
    ours(q, q)
    theirs(q, q)
    for a, b in zip(
        [w for w in ours.weights if w.name not in ("ranges", "ts")], theirs.weights
    ):
        a.assign(b)
    mask = rng.random((2, 5, 5)) > 0.3
    mask[:, :, 0] = True
    expected = _numpy(theirs(q, q, attention_mask=mask))
    got = _numpy(ours(q, q, attention_mask=mask))
    np.testing.assert_allclose(got, expected, rtol=F32_RTOL, atol=F32_RTOL)
    ours.ts.assign(np.full(ours.ts.shape, 0.5, "float32"))
    changed = _numpy(ours(q, q, attention_mask=mask))
    assert np.abs(changed - expected).max() > 1e3 * F32_RTOL  # ts is used


def test_vit_trains_jit_compiled_and_analysis_runs():
    model = models.vit_classifier(
        (8, 8, 1), 10, patch_size=4, num_layers=1, hidden_dim=16, num_heads=2,
        mlp_dim=16, attention="multimax", head="multimax",
    )  # fmt: skip
    model.compile(jit_compile=True)
    rng = np.random.default_rng(2)
    images = rng.normal(size=(16, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 10, size=(16,))
    before = [_numpy(w).copy() for w in analysis.modulator_layers(model)[0].weights]
    history = model.fit(images, labels, epochs=3, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    after = [_numpy(w) for w in analysis.modulator_layers(model)[0].weights]
    assert any(np.abs(a - b).max() > 0 for a, b in zip(after, before))
    stats = analysis.attention_statistics(model, images[:2])
    assert stats and all(0 <= s["sparsity"] <= 1 for s in stats)


def test_to_multimax_keeps_outputs_at_zero_ts():
    inputs = keras.Input((5, 8))
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    model = keras.Model(inputs, outputs)
    converted = to_multimax(model, replace_softmax=True)
    names = {type(layer).__name__ for layer in converted.layers}
    assert "MultiMaxAttention" in names and "ActivationMultiMax" in names
    x = np.random.default_rng(3).normal(size=(2, 5, 8)).astype("float32")
    np.testing.assert_allclose(
        _numpy(converted(x)), _numpy(model(x)), rtol=F32_RTOL, atol=F32_RTOL
    )


SAVE_AND_PREDICT = """
import sys
import numpy as np
import keras
from keras_multimax import models
mode, path = sys.argv[1], sys.argv[2]
x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype("float32")
if mode == "save":
    keras.utils.set_random_seed(0)
    model = models.vit_classifier(
        (8, 8, 1), 10, patch_size=4, num_layers=1, hidden_dim=16, num_heads=2,
        mlp_dim=16, attention="multimax", head="multimax",
        ts_initializer="random_normal",
    )
    model.save(path + ".keras")
else:
    model = keras.saving.load_model(path + ".keras")
np.save(path + "." + mode + ".npy", keras.ops.convert_to_numpy(model(x)))
"""


def _run(backend: str, mode: str, path: str) -> None:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT  # this checkout's keras_multimax
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SAVE_AND_PREDICT), mode, path],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("saved_on, loaded_on", [("tensorflow", "jax"), ("jax", "tensorflow")])  # fmt: skip
def test_keras_file_loads_on_the_other_backend(saved_on, loaded_on, tmp_path):
    path = str(tmp_path / "vit")
    _run(saved_on, "save", path)
    _run(loaded_on, "load", path)
    saved, loaded = np.load(path + ".save.npy"), np.load(path + ".load.npy")
    # Two backends, float32, two blocks of matmuls: ~100 ulp of the output.
    np.testing.assert_allclose(loaded, saved, rtol=F32_RTOL, atol=F32_RTOL)


def _llama():
    import keras_hub

    return keras_hub.models.LlamaBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
    )


def test_keras_hub_llama_converts_and_leaves_the_fused_jax_path(monkeypatch):
    pytest.importorskip("keras_hub", reason="the keras-hub extra is not installed")
    backbone = _llama()
    rng = np.random.default_rng(0)
    inputs = {
        "token_ids": rng.integers(1, 50, (2, 8)).astype("int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    expected = _numpy(backbone(inputs))
    calls = []
    original = keras.ops.dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(keras.ops, "dot_product_attention", counting)
    _numpy(backbone(inputs))
    softmax_calls = len(calls)
    converted = to_multimax(backbone)
    calls.clear()
    got = _numpy(converted(inputs))
    # On JAX the SoftMax model takes the fused kernel; the MultiMax one never.
    assert softmax_calls == 2 and not calls, (softmax_calls, len(calls))
    # ts = 0: the same function, float32 rounding of a different SoftMax path.
    np.testing.assert_allclose(got, expected, atol=F32_RTOL * np.abs(expected).max())
    for w in converted.weights:
        if w.name == "ts":
            w.assign(np.full(w.shape, 0.5, "float32"))
    moved = np.abs(_numpy(converted(inputs)) - expected).max()
    assert moved > 100 * F32_RTOL * np.abs(expected).max()


def test_lm_head_on_jax_equals_cross_entropy_of_its_logits():
    head = layers.MultiMaxLMHead(20, ts_initializer=keras.initializers.Constant(0.3))
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(2, 3, 8)).astype("float32")
    labels = rng.integers(0, 20, (2, 3))
    loss = _numpy(head(hidden, labels=labels))
    logits = _numpy(head(hidden))
    expected = -np.take_along_axis(
        _numpy(jax.nn.log_softmax(logits, axis=-1)), labels[..., None], -1
    )[..., 0]
    # One logsumexp over 20 modulated logits of O(1): ~100 ulp.
    np.testing.assert_allclose(loss, expected, atol=F32_RTOL * np.abs(expected).max())
