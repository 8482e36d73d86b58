"""The ops take symbolic inputs as `keras.ops` do: Functional models built from them.

Written once for every backend (only `keras.ops`/`keras.Input`).
"""

import os

import keras
import numpy as np
import pytest

from keras_multimax import ops

ZEROS = np.zeros(4, "float32")
RANGES = np.array([-0.5, 0.5, -1.0, 1.0], "float32")
TS = np.array([0.4, 0.3, 0.2, 0.1], "float32")


def test_multimax_and_seglu_return_keras_tensors_with_shape_and_dtype():
    x = keras.Input((3, 5))
    y = ops.multimax(x, ZEROS, ZEROS)
    assert isinstance(y, keras.KerasTensor)
    assert (y.shape, y.dtype) == ((None, 3, 5), "float32")
    y = ops.multimax(
        x, ZEROS, ZEROS, axis=(1, 2), mask=keras.Input((3, 5), dtype="bool")
    )
    assert (y.shape, y.dtype) == ((None, 3, 5), "float32")
    # Per-row parameters broadcast x up, as the eager op does.
    per_row = np.zeros((4, 1, 1, 4), "float32")
    y = ops.seglu(keras.Input((1, 2, 5), dtype="bfloat16"), per_row, per_row)
    assert (y.shape, y.dtype) == ((None, 4, 2, 5), "bfloat16")
    eager = ops.seglu(np.ones((2, 1, 2, 5), "float32"), per_row, per_row)
    assert tuple(eager.shape) == (2, 4, 2, 5)


def test_multimax_cross_entropy_returns_the_shape_of_the_labels():
    hidden = keras.Input((6, 8))
    labels = keras.Input((6,), dtype="int32")
    kernel = np.ones((8, 11), "float32")
    loss = ops.multimax_cross_entropy(hidden, kernel, labels, ZEROS, ZEROS)
    assert (loss.shape, loss.dtype) == ((None, 6), "float32")
    loss = ops.multimax_cross_entropy(
        keras.Input((8,), dtype="float64"),
        kernel,
        keras.Input((), dtype="int32"),
        ZEROS,
        ZEROS,
    )
    assert (loss.shape, loss.dtype) == ((None,), "float64")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda x: ops.multimax(keras.ops.cast(x, "int32"), ZEROS, ZEROS),
            TypeError,
            "`x` must be a floating-point tensor",
        ),
        (
            lambda x: ops.multimax(x, ZEROS, np.zeros(3, "float32")),
            ValueError,
            "even length 2\\*order",
        ),
        (lambda x: ops.multimax(x, ZEROS, ZEROS, axis=2), ValueError, "`axis` is out"),
        (
            lambda x: ops.multimax(x, ZEROS, ZEROS, mask=np.ones((2, 4), bool)),
            ValueError,
            "`mask` must be broadcastable",
        ),
        (
            lambda x: ops.seglu(
                x, np.zeros((3, 4), "float32"), np.zeros((3, 4), "float32")
            ),
            ValueError,
            "must broadcast",
        ),
        (
            lambda x: ops.multimax_cross_entropy(
                x,
                np.ones((4, 3), "float32"),
                keras.ops.cast(x[:, 0], "int32"),
                ZEROS,
                ZEROS,
            ),
            ValueError,
            "first dimension of `kernel`",
        ),
    ],
)
def test_symbolic_calls_raise_the_errors_of_eager_calls(call, error, match):
    """The same class and message for a KerasTensor and for an array."""
    with pytest.raises(error, match=match):
        call(keras.Input((5,)))
    with pytest.raises(error, match=match):
        call(keras.ops.ones((2, 5)))


def test_functional_model_from_the_ops_trains_saves_and_reloads(tmp_path):
    inputs = keras.Input((6,))
    labels = keras.Input((), dtype="int32")
    hidden = keras.layers.Dense(8, name="hidden")(inputs)
    scores = keras.layers.Dense(5, name="scores")(hidden)
    probs = ops.multimax(ops.seglu(scores, ZEROS, TS), RANGES, TS, mask=scores > -3.0)
    kernel = np.random.default_rng(0).normal(size=(8, 7)).astype("float32")
    loss = ops.multimax_cross_entropy(hidden, kernel, labels, RANGES, TS, chunk_size=3)
    model = keras.Model([inputs, labels], [probs, loss])

    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.integers(0, 7, size=(16,)).astype("int32")
    targets = [np.full((16, 5), 0.2, "float32"), np.zeros((16,), "float32")]
    before = [np.array(w.numpy()) for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=["mse", "mae"])
    model.fit([x, y], targets, epochs=2, batch_size=8, verbose=0)
    for old, w in zip(before, model.trainable_weights):
        assert not np.array_equal(old, w.numpy()), f"{w.path} did not train"

    path = os.path.join(tmp_path, "ops.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    for got, want in zip(
        loaded.predict([x, y], verbose=0), model.predict([x, y], verbose=0)
    ):
        # The same float32 computation on the same inputs and weights.
        np.testing.assert_array_equal(got, want)
    # The loaded nodes are keras_multimax operations, with their arguments.
    names = {type(layer).__name__: layer for layer in loaded.operations}
    assert names["MultiMaxCrossEntropy"].get_config()["chunk_size"] == 3
    assert {"MultiMax", "SegLU"} <= set(names)


def test_operations_round_trip_their_configuration():
    for operation in (
        ops.MultiMax(axis=(1, 2)),
        ops.SegLU(),
        ops.MultiMaxCrossEntropy(chunk_size=128, ignore_index=-100),
    ):
        config = operation.get_config()
        clone = type(operation).from_config(config)
        assert clone.get_config() == config
