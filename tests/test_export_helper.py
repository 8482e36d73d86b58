"""`keras_multimax.export.export_all` and `examples/export.py`, on every backend.

What each backend writes differs: from TensorFlow every format (LiteRT and
ONNX through tf2onnx); from JAX, Keras 3.15 writes the ``.keras`` file, the
SavedModel (jax2tf) and ONNX (jax2onnx, not in the ``export`` extra) and
refuses LiteRT. Tests of one backend's formats carry its marker.
"""

import importlib.util
import os
import sys

import keras
import numpy as np
import pytest
from export_models import active_modulator
from export_models import build_model
from export_models import keras_outputs
from export_models import sample_inputs
from tolerances import assert_close
from tolerances import assert_defect_caught
from tolerances import bound

from keras_multimax import export
from keras_multimax import layers

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "export.py")
LITERT = ("litert", "litert_dynamic_range")
TENSORFLOW = pytest.mark.only_backend(
    "tensorflow", reason="LiteRT and tf2onnx export from TensorFlow only"
)
JAX = pytest.mark.only_backend(
    "jax", reason="export from JAX: jax2tf, jax2onnx, and no LiteRT"
)


@pytest.mark.slow
@TENSORFLOW
def test_export_all_every_format_with_gelu_and_masks(tmp_path):
    # Exact GELU is TF's Erfc, which tf2onnx 1.17 cannot convert by itself;
    # the mask input goes through ops.multimax's masked branch.
    x = keras.Input((None, 5), name="x")
    mask = keras.Input((None, 5), name="mask", dtype="bool")
    h = keras.layers.Dense(64, activation="gelu", name="mlp")(x)
    h = keras.layers.Dense(5, name="proj")(h)
    y = layers.MultiMax(modulator=active_modulator(1))(h, mask=mask)
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
@TENSORFLOW
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


@TENSORFLOW
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
@TENSORFLOW
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


@TENSORFLOW
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


@TENSORFLOW
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


@TENSORFLOW
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


# --- From JAX ------------------------------------------------------------

# The SavedModel holds the StableHLO that jax.jit compiles (jax2tf native
# serialization) and TensorFlow compiles it again with its own XLA build, whose
# fusions may sum in another order: the attention model's longest chain is
# four reductions of <= 8 terms in sequence (projection, scores, weighted
# values, output and head), <= 8 eps of its scale each. 32 eps · max|expected|
# (measured: <= 0.6; the .keras file reloaded on JAX: 0). ONNX runs
# onnxruntime's kernels on the same jaxpr: the same count of reorderings and
# exp() within a few ulp (measured: <= 3).
DEPTH = 32


def _zero_ts(model):
    """The defect a broken export would show: MultiMax reduced to SoftMax."""
    for weight in model.weights:
        if weight.path.split("/")[-1] == "ts":
            weight.assign(np.zeros(weight.shape, "float32"))


@JAX
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
    import tensorflow as tf

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


@JAX
@pytest.mark.parametrize("fmt", LITERT)
def test_asking_for_litert_is_a_value_error_naming_the_backend(fmt, tmp_path):
    model = build_model("multimax")
    with pytest.raises(ValueError, match=rf"Cannot export {fmt}: .*TensorFlow.*'jax'"):
        export.export_all(
            model, str(tmp_path), sample_inputs("multimax")[0], formats=("keras", fmt)
        )
    assert os.listdir(tmp_path) == []  # refused before anything is written


@JAX
def test_unsupported_formats_follow_keras_own_refusal(tmp_path):
    unsupported = export.unsupported_formats()
    assert list(unsupported) == list(LITERT)
    assert all("'jax'" in reason for reason in unsupported.values()), unsupported
    assert export.unsupported_formats(("keras", "tf_saved_model", "onnx")) == {}
    # What the table stands for: Keras itself refuses LiteRT on this backend.
    model = build_model("multimax")
    with pytest.raises(ValueError, match="LiteRT export requires TensorFlow"):
        model.export(str(tmp_path / "m.tflite"), format="litert")


@JAX
def test_unavailable_formats_name_jax2onnx_not_tf2onnx(monkeypatch):
    _block(monkeypatch, "jax2onnx", "tf2onnx")
    assert export.unavailable_formats() == {"onnx": ("jax2onnx",)}
    # LiteRT is unsupported here, not missing: it is not listed either way.
    _block(monkeypatch, "onnxruntime", "ai_edge_litert", "ai_edge_litert.interpreter")
    assert export.unavailable_formats() == {"onnx": ("onnxruntime", "jax2onnx")}


@JAX
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
@JAX
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


@JAX
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


@JAX
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
    import tensorflow as tf

    loaded = tf.saved_model.load(path)  # must outlive `serve` (owns the variables)
    served = loaded.serve([tf.constant(a) for a in inputs])
    assert_close(
        served.numpy(), keras_outputs(model, inputs), "float32", DEPTH, what="masked"
    )
