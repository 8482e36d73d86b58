"""Tests of the `MultiMax` and `SegLU` layers (every backend)."""

import keras
import numpy as np
import numpy_reference as ref
import pytest
from backend_helpers import to_numpy
from backend_helpers import variable_gradients
from layer_test_case import ACTIVATION_DEPTH
from layer_test_case import paper_modulator
from layer_test_case import run_layer_test

from keras_multimax import Modulator
from keras_multimax import layers

RNG = np.random.default_rng(7)
X = RNG.normal(size=(4, 3, 5)).astype("float32")


def _weights(layer):
    return to_numpy(layer.ranges), to_numpy(layer.ts)


@pytest.mark.parametrize("order", [1, 3])
def test_multimax_layer_standard_checks(order):
    run_layer_test(
        layers.MultiMax,
        {
            "axis": -1,
            "modulator": paper_modulator(order=order, ranges_regularizer="l2"),
        },
        X,
        expected_output_shape=X.shape,
        expected_num_trainable_weights=2,
        mixed_precision_depth=ACTIVATION_DEPTH,
    )


def test_multimax_layer_tuple_axis_standard_checks():
    run_layer_test(
        layers.MultiMax,
        {"axis": (1, 2), "modulator": paper_modulator(ts_constraint="non_neg")},
        X,
        expected_output_shape=X.shape,
        expected_num_trainable_weights=2,
        mixed_precision_depth=ACTIVATION_DEPTH,
    )


def test_seglu_layer_standard_checks():
    run_layer_test(
        layers.SegLU,
        {"modulator": paper_modulator(order=1, ts_regularizer="l1")},
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
        to_numpy(layer(X)), ref.multimax(X, ranges, ts, axis=1), rtol=1e-5, atol=1e-7
    )


def test_seglu_layer_correctness_against_numpy():
    layer = layers.SegLU(modulator=Modulator(order=3))
    layer.build(X.shape)
    ranges = np.array([0.3, -0.2, 0.1, 0.4, -1.0, 1.0], "float32")
    ts = np.array([0.5, -0.3, 0.2, 0.1, 0.05, -0.05], "float32")
    layer.ranges.assign(ranges)
    layer.ts.assign(ts)
    np.testing.assert_allclose(
        to_numpy(layer(X)), ref.seglu(X, ranges, ts), rtol=1e-5, atol=1e-6
    )


def test_paper_initialisation_matches_official_code():
    """The official truncated normal: standard deviation 0.02, cut at 2 of them."""
    layer = layers.MultiMax()
    layer.build((None, 1000))
    assert layer.ranges.shape == (4,) and layer.ts.shape == (4,)
    big = layers.SegLU(modulator=paper_modulator(order=500))
    big.build((None, 3))
    for values in _weights(big):
        assert 0.01 < values.std() < 0.03
        assert np.abs(values).max() <= 0.04 + 1e-7  # truncated at two std


def test_zero_ts_is_exactly_softmax():
    layer = layers.MultiMax(axis=(1, 2))  # the default modulator: ts = 0
    out = to_numpy(layer(X))
    expected = to_numpy(keras.layers.Softmax(axis=(1, 2))(X))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def _constant_ts(value):
    return Modulator(ts_initializer=keras.initializers.Constant(value))


def test_keras_mask_from_previous_layer_and_explicit_mask():
    tokens = np.array([[3, 4, 0, 0], [5, 0, 0, 0]])
    inputs = keras.Input((4,), dtype="int32")
    embedded = keras.layers.Embedding(10, 1, mask_zero=True)(inputs)
    scores = keras.layers.Lambda(
        lambda e: e[..., 0],
        mask=lambda inputs, mask: mask,  # keep the Keras mask
    )(embedded)
    layer = layers.MultiMax(modulator=_constant_ts(0.5))
    model = keras.Model(inputs, layer(scores))
    out = to_numpy(model(tokens))
    np.testing.assert_array_equal(out[tokens == 0], 0.0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)

    layer = layers.MultiMax(modulator=_constant_ts(-0.5))
    explicit = to_numpy(layer(X, mask=X > 0))
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
    model.add(layers.MultiMax(modulator="paper"))
    mm = model.layers[-1]
    _, grads = variable_gradients(
        lambda: keras.losses.sparse_categorical_crossentropy(y, model(x)),
        [mm.ranges, mm.ts],
    )
    assert all(np.abs(g).max() > 0 for g in grads)

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
    probs = to_numpy(keras.ops.softmax(model(x)))
    seg = model.layers[-1]
    expected = ref.multimax(to_numpy(model.layers[0](x)), *_weights(seg))
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)


# --- errors ------------------------------------------------------------------
# A bad `order` is the Modulator's error: tests/test_modulator.py.


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
