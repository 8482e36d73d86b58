"""LiteRT (TFLite) export: builtin ops only, run in the `ai_edge_litert` interpreter.

The converter is restricted to ``TFLITE_BUILTINS`` (Keras' default also allows
``SELECT_TF_OPS``), so conversion fails if any op would need the Flex
delegate, and the operator table of the written flatbuffer is read back to
check that no custom op slipped in. Batch size and sequence length are
dynamic: the same file runs on several input shapes.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter
from export_models import MODELS
from export_models import build_model
from export_models import keras_outputs
from export_models import sample_inputs

from keras_multimax import Modulator
from keras_multimax import layers

pytestmark = pytest.mark.only_backend(
    "tensorflow", reason="LiteRT export needs TensorFlow (Keras 3.15)"
)

BUILTINS_ONLY = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}
SHAPES = ((3, 7), (5, 9), (1, 1))
# Dynamic-range quantization stores large weight matrices as int8 and keeps
# activations (and so MultiMax itself) in float32; this bound on the
# probabilities leaves ~10x margin over the 1.1e-3 measured on the model below.
QUANTIZED_ATOL = 1e-2

_OPERATOR_NAMES = {
    value: key
    for key, value in vars(schema.BuiltinOperator).items()
    if not key.startswith("_")
}


def operator_names(path: str) -> list[str]:
    """Operators of a .tflite file, read from its flatbuffer operator table."""
    with open(path, "rb") as f:
        model = schema.Model.GetRootAsModel(f.read(), 0)
    names = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = _OPERATOR_NAMES[builtin]
        if name == "CUSTOM":  # Flex (Select TF) ops are custom ops too
            name = "CUSTOM:" + code.CustomCode().decode()
        names.append(name)
    return names


def run_litert(path: str, model: keras.Model, inputs: list[np.ndarray]):
    runner = Interpreter(path).get_signature_runner("serving_default")
    feeds = {t.name: a for t, a in zip(model.inputs, inputs)}
    (output,) = runner(**feeds).values()
    return output


def assert_close(got, want, atol):
    """|got - want| <= atol, relative for entries beyond 1 (SegLU logits)."""
    excess = np.abs(got - want) - atol * np.maximum(1.0, np.abs(want))
    assert np.max(excess) <= 0, float(np.max(np.abs(got - want)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_litert_builtin_ops_and_float32_parity(name, tmp_path):
    model = build_model(name)
    path = str(tmp_path / f"{name}.tflite")
    model.export(path, format="litert", verbose=False, target_spec=BUILTINS_ONLY)

    ops = operator_names(path)
    assert ops and not [op for op in ops if op.startswith("CUSTOM")], ops
    for batch, length in SHAPES:  # one file, dynamic batch and length
        inputs = sample_inputs(name, batch, length, seed=batch)
        got = run_litert(path, model, inputs)
        assert got.shape == keras_outputs(model, inputs).shape
        assert_close(got, keras_outputs(model, inputs), atol=1e-5)
    print(f"{name}: {os.path.getsize(path)} bytes, ops {sorted(set(ops))}")


@pytest.mark.slow
def test_litert_fully_masked_rows_are_zero(tmp_path):
    model = build_model("masked_multimax")
    path = str(tmp_path / "masked.tflite")
    model.export(path, format="litert", verbose=False, target_spec=BUILTINS_ONLY)
    inputs = [a[:, :2] for a in sample_inputs("masked_multimax")]
    inputs[1][0, 0] = False  # nothing visible in this row
    inputs[1][1, 1, 1:] = False
    inputs[0][1, 1, 1:] = [300.0, -300.0, 90.0, -90.0]  # huge masked scores
    got = run_litert(path, model, inputs)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[0, 0], 0.0)
    np.testing.assert_allclose(got[1, 1], [1.0, 0.0, 0.0, 0.0, 0.0], atol=1e-6)
    assert_close(got, keras_outputs(model, inputs), atol=1e-5)


@pytest.mark.slow
def test_litert_dynamic_range_quantized(tmp_path):
    keras.utils.set_random_seed(0)
    modulator = Modulator(
        ranges_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=1),
        ts_initializer=keras.initializers.RandomNormal(stddev=0.3, seed=2),
    )
    x = keras.Input((None, 64), name="x")
    h = keras.layers.Dense(256, name="up")(x)  # 16k weights: quantized
    h = layers.SegLU(name="seglu", modulator=modulator)(h)
    h = keras.layers.Dense(64, name="down")(h)
    y = layers.MultiMax(name="multimax", modulator=modulator)(h)
    model = keras.Model(x, y)

    float_path = str(tmp_path / "float32.tflite")
    quant_path = str(tmp_path / "dynamic_range.tflite")
    model.export(float_path, format="litert", verbose=False, target_spec=BUILTINS_ONLY)
    model.export(
        quant_path,
        format="litert",
        verbose=False,
        target_spec=BUILTINS_ONLY,
        optimizations=[tf.lite.Optimize.DEFAULT],
    )
    assert not [op for op in operator_names(quant_path) if op.startswith("CUSTOM")]
    float_size, quant_size = os.path.getsize(float_path), os.path.getsize(quant_path)
    assert quant_size < 0.4 * float_size, (float_size, quant_size)

    inputs = [np.random.default_rng(0).standard_normal((4, 10, 64)).astype("float32")]
    want = keras_outputs(model, inputs)
    assert_close(run_litert(float_path, model, inputs), want, atol=1e-5)
    got = run_litert(quant_path, model, inputs)
    error = float(np.max(np.abs(got - want)))
    assert error <= QUANTIZED_ATOL, error
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)  # still distributions
    print(
        f"float32 {float_size} bytes, dynamic-range {quant_size} bytes, "
        f"max abs diff {error:.2e}"
    )


class _Determinant(keras.layers.Layer):
    """Needs the Flex delegate in LiteRT (no builtin MatrixDeterminant)."""

    def call(self, x):
        return tf.linalg.det(tf.reshape(x, (-1, 2, 2)))


@pytest.mark.slow
def test_litert_checks_catch_select_tf_ops(tmp_path):
    # Controls for the two checks above: a Flex op fails the strict
    # conversion and shows up in the operator table of a default conversion.
    x = keras.Input((4,))
    model = keras.Model(x, _Determinant()(x))
    model(np.ones((1, 4), "float32"))
    with pytest.raises(Exception, match="MatrixDeterminant. op is neither a custom op"):
        model.export(
            str(tmp_path / "strict.tflite"),
            format="litert",
            verbose=False,
            target_spec=BUILTINS_ONLY,
        )
    path = str(tmp_path / "default.tflite")
    model.export(path, format="litert", verbose=False)  # Keras allows Select ops
    assert "CUSTOM:FlexMatrixDeterminant" in operator_names(path)
