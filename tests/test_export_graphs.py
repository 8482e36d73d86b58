"""Exported graphs hold the plain-op forward, never the fused XLA kernel.

By default the forward of `ops.multimax`/`ops.seglu` is a nested
``tf.function(jit_compile=True)``. tf2onnx cannot convert a call to such a
function and a SavedModel server without XLA's CPU JIT cannot run it, so every
export path must trace plain ops instead (`ops.plain_ops`, entered
automatically under the exporters listed in `ops._EXPORTER_MODULES`). Each test
walks the functions reachable from the exported forward graph and looks for
the ``_XlaMustCompile`` mark; a positive control shows the walk finds the
kernel in a graph traced the default way.
"""

import inspect
import pathlib
import textwrap

import keras
import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf
import tf2onnx
from export_models import MODELS
from export_models import build_model
from export_models import keras_outputs
from export_models import run_fresh_python
from export_models import sample_inputs
from tolerances import assert_close
from tolerances import assert_defect_caught

from keras_multimax import ops

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


@pytest.mark.parametrize("name", MODELS)
def test_default_graphs_use_the_kernel_and_plain_ops_does_not(name):
    """Positive control: the walk finds the kernel where it is."""
    model = build_model(name)
    fn = tf.function(call(model), input_signature=input_signature(model))
    assert xla_kernels(fn.get_concrete_function().graph.as_graph_def())
    with ops.plain_ops():
        plain = tf.function(call(model), input_signature=input_signature(model))
        graph_def = plain.get_concrete_function().graph.as_graph_def()
    assert not xla_kernels(graph_def)
    # Nested and re-entered contexts restore the default on exit.
    with ops.plain_ops(), ops.plain_ops():
        pass
    again = tf.function(call(model), input_signature=input_signature(model))
    assert xla_kernels(again.get_concrete_function().graph.as_graph_def())


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


def test_function_traced_before_export_needs_plain_ops():
    """tf2onnx receives an already traced graph: only `plain_ops` helps.

    The control shows that without it the traced kernel reaches tf2onnx as an
    unsupported ``PartitionedCall``: this is why the context exists.
    """
    model = build_model("multimax")
    inputs = sample_inputs("multimax")
    signature = input_signature(model)

    traced = tf.function(call(model), input_signature=signature)
    traced.get_concrete_function()  # traced outside any exporter
    proto, _ = tf2onnx.convert.from_function(traced, input_signature=signature)
    assert "PartitionedCall" in {node.op_type for node in proto.graph.node}

    with ops.plain_ops():
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
    """The default forward and the exported one differ by float rounding only."""
    model = build_model("attention")
    inputs = sample_inputs("attention")
    fused = keras.ops.convert_to_numpy(model(inputs[0], training=False))
    assert_close(fused, keras_outputs(model, inputs), *SAME_OPS)


def test_saved_model_signature_traced_beforehand_needs_plain_ops(tmp_path):
    """A ConcreteFunction passed as ``signatures=`` was traced outside the save."""
    model = build_model("multimax")
    module = tf.Module()
    module.model = model
    serve = tf.function(call(model), input_signature=input_signature(model))

    tf.saved_model.save(
        module, str(tmp_path / "a"), signatures=serve.get_concrete_function()
    )
    signature = tf.saved_model.load(str(tmp_path / "a")).signatures["serving_default"]
    assert xla_kernels(signature.graph.as_graph_def())  # the documented gap

    with ops.plain_ops():
        concrete = tf.function(
            call(model), input_signature=input_signature(model)
        ).get_concrete_function()
    tf.saved_model.save(module, str(tmp_path / "b"), signatures=concrete)
    signature = tf.saved_model.load(str(tmp_path / "b")).signatures["serving_default"]
    assert not xla_kernels(signature.graph.as_graph_def())


def test_exporter_modules_match_whole_names():
    """A module named like an exporter (``tf2onnx_helpers``) keeps the kernel."""
    code = textwrap.dedent(
        """
        def trace(fn, signature):
            return tf.function(fn, input_signature=signature).get_concrete_function()
        """
    )
    model = build_model("multimax")
    graphs = {}
    for name in ("tf2onnx_helpers", "tf2onnx.helpers"):
        namespace = {"__name__": name, "tf": tf}
        exec(code, namespace)  # frames of `trace` report `name` as their module
        concrete = namespace["trace"](call(model), input_signature(model))
        graphs[name] = xla_kernels(concrete.graph.as_graph_def())
    assert graphs["tf2onnx_helpers"]
    assert not graphs["tf2onnx.helpers"]


def test_eager_inference_compiles_no_kernel_and_training_does():
    """Eager inference would compile the kernel for every new shape: plain ops."""
    kernel = ops._forward_kernel
    ranges = tf.constant([-1.0, 1.0, -2.0, 2.0])
    ts = tf.constant([0.3, 0.4, 0.1, 0.2])
    before = kernel.experimental_get_tracing_count()
    for length in (3, 4, 5):
        ops.multimax(tf.ones([2, length]), ranges, ts)
    assert kernel.experimental_get_tracing_count() == before
    x = tf.ones([2, 6])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = ops.multimax(x, ranges, ts)
    assert kernel.experimental_get_tracing_count() == before + 1
    assert tape.gradient(y, x) is not None


MIRRORED_CHILD = """
import sys
sys.path.insert(0, {tests!r})
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
from export_models import build_model
from test_export_graphs import call, input_signature, xla_kernels
from keras_multimax import ops

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = build_model("attention")


def serve(x):
    per_replica = strategy.run(call(model), args=(x,))
    return strategy.gather(per_replica, axis=0)


def kernels():
    fn = tf.function(serve, input_signature=input_signature(model))
    return xla_kernels(fn.get_concrete_function().graph.as_graph_def())


default = kernels()
with ops.plain_ops():
    plain = kernels()
print(bool(default), bool(plain))
"""


@pytest.mark.slow
def test_plain_ops_reaches_mirrored_replica_threads(tmp_path):
    """`strategy.run` traces each replica in its own thread."""
    tests = str(pathlib.Path(inspect.getfile(xla_kernels)).parent)
    out = run_fresh_python(MIRRORED_CHILD.format(tests=tests), cwd=str(tmp_path))
    assert out.split() == ["True", "False"], out
