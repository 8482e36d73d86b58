"""Exported graphs hold the plain-op forward, never the fused XLA kernel.

The TensorFlow forward of `ops.multimax`/`ops.seglu` is plain builtin ops,
with or without a gradient tape, and a nested ``tf.function(jit_compile=
True)`` after `keras_multimax.config.enable_fused_forward()` only. tf2onnx
cannot convert a call to such a function and a SavedModel server without
XLA's CPU JIT cannot run it, so every export path must trace plain ops:
by default it does, and `config.plain_forward` keeps the kernel out with the
switch on. Each test walks the functions reachable from the exported forward
graph and looks for the ``_XlaMustCompile`` mark; positive controls show the
walk finds the kernel in a graph traced with the switch on.
"""

import keras
import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf
import tf2onnx
from export_models import MODELS
from export_models import build_model
from export_models import keras_outputs
from export_models import sample_inputs
from tolerances import assert_close
from tolerances import assert_defect_caught

from keras_multimax import config
from keras_multimax import ops
from keras_multimax.backend.tensorflow import multimax as tf_multimax

pytestmark = pytest.mark.only_backend(
    "tensorflow",
    reason="TensorFlow graphs: the fused XLA kernel, SavedModel, tf2onnx, LiteRT",
)

# Bounds in float32 eps · max(largest |output|, 1), see tests/tolerances.py:
# the floor keeps probabilities absolute. Measured 1.8 (attention SavedModel)
# and 2.2 (SegLU through ONNX) on an AVX2-only CPU.
# The plain-op forward against itself or the fused kernel, in TensorFlow:
# a few roundings of the modulator (FMA or not), the SoftMax and each layer.
SAME_OPS = ("float32", 16, 1.0)
# Another runtime's own kernels (exp, pow, matmul) on top of that.
ONNX = ("float32", 32, 1.0)
LITERT = ("float32", 64, 1.0)


def _xla_marked(attrs) -> bool:
    return "_XlaMustCompile" in attrs and attrs["_XlaMustCompile"].b


def xla_kernels(graph_def) -> set:
    """Names of XLA-marked functions called (transitively) from `graph_def`."""
    library = {f.signature.name: f for f in graph_def.library.function}
    found, seen = set(), set()

    def visit(nodes):
        for node in nodes:
            for value in node.attr.values():
                names = [value.func.name] if value.HasField("func") else []
                names += [f.name for f in value.list.func]
                for name in names:
                    if name not in library or name in seen:
                        continue
                    seen.add(name)
                    if _xla_marked(node.attr) or _xla_marked(library[name].attr):
                        found.add(name)
                    visit(library[name].node_def)

    visit(graph_def.node)
    return found


def input_signature(model):
    return [tf.TensorSpec(t.shape, t.dtype) for t in model.inputs]


def call(model):
    def fn(*inputs):
        return model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)

    return fn


def graph_kernels(model, under_tape=False) -> set:
    """XLA kernels of a freshly traced forward of `model`."""

    def fn(*inputs):
        if not under_tape:
            return call(model)(*inputs)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            return call(model)(*inputs)

    traced = tf.function(fn, input_signature=input_signature(model))
    return xla_kernels(traced.get_concrete_function().graph.as_graph_def())


@pytest.mark.parametrize("name", MODELS)
def test_kernel_only_with_the_switch_and_never_in_plain_forward(name):
    """The rule, with positive controls: the walk finds the kernel where it is."""
    model = build_model(name)
    # The default: plain ops, in inference and in a training step alike.
    assert not graph_kernels(model)
    assert not graph_kernels(model, under_tape=True)
    config.enable_fused_forward()
    try:
        assert graph_kernels(model)  # the explicit opt-in
        assert graph_kernels(model, under_tape=True)
        with config.plain_forward(), config.plain_forward():
            assert not graph_kernels(model)
        # Nested and re-entered blocks restore the switch on exit.
        assert graph_kernels(model)
        with pytest.warns(DeprecationWarning, match="plain_ops"):
            with ops.plain_ops():  # the 0.2.0 name still works, for one release
                assert not graph_kernels(model)
        assert graph_kernels(model)
    finally:
        config.disable_fused_forward()
    assert not graph_kernels(model)


@pytest.mark.parametrize("name", MODELS)
def test_keras_export_saved_model_is_plain(name, tmp_path):
    model = build_model(name)
    inputs = sample_inputs(name)
    model.export(str(tmp_path / name), format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / name))
    for function in loaded.serve.concrete_functions:
        assert not xla_kernels(function.graph.as_graph_def())
    assert not xla_kernels(loaded.signatures["serving_default"].graph.as_graph_def())
    expected = keras_outputs(model, inputs)
    assert_close(
        loaded.serve(inputs if len(inputs) > 1 else inputs[0]).numpy(),
        expected,
        *SAME_OPS,
        what=name,
    )
    # Control: the model with its modulator ignored is >= 10 bounds away.
    for w in model.weights:
        if w.name == "ts":
            w.assign(np.zeros(w.shape, "float32"))
    assert_defect_caught(keras_outputs(model, inputs), expected, *SAME_OPS)


def test_tf_saved_model_save_traces_plain_ops(tmp_path):
    model = build_model("attention")
    module = tf.Module()
    module.model = model
    module.serve = tf.function(call(model), input_signature=input_signature(model))
    tf.saved_model.save(module, str(tmp_path / "sm"))  # traced inside save
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    for function in loaded.serve.concrete_functions:
        assert not xla_kernels(function.graph.as_graph_def())
    signature = loaded.signatures["serving_default"]
    assert not xla_kernels(signature.graph.as_graph_def())


@pytest.mark.parametrize("name", ["multimax", "seglu"])
def test_tf2onnx_from_keras_converts(name):
    model = build_model(name)
    inputs = sample_inputs(name)
    proto, _ = tf2onnx.convert.from_keras(
        model, input_signature=input_signature(model), opset=17
    )
    assert "PartitionedCall" not in {node.op_type for node in proto.graph.node}
    session = ort.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feeds = {i.name: a for i, a in zip(session.get_inputs(), inputs)}
    assert_close(
        session.run(None, feeds)[0], keras_outputs(model, inputs), *ONNX, what=name
    )


def test_function_traced_with_the_switch_on_needs_plain_forward():
    """tf2onnx receives an already traced graph: a fused one does not convert.

    The control shows that with the switch on the traced kernel reaches
    tf2onnx as an unsupported ``PartitionedCall``; `config.plain_forward`
    (or the default) gives a graph that converts.
    """
    model = build_model("multimax")
    inputs = sample_inputs("multimax")
    signature = input_signature(model)

    config.enable_fused_forward()
    try:
        traced = tf.function(call(model), input_signature=signature)
        traced.get_concrete_function()
        proto, _ = tf2onnx.convert.from_function(traced, input_signature=signature)
        assert "PartitionedCall" in {node.op_type for node in proto.graph.node}
    finally:
        config.disable_fused_forward()

    with config.plain_forward():
        traced = tf.function(call(model), input_signature=signature)
        traced.get_concrete_function()
    proto, _ = tf2onnx.convert.from_function(traced, input_signature=signature)
    session = ort.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    assert_close(
        session.run(None, {session.get_inputs()[0].name: inputs[0]})[0],
        keras_outputs(model, inputs),
        *ONNX,
    )


def test_litert_converter_from_keras_model_converts():
    from ai_edge_litert.interpreter import Interpreter

    model = build_model("attention")
    inputs = sample_inputs("attention")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    interpreter = Interpreter(model_content=converter.convert())
    interpreter.resize_tensor_input(0, inputs[0].shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], inputs[0])
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert_close(got, keras_outputs(model, inputs), *LITERT)


def test_kernel_and_plain_ops_agree_on_a_model():
    """The fused forward and the exported one differ by float rounding only."""
    model = build_model("attention")
    inputs = sample_inputs("attention")
    config.enable_fused_forward()
    try:
        fused = keras.ops.convert_to_numpy(model(inputs[0], training=False))
    finally:
        config.disable_fused_forward()
    assert_close(fused, keras_outputs(model, inputs), *SAME_OPS)


def test_saved_model_signature_traced_with_the_switch_on_needs_plain_forward(
    tmp_path,
):
    """A ConcreteFunction passed as ``signatures=`` keeps what it was traced with."""
    model = build_model("multimax")
    module = tf.Module()
    module.model = model
    serve = tf.function(call(model), input_signature=input_signature(model))

    config.enable_fused_forward()
    try:
        tf.saved_model.save(
            module, str(tmp_path / "a"), signatures=serve.get_concrete_function()
        )
        with config.plain_forward():
            concrete = tf.function(
                call(model), input_signature=input_signature(model)
            ).get_concrete_function()
    finally:
        config.disable_fused_forward()
    signature = tf.saved_model.load(str(tmp_path / "a")).signatures["serving_default"]
    assert xla_kernels(signature.graph.as_graph_def())  # the documented gap

    tf.saved_model.save(module, str(tmp_path / "b"), signatures=concrete)
    signature = tf.saved_model.load(str(tmp_path / "b")).signatures["serving_default"]
    assert not xla_kernels(signature.graph.as_graph_def())


def test_eager_calls_compile_the_kernel_only_with_the_switch():
    """Without the switch no call compiles the kernel, with a tape or without;
    with it, each new input shape does (traced once per shape)."""
    kernel = tf_multimax._forward_kernel
    ranges = tf.constant([-1.0, 1.0, -2.0, 2.0])
    ts = tf.constant([0.3, 0.4, 0.1, 0.2])
    before = kernel.experimental_get_tracing_count()
    for length in (3, 4, 5):
        ops.multimax(tf.ones([2, length]), ranges, ts)
    x = tf.ones([2, 6])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = ops.multimax(x, ranges, ts)
    assert tape.gradient(y, x) is not None
    assert kernel.experimental_get_tracing_count() == before
    config.enable_fused_forward()
    try:
        ops.multimax(tf.ones([2, 7]), ranges, ts)
    finally:
        config.disable_fused_forward()
    assert kernel.experimental_get_tracing_count() == before + 1
