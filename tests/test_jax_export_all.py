"""`keras_multimax.export.export_all` on Keras' JAX backend.

Runs with ``KERAS_BACKEND=jax`` (CI's second pytest run); skipped on other
backends. From JAX, Keras 3.15 writes the ``.keras`` file, the SavedModel
(jax2tf) and ONNX (jax2onnx, not in the ``export`` extra); it refuses LiteRT.
The models are small keras_multimax layers, not a ViT: a ViT's SavedModel
from jax 0.10 does not reload in TensorFlow 2.21 (its ``erf`` becomes a
StableHLO composite that TensorFlow's XLA cannot deserialize, see
test_jax_export.py).
"""

import importlib.util
import os
import sys

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("needs KERAS_BACKEND=jax", allow_module_level=True)

import tensorflow as tf  # noqa: E402
from export_models import build_model  # noqa: E402
from export_models import keras_outputs  # noqa: E402
from export_models import sample_inputs  # noqa: E402
from tolerances import assert_close  # noqa: E402
from tolerances import assert_defect_caught  # noqa: E402
from tolerances import bound  # noqa: E402

from keras_multimax import export  # noqa: E402

pytestmark = pytest.mark.backends

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "export.py")
LITERT = ("litert", "litert_dynamic_range")
# The SavedModel holds the StableHLO that jax.jit compiles (jax2tf native
# serialization) and TensorFlow compiles it again with its own XLA build, whose
# fusions may sum in another order: the attention model's longest chain is
# four reductions of <= 8 terms in sequence (projection, scores, weighted
# values, output and head), <= 8 eps of its scale each. 32 eps · max|expected|
# (measured: <= 0.6; the .keras file reloaded on JAX: 0). ONNX runs
# onnxruntime's kernels on the same jaxpr: the same count of reorderings and
# exp() within a few ulp (measured: <= 3).
DEPTH = 32


def _block(monkeypatch, *modules):
    """Makes `import module` fail as if the package were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def _zero_ts(model):
    """The defect a broken export would show: MultiMax reduced to SoftMax."""
    for weight in model.weights:
        if weight.path.split("/")[-1] == "ts":
            weight.assign(np.zeros(weight.shape, "float32"))


@pytest.mark.parametrize("name", ["multimax", "attention"])
def test_keras_and_saved_model_match_the_keras_model(name, tmp_path):
    model = build_model(name)
    (x,) = sample_inputs(name, batch=2, length=5)
    expected = keras_outputs(model, [x])

    results = export.export_all(
        model, str(tmp_path), x, formats=("keras", "tf_saved_model"), repeats=1
    )

    assert [r.format for r in results] == ["keras", "tf_saved_model"]
    for r in results:
        assert os.path.exists(r.path) and r.size_bytes > 0 and r.latency_ms > 0, r
        assert r.max_abs_diff <= bound(expected, "float32", DEPTH), r
    # Reload the SavedModel here too, in TensorFlow, and at another batch and
    # sequence length (both dynamic in the model's inputs).
    loaded = tf.saved_model.load(results[1].path)
    for batch, length in ((2, 5), (3, 4)):
        (y,) = sample_inputs(name, batch=batch, length=length, seed=1)
        assert_close(
            loaded.serve(tf.constant(y)).numpy(),
            keras_outputs(model, [y]),
            "float32",
            DEPTH,
            what=f"{name} SavedModel from JAX, batch {batch}, length {length}",
        )
    _zero_ts(model)  # the bound must be far below what a lost modulator moves
    assert_defect_caught(keras_outputs(model, [x]), expected, "float32", DEPTH)


@pytest.mark.parametrize("fmt", LITERT)
def test_asking_for_litert_is_a_value_error_naming_the_backend(fmt, tmp_path):
    model = build_model("multimax")
    with pytest.raises(ValueError, match=rf"Cannot export {fmt}: .*TensorFlow.*'jax'"):
        export.export_all(
            model, str(tmp_path), sample_inputs("multimax")[0], formats=("keras", fmt)
        )
    assert os.listdir(tmp_path) == []  # refused before anything is written


def test_unsupported_formats_follow_keras_own_refusal(tmp_path):
    unsupported = export.unsupported_formats()
    assert list(unsupported) == list(LITERT)
    assert all("'jax'" in reason for reason in unsupported.values()), unsupported
    assert export.unsupported_formats(("keras", "tf_saved_model", "onnx")) == {}
    # What the table stands for: Keras itself refuses LiteRT on this backend.
    model = build_model("multimax")
    with pytest.raises(ValueError, match="LiteRT export requires TensorFlow"):
        model.export(str(tmp_path / "m.tflite"), format="litert")


def test_unavailable_formats_name_jax2onnx_not_tf2onnx(monkeypatch):
    _block(monkeypatch, "jax2onnx", "tf2onnx")
    assert export.unavailable_formats() == {"onnx": ("jax2onnx",)}
    # LiteRT is unsupported here, not missing: it is not listed either way.
    _block(monkeypatch, "onnxruntime", "ai_edge_litert", "ai_edge_litert.interpreter")
    assert export.unavailable_formats() == {"onnx": ("onnxruntime", "jax2onnx")}


def test_default_formats_leave_litert_out_with_the_reason(monkeypatch, tmp_path):
    # Without jax2onnx the default (onnx included) then stops before writing.
    _block(monkeypatch, "jax2onnx")
    model = build_model("multimax")
    with (
        pytest.warns(
            UserWarning, match=r"leaves out litert, litert_dynamic_range: .*'jax'"
        ),
        pytest.raises(
            ImportError, match=r"onnx needs jax2onnx\..*jax2onnx \(ONNX from JAX"
        ),
    ):
        export.export_all(model, str(tmp_path), sample_inputs("multimax")[0])
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_default_formats_with_jax2onnx_run_onnx_too(monkeypatch, tmp_path):
    pytest.importorskip("jax2onnx")
    _block(monkeypatch, "tf2onnx")  # the JAX path must not need it
    model = build_model("attention")
    (x,) = sample_inputs("attention", batch=2, length=5)
    with pytest.warns(UserWarning, match="leaves out litert"):
        results = export.export_all(model, str(tmp_path), x, repeats=1)
    assert [r.format for r in results] == ["keras", "tf_saved_model", "onnx"]
    expected = keras_outputs(model, [x])
    assert all(r.max_abs_diff <= bound(expected, "float32", DEPTH) for r in results)


def test_example_skips_litert_on_jax_and_refuses_it_when_asked(monkeypatch, capsys):
    _block(monkeypatch, "jax2onnx")
    spec = importlib.util.spec_from_file_location("export_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.choose_formats(None) == ["keras", "tf_saved_model"]
    skipped = [line for line in capsys.readouterr().out.splitlines() if "Skip" in line]
    assert len(skipped) == 2, skipped
    assert "litert, litert_dynamic_range" in skipped[0] and "'jax'" in skipped[0]
    assert "onnx" in skipped[1] and "jax2onnx" in skipped[1]
    with pytest.raises(SystemExit, match=r"--formats litert: .*'jax'"):
        example.choose_formats(["keras", "litert"])


def test_inputs_sharing_a_dynamic_dimension_need_polymorphic_shapes(tmp_path):
    """Keras' JAX exporter names each ``None`` of each input apart for jax2tf.

    A mask of the same (dynamic) length as its scores then cannot be proven
    to broadcast, so `export_all` fails with Keras' `TypeError`; Keras'
    ``jax2tf_kwargs`` give both inputs one symbol (docs/guides/deployment.md).
    """
    model = build_model("masked_multimax")
    inputs = sample_inputs("masked_multimax", batch=2, length=5)
    with pytest.raises(TypeError, match="incompatible shapes for broadcasting"):
        export.export_all(
            model, str(tmp_path / "a"), inputs, formats=("tf_saved_model",)
        )
    path = str(tmp_path / "b")
    model.export(
        path,
        format="tf_saved_model",
        verbose=False,
        jax2tf_kwargs={"polymorphic_shapes": [["(batch, t, 5)"] * 2]},
    )
    loaded = tf.saved_model.load(path)  # must outlive `serve` (owns the variables)
    served = loaded.serve([tf.constant(a) for a in inputs])
    assert_close(
        served.numpy(), keras_outputs(model, inputs), "float32", DEPTH, what="masked"
    )
