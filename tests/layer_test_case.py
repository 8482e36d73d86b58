"""`run_layer_test`: the checks every keras_multimax layer goes through.

In the spirit of Keras' own `TestCase.run_layer_test`: configuration round
trip, symbolic and eager calls, weight counts, a training step that moves every
weight, `.keras` save/load and mixed precision, in one call.
"""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np
from tolerances import assert_close

from keras_multimax import Modulator
from keras_multimax import modulator as modulators


def _numpy(x) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(x))


def _as_kwargs(input_data):
    return dict(input_data) if isinstance(input_data, dict) else {"inputs": input_data}


def _outputs(result):
    return result[0] if isinstance(result, tuple) else result


def _build_model(layer, input_data, call_kwargs):
    kwargs = _as_kwargs(input_data)
    inputs = {
        name: keras.Input(shape=np.shape(value)[1:], name=name, dtype="float32")
        for name, value in kwargs.items()
    }
    first = next(iter(kwargs))
    if first == "inputs":
        out = layer(inputs["inputs"], **call_kwargs)
    else:
        out = layer(**inputs, **call_kwargs)
    return keras.Model(inputs, _outputs(out)), {
        name: np.asarray(value) for name, value in kwargs.items()
    }


# Attention in mixed precision. float16: eight roundings in sequence (inputs,
# query/key/value projections, scores, MultiMax weights, their combination
# with the values, output projection). bfloat16: oneDNN and XLA accumulate its
# matmuls in float32 and round once per op output, so half as many; measured
# 1.0–2.5 eps (RMS) against 4 here, and a modulator with ts ignored is 43–72
# eps away (four draws of the other weights; tests/test_tolerance_controls.py).
ATTENTION_DEPTH = {"float16": 8, "bfloat16": 4}
# MultiMax/SegLU in mixed precision: the input and output roundings, the
# first amplified by σ' (<= 2 relative to the output scale at these inputs).
ACTIVATION_DEPTH = {"float16": 4, "bfloat16": 4}


def run_layer_test(
    layer_cls,
    init_kwargs: dict,
    input_data,
    expected_output_shape: tuple,
    expected_num_trainable_weights: int,
    call_kwargs: dict | None = None,
    trainable_weight_names: tuple[str, ...] = ("ranges", "ts"),
    mixed_precision_depth: dict | None = None,
):
    """Runs the standard layer checks; raises AssertionError on failure.

    Args:
        layer_cls: The layer class.
        init_kwargs: Constructor arguments.
        input_data: An array (passed as the first positional argument) or a
            dict of arrays passed as keyword arguments (e.g. query/value).
        expected_output_shape: Shape of the (first) output for `input_data`.
        expected_num_trainable_weights: Number of trainable weights once built.
        call_kwargs: Extra call arguments (e.g. ``use_causal_mask=True``).
        trainable_weight_names: Weights that must move in one training step.
        mixed_precision_depth: By compute dtype, how many roundings the
            mixed-precision outputs may differ from float32 by, in RMS, each
            up to one epsilon of the outputs' RMS (see `tolerances`). The
            default, `ATTENTION_DEPTH`, is for attention layers.

    At ``ts = 0`` (the default modulator) the gradient of ``ranges`` is
    exactly zero, so a test that expects ``ranges`` to train passes a
    modulator whose ``ts`` starts elsewhere (e.g. ``modulator="paper"``).
    """
    call_kwargs = dict(call_kwargs or {})
    depth = ATTENTION_DEPTH if mixed_precision_depth is None else mixed_precision_depth

    # Configuration round trip, with and without the registry.
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    for key in init_kwargs:
        assert key in config, f"get_config() misses constructor argument {key!r}"
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)
    )
    assert type(revived) is layer_cls
    assert revived.get_config() == config

    # Eager call.
    kwargs = _as_kwargs(input_data)
    eager = _outputs(layer(**kwargs, **call_kwargs))
    assert tuple(eager.shape) == tuple(expected_output_shape), eager.shape
    assert np.all(np.isfinite(_numpy(eager)))
    assert len(layer.trainable_weights) == expected_num_trainable_weights, [
        w.path for w in layer.trainable_weights
    ]

    # Symbolic call: compute_output_shape agrees with the eager shape.
    model, arrays = _build_model(layer_cls(**init_kwargs), input_data, call_kwargs)
    assert tuple(model.output.shape[1:]) == tuple(expected_output_shape[1:])

    # One training step moves every MultiMax weight.
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    target = np.random.default_rng(0).normal(size=expected_output_shape)
    before = {w.path: _numpy(w) for w in model.trainable_weights}
    model.fit(
        arrays, target.astype("float32"), epochs=1, batch_size=len(target), verbose=0
    )
    checked = [
        w
        for w in model.trainable_weights
        if w.path.split("/")[-1] in trainable_weight_names
    ]
    assert checked, (
        f"no trainable weight named {trainable_weight_names} in "
        f"{[w.path for w in model.trainable_weights]}"
    )
    for w in checked:
        assert not np.array_equal(before[w.path], _numpy(w)), (
            f"{w.path} did not change in a training step"
        )
    reference = model.predict(arrays, verbose=0)

    # .keras round trip gives the same outputs.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(arrays, verbose=0), reference, atol=1e-6)

    # Mixed precision: outputs in the compute dtype, close to float32 with the
    # same weights. The modulator is made strong first: at its initial
    # ts = 0 (or |ts| ~ 0.02) a wrong modulator would hardly move the outputs.
    strengthen_modulator(layer)
    reference = _numpy(_outputs(layer(**kwargs, **call_kwargs)))
    for policy, compute_dtype in (
        ("mixed_float16", "float16"),
        ("mixed_bfloat16", "bfloat16"),
    ):
        mixed = layer_cls.from_config({**config, "dtype": policy})
        out = _outputs(mixed(**kwargs, **call_kwargs))
        assert keras.backend.standardize_dtype(out.dtype) == compute_dtype
        for w, v in zip(mixed.weights, layer.weights):
            w.assign(_numpy(v))  # a copy: JAX may donate the source buffer
        out = _outputs(mixed(**kwargs, **call_kwargs))
        out = _numpy(keras.ops.cast(out, "float32"))
        assert np.all(np.isfinite(out))
        assert_close(
            out,
            reference,
            compute_dtype,
            depth[compute_dtype],
            norm="rms",
            what=f"{layer_cls.__name__} under {policy}",
        )
        for w in mixed.weights:
            if w.path.split("/")[-1] in ("ranges", "ts"):
                assert w.dtype == "float32", f"{w.path} is {w.dtype}"


def paper_modulator(**changes) -> Modulator:
    """The official initialisation (ts ~ N(0, 0.02) truncated), with ``changes``.

    For layers that must train every modulator weight in one step: at
    ts = 0 (the default) the gradient of ``ranges`` is exactly zero.
    """
    return Modulator(**{**modulators.get("paper").get_config(), **changes})


def strengthen_modulator(layer, seed: int = 0):
    """Sets ``ranges`` ~ N(0, 0.5) and ``|ts|`` in [1, 2] with random signs.

    Strong enough that ignoring ``ts`` moves bfloat16 attention outputs by
    more than 10 times the mixed-precision bound (|ts| in [0.3, 0.6] moved
    them by 4–10 times only, depending on the other weights).
    """
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        name = w.path.split("/")[-1]
        if name == "ranges":
            w.assign(rng.normal(0.0, 0.5, w.shape).astype("float32"))
        elif name == "ts":
            signs = rng.choice([-1.0, 1.0], w.shape)
            w.assign((rng.uniform(1.0, 2.0, w.shape) * signs).astype("float32"))


def assert_positional_drop_in(parent_cls, layer_cls, values: dict):
    """Checks that `layer_cls` takes the parent's arguments positionally.

    For every prefix of the parent's positional parameters (from the required
    ones to all of them), ``layer_cls(*args)`` must be accepted wherever
    ``parent_cls(*args)`` is, and give the parent's configuration (plus the
    MultiMax-only entries).

    Args:
        parent_cls: The Keras layer that `layer_cls` replaces.
        layer_cls: The MultiMax layer.
        values: A non-default value for every positional parameter of
            `parent_cls`, by name (a parameter missing here fails the check,
            so that a new Keras argument is noticed).
    """
    import inspect

    kinds = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )
    parent = [
        p
        for p in inspect.signature(parent_cls.__init__).parameters.values()
        if p.kind in kinds and p.name != "self"
    ]
    ours = [
        p.name
        for p in inspect.signature(layer_cls.__init__).parameters.values()
        if p.kind in kinds and p.name != "self"
    ]
    names = [p.name for p in parent]
    assert ours[: len(names)] == names, (ours, names)
    missing = [name for name in names if name not in values]
    assert not missing, f"no test value for the parent's arguments {missing}"
    required = sum(p.default is inspect.Parameter.empty for p in parent)
    for n in range(required, len(names) + 1):
        args = [values[name] for name in names[:n]]
        expected = parent_cls(*args, name="layer").get_config()
        config = layer_cls(*args, name="layer").get_config()
        extra = set(config) - set(expected)
        assert extra and extra <= {"per_head", "modulator"}, extra
        assert {key: config[key] for key in expected} == expected, names[:n]
