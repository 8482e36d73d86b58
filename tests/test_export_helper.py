"""`keras_multimax.export.export_all` and `examples/export.py`."""

import importlib.util
import os
import sys

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


# --- Runtimes that are not installed -------------------------------------


def _block(monkeypatch, *modules):
    """Makes `import module` fail as if the package were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def _load_example():
    spec = importlib.util.spec_from_file_location("export_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_unavailable_formats_names_the_missing_packages(monkeypatch):
    assert export.unavailable_formats() == {}
    _block(monkeypatch, "onnxruntime")
    assert export.unavailable_formats() == {"onnx": ("onnxruntime",)}
    _block(monkeypatch, "ai_edge_litert", "ai_edge_litert.interpreter", "tf2onnx")
    assert export.unavailable_formats(("keras", "litert", "onnx")) == {
        "litert": ("ai-edge-litert",),
        "onnx": ("onnxruntime", "tf2onnx"),
    }


def test_export_all_missing_runtime_fails_before_writing_anything(
    monkeypatch, tmp_path
):
    _block(monkeypatch, "onnxruntime")
    model = build_model("seglu")
    with pytest.raises(ImportError, match=r"onnx.*onnxruntime.*\[export\]"):
        export.export_all(
            model, str(tmp_path), sample_inputs("seglu")[0], formats=("keras", "onnx")
        )
    assert os.listdir(tmp_path) == []


def test_onnx_runner_without_tf2onnx_says_which_extra(monkeypatch, tmp_path):
    # onnxruntime installed, tf2onnx not: used to be a bare "import of tf2onnx
    # halted" from the Erfc converter registration.
    _block(monkeypatch, "tf2onnx")
    model = build_model("seglu")
    with pytest.raises(ImportError, match=r"could not import tf2onnx.*\[export\]"):
        export._onnx_runner(model, str(tmp_path / "m.onnx"), sample_inputs("seglu"))


def _two_input_model():
    """Float features of shape (16,) and integer token ids of any length."""
    x = keras.Input((16,), name="features")
    ids = keras.Input((None,), dtype="int32", name="ids")
    e = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(10, 4)(ids))
    h = keras.layers.Concatenate()([keras.layers.Dense(4)(x), e])
    return keras.Model([x, ids], layers.MultiMax()(h), name="own")


def test_example_default_formats_skip_missing_runtimes(monkeypatch, tmp_path, capsys):
    # A model that does not take 8x8 digits, exported with the default formats
    # while the LiteRT and ONNX runtimes are missing: one line says what is
    # skipped, the table has the others, parity runs on inputs like the model's.
    path = str(tmp_path / "own.keras")
    _two_input_model().save(path)
    out_dir = tmp_path / "out"
    _block(monkeypatch, "onnxruntime", "ai_edge_litert", "ai_edge_litert.interpreter")
    _load_example().main(["--model", path, "--output-dir", str(out_dir), "--smoke"])
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "Skipping" in line]
    assert len(skipped) == 1, out
    for name in ("litert", "litert_dynamic_range", "onnx", "onnxruntime", "[export]"):
        assert name in skipped[0], skipped
    assert "Keras (.keras)" in out and "SavedModel" in out
    assert "ONNX (.onnx)" not in out and "LiteRT" not in out
    assert "random" in out
    assert (out_dir / "export_results.md").read_text().count("\n") == 2 + 2
    assert sorted(os.listdir(out_dir)) == [
        "export_results.md",
        "model.keras",
        "saved_model",
    ]


def test_example_explicit_format_without_runtime_is_an_error(monkeypatch, tmp_path):
    path = str(tmp_path / "own.keras")
    _two_input_model().save(path)
    _block(monkeypatch, "onnxruntime")
    example = _load_example()
    with pytest.raises(SystemExit, match=r"--formats.*onnx.*onnxruntime.*\[export\]"):
        example.main(
            [
                "--model",
                path,
                "--formats",
                "keras",
                "onnx",
                "--output-dir",
                str(tmp_path),
            ]
        )
    assert not (tmp_path / "model.keras").exists()


def test_example_parity_inputs_follow_the_model_inputs():
    example = _load_example()
    x = keras.Input((None, 5), name="x")
    mask = keras.Input((None, 5), dtype="bool", name="mask")
    masked = keras.Model([x, mask], layers.MultiMax()(x, mask=mask))
    inputs, description = example.parity_inputs(masked, batch_size=32, seed=0)
    assert [(a.shape, a.dtype.name) for a in inputs] == [
        ((32, 8, 5), "float32"),
        ((32, 8, 5), "bool"),
    ]
    assert "random" in description
    assert np.isfinite(np.asarray(masked(inputs))).all()

    model = _two_input_model()
    (features, ids), _ = example.parity_inputs(model, batch_size=4, seed=0)
    assert features.shape == (4, 16) and features.dtype == np.float32
    assert ids.shape == (4, 8) and ids.dtype == np.int32
    assert ids.min() >= 1 and ids.max() <= 9
    assert np.asarray(model([features, ids])).shape == (4, 8)

    # An 8x8x1 float model gets the real digits test images.
    digits = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten()])
    (images,), description = example.parity_inputs(digits, batch_size=6, seed=0)
    assert images.shape == (6, 8, 8, 1) and "digits" in description
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.1
