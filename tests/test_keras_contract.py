"""For inputs Keras' attention layers reject, ours raise the same error first.

Each case calls the Keras layer and its MultiMax twin with the same
arguments and inputs and compares the exception's class and message. The
shape cases are those of Keras' own suites
(`keras/src/layers/attention/multi_head_attention_test.py::
test_shape_mismatch_error` and its grouped-query twin).
"""

import keras
import numpy as np
import pytest

from keras_multimax import layers

MHA = (keras.layers.MultiHeadAttention, layers.MultiMaxAttention)
GQA = (keras.layers.GroupQueryAttention, layers.MultiMaxGroupQueryAttention)
MHA_ARGS = {"num_heads": 4, "key_dim": 2, "value_dim": 2}
GQA_ARGS = {"head_dim": 2, "num_query_heads": 4, "num_key_value_heads": 4}

# (name, query, value, key shapes); Keras' cases, the first with a rank-1 key
# (the one that used to get our rank error instead of Keras').
MHA_SHAPES = [
    ("query_value_dim_mismatch", (2, 4, 8), (2, 2, 7), (2,)),
    ("key_value_dim_mismatch", (2, 4, 8), (2, 2, 8), (2, 1, 7)),
    (
        "key_value_dim_mismatch_high_dim",
        (2, 4, 2, 3, 8),
        (2, 1, 1, 5, 8),
        (2, 1, 15, 5, 2),
    ),
]
GQA_SHAPES = [
    ("query_value_dim_mismatch", (2, 4, 8), (2, 2, 7), (2, 2, 8)),
    ("key_value_dim_mismatch", (2, 4, 8), (2, 2, 8), (2, 1, 7)),
]


def _error(make, *inputs):
    with pytest.raises(Exception) as info:  # noqa: B017  # compared below
        make()(*[np.ones(shape, "float32") for shape in inputs])
    return type(info.value), str(info.value)


@pytest.mark.parametrize("name, query, value, key", MHA_SHAPES)
def test_multi_head_attention_raises_keras_error_first(name, query, value, key):
    keras_error = _error(lambda: MHA[0](**MHA_ARGS), query, value, key)
    assert keras_error[0] is ValueError and "must be equal" in keras_error[1]
    assert _error(lambda: MHA[1](**MHA_ARGS), query, value, key) == keras_error


def _shape_error(layer, *shapes):
    with pytest.raises(ValueError) as info:
        layer.compute_output_shape(*shapes)
    return ValueError, str(info.value)


@pytest.mark.parametrize("name, query, value, key", GQA_SHAPES)
def test_group_query_attention_raises_keras_error_first(name, query, value, key):
    """Keras' GroupQueryAttention checks these shapes in `compute_output_shape`
    (called eagerly it fails later, in the backend's einsum); the twin raises
    that check's error, from `compute_output_shape` and from a call."""
    keras_error = _shape_error(GQA[0](**GQA_ARGS), query, value, key)
    assert "must be equal" in keras_error[1]
    assert _shape_error(GQA[1](**GQA_ARGS), query, value, key) == keras_error
    assert _error(lambda: GQA[1](**GQA_ARGS), query, value, key) == keras_error


@pytest.mark.parametrize("parent, twin, args", [(*MHA, MHA_ARGS), (*GQA, GQA_ARGS)])
def test_inputs_keras_accepts_but_we_cannot_get_our_error(parent, twin, args):
    """A rank-2 query passes Keras' checks; ours then names the problem."""
    with pytest.raises(ValueError, match="must have (at least|exactly) 3 dimensions"):
        twin(**args)(np.ones((2, 8), "float32"), np.ones((2, 8), "float32"))
