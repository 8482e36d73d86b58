"""`keras_multimax.ops` on JAX: values, the custom VJP, masks, numerics, errors.

Runs with ``KERAS_BACKEND=jax`` (CI's second pytest run); skipped on other
backends. The references are independent of the package: the NumPy
implementation (`numpy_reference`), the float64 reference JSON, `jax.grad` of
the plain formula written below in `jax.numpy`, and `jax.nn.softmax` at
``ts = 0``. float64 cases run inside ``jax.enable_x64(True)`` (a context, so
the rest of the session keeps JAX's float32 default).
"""

import json
import pathlib

import keras
import numpy as np
import numpy_reference as ref
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("needs KERAS_BACKEND=jax", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from keras_multimax import ops  # noqa: E402

pytestmark = pytest.mark.backends

REFERENCE = json.loads(
    (pathlib.Path(__file__).parent / "data" / "multimax_reference.json").read_text()
)["cases"]

# float32 rounding of a handful of elementwise ops and one SoftMax, relative
# to the largest magnitude: ~100 ulp (eps = 1.2e-7), whatever the vector width.
F32_RTOL = 100 * np.finfo(np.float32).eps
# float64: the same 100 ulp (eps = 2.2e-16), far below any formula error.
F64_RTOL = 100 * np.finfo(np.float64).eps


def plain_seglu(x, ranges, ts):
    """The modulator in plain `jax.numpy`, differentiated by `jax.grad`."""
    sigma = x
    for k in range(ts.shape[-1] // 2):
        sigma = (
            sigma
            + ts[..., 2 * k] * jax.nn.relu(ranges[..., 2 * k] - x) ** (k + 1)
            + ts[..., 2 * k + 1] * jax.nn.relu(x - ranges[..., 2 * k + 1]) ** (k + 1)
        )
    return sigma


def plain_multimax(x, ranges, ts, axis=-1, mask=None):
    """MultiMax in plain `jax.numpy` (masked entries dropped), by `jax.grad`."""
    sigma = plain_seglu(x, ranges, ts)
    if mask is None:
        return jax.nn.softmax(sigma, axis=axis)
    sigma = jnp.where(mask, sigma, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.max(sigma, axis=axis, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.where(mask, jnp.exp(sigma - top), 0.0)
    total = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def values_and_gradients(fn, upstream, **kwargs):
    """`fn`'s output and the gradients of sum(fn · upstream), jitted."""

    def loss(x, ranges, ts):
        y = fn(x, ranges, ts, **kwargs)
        return jnp.sum(y * upstream.astype(y.dtype)), y

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

    def run(x, ranges, ts):
        grads, y = grad(x, ranges, ts)
        return (y, *grads)

    return run


def relative_error(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


# --- the reference JSON (official formulation, float64) ---------------------


@pytest.mark.parametrize("case", range(len(REFERENCE)))
def test_reference_float64(case):
    c = REFERENCE[case]
    with jax.enable_x64(True):
        args = [jnp.asarray(c[k], jnp.float64) for k in ("x", "ranges", "ts")]
        upstream = jnp.asarray(c["upstream"], jnp.float64)
        run = values_and_gradients(ops.multimax, upstream, axis=c["axis"])
        outputs = [np.asarray(v) for v in run(*args)]
        seglu = np.asarray(ops.seglu(*args))
    assert outputs[0].dtype == np.float64
    np.testing.assert_allclose(seglu, c["seglu"], rtol=1e-9)
    for actual, key in zip(outputs, ("multimax", "grad_x", "grad_ranges", "grad_ts")):
        np.testing.assert_allclose(actual, c[key], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("case", range(len(REFERENCE)))
def test_reference_float32(case):
    """float32: 1e-5 of the result, or of the absolute terms of a sum that cancels.

    The same bound as the TensorFlow test (`tests/test_ops.py`): the parameter
    gradients are sums of terms of both signs (see its docstring).
    """
    c = REFERENCE[case]
    args = [jnp.asarray(c[k], jnp.float32) for k in ("x", "ranges", "ts")]
    upstream = jnp.asarray(c["upstream"], jnp.float32)
    y, gx, gr, gt = values_and_gradients(ops.multimax, upstream, axis=c["axis"])(*args)
    assert relative_error(ops.seglu(*args), c["seglu"]) <= 1e-5
    for actual, key in ((y, "multimax"), (gx, "grad_x")):
        assert actual.dtype == jnp.float32
        assert relative_error(actual, c[key]) <= 1e-5, key
    terms = ref.parameter_gradient_terms(c["x"], c["ranges"], c["ts"], c["upstream"])
    for actual, key, term in ((gr, "grad_ranges", terms[0]), (gt, "grad_ts", terms[1])):
        expected = np.asarray(c[key])
        scale = max(
            np.abs(expected).max(), np.abs(term).reshape(-1, expected.size).sum(0).max()
        )
        assert np.abs(np.asarray(actual) - expected).max() <= 1e-5 * scale, key


# --- gradients ----------------------------------------------------------------


def _away_from_breakpoints(shape, ranges, rng, gap=0.05):
    x = rng.normal(scale=1.5, size=shape)
    for r in np.ravel(ranges):
        x[np.abs(x - r) < gap] += 2 * gap
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("axis", [-1, (0, 2)])
def test_numerical_gradient_float64(order, axis):
    """Finite differences (`jax.test_util.check_grads`) of the custom VJP."""
    from jax.test_util import check_grads

    rng = np.random.default_rng(order)
    with jax.enable_x64(True):
        ranges = jnp.asarray(rng.uniform(-1, 1, size=2 * order))
        ts = jnp.asarray(rng.uniform(-0.5, 0.5, size=2 * order))
        x = jnp.asarray(_away_from_breakpoints((2, 3, 4), ranges, rng))
        upstream = jnp.asarray(rng.normal(size=x.shape))

        def loss(x, ranges, ts):
            return jnp.sum(ops.multimax(x, ranges, ts, axis=axis) * upstream)

        check_grads(loss, (x, ranges, ts), order=1, modes=["rev"], eps=1e-6)
        check_grads(
            lambda x, r, t: ops.seglu(x, r, t), (x, ranges, ts), 1, ["rev"], eps=1e-6
        )


@pytest.mark.parametrize(
    "x_shape, param_shape, axis, with_mask",
    [
        ((4, 7), (4,), -1, False),
        ((4, 7), (2,), 0, True),
        ((2, 3, 5, 6), (3, 1, 1, 4), -1, True),  # per-head parameters
        ((2, 3, 5, 6), (4,), (2, 3), True),
        ((2, 3, 5, 6), (3, 5, 1, 6), (1, 3), False),
        ((2, 1, 5, 6), (3, 1, 1, 4), -1, True),  # parameters broadcast x up
    ],
)
def test_gradient_equals_autodiff_of_plain_formula(
    x_shape, param_shape, axis, with_mask
):
    rng = np.random.default_rng(3)
    mask = jnp.asarray(rng.random(x_shape) > 0.3) if with_mask else None
    with jax.enable_x64(True):
        _check_against_plain_formula(rng, x_shape, param_shape, axis, mask)


def _check_against_plain_formula(rng, x_shape, param_shape, axis, mask):
    """Random float64 arguments; returns them and the VJP, checked against autodiff."""
    x = jnp.asarray(rng.normal(scale=2.0, size=x_shape))
    ranges = jnp.asarray(rng.normal(size=param_shape))
    ts = jnp.asarray(rng.normal(scale=0.3, size=param_shape))
    out_shape = np.broadcast_shapes(x_shape, param_shape[:-1])
    upstream = jnp.asarray(rng.normal(size=out_shape))
    ours = values_and_gradients(ops.multimax, upstream, axis=axis, mask=mask)
    plain = values_and_gradients(plain_multimax, upstream, axis=axis, mask=mask)
    for a, b in zip(ours(x, ranges, ts), plain(x, ranges, ts)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    return (x, ranges, ts), upstream, ours


@pytest.mark.parametrize(
    "x_shape, param_shape, axis, loops",
    [
        ((8, 3, 5, 6), (4,), -1, True),
        ((8, 3, 5, 6), (3, 1, 1, 4), -1, True),  # per-head parameters
        ((8, 3, 5, 6), (4,), (2, 3), True),
        ((8, 3, 5, 6), (8, 1, 1, 1, 4), -1, False),  # one set per leading index
        ((8, 3, 5, 6), (4,), 0, False),  # normalised over the leading axis
        ((8, 1, 5, 18), (3, 1, 1, 4), -1, False),  # parameters broadcast x up
    ],
)
def test_gradient_in_cache_sized_slices_equals_autodiff(
    monkeypatch, x_shape, param_shape, axis, loops
):
    """The CPU backward over slices of the leading axis (`_SLICE_BYTES`).

    The slice size is lowered so that a small x (8 rows of 720 bytes) is
    split in 4; the loop must show in the program, and its gradients equal
    `jax.grad` of the plain formula with a mask. A −inf entry gives what the
    same entry masked gives (the plain formula's gradient is NaN there).
    """
    from keras_multimax.backend.jax import multimax as backend

    monkeypatch.setattr(backend, "_SLICE_BYTES", 2 * 720)
    rng = np.random.default_rng(8)
    mask = jnp.asarray(rng.random(x_shape) > 0.3)
    with jax.enable_x64(True):
        (x, ranges, ts), upstream, ours = _check_against_plain_formula(
            rng, x_shape, param_shape, axis, mask
        )
        program = str(jax.make_jaxpr(ours)(x, ranges, ts))
        assert ("scan[" in program or "while[" in program) == loops
        at = (1, 0, 3, 4)
        masked = values_and_gradients(
            ops.multimax, upstream, axis=axis, mask=mask.at[at].set(False)
        )(x, ranges, ts)
        minus_inf = values_and_gradients(ops.multimax, upstream, axis=axis, mask=mask)(
            x.at[at].set(-jnp.inf), ranges, ts
        )
        for a, b in zip(minus_inf, masked):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("upstream_shape", [(197,), (6, 197, 197), (6, 1, 197)])
def test_gradient_with_an_upstream_that_broadcasts(upstream_shape):
    """A loss like ``sum(y · w)`` with ``w`` shared over the batch.

    jax 0.10.2 on the CPU computes ``y · (dy − Σ dy·y)`` wrongly (errors of
    10–35 % of ``max|y·dy|``) when ``dy`` is such a broadcast and x is as
    large as [4, 6, 197, 197]; ``y·dy − y·Σ dy·y`` is right. float32 against
    NumPy in float64: the 100-ulp bound of the other float32 tests, of the
    largest term ``|y·dy|``.
    """
    rng = np.random.default_rng(9)
    x = rng.normal(size=(4, 6, 197, 197)).astype("float32")
    ranges = np.array([-1.0, 1.0, -2.0, 2.0], "float32")
    ts = np.array([0.3, 0.4, 0.1, 0.2], "float32")
    w = rng.normal(size=upstream_shape).astype("float32")
    gx = jax.jit(jax.grad(lambda x: jnp.sum(ops.multimax(x, ranges, ts) * w)))(x)
    y = ref.multimax(x.astype("float64"), ranges, ts)
    dy = np.broadcast_to(w.astype("float64"), x.shape)
    gs = y * (dy - np.sum(dy * y, axis=-1, keepdims=True))
    xd = x.astype("float64")
    d_x = (
        1
        - ts[0] * (xd < ranges[0])
        + ts[1] * (xd > ranges[1])
        - 2 * ts[2] * np.maximum(ranges[2] - xd, 0)
        + 2 * ts[3] * np.maximum(xd - ranges[3], 0)
    )
    error = np.max(np.abs(np.asarray(gx, np.float64) - gs * d_x))
    assert error <= F32_RTOL * np.max(np.abs(y * dy))


def test_seglu_gradient_has_the_shape_of_x_when_parameters_broadcast_it():
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 1, 3)))
        ranges = jnp.asarray(rng.normal(size=(5, 1, 4)))
        ts = jnp.asarray(rng.normal(size=(5, 1, 4)))
        upstream = jnp.asarray(rng.normal(size=(2, 5, 3)))
        ours = values_and_gradients(lambda *a: ops.seglu(*a), upstream)(x, ranges, ts)
        plain = values_and_gradients(plain_seglu, upstream)(x, ranges, ts)
        for a, b, v in zip(ours[1:], plain[1:], (x, ranges, ts)):
            assert a.shape == v.shape
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_backward_saves_only_input_parameters_and_output():
    """The residuals of the VJP are x, ranges, ts and y: no σ, no factors."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)
    ranges, ts = jnp.zeros(4), jnp.full(4, 0.1)
    y, vjp = jax.vjp(lambda x, r, t: ops.multimax(x, r, t), x, ranges, ts)
    saved = [a for a in jax.tree_util.tree_leaves(vjp) if hasattr(a, "shape")]
    full_size = [a for a in saved if a.shape == x.shape]
    assert len(full_size) == 2, [a.shape for a in saved]  # x and y
    assert any(a is x or np.array_equal(a, x) for a in full_size)
    assert any(np.array_equal(a, y) for a in full_size)


def test_jit_retraces_for_new_shapes():
    f = jax.jit(lambda x: ops.multimax(x, jnp.zeros(4), jnp.full(4, 0.2)))
    rng = np.random.default_rng(6)
    for shape in [(2, 5), (3, 7), (1, 1)]:
        x = rng.normal(size=shape).astype("float32")
        np.testing.assert_allclose(
            f(x), ref.multimax(x, np.zeros(4), np.full(4, 0.2)), rtol=F32_RTOL
        )


# --- properties against NumPy ---------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("axis", [-1, 1, (1, 2), (0, 2)])
def test_values_against_numpy(order, axis):
    rng = np.random.default_rng(order)
    x = rng.normal(scale=3, size=(3, 4, 5)).astype("float32")
    ranges = rng.uniform(-1, 1, size=2 * order).astype("float32")
    ts = rng.uniform(-0.3, 0.3, size=2 * order).astype("float32")
    y = np.asarray(jax.jit(lambda x: ops.multimax(x, ranges, ts, axis=axis))(x))
    np.testing.assert_allclose(
        y, ref.multimax(x, ranges, ts, axis=axis), rtol=2e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        ops.seglu(x, ranges, ts), ref.seglu(x, ranges, ts), rtol=1e-5, atol=1e-5
    )


def test_zero_ts_equals_jax_softmax_and_seglu_is_the_identity():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(scale=4.0, size=(5, 11)), jnp.float32)
    ranges = jnp.asarray(rng.normal(size=4), jnp.float32)
    y = ops.multimax(x, ranges, jnp.zeros(4))
    np.testing.assert_allclose(y, jax.nn.softmax(x), rtol=F32_RTOL)
    np.testing.assert_array_equal(ops.seglu(x, ranges, jnp.zeros(4)), x)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_masks_and_minus_inf_give_exact_zeros_and_no_nan(sign):
    """Masked and −inf entries: probability 0 and gradient 0 whatever ts."""
    rng = np.random.default_rng(5)
    x = rng.normal(scale=3, size=(6, 8)).astype("float32")
    mask = rng.random((6, 8)) > 0.4
    mask[2] = False  # a fully masked row
    x[0, 0] = -np.inf
    excluded = ~mask | np.isneginf(x)
    ranges = np.array([0.5, -0.5, 0.2, -0.2], "float32")
    ts = sign * np.array([0.8, 0.4, 0.6, 0.3], "float32")
    upstream = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
    y, gx, gr, gt = values_and_gradients(ops.multimax, upstream, mask=mask)(
        x, ranges, ts
    )
    y, gx = np.asarray(y), np.asarray(gx)
    for value in (y, gx, gr, gt):
        assert np.all(np.isfinite(value))
    np.testing.assert_array_equal(y[excluded], 0.0)
    np.testing.assert_array_equal(gx[excluded], 0.0)
    np.testing.assert_allclose(y[np.arange(6) != 2].sum(axis=1), 1.0, rtol=F32_RTOL)
    np.testing.assert_allclose(
        y,
        ref.multimax(np.where(excluded, 0, x), ranges, ts, mask=~excluded),
        rtol=1e-5,
        atol=1e-7,
    )


def test_minus_inf_at_zero_ts_is_softmax_with_finite_gradients():
    x = jnp.asarray([[-jnp.inf, 1.0, 2.0], [1e20, 0.0, -1e20]], jnp.float32)
    upstream = jnp.asarray([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    y, *grads = values_and_gradients(ops.multimax, upstream)(
        x, jnp.zeros(4), jnp.zeros(4)
    )
    np.testing.assert_allclose(y, jax.nn.softmax(x), rtol=F32_RTOL)
    for g in grads:
        assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(
        ops.seglu(jnp.asarray([-jnp.inf, 1e20]), jnp.zeros(2), jnp.zeros(2)),
        np.float32([-np.inf, 1e20]),
    )


@pytest.mark.parametrize(
    "dtype, scale",
    [("float32", 1e4), ("float16", 300.0), ("bfloat16", 300.0)],
)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_inputs_stay_finite_and_half_precision_is_float32(dtype, scale, sign):
    rng = np.random.default_rng(2)
    x64 = rng.uniform(-scale, scale, size=(4, 64))
    x = jnp.asarray(x64, dtype)
    ranges = jnp.asarray([0.1, -0.1, 0.2, -0.2], dtype)
    ts = jnp.asarray(sign * np.array([0.02, 0.03, 0.02, 0.01]), dtype)
    y, *grads = values_and_gradients(ops.multimax, jnp.arange(64.0))(x, ranges, ts)
    assert y.dtype == x.dtype and all(g.dtype == x.dtype for g in grads)
    for value in (y, *grads):
        assert np.all(np.isfinite(np.asarray(value, np.float32)))
    expected = ref.multimax(
        np.asarray(x, np.float64),
        np.asarray(ranges, np.float64),
        np.asarray(ts, np.float64),
    )
    # Probabilities are at most 1: the output's rounding (eps of its dtype,
    # 2 ulp) bounds the error when the computation is in float32.
    eps = float(jnp.finfo(x.dtype).eps)
    np.testing.assert_allclose(
        np.asarray(y, np.float64), expected, atol=max(2 * eps, 1e-5)
    )


# Argument errors: tests/test_ops_errors.py (the same on every backend).
