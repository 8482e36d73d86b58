"""Tests of `keras_multimax.ops`: values, gradients, masks, numerics (every backend).

The references are independent of the package: the float64 reference JSON
(official formulation), the NumPy implementation (`numpy_reference`), NumPy
finite differences, autodiff of the plain formula written in `keras.ops`
(`plain_formula`), and `keras.ops.softmax` at ``ts = 0``. Each computation
runs in every mode of `backend_helpers.MODES` where the mode can matter
(eagerly, traced, and on TensorFlow with the fused forward).
"""

import json
import pathlib

import keras
import numpy as np
import numpy_reference as ref
import pytest
from backend_helpers import MODES
from backend_helpers import float64
from backend_helpers import numerical_gradients
from backend_helpers import run_in_mode
from backend_helpers import to_numpy
from backend_helpers import value_and_gradients
from plain_formula import compare_with_plain_formula
from plain_formula import plain_multimax
from plain_formula import plain_seglu
from tolerances import EPS

from keras_multimax import ops

REFERENCE = json.loads(
    (pathlib.Path(__file__).parent / "data" / "multimax_reference.json").read_text()
)["cases"]


def _relative_error(actual, expected):
    actual = to_numpy(actual).astype(np.float64)
    expected = np.asarray(expected, np.float64)
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


def _arrays(case, dtype):
    return [np.asarray(case[k], dtype) for k in ("x", "ranges", "ts")]


# --- the reference JSON (official formulation, float64) ---------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(REFERENCE)))
def test_reference_float64(case, mode):
    c = REFERENCE[case]
    with float64():
        args = _arrays(c, "float64")
        y, grads = value_and_gradients(
            lambda *a: ops.multimax(*a, axis=c["axis"]),
            *args,
            upstream=np.asarray(c["upstream"]),
            mode=mode,
        )
        seglu = to_numpy(ops.seglu(*args))
        y = to_numpy(y)
    assert y.dtype == np.float64
    np.testing.assert_allclose(seglu, c["seglu"], rtol=1e-9)
    for actual, key in zip(
        [y, *grads], ("multimax", "grad_x", "grad_ranges", "grad_ts")
    ):
        np.testing.assert_allclose(actual, c[key], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(REFERENCE)))
def test_reference_float32(case, mode):
    """float32: values and grad_x within 1e-5 of their largest magnitude.

    The gradients of `ranges` and `ts` are sums of terms of both signs over
    every entry; where they cancel (case 4: grad_ranges is 3e-4 from terms of
    1e-2) float32 cannot reach 1e-5 of the result itself, even from correctly
    rounded float32 outputs. Their bound is 1e-5 of the larger of the result
    and the sum of the absolute terms (the condition of the sum), computed
    independently in float64.
    """
    c = REFERENCE[case]
    args = _arrays(c, "float32")
    y, (gx, gr, gt) = value_and_gradients(
        lambda *a: ops.multimax(*a, axis=c["axis"]),
        *args,
        upstream=np.asarray(c["upstream"]),
        mode=mode,
    )
    assert _relative_error(ops.seglu(*args), c["seglu"]) <= 1e-5
    for actual, key in ((to_numpy(y), "multimax"), (gx, "grad_x")):
        assert actual.dtype == np.float32
        assert _relative_error(actual, c[key]) <= 1e-5, key
    terms = ref.parameter_gradient_terms(c["x"], c["ranges"], c["ts"], c["upstream"])
    for actual, key, term in ((gr, "grad_ranges", terms[0]), (gt, "grad_ts", terms[1])):
        expected = np.asarray(c[key])
        np.testing.assert_allclose(
            term.reshape(-1, expected.size).sum(0), expected, rtol=1e-9
        )
        scale = max(
            np.abs(expected).max(), np.abs(term).reshape(-1, expected.size).sum(0).max()
        )
        error = np.abs(actual - expected).max()
        assert error <= 1e-5 * scale, (key, error, scale)


def test_reference_covers_both_orders():
    assert {c["order"] for c in REFERENCE} == {1, 2}


# --- gradients ----------------------------------------------------------------


def _away_from_breakpoints(shape, ranges, rng, gap=0.05):
    """Inputs at least ``gap`` from every threshold: σ is smooth around them,
    so central differences of step 1e-6 never straddle a kink."""
    x = rng.normal(scale=1.5, size=shape)
    for r in np.ravel(ranges):
        x[np.abs(x - r) < gap] += 2 * gap
    return x


def _check_numerically(fn, args, upstream):
    """The custom gradient against NumPy central differences, in float64.

    The finite-difference error is ~1e-10 for these O(1) losses (see
    `numerical_gradients`); rtol 1e-6 leaves it room and still fails for
    any wrong term of the closed form (an error of O(ts) ~ 0.1).
    """
    with float64():
        _, theoretical = value_and_gradients(fn, *args, upstream=upstream)

        def loss(*a):
            return np.sum(to_numpy(fn(*a)) * upstream)

        numerical = numerical_gradients(loss, args)
    for t, n in zip(theoretical, numerical):
        assert t.dtype == np.float64
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("order, axis", [(1, -1), (2, (0, 2)), (3, -1), (3, (0, 2))])
def test_multimax_gradient_equals_finite_differences(order, axis):
    rng = np.random.default_rng(order)
    ranges = rng.uniform(-1, 1, size=2 * order)
    ts = rng.uniform(-0.5, 0.5, size=2 * order)
    x = _away_from_breakpoints((2, 3, 4), ranges, rng)
    _check_numerically(
        lambda *a: ops.multimax(*a, axis=axis),
        [x, ranges, ts],
        rng.normal(size=x.shape),
    )


@pytest.mark.parametrize("order", [1, 3])
def test_seglu_gradient_equals_finite_differences(order):
    rng = np.random.default_rng(10 + order)
    ranges = rng.uniform(-1, 1, size=(3, 1, 2 * order))  # per-row parameters
    ts = rng.uniform(-0.5, 0.5, size=(3, 1, 2 * order))
    x = _away_from_breakpoints((3, 4), ranges, rng)
    _check_numerically(ops.seglu, [x, ranges, ts], rng.normal(size=(3, 3, 4)))


GRADIENT_CASES = [
    # x shape, parameter shape, axis, with mask
    ((4, 7), (4,), -1, False),
    ((4, 7), (2,), 0, True),
    ((2, 3, 5, 6), (3, 1, 1, 4), -1, True),  # per-head parameters
    ((2, 3, 5, 6), (4,), (2, 3), True),
    ((2, 3, 5, 6), (3, 5, 1, 6), (1, 3), False),
    ((2, 1, 5, 6), (3, 1, 1, 4), -1, True),  # parameters broadcast x up
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("x_shape, param_shape, axis, with_mask", GRADIENT_CASES)
def test_gradient_equals_autodiff_of_plain_formula(
    x_shape, param_shape, axis, with_mask, mode
):
    rng = np.random.default_rng(3)
    mask = rng.random(x_shape) > 0.3 if with_mask else None
    with float64():
        compare_with_plain_formula(rng, x_shape, param_shape, axis, mask, mode)


def test_seglu_gradient_has_the_shape_of_x_when_parameters_broadcast_it():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 1, 3))
    ranges = rng.normal(size=(5, 1, 4))
    ts = rng.normal(size=(5, 1, 4))
    upstream = rng.normal(size=(2, 5, 3))
    with float64():
        _, ours = value_and_gradients(ops.seglu, x, ranges, ts, upstream=upstream)
        _, plain = value_and_gradients(plain_seglu, x, ranges, ts, upstream=upstream)
    for a, b, v in zip(ours, plain, (x, ranges, ts)):
        assert a.shape == v.shape
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


# --- properties against NumPy ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order, axis", [(1, 1), (2, (1, 2)), (3, (0, 2)), (3, -1)])
def test_values_against_numpy(order, axis, mode):
    rng = np.random.default_rng(order)
    x = rng.normal(scale=3, size=(3, 4, 5)).astype("float32")
    ranges = rng.uniform(-1, 1, size=2 * order).astype("float32")
    ts = rng.uniform(-0.3, 0.3, size=2 * order).astype("float32")
    y = to_numpy(
        run_in_mode(lambda x: ops.multimax(x, ranges, ts, axis=axis), x, mode=mode)
    )
    np.testing.assert_allclose(
        y, ref.multimax(x, ranges, ts, axis=axis), rtol=2e-5, atol=1e-7
    )
    np.testing.assert_allclose(y.sum(axis=axis), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(ops.seglu(x, ranges, ts)), ref.seglu(x, ranges, ts), atol=1e-5
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zero_ts_equals_keras_softmax_and_seglu_is_the_identity(dtype):
    rng = np.random.default_rng(7)
    with float64():
        x = keras.ops.convert_to_tensor(rng.normal(scale=4.0, size=(5, 11)), dtype)
        ranges = keras.ops.convert_to_tensor(rng.normal(size=4), dtype)
        zeros = keras.ops.zeros((4,), dtype)
        y = to_numpy(ops.multimax(x, ranges, zeros))
        expected = to_numpy(keras.ops.softmax(x))
        seglu = to_numpy(ops.seglu(x, ranges, zeros))
    # One SoftMax each, of the same input: a few roundings of the largest
    # probability (1), 8 eps.
    assert y.dtype == dtype
    np.testing.assert_allclose(y, expected, rtol=0, atol=8 * EPS[dtype])
    np.testing.assert_array_equal(seglu, to_numpy(x))


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("mode", MODES)
def test_masks_and_minus_inf_give_exact_zeros_and_no_nan(sign, mode):
    """Masked and −inf entries: probability 0 and gradient 0 whatever ts."""
    rng = np.random.default_rng(5)
    x = rng.normal(scale=3, size=(6, 8)).astype("float32")
    mask = rng.random((6, 8)) > 0.4
    mask[2] = False  # a fully masked row
    x[0, 0] = -np.inf
    excluded = ~mask | np.isneginf(x)
    ranges = np.array([0.5, -0.5, 0.2, -0.2], "float32")
    ts = sign * np.array([0.8, 0.4, 0.6, 0.3], "float32")
    y, (gx, gr, gt) = value_and_gradients(
        lambda *a: ops.multimax(*a, mask=mask),
        x,
        ranges,
        ts,
        upstream=rng.normal(size=(6, 8)),
        mode=mode,
    )
    y = to_numpy(y)
    for value in (y, gx, gr, gt):
        assert np.all(np.isfinite(value))
    np.testing.assert_array_equal(y[excluded], 0.0)
    np.testing.assert_array_equal(gx[excluded], 0.0)
    np.testing.assert_allclose(y[np.arange(6) != 2].sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        y,
        ref.multimax(np.where(excluded, 0, x), ranges, ts, mask=~excluded),
        rtol=1e-5,
        atol=1e-7,
    )


@pytest.mark.parametrize("fill", [-np.inf, np.inf, np.nan, -1e30, 1e30, -1e13])
@pytest.mark.parametrize("order", [2, 3])
def test_masked_values_never_reach_the_gradients(fill, order):
    """Padding values under the mask (-inf, NaN, 1e30) change nothing."""
    rng = np.random.default_rng(order)
    x = rng.normal(size=(3, 6))
    mask = np.ones((3, 6), bool)
    mask[:, 2] = mask[1, 4] = False
    ranges = rng.uniform(-1, 1, 2 * order)
    ts = rng.uniform(-0.5, 0.5, 2 * order)
    upstream = rng.normal(size=(3, 6))
    results = []
    with float64():
        for fn, inputs in (
            (ops.multimax, np.where(mask, x, fill)),
            (plain_multimax, x),  # finite values under the mask
        ):
            y, grads = value_and_gradients(
                lambda *a, fn=fn: fn(*a, mask=mask),
                inputs,
                ranges,
                ts,
                upstream=upstream,
            )
            results.append([to_numpy(y), *grads])
    ours, plain = results
    for a, b in zip(ours, plain):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(ours[1][~mask], 0.0)


def test_mask_equals_dropping_the_entries():
    x = np.array([[0.3, 2.0, -1.0, 1.5, -4.0]], "float32")
    keep = np.array([True, True, False, True, False])
    ranges = np.array([0.1, 0.2, -0.1, 0.3], "float32")
    ts = np.array([0.9, -0.4, 0.7, 0.2], "float32")
    masked = to_numpy(ops.multimax(x, ranges, ts, mask=keep[None]))
    dropped = to_numpy(ops.multimax(x[:, keep], ranges, ts))
    np.testing.assert_allclose(masked[:, keep], dropped, rtol=1e-6)


def test_large_negative_masking_fails_where_mask_argument_works():
    """Why masks are applied after σ: -1e9 fed into σ becomes a huge score."""
    x = np.array([[1.0, 2.0, -1e9]], "float32")
    ranges = np.array([0.0, 0.0, 0.0, 0.0], "float32")
    ts = np.array([0.0, 0.0, 0.1, 0.0], "float32")  # t_b of order 2 > 0
    additive = to_numpy(ops.multimax(x, ranges, ts))
    assert additive[0, 2] > 0.99  # the "masked" entry takes all the mass
    proper = to_numpy(ops.multimax(x[:, :2], ranges, ts))
    masked = to_numpy(
        ops.multimax(
            np.array([[1.0, 2.0, 5.0]], "float32"), ranges, ts, mask=[[1, 1, 0]]
        )
    )
    np.testing.assert_allclose(masked[:, :2], proper, rtol=1e-6)
    assert masked[0, 2] == 0.0


@pytest.mark.parametrize(
    "dtype, scale",
    [("float32", 1e4), ("float16", 300.0), ("bfloat16", 300.0), ("float64", 1e4)],
)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_inputs_stay_finite_and_half_precision_is_float32(dtype, scale, sign):
    rng = np.random.default_rng(2)
    with float64():
        x = keras.ops.convert_to_tensor(rng.uniform(-scale, scale, (4, 64)), dtype)
        ranges = keras.ops.convert_to_tensor([0.1, -0.1, 0.2, -0.2], dtype)
        ts = keras.ops.convert_to_tensor(
            sign * np.array([0.02, 0.03, 0.02, 0.01]), dtype
        )
        y, grads = value_and_gradients(
            ops.multimax, x, ranges, ts, upstream=np.arange(64.0)
        )
        assert keras.backend.standardize_dtype(y.dtype) == dtype
        y = to_numpy(keras.ops.cast(y, "float64"))
        x, ranges, ts = (
            to_numpy(keras.ops.cast(v, "float64")) for v in (x, ranges, ts)
        )
    assert all(keras.backend.standardize_dtype(g.dtype) == dtype for g in grads)
    for value in (y, *grads):
        assert np.all(np.isfinite(value.astype(np.float32)))
    # Probabilities are at most 1: the output's rounding (2 ulp of its dtype)
    # bounds the error when the computation is in float32 (1e-5 at least:
    # float32 inputs of 1e4 carry 1e-3 absolute rounding into σ).
    np.testing.assert_allclose(
        y, ref.multimax(x, ranges, ts), atol=max(2 * EPS[dtype], 1e-5)
    )


def test_overflowing_modulator_gives_finite_probabilities():
    x = np.array([[1e30, 1e30, -1e30, 0.0]], "float32")
    y = to_numpy(ops.multimax(x, np.zeros(4, "float32"), np.float32([0, 0, 0.5, 0.5])))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y.sum(), 1.0, rtol=1e-6)


def test_half_precision_is_computed_in_float32():
    """(±300)² = 90000 overflows float16; 0.1·90000 + 300 does not."""
    x = np.array([[300.0, -300.0, 0.0]], "float16")
    ranges = np.zeros(4, "float16")
    ts = np.array([0.0, 0.0, 0.1, 0.1], "float16")
    expected = ref.seglu(x, ranges, ts)
    assert np.all(np.abs(expected) < 65504)
    actual = to_numpy(keras.ops.cast(ops.seglu(x, ranges, ts), "float32"))
    np.testing.assert_allclose(actual, expected, rtol=1e-3)


# Argument errors: tests/test_ops_errors.py. Backend implementations (the TF
# kernels, the JAX backward's slices): test_backend_tensorflow.py and
# test_backend_jax.py.
