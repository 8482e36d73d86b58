"""The JAX implementation of `keras_multimax.ops`: the custom VJP's program.

What is tested here exists only in ``keras_multimax/backend/jax``: the
backward over cache-sized slices of the leading axis, the residuals the VJP
keeps, retracing under `jax.jit`, and a jax CPU defect that the backward
works around. The math itself is tested on every backend in test_ops.py.
"""

import keras
import numpy as np
import numpy_reference as ref
import pytest
from backend_helpers import float64
from backend_helpers import to_numpy
from backend_helpers import value_and_gradients
from plain_formula import compare_with_plain_formula
from tolerances import EPS

from keras_multimax import ops

pytestmark = pytest.mark.only_backend(
    "jax", reason="tests the JAX backend's custom VJP (jaxpr, residuals, slices)"
)

if keras.backend.backend() == "jax":
    import jax
    import jax.numpy as jnp

# float32 rounding of a handful of elementwise ops and one SoftMax, relative
# to the largest magnitude: ~100 ulp, whatever the vector width.
F32_RTOL = 100 * EPS["float32"]


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
    autodiff of the plain formula with a mask. A −inf entry gives what the
    same entry masked gives (the plain formula's gradient is NaN there).
    """
    from keras_multimax.backend.jax import multimax as backend

    monkeypatch.setattr(backend, "_SLICE_BYTES", 2 * 720)
    rng = np.random.default_rng(8)
    mask = rng.random(x_shape) > 0.3
    with float64():
        (x, ranges, ts), upstream = compare_with_plain_formula(
            rng, x_shape, param_shape, axis, mask, mode="traced"
        )

        def loss(x, ranges, ts):
            y = ops.multimax(x, ranges, ts, axis=axis, mask=mask)
            return jnp.sum(y * upstream)

        program = str(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(x, ranges, ts))
        assert ("scan[" in program or "while[" in program) == loops
        at = (1, 0, 3, 4)
        hidden = mask.copy()
        hidden[at] = False
        masked = value_and_gradients(
            lambda *a: ops.multimax(*a, axis=axis, mask=hidden),
            x,
            ranges,
            ts,
            upstream=upstream,
            mode="traced",
        )
        x_inf = x.copy()
        x_inf[at] = -np.inf
        minus_inf = value_and_gradients(
            lambda *a: ops.multimax(*a, axis=axis, mask=mask),
            x_inf,
            ranges,
            ts,
            upstream=upstream,
            mode="traced",
        )
    np.testing.assert_array_equal(to_numpy(minus_inf[0]), to_numpy(masked[0]))
    for a, b in zip(minus_inf[1], masked[1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
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


def test_converted_keras_hub_model_leaves_keras_fused_attention_path(monkeypatch):
    """On JAX, Keras' attention calls the fused `dot_product_attention`; the
    converted model must never take it (it would silently run SoftMax)."""
    pytest.importorskip("keras_hub", reason="the keras-hub extra is not installed")
    import hub_models

    from keras_multimax.convert import to_multimax

    backbone = hub_models.backbone("llama")
    hub_models.randomize(backbone)  # O(1) scores, where MultiMax shows
    inputs = hub_models.inputs(backbone)
    expected = hub_models.outputs(backbone, inputs)
    calls = []
    original = keras.ops.dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(keras.ops, "dot_product_attention", counting)
    hub_models.outputs(backbone, inputs)
    softmax_calls = len(calls)
    converted = to_multimax(backbone)
    calls.clear()
    got = hub_models.outputs(converted, inputs)
    # The SoftMax model takes the fused kernel (the control); MultiMax never.
    assert softmax_calls == 2 and not calls, (softmax_calls, len(calls))
    # ts = 0: the same function (bounds of tests/hub_models.py).
    assert hub_models.rel_diff(got, expected) <= hub_models.TS0_BOUND
    hub_models.activate(converted)  # control: an active modulator shows
    moved = hub_models.rel_diff(hub_models.outputs(converted, inputs), expected)
    assert moved >= hub_models.ACTIVE_BOUND
