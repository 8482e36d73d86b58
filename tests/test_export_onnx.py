"""ONNX export (`model.export(format="onnx")`, tf2onnx) run with onnxruntime."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_models import MODELS
from export_models import build_model
from export_models import fully_masked_inputs
from export_models import keras_outputs
from export_models import sample_inputs

pytestmark = pytest.mark.only_backend(
    "tensorflow", reason="ONNX through tf2onnx, from TensorFlow graphs"
)

SHAPES = ((3, 7), (5, 9), (1, 1))


def export_onnx(model, path: str, example) -> ort.InferenceSession:
    # Keras' ONNX exporter refuses a model that was never called.
    keras_outputs(model, example)
    model.export(path, format="onnx", verbose=False)
    graph = onnx.load(path).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, domains  # standard operators only
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def run_onnx(session, model, inputs):
    feeds = {t.name: a for t, a in zip(model.inputs, inputs)}
    assert {i.name for i in session.get_inputs()} == set(feeds)
    return session.run(None, feeds)[0]


def assert_close(got, want, atol):
    """|got - want| <= atol, relative for entries beyond 1 (SegLU logits)."""
    excess = np.abs(got - want) - atol * np.maximum(1.0, np.abs(want))
    assert np.max(excess) <= 0, float(np.max(np.abs(got - want)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_matches_keras(name, tmp_path):
    model = build_model(name)
    path = str(tmp_path / f"{name}.onnx")
    session = export_onnx(model, path, sample_inputs(name))
    for batch, length in SHAPES:  # dynamic batch and sequence length
        inputs = sample_inputs(name, batch, length, seed=batch)
        want = keras_outputs(model, inputs)
        got = run_onnx(session, model, inputs)
        assert got.shape == want.shape
        assert_close(got, want, atol=1e-5)
    print(f"{name}: {os.path.getsize(path)} bytes")


@pytest.mark.slow
def test_onnx_fully_masked_rows_are_zero(tmp_path):
    # tf2onnx lowers a float `tf.where(c, a, b)` to `cast(c)*a + cast(!c)*b`
    # unless it sees an inf constant or an IsInf/IsNaN condition (tf2onnx 1.17,
    # onnx_opset/controlflow.py, Select.version_9), so any inf reaching a
    # select in ops.multimax becomes 0 * inf = NaN in ONNX: a -inf mask fill in
    # a fully masked row, or exp() overflowing at a masked score far above the
    # visible maximum (causal attention: the `attention` model above).
    model = build_model("masked_multimax")
    inputs = fully_masked_inputs()
    session = export_onnx(model, str(tmp_path / "masked.onnx"), inputs)
    got = run_onnx(session, model, inputs)
    np.testing.assert_array_equal(got[0, 0], 0.0)
    np.testing.assert_allclose(got[1, 1], [1.0, 0.0, 0.0, 0.0, 0.0], atol=1e-6)
    assert_close(got, keras_outputs(model, inputs), atol=1e-5)
