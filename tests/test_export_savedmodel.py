"""SavedModels reload without keras_multimax, with the same outputs and gradients.

Two ways of writing a SavedModel are checked for every model of
`export_models.MODELS`:

* ``model.export(path)`` (Keras' ``tf_saved_model`` format, endpoint ``serve``);
* ``tf.saved_model.save`` of a ``tf.Module`` that holds the model's variables
  and a ``tf.function`` calling the model.

A fresh process in which importing keras_multimax is impossible reloads them,
compares outputs (≤ 1e-6, relative beyond 1; also at other batch sizes and
lengths, and through the ``serving_default`` signature), gradients with respect
to the inputs and the variables (with the parent's, written to ``.npz``) and
the ops of the backward graph, and takes SGD steps on the reloaded variables
(fine-tuning lowers the loss). The closed-form gradient of `ops.multimax`/`ops.seglu` has no
``ReluGrad`` (autodiff of the forward pass would), so finding none shows the
saved custom gradient is the one that runs. ``SaveOptions(
experimental_custom_gradients=False)`` is checked to lose it (a gradient
request raises ``LookupError``), so the default ``True`` is what makes
exported models fine-tunable.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from export_models import MODELS
from export_models import build_model
from export_models import keras_outputs
from export_models import run_fresh_python
from export_models import sample_inputs

# (batch, length) of the extra inputs that check dynamic shapes.
OTHER_SHAPES = ((1, 2), (5, 9))

CHILD = """
import json, sys
sys.modules["keras_multimax"] = None  # any import of it now raises
import numpy as np
import tensorflow as tf


def assert_close(got, want, err_msg=""):
    # 1e-6 absolute, relative for entries beyond 1 (SegLU logits, a float32
    # ulp at 32 is 4e-6).
    bound = 1e-6 * np.maximum(1.0, np.abs(want))
    worst = float(np.max(np.abs(got - want) - bound))
    assert worst <= 0, (err_msg, float(np.max(np.abs(got - want))))


def all_ops(fn, *args):
    graph_def = fn.get_concrete_function(*args).graph.as_graph_def()
    ops = {n.op for n in graph_def.node}
    for f in graph_def.library.function:
        ops |= {n.op for n in f.node_def}
    return ops


def check(name, kind, path, variables_of, call, atol):
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
    assert_close(run(inputs).numpy(), data["expected"], name)
    for j in range(2):  # other batch sizes and lengths
        other = [data[f"other{j}_{i}"] for i in range(n_in)]
        assert_close(run(other).numpy(), data[f"other{j}_expected"], name)

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
    err = 0.0
    for i, g in enumerate(grads):
        ref = data[f"grad_{i}"]
        assert g is not None, (name, i)
        # float32 sums over batch and positions, in another order in a graph:
        # 1e-5 relative to the largest entry of the gradient.
        scale = max(1.0, float(np.max(np.abs(ref))))
        np.testing.assert_allclose(
            g.numpy(), ref, rtol=1e-5, atol=atol * scale, err_msg=f"{name} {i}"
        )
        err = max(err, float(np.max(np.abs(g.numpy() - ref))))
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
    print(kind, name, len(grads), f"{err:.2e}")


for name in json.load(open("names.json")):
    check(name, "export", f"{name}_export", lambda m: list(m.trainable_variables),
          lambda m: m.serve, 1e-5)
    check(name, "module", f"{name}_module", lambda m: list(m.trainable),
          lambda m: m.call, 1e-5)

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


@pytest.mark.slow
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

    lines = stdout.strip().splitlines()
    checked = {tuple(line.split()[:2]) for line in lines if not line.startswith("c")}
    assert checked == {(kind, n) for kind in ("export", "module") for n in MODELS}
    assert "control LookupError" in lines
