"""Bad arguments to `keras_multimax.ops`: the same errors on every backend.

Inputs are NumPy arrays, so the file runs unchanged on every backend.
"""

import numpy as np
import pytest

from keras_multimax import ops

ZEROS = np.zeros(4, "float32")


def test_mask_none_means_no_mask():
    x = np.zeros((2, 5), "float32")
    np.testing.assert_allclose(
        np.asarray(ops.multimax(x, ZEROS, ZEROS, mask=None)),
        np.full((2, 5), 0.2),
        rtol=1e-6,
    )


@pytest.mark.parametrize("name", ["x", "ranges", "ts"])
@pytest.mark.parametrize("fn", [ops.multimax, ops.seglu], ids=["multimax", "seglu"])
def test_none_names_the_argument(fn, name):
    """Break B4 (adversarial inputs): None used to fail deep inside the backend."""
    args = {"x": np.zeros((2, 5), "float32"), "ranges": ZEROS, "ts": ZEROS}
    args[name] = None
    with pytest.raises(
        TypeError,
        match=rf"`{name}` must be a floating-point tensor.*Received: {name}=None",
    ):
        fn(**args)


def test_non_float_input_is_a_type_error():
    with pytest.raises(TypeError, match=r"x.dtype=int32"):
        ops.multimax(np.array([[1, 2]], "int32"), ZEROS, ZEROS)
    with pytest.raises(TypeError, match=r"ranges.dtype=int32"):
        ops.seglu(np.zeros((2,), "float32"), np.zeros(4, "int32"), ZEROS)
    with pytest.raises(TypeError, match=r"x.dtype=string"):
        ops.seglu(np.array(["a"]), ZEROS, ZEROS)


@pytest.mark.parametrize(
    "ranges_shape, ts_shape, match",
    [
        ((3,), (3,), r"ts.shape=\(3,\)"),
        ((4,), (2,), r"ranges.shape=\(4,\), ts.shape=\(2,\)"),
        ((2, 4), (3, 4), r"ranges.shape=\(2, 4\), ts.shape=\(3, 4\)"),
        ((), (), r"ranges.shape=\(\)"),
        ((3, 4), (3, 4), r"x.shape=\(2, 5\), ranges.shape=\(3, 4\)"),
        ((1, 2, 5, 4), (1, 2, 5, 4), r"cannot have more dimensions"),
    ],
)
def test_bad_parameters_are_value_errors(ranges_shape, ts_shape, match):
    with pytest.raises(ValueError, match=match):
        ops.multimax(
            np.zeros((2, 5), "float32"),
            np.zeros(ranges_shape, "float32"),
            np.zeros(ts_shape, "float32"),
        )


def test_bad_axis_and_mask_are_value_errors():
    x = np.zeros((2, 5), "float32")
    with pytest.raises(ValueError, match=r"axis=2"):
        ops.multimax(x, ZEROS, ZEROS, axis=2)
    with pytest.raises(ValueError, match=r"axis=\(1, -1\)"):
        ops.multimax(x, ZEROS, ZEROS, axis=(1, -1))
    with pytest.raises(ValueError, match=r"axis=\(\)"):
        ops.multimax(x, ZEROS, ZEROS, axis=())
    with pytest.raises(TypeError, match=r"axis=1.0"):
        ops.multimax(x, ZEROS, ZEROS, axis=1.0)
    with pytest.raises(ValueError, match=r"mask.shape=\(2, 3\)"):
        ops.multimax(x, ZEROS, ZEROS, mask=np.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"mask.shape=\(1, 2, 5\)"):
        ops.multimax(x, ZEROS, ZEROS, mask=np.ones((1, 2, 5), bool))
    with pytest.raises(TypeError, match=r"mask.dtype=string"):
        ops.multimax(x, ZEROS, ZEROS, mask=np.array([["a"] * 5] * 2))


# NumPy integers as `axis`: test_robustness.py (break B9).
