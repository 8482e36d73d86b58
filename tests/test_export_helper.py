"""`keras_multimax.export.export_all` and `examples/export.py`."""

import importlib.util
import os

import keras
import numpy as np
import pytest
from export_models import build_model
from export_models import sample_inputs

from keras_multimax import export
from keras_multimax import layers

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "export.py")


@pytest.mark.slow
def test_export_all_every_format_with_gelu_and_masks(tmp_path):
    # Exact GELU is TF's Erfc, which tf2onnx 1.17 cannot convert by itself;
    # the mask input goes through ops.multimax's masked branch.
    x = keras.Input((None, 5), name="x")
    mask = keras.Input((None, 5), name="mask", dtype="bool")
    h = keras.layers.Dense(64, activation="gelu", name="mlp")(x)
    h = keras.layers.Dense(5, name="proj")(h)
    y = layers.MultiMax(
        ranges_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=1),
        ts_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=2),
    )(h, mask=mask)
    model = keras.Model([x, mask], y)
    inputs = sample_inputs("masked_multimax", batch=4, length=6)

    results = export.export_all(model, str(tmp_path), inputs, repeats=2)

    assert [r.format for r in results] == list(export.FORMATS)
    for r in results:
        assert os.path.exists(r.path) and r.size_bytes > 0, r
        assert r.latency_ms > 0, r
        bound = 1e-2 if r.format == "litert_dynamic_range" else 1e-5
        assert r.max_abs_diff <= bound, r
    table = export.format_table(results).splitlines()
    assert len(table) == 2 + len(results)
    assert "ONNX (.onnx)" in table[-1]


@pytest.mark.slow
def test_export_all_attention_model_subset(tmp_path):
    model = build_model("attention")
    inputs = sample_inputs("attention", batch=2, length=5)
    results = export.export_all(
        model, str(tmp_path), inputs[0], formats=("tf_saved_model", "litert"), repeats=1
    )
    assert [r.format for r in results] == ["tf_saved_model", "litert"]
    assert all(r.max_abs_diff <= 1e-5 for r in results), results


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"formats": ("keras", "tflite")}, "formats="),
        ({"formats": ()}, "formats="),
        ({"repeats": 0}, "repeats=0"),
    ],
)
def test_export_all_rejects_bad_arguments(kwargs, message, tmp_path):
    model = build_model("seglu")
    with pytest.raises(ValueError, match=message):
        export.export_all(model, str(tmp_path), sample_inputs("seglu")[0], **kwargs)


def test_export_all_litert_needs_float32_compute(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    x = keras.Input((None, 8))
    model = keras.Model(x, layers.MultiMax()(keras.layers.Dense(4)(x)))
    keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(ValueError, match=r"float32.*\['float16'\]"):
        export.export_all(
            model, str(tmp_path), np.zeros((1, 3, 8), "float32"), formats=("litert",)
        )


def test_export_all_rejects_several_outputs(tmp_path):
    x = keras.Input((4,))
    model = keras.Model(x, [layers.MultiMax()(x), layers.SegLU()(x)])
    with pytest.raises(ValueError, match="2 outputs"):
        export.export_all(model, str(tmp_path), np.zeros((1, 4), "float32"))


@pytest.mark.slow
def test_example_smoke_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("export_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--smoke", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    for label in ("Keras (.keras)", "SavedModel", "LiteRT float32", "ONNX (.onnx)"):
        assert label in out
    written = (tmp_path / "export_results.md").read_text()
    assert written.count("\n") == 2 + len(export.FORMATS)
    assert {"model.keras", "model.tflite", "model.onnx", "saved_model"} <= set(
        os.listdir(tmp_path)
    )
