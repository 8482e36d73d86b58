"""MultiMax written straight from the formula in `keras.ops`, for tests only.

Differentiated by the backend's autodiff (through `backend_helpers`), it is
the independent reference for the closed-form custom gradients of
`keras_multimax.ops`: it shares no code with the package.
"""

from __future__ import annotations

import numpy as np
from backend_helpers import DEFAULT_MODE
from backend_helpers import to_numpy
from backend_helpers import value_and_gradients
from keras import ops

from keras_multimax import ops as multimax_ops


def plain_seglu(x, ranges, ts):
    """σ(x) = x + Σ_k ts[2k]·relu(ranges[2k] − x)^(k+1) + ts[2k+1]·relu(x − ranges[2k+1])^(k+1)."""
    sigma = x
    for k in range(ts.shape[-1] // 2):
        sigma = (
            sigma
            + ts[..., 2 * k] * ops.relu(ranges[..., 2 * k] - x) ** (k + 1)
            + ts[..., 2 * k + 1] * ops.relu(x - ranges[..., 2 * k + 1]) ** (k + 1)
        )
    return sigma


def plain_multimax(x, ranges, ts, axis=-1, mask=None):
    """softmax(σ(x)) over ``axis``; masked entries dropped after the modulation."""
    sigma = plain_seglu(x, ranges, ts)
    if mask is None:
        return ops.exp(sigma - ops.logsumexp(sigma, axis=axis, keepdims=True))
    mask = ops.convert_to_tensor(mask)
    sigma = ops.where(mask, sigma, -np.inf)
    top = ops.stop_gradient(ops.max(sigma, axis=axis, keepdims=True))
    top = ops.where(ops.isfinite(top), top, ops.zeros_like(top))
    e = ops.where(mask, ops.exp(sigma - top), ops.zeros_like(sigma))
    total = ops.sum(e, axis=axis, keepdims=True)
    return e / ops.where(total > 0, total, ops.ones_like(total))


def compare_with_plain_formula(
    rng, x_shape, param_shape, axis, mask, mode=DEFAULT_MODE
):
    """Random float64 arguments; the custom gradient equals autodiff of the
    plain formula (the same float64 terms summed in another order: 1e-9).
    Call inside `float64()`; returns the arguments and the upstream."""
    x = rng.normal(scale=2.0, size=x_shape)
    ranges = rng.normal(size=param_shape)
    ts = rng.normal(scale=0.3, size=param_shape)
    upstream = rng.normal(size=np.broadcast_shapes(x_shape, param_shape[:-1]))
    results = []
    for fn in (multimax_ops.multimax, plain_multimax):
        y, grads = value_and_gradients(
            lambda *a, fn=fn: fn(*a, axis=axis, mask=mask),
            x,
            ranges,
            ts,
            upstream=upstream,
            mode=mode,
        )
        results.append([to_numpy(y), *grads])
    for a, b in zip(*results):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    return (x, ranges, ts), upstream
