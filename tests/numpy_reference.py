"""An independent NumPy implementation of MultiMax, for tests only.

Written straight from the paper's formula in float64, without sharing code with
`keras_multimax.ops`, so tests compare the package against something else.
"""

from __future__ import annotations

import numpy as np


def seglu(x, ranges, ts):
    """σ(x) = x + Σ_k ts[2k]·relu(ranges[2k] − x)^(k+1) + ts[2k+1]·relu(x − ranges[2k+1])^(k+1).

    `ranges`/`ts` have shape (..., 2K); their leading dimensions broadcast
    against `x` from the right.
    """
    x = np.asarray(x, dtype=np.float64)
    ranges = np.asarray(ranges, dtype=np.float64)
    ts = np.asarray(ts, dtype=np.float64)
    out = x.copy()
    for k in range(ts.shape[-1] // 2):
        b, d = ranges[..., 2 * k], ranges[..., 2 * k + 1]
        t_b, t_d = ts[..., 2 * k], ts[..., 2 * k + 1]
        out = (
            out
            + t_b * np.maximum(b - x, 0.0) ** (k + 1)
            + t_d * np.maximum(x - d, 0.0) ** (k + 1)
        )
    return out


def softmax(z, axis=-1, mask=None):
    """SoftMax over `axis` (int or tuple); masked entries get 0, empty rows 0."""
    z = np.asarray(z, dtype=np.float64)
    if mask is None:
        mask = np.ones(z.shape, dtype=bool)
    mask = np.broadcast_to(np.asarray(mask, dtype=bool), z.shape)
    masked = np.where(mask, z, -np.inf)
    top = np.max(masked, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(mask, np.exp(masked - top), 0.0)
    total = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def multimax(x, ranges, ts, axis=-1, mask=None):
    """softmax(σ(x)) over `axis`, masking after the modulation."""
    return softmax(seglu(x, ranges, ts), axis=axis, mask=mask)


def parameter_gradient_terms(x, ranges, ts, upstream, axis=-1):
    """Per-entry contributions to the MultiMax gradients of `ranges` and `ts`.

    Returns two arrays of shape x.shape + (2K,) whose sums over the entries are
    the gradients of sum(multimax(x) * upstream). Their absolute sums bound the
    rounding error of a float32 computation (the gradients are sums of terms
    of both signs that can cancel).
    """
    x = np.asarray(x, dtype=np.float64)
    ranges = np.asarray(ranges, dtype=np.float64)
    ts = np.asarray(ts, dtype=np.float64)
    y = multimax(x, ranges, ts, axis=axis)
    upstream = np.asarray(upstream, dtype=np.float64)
    gs = y * (upstream - np.sum(upstream * y, axis=axis, keepdims=True))
    d_ranges, d_ts = [], []
    for k in range(ts.shape[-1] // 2):
        lower = np.maximum(ranges[..., 2 * k] - x, 0.0)
        upper = np.maximum(x - ranges[..., 2 * k + 1], 0.0)
        lower_k = (lower > 0).astype(np.float64) if k == 0 else lower**k
        upper_k = (upper > 0).astype(np.float64) if k == 0 else upper**k
        d_ranges += [
            (k + 1) * ts[..., 2 * k] * lower_k,
            -(k + 1) * ts[..., 2 * k + 1] * upper_k,
        ]
        d_ts += [lower ** (k + 1), upper ** (k + 1)]
    return (
        np.stack([gs * d for d in d_ranges], axis=-1),
        np.stack([gs * d for d in d_ts], axis=-1),
    )
