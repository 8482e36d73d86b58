"""Tests of the `MultiMax` and `SegLU` layers."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import numpy_reference as ref
import pytest
import tensorflow as tf
from layer_test_case import ACTIVATION_DEPTH
from layer_test_case import run_layer_test

from keras_multimax import layers

RNG = np.random.default_rng(7)
X = RNG.normal(size=(4, 3, 5)).astype("float32")


def _weights(layer):
    return layer.ranges.numpy(), layer.ts.numpy()


@pytest.mark.parametrize("order", [1, 2, 3])
def test_multimax_layer_standard_checks(order):
    run_layer_test(
        layers.MultiMax,
        {"axis": -1, "order": order, "ranges_regularizer": "l2"},
        X,
        expected_output_shape=X.shape,
        expected_num_trainable_weights=2,
        mixed_precision_depth=ACTIVATION_DEPTH,
    )


def test_multimax_layer_tuple_axis_standard_checks():
    run_layer_test(
        layers.MultiMax,
        {"axis": (1, 2), "ts_constraint": "non_neg"},
        X,
        expected_output_shape=X.shape,
        expected_num_trainable_weights=2,
        mixed_precision_depth=ACTIVATION_DEPTH,
    )


@pytest.mark.parametrize("order", [1, 2])
def test_seglu_layer_standard_checks(order):
    run_layer_test(
        layers.SegLU,
        {"order": order, "ts_regularizer": "l1"},
        X,
        expected_output_shape=X.shape,
        expected_num_trainable_weights=2,
        mixed_precision_depth=ACTIVATION_DEPTH,
    )


def test_multimax_layer_correctness_against_numpy():
    layer = layers.MultiMax(axis=1)
    layer.build(X.shape)
    ranges = np.array([0.3, -0.2, 0.1, 0.4], "float32")
    ts = np.array([0.5, -0.3, 0.2, 0.1], "float32")
    layer.ranges.assign(ranges)
    layer.ts.assign(ts)
    np.testing.assert_allclose(
        layer(X).numpy(), ref.multimax(X, ranges, ts, axis=1), rtol=1e-5, atol=1e-7
    )


def test_seglu_layer_correctness_against_numpy():
    layer = layers.SegLU(order=3)
    layer.build(X.shape)
    ranges = np.array([0.3, -0.2, 0.1, 0.4, -1.0, 1.0], "float32")
    ts = np.array([0.5, -0.3, 0.2, 0.1, 0.05, -0.05], "float32")
    layer.ranges.assign(ranges)
    layer.ts.assign(ts)
    np.testing.assert_allclose(
        layer(X).numpy(), ref.seglu(X, ranges, ts), rtol=1e-5, atol=1e-6
    )


def test_default_initialisation_matches_official_code():
    layer = layers.MultiMax()
    layer.build((None, 1000))
    assert layer.ranges.shape == (4,) and layer.ts.shape == (4,)
    big = layers.SegLU(order=500)
    big.build((None, 3))
    for w in (big.ranges, big.ts):
        values = w.numpy()
        assert 0.01 < values.std() < 0.03
        assert np.abs(values).max() <= 0.04 + 1e-7  # truncated at two std


def test_zero_ts_is_exactly_softmax():
    layer = layers.MultiMax(ts_initializer="zeros", axis=(1, 2))
    out = layer(X).numpy()
    expected = keras.layers.Softmax(axis=(1, 2))(X).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_keras_mask_from_previous_layer_and_explicit_mask():
    tokens = np.array([[3, 4, 0, 0], [5, 0, 0, 0]])
    inputs = keras.Input((4,), dtype="int32")
    embedded = keras.layers.Embedding(10, 1, mask_zero=True)(inputs)
    scores = keras.layers.Lambda(
        lambda e: e[..., 0],
        mask=lambda inputs, mask: mask,  # keep the Keras mask
    )(embedded)
    layer = layers.MultiMax(ts_initializer=keras.initializers.Constant(0.5))
    model = keras.Model(inputs, layer(scores))
    out = model(tokens).numpy()
    np.testing.assert_array_equal(out[tokens == 0], 0.0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)

    layer = layers.MultiMax(ts_initializer=keras.initializers.Constant(-0.5))
    explicit = layer(X, mask=X > 0).numpy()
    np.testing.assert_array_equal(explicit[X <= 0], 0.0)
    expected = ref.multimax(X, *_weights(layer), mask=X > 0)
    np.testing.assert_allclose(explicit, expected, rtol=1e-5, atol=1e-7)


def test_sequential_output_layer_trains_and_gets_parameter_gradients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x[:, :3] @ rng.normal(size=(3, 4))).argmax(axis=1)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, "relu"), keras.layers.Dense(4)]
    )
    model.add(layers.MultiMax())
    mm = model.layers[-1]
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x))
    grads = tape.gradient(loss, [mm.ranges, mm.ts])
    assert all(np.abs(g.numpy()).max() > 0 for g in grads)

    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    history = model.fit(x, y, epochs=8, batch_size=32, verbose=0).history["loss"]
    assert history[-1] < 0.7 * history[0], history


def test_seglu_with_from_logits_loss_trains():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x[:, :3] @ rng.normal(size=(3, 4))).argmax(axis=1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), layers.SegLU()])
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, epochs=8, batch_size=32, verbose=0).history["loss"]
    assert history[-1] < 0.7 * history[0], history
    probs = keras.ops.softmax(model(x)).numpy()
    seg = model.layers[-1]
    expected = ref.multimax(model.layers[0](x).numpy(), *_weights(seg))
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_keras_file_loads_in_fresh_process(tmp_path):
    path = str(tmp_path / "m.keras")
    model = keras.Sequential(
        [keras.Input((5,)), layers.SegLU(order=1), layers.MultiMax(axis=-1)]
    )
    model.save(path)
    np.save(tmp_path / "x.npy", X[:, 0])
    np.save(tmp_path / "y.npy", model.predict(X[:, 0], verbose=0))
    script = textwrap.dedent(
        f"""
        import numpy as np, keras
        import keras_multimax  # registers the layers
        model = keras.saving.load_model({path!r})
        out = model.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0)
        np.testing.assert_allclose(out, np.load({str(tmp_path / "y.npy")!r}), atol=1e-7)
        print("LOADED", [type(l).__name__ for l in model.layers])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED ['SegLU', 'MultiMax']" in result.stdout


# --- errors ------------------------------------------------------------------


@pytest.mark.parametrize("order", [0, -1, 1.5, "2", True, None])
@pytest.mark.parametrize("cls", [layers.MultiMax, layers.SegLU])
def test_bad_order_is_a_value_error(cls, order):
    with pytest.raises(ValueError, match=rf"order={order!r}"):
        cls(order=order)


def test_axis_out_of_range_is_a_value_error():
    with pytest.raises(ValueError, match=r"axis=3"):
        layers.MultiMax(axis=3)(X)
    with pytest.raises(ValueError, match=r"axis=\(1, 5\)"):
        layers.MultiMax(axis=(1, 5))(X)
    with pytest.raises(TypeError, match=r"axis='last'"):
        layers.MultiMax(axis="last")


def test_mask_not_broadcastable_is_a_value_error():
    with pytest.raises(ValueError, match=r"mask.shape=\(4, 3\)"):
        layers.MultiMax()(X, mask=np.ones((4, 3), bool))


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match="int32"):
        layers.MultiMax()(np.ones((2, 3), "int32"))
