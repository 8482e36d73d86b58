"""SavedModels reload without keras_multimax, with the same outputs and gradients.

From TensorFlow, with their gradients; from JAX (jax2tf, last test), outputs.

Two ways of writing a SavedModel are checked for every model of
`export_models.MODELS`:

* ``model.export(path)`` (Keras' ``tf_saved_model`` format, endpoint ``serve``);
* ``tf.saved_model.save`` of a ``tf.Module`` that holds the model's variables
  and a ``tf.function`` calling the model.

A fresh process in which importing keras_multimax is impossible reloads them,
compares outputs (within 16 float32 eps of their scale; also at other batch
sizes and lengths, and through the ``serving_default`` signature), gradients with respect
to the inputs and the variables (with the parent's, written to ``.npz``) and
the ops of the backward graph, and takes SGD steps on the reloaded variables
(fine-tuning lowers the loss). The closed-form gradient of `ops.multimax`/`ops.seglu` has no
``ReluGrad`` (autodiff of the forward pass would), so finding none shows the
saved custom gradient is the one that runs. ``SaveOptions(
experimental_custom_gradients=False)`` is checked to lose it (a gradient
request raises ``LookupError``), so the default ``True`` is what makes
exported models fine-tunable.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from export_models import MODELS
from export_models import build_model
from export_models import keras_outputs
from export_models import run_fresh_python
from export_models import sample_inputs
from tolerances import assert_defect_caught

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
TENSORFLOW = pytest.mark.only_backend(
    "tensorflow", reason="SavedModels of TensorFlow graphs, written from TensorFlow"
)

# The child's bounds (see CHILD), for the controls in this process.
OUTPUT_DEPTH = 16
GRADIENT_DEPTH = 256

# (batch, length) of the extra inputs that check dynamic shapes.
OTHER_SHAPES = ((1, 2), (5, 9))

CHILD = """
import json, sys
sys.modules["keras_multimax"] = None  # any import of it now raises
import numpy as np
import tensorflow as tf


EPS32 = 2.0**-23
# Bounds in eps · max(largest |expected|, 1), as tests/tolerances.py (this
# process runs in another directory, without the tests on its path).
# Outputs: the same plain-op graph, reloaded: a few roundings per layer.
OUTPUT_DEPTH = 16
# Gradients of the variables sum products of ~6 factors over the batch and
# positions (21 entries) in another order than the eager parent: measured up
# to 88 (1.05e-5) on an AVX2-only CPU.
GRADIENT_DEPTH = 256


def ratio(got, want):
    # max |got - want| in units of eps * max(largest |want|, 1).
    unit = EPS32 * max(1.0, float(np.max(np.abs(want))))
    return float(np.max(np.abs(np.asarray(got) - want))) / unit


def assert_close(got, want, err_msg="", depth=OUTPUT_DEPTH):
    measured = ratio(got, want)
    assert measured <= depth, (err_msg, measured, depth)
    return measured


def all_ops(fn, *args):
    graph_def = fn.get_concrete_function(*args).graph.as_graph_def()
    ops = {n.op for n in graph_def.node}
    for f in graph_def.library.function:
        ops |= {n.op for n in f.node_def}
    return ops


def check(name, kind, path, variables_of, call):
    data = np.load(f"{name}.npz")
    n_in = int(data["n_inputs"])
    loaded = tf.saved_model.load(path)
    fn = call(loaded)
    variables = variables_of(loaded)
    names = [v.name.split(":")[0] for v in variables]
    wanted = json.loads(str(data["variable_names"]))
    order = [names.index(n) for n in wanted]  # fails if one is missing
    variables = [variables[i] for i in order]

    def run(arrays):
        args = [tf.constant(a) for a in arrays]
        return fn(args if n_in > 1 else args[0])

    inputs = [data[f"input_{i}"] for i in range(n_in)]
    worst_output = assert_close(run(inputs).numpy(), data["expected"], name)
    for j in range(2):  # other batch sizes and lengths
        other = [data[f"other{j}_{i}"] for i in range(n_in)]
        worst_output = max(
            worst_output,
            assert_close(run(other).numpy(), data[f"other{j}_expected"], name),
        )

    @tf.function
    def gradients(x0):
        args = [x0] + [tf.constant(a) for a in inputs[1:]]
        with tf.GradientTape() as tape:
            tape.watch(x0)
            y = fn(args if n_in > 1 else args[0])
            loss = tf.reduce_sum(y * data["loss_weights"])
        return tape.gradient(loss, [x0] + variables)

    x0 = tf.constant(inputs[0])
    grads = gradients(x0)
    worst_gradient = 0.0
    for i, g in enumerate(grads):
        assert g is not None, (name, i)
        worst_gradient = max(
            worst_gradient,
            assert_close(g.numpy(), data[f"grad_{i}"], f"{name} {i}", GRADIENT_DEPTH),
        )
    ops = all_ops(gradients, x0)
    assert "ReluGrad" not in ops, (name, kind, sorted(ops))
    if kind == "export":  # the TF Serving signature, inputs by name
        named = dict(zip(json.loads(str(data["input_names"])), inputs))
        (served,) = loaded.signatures["serving_default"](**named).values()
        assert_close(served.numpy(), data["expected"], name)

    # Fine-tuning the reloaded variables: a few SGD steps lower the loss.
    def loss_value():
        return float(tf.reduce_sum(run(inputs) * data["loss_weights"]))

    before = loss_value()
    for _ in range(3):
        for v, g in zip(variables, gradients(x0)[1:]):
            v.assign_sub(1e-3 * g)
    assert loss_value() < before, (name, kind, before, loss_value())
    print(kind, name, len(grads), f"{worst_output:.2f}", f"{worst_gradient:.2f}")


for name in json.load(open("names.json")):
    check(name, "export", f"{name}_export", lambda m: list(m.trainable_variables),
          lambda m: m.serve)
    check(name, "module", f"{name}_module", lambda m: list(m.trainable),
          lambda m: m.call)

# Control: without experimental_custom_gradients the gradient is gone.
loaded = tf.saved_model.load("multimax_nograd")
x = tf.constant(np.load("multimax.npz")["input_0"])
try:  # eager tapes build the backward function during the call
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = loaded.call(x)
    tape.gradient(y, x)
except LookupError as e:
    assert "IdentityN" in str(e), e
    print("control LookupError")
assert "keras_multimax" not in sys.modules or sys.modules["keras_multimax"] is None
"""


def _module_for(model: keras.Model) -> tf.Module:
    """A plain tf.Module with the model's variables and one serving function."""
    module = tf.Module()
    module.trainable = [v.value for v in model.trainable_variables]
    module.non_trainable = [v.value for v in model.non_trainable_variables]
    specs = [tf.TensorSpec(t.shape, t.dtype) for t in model.inputs]
    module.call = tf.function(
        lambda inputs: model(inputs, training=False),
        input_signature=[specs if len(specs) > 1 else specs[0]],
    )
    return module


def _parent_gradients(model, inputs, loss_weights):
    x0 = tf.constant(inputs[0])
    rest = [tf.constant(a) for a in inputs[1:]]
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(x0)
        y = model([x0, *rest] if rest else x0, training=False)
        loss = tf.reduce_sum(y * loss_weights)
    return [g.numpy() for g in tape.gradient(loss, [x0, *variables])]


def _check_controls(model, inputs, loss_weights, expected, grads):
    """The child's bounds, >= 10× below what ignoring the modulator changes."""
    ts = [w for w in model.weights if w.name == "ts"]
    saved = [w.numpy() for w in ts]
    for w in ts:
        w.assign(np.zeros(w.shape, "float32"))
    try:
        assert_defect_caught(
            keras_outputs(model, inputs), expected, "float32", OUTPUT_DEPTH, floor=1.0
        )
        # Only the gradients that ts reaches: x and the weights below the
        # modulator (the last ones, after it, only see its outputs).
        ignored = _parent_gradients(model, inputs, loss_weights)
        assert_defect_caught(ignored[0], grads[0], "float32", GRADIENT_DEPTH, 1.0)
    finally:
        for w, value in zip(ts, saved):
            w.assign(value)


@pytest.mark.slow
@TENSORFLOW
def test_saved_models_reload_without_keras_multimax(tmp_path):
    rng = np.random.default_rng(42)
    for name in MODELS:
        model = build_model(name)
        inputs = sample_inputs(name)
        expected = keras_outputs(model, inputs)
        loss_weights = rng.standard_normal(expected.shape).astype("float32")
        arrays = {
            "n_inputs": len(inputs),
            "expected": expected,
            "loss_weights": loss_weights,
            "variable_names": json.dumps([v.path for v in model.trainable_variables]),
            "input_names": json.dumps([t.name for t in model.inputs]),
        }
        arrays.update({f"input_{i}": a for i, a in enumerate(inputs)})
        for j, (batch, length) in enumerate(OTHER_SHAPES):
            other = sample_inputs(name, batch, length, seed=10 + j)
            arrays.update({f"other{j}_{i}": a for i, a in enumerate(other)})
            arrays[f"other{j}_expected"] = keras_outputs(model, other)
        grads = _parent_gradients(model, inputs, loss_weights)
        # Every trainable variable, including ranges and ts, gets a gradient.
        assert all(np.any(g != 0) for g in grads), name
        _check_controls(model, inputs, loss_weights, expected, grads)
        arrays.update({f"grad_{i}": g for i, g in enumerate(grads)})
        np.savez(tmp_path / f"{name}.npz", **arrays)

        model.export(str(tmp_path / f"{name}_export"), verbose=False)
        tf.saved_model.save(
            _module_for(model),
            str(tmp_path / f"{name}_module"),
            options=tf.saved_model.SaveOptions(experimental_custom_gradients=True),
        )
        if name == "multimax":
            tf.saved_model.save(
                _module_for(model),
                str(tmp_path / "multimax_nograd"),
                options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
            )
    (tmp_path / "names.json").write_text(json.dumps(list(MODELS)))

    stdout = run_fresh_python(CHILD, cwd=str(tmp_path))

    print(stdout)
    lines = stdout.strip().splitlines()
    checked = {tuple(line.split()[:2]) for line in lines if not line.startswith("c")}
    assert checked == {(kind, n) for kind in ("export", "module") for n in MODELS}
    assert "control LookupError" in lines


# --- From Keras' JAX backend (jax2tf) ----------------------------------------

EXPORT = """
import sys
import numpy as np
import keras
from keras_multimax import Modulator, layers
path, fmt = sys.argv[1], sys.argv[2]
keras.utils.set_random_seed(0)
inputs = keras.Input((5, 8))
h = layers.MultiMaxAttention(
    num_heads=2, key_dim=4, per_head=True,
    modulator=Modulator(ts_initializer="random_normal"),
)(inputs, inputs)  # ts = 0 would be SoftMax
h = keras.layers.Dense(6)(h)
outputs = layers.MultiMax(modulator=Modulator(ts_initializer="random_normal"))(h)
model = keras.Model(inputs, outputs)
x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype("float32")
np.save(path + ".in.npy", x)
np.save(path + ".keras.npy", keras.ops.convert_to_numpy(model(x)))
try:
    model.export(path, format=fmt, verbose=False)
except ValueError as e:
    print("ValueError:", e)
"""

RELOAD = """
import sys
import numpy as np
import tensorflow as tf
path = sys.argv[1]
loaded = tf.saved_model.load(path)  # must outlive `serve` (owns the variables)
served = loaded.serve(tf.constant(np.load(path + ".in.npy")))
np.save(path + ".served.npy", served.numpy())
assert "keras_multimax" not in sys.modules
"""


def _run(code: str, *args: str, backend: str | None = None) -> str:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if backend:
        env["KERAS_BACKEND"] = backend
        env["PYTHONPATH"] = ROOT  # this checkout's keras_multimax
    else:
        env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.only_backend(
    "jax", reason="model.export from Keras' JAX backend goes through jax2tf"
)
def test_saved_model_from_jax_reloads_in_tensorflow_without_keras_multimax(tmp_path):
    path = str(tmp_path / "vit")
    assert "ValueError" not in _run(EXPORT, path, "tf_saved_model", backend="jax")
    _run(RELOAD, path)
    served, expected = np.load(path + ".served.npy"), np.load(path + ".keras.npy")
    # The same float32 program compiled by XLA (JAX) and run by TensorFlow's
    # kernels: rounding of a few ulp per op; 1e-5 of the largest probability.
    assert np.abs(served - expected).max() <= 1e-5 * np.abs(expected).max()
