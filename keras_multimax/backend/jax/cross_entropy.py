"""The fused MultiMax LM-head loss for JAX (`jax.custom_vjp`).

The same algorithm as ``backend/tensorflow/cross_entropy.py`` (see there):
a forward pass over the vocabulary chunks with an online logsumexp, and a
backward pass that recomputes each chunk's logits from ``hidden`` and the
saved logsumexp. The full chunks run in `jax.lax.fori_loop`/`jax.lax.scan`
(sequential by construction), the partial last chunk after them with its
static shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from keras_multimax import _formula


def _compute_dtype(dtype):
    dtype = jnp.dtype(dtype)
    return jnp.float32 if dtype in (jnp.float16, jnp.bfloat16) else dtype


# The chunk math, written once for both backends (traced under `jax.jit`).
_chunk_forward = _formula.cross_entropy_chunk
_chunk_backward = _formula.cross_entropy_chunk_gradients


def _logits(hidden, kernel, bias, start, size, compute):
    w = jax.lax.dynamic_slice_in_dim(kernel, start, size, axis=1).astype(compute)
    z = hidden @ w
    if bias is not None:
        z = z + jax.lax.dynamic_slice_in_dim(bias, start, size).astype(compute)[None, :]
    return z, w


def concrete_values(labels):
    """The labels as a NumPy array when known now, else None (traced by jit)."""
    return None if isinstance(labels, jax.core.Tracer) else np.asarray(labels)


def _weights(labels, vocab, ignore_index, compute):
    """1 for tokens that count, 0 for ignored ones, NaN for out-of-range labels."""
    valid = (labels >= 0) & (labels < vocab)
    ignored = jnp.zeros_like(valid) if ignore_index is None else labels == ignore_index
    weight = jnp.where(ignored, 0.0, jnp.where(valid, 1.0, jnp.nan)).astype(compute)
    return weight, ignored


def _forward(h, w, b, r, t, labels, chunk, ignore_index):
    compute = _compute_dtype(h.dtype)
    vocab = w.shape[1]
    hc, rc, tc = h.astype(compute), r.astype(compute), t.astype(compute)
    weight, ignored = _weights(labels, vocab, ignore_index, compute)

    def step(state, start, size):
        top, total, picked = state
        z, _ = _logits(hc, w, b, start, size, compute)
        c_top, c_total, c_picked = _chunk_forward(z, labels - start, rc, tc)
        top, total, _, _ = _formula.merge_logsumexp(top, total, c_top, c_total)
        return top, total, picked + c_picked

    tokens = hc.shape[0]
    state = (
        jnp.full((tokens,), -jnp.inf, compute),
        jnp.zeros((tokens,), compute),
        jnp.zeros((tokens,), compute),
    )
    full = vocab // chunk
    if full:
        state = jax.lax.fori_loop(
            0, full, lambda i, s: step(s, i * chunk, chunk), state
        )
    if vocab % chunk:
        state = step(state, full * chunk, vocab % chunk)
    top, total, picked = state
    lse = _formula.finish_logsumexp(top, total)
    loss = jnp.where(ignored, 0.0, (lse - picked) * weight).astype(compute)
    return loss, lse


def _backward(upstream, lse, h, w, b, r, t, labels, chunk, ignore_index):
    compute = _compute_dtype(h.dtype)
    vocab, width = w.shape[1], w.shape[0]
    order = t.shape[-1] // 2
    hc, rc, tc = h.astype(compute), r.astype(compute), t.astype(compute)
    weight, _ = _weights(labels, vocab, ignore_index, compute)
    g = upstream.astype(compute) * weight

    def step(carry, start, size):
        d_hidden, sums = carry
        z, wc = _logits(hc, w, b, start, size, compute)
        dz, db, s = _chunk_backward(z, lse, g, labels - start, rc, tc)
        d_hidden = d_hidden + dz @ wc.T
        dw = (hc.T @ dz).astype(w.dtype)
        return (d_hidden, sums + s), (dw, db)

    carry = (jnp.zeros_like(hc), jnp.zeros((4 * order, hc.shape[0]), compute))
    kernel_parts, bias_parts = [], []
    full = vocab // chunk
    if full:
        carry, (dws, dbs) = jax.lax.scan(
            lambda c, i: step(c, i * chunk, chunk), carry, jnp.arange(full)
        )
        kernel_parts.append(jnp.transpose(dws, (1, 0, 2)).reshape(width, full * chunk))
        bias_parts.append(dbs.reshape(full * chunk))
    if vocab % chunk:
        carry, (dw, db) = step(carry, full * chunk, vocab % chunk)
        kernel_parts.append(dw)
        bias_parts.append(db)
    d_hidden, sums = carry[0], jnp.sum(carry[1], axis=1)
    d_ranges, d_ts = _formula.parameter_gradients(sums, tc)
    d_kernel = jnp.concatenate(kernel_parts, axis=1)
    d_bias = None if b is None else jnp.concatenate(bias_parts).astype(b.dtype)
    return (
        d_hidden.astype(h.dtype),
        d_kernel,
        d_bias,
        d_ranges.astype(r.dtype),
        d_ts.astype(t.dtype),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _fused(h, w, b, r, t, labels, chunk, ignore_index):
    return _forward(h, w, b, r, t, labels, chunk, ignore_index)[0]


def _fused_fwd(h, w, b, r, t, labels, chunk, ignore_index):
    loss, lse = _forward(h, w, b, r, t, labels, chunk, ignore_index)
    return loss, (lse, h, w, b, r, t, labels)


def _fused_bwd(chunk, ignore_index, saved, upstream):
    lse, h, w, b, r, t, labels = saved
    grads = _backward(upstream, lse, h, w, b, r, t, labels, chunk, ignore_index)
    return (*grads, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def multimax_cross_entropy(
    hidden, kernel, labels, ranges, ts, bias, chunk, ignore_index
):
    """Per-token loss ``(tokens,)`` in the compute dtype; see the module docstring."""
    hidden, kernel = jnp.asarray(hidden), jnp.asarray(kernel)
    ranges, ts = jnp.asarray(ranges), jnp.asarray(ts)
    labels = jnp.asarray(labels).astype(jnp.int32)
    if bias is not None:
        bias = jnp.asarray(bias)
    return _fused(hidden, kernel, bias, ranges, ts, labels, chunk, ignore_index)
