"""The TensorFlow implementation of `keras_multimax.ops`: graphs of unknown shape.

Only TensorFlow traces graphs whose rank or dimensions are unknown until
they run (``tf.TensorSpec(None)``, ``[None, None]``): the checks that must
then wait for run time, or refuse to trace, are tested here. The math is
tested on every backend in test_ops.py; the fused forward and exported
graphs in test_export_graphs.py.
"""

import numpy as np
import pytest
from tolerances import EPS

from keras_multimax import ops

pytestmark = pytest.mark.only_backend(
    "tensorflow", reason="tf.function graphs with unknown ranks and dimensions"
)

ZEROS = np.zeros(4, "float32")
EPS32 = EPS["float32"]


def test_unknown_rank_input_is_a_value_error():
    import tensorflow as tf

    fn = tf.function(
        lambda x: ops.multimax(x, tf.zeros(4), tf.zeros(4)),
        input_signature=[tf.TensorSpec(None, tf.float32)],
    )
    with pytest.raises(ValueError, match=r"x.shape=<unknown>"):
        fn.get_concrete_function()


def test_mask_of_unknown_rank_is_rejected():
    import tensorflow as tf

    fn = tf.function(
        lambda m: ops.multimax(tf.ones([2, 3]), ZEROS, ZEROS, mask=m),
        input_signature=[tf.TensorSpec(None, tf.bool)],
    )
    with pytest.raises(ValueError, match="`mask` must have a known rank"):
        fn.get_concrete_function()


def test_mask_that_cannot_broadcast_fails_when_the_graph_runs():
    """Break B3: a mask larger than x on an axis known only at run time."""
    import tensorflow as tf

    fn = tf.function(
        lambda x, m: ops.multimax(x, ZEROS, ZEROS, mask=m),
        input_signature=[
            tf.TensorSpec([None, None]),
            tf.TensorSpec([None, None], tf.bool),
        ],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="`mask` must be broad"):
        fn(tf.ones([2, 1]), tf.ones([2, 3], tf.bool))
    # Positive control: a mask that broadcasts runs and masks.
    y = fn(tf.ones([2, 3]), tf.constant([[True, False, True]] * 2)).numpy()
    np.testing.assert_allclose(y, [[0.5, 0.0, 0.5]] * 2, atol=4 * EPS32)
    y = fn(tf.ones([2, 3]), tf.constant([[True], [False]])).numpy()
    np.testing.assert_allclose(y, [[1 / 3] * 3, [0.0] * 3], atol=4 * EPS32)


@pytest.mark.parametrize("fn", [ops.multimax, ops.seglu], ids=["multimax", "seglu"])
def test_gradient_shape_with_unknown_dims_and_broadcasting_parameters(fn):
    """Break B2: parameters (5, 4) broadcast x (?, ?) = (2, 1) up to (2, 5)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    ranges = tf.constant(rng.normal(size=(5, 4)), tf.float32)
    ts = tf.constant(0.3 * rng.normal(size=(5, 4)), tf.float32)
    weights = tf.constant(rng.normal(size=(2, 5)), tf.float32)

    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fn(x, ranges, ts) * weights)
        return tape.gradient(loss, x)

    x = tf.constant([[0.3], [-0.9]])
    traced = tf.function(gradient, input_signature=[tf.TensorSpec([None, None])])
    graph = traced(x)
    assert graph.shape == (2, 1)
    # Independent check: the gradient of x is the sum over its 5 copies.
    x_up = tf.broadcast_to(x, (2, 5))
    with tf.GradientTape() as tape:
        tape.watch(x_up)
        loss = tf.reduce_sum(fn(x_up, ranges, ts) * weights)
    summed = tf.reduce_sum(tape.gradient(loss, x_up), axis=1, keepdims=True)
    # A sum of 5 float32 products in another order: 16 eps of the result.
    np.testing.assert_allclose(graph.numpy(), summed.numpy(), rtol=16 * EPS32)


@pytest.mark.parametrize(
    "shape, separate",
    [((2, 3, 8, 16), True), ((4, 4, 64, 64), True), ((2, 3, 5, 7), False)],
    ids=["separate_sums", "folded_as_computed", "stacked_products"],
)
@pytest.mark.parametrize("mode", ["eager", "traced"])
def test_shared_parameter_gradients_by_either_reduction(shape, separate, mode):
    """Parameters shared by every entry are summed factor by factor when the
    entries divide in ``2**_SEPARATE_FOLDS`` parts (from
    ``_FOLD_AS_COMPUTED_MIN_ENTRIES`` on, over x cut in those parts), with the
    stacked products otherwise (210 entries): each equals autodiff of the
    plain formula."""
    import tensorflow as tf
    from backend_helpers import float64
    from plain_formula import compare_with_plain_formula

    from keras_multimax.backend.tensorflow import multimax as tf_multimax

    assert tf_multimax._separate_sums_apply(tf.TensorShape(shape), []) == separate
    assert (np.prod(shape) >= tf_multimax._FOLD_AS_COMPUTED_MIN_ENTRIES) == (
        shape == (4, 4, 64, 64)
    )
    rng = np.random.default_rng(5)
    mask = rng.random(shape) > 0.3
    with float64():
        compare_with_plain_formula(rng, shape, (4,), -1, mask, mode)
