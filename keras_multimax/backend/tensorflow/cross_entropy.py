"""The fused MultiMax LM-head loss for TensorFlow (`tf.custom_gradient`).

``loss = logsumexp(σ(z)) − σ(z)[label]`` with ``z = hidden·kernel + bias``,
computed over the vocabulary in chunks of ``chunk`` columns; the logits are
never held whole. See `keras_multimax._cross_entropy` for the contract; the
inputs arrive validated, ``hidden`` as ``(tokens, width)`` and ``labels`` as
``(tokens,)``.

Forward: one pass over the chunks keeps a running maximum and sum of
``exp(σ(z))`` per token (an online logsumexp) and picks ``σ(z)[label]``.
Backward: a second pass recomputes each chunk's logits from ``hidden`` and the
saved logsumexp and turns them into the chunk's gradients at once:

    ∂L/∂σ = g·(softmax(σ(z)) − onehot(label)),   ∂L/∂z = ∂L/∂σ · σ'(z)

``∂L/∂hidden`` is summed over the chunks, ``∂L/∂kernel`` and ``∂L/∂bias`` are
written chunk by chunk, ``∂L/∂ranges``/``∂L/∂ts`` are sums over every logit.

Why recompute rather than compute the gradients in the forward (Liger's
fused linear cross-entropy): the output is a per-token loss, whose upstream
gradient (sample weights, masks, a sum or a mean) is only known in the
backward, and ``∂L/∂kernel = Σ_tokens g·hiddenᵀ·∂ℓ/∂z`` needs it inside the
sum. Liger's trick also needs the logsumexp of a token before its gradient,
i.e. the whole vocabulary of a token chunk at once ([tokens_chunk,
vocab_size] buffers), not vocabulary chunks. What it would save is the
forward's share of the work: at [4096 tokens, 256, chunk 1024] one chunk's
forward (its matrix product, 11 ms, and the forward kernel, 5.5 ms) against
its backward (recomputed product, backward kernel of 25-30 ms, two products
of 11 ms), about 22 % of the step, measured on 2 shared cores. The
per-token contract with any upstream was kept; see benchmarks/README.md for
the step against the unfused head.

The chunks run one after another in a `tf.while_loop` with
``parallel_iterations=1``: TensorFlow's executor would otherwise start the
matrix products of independent chunks together and hold all their buffers.
The last, partial chunk (``vocab % chunk`` columns) runs after the loop with its
own static shape, so that the function also compiles with XLA. The
elementwise work of a chunk (σ, its partials, the exponentials and the
reductions over the chunk) is one fused XLA kernel, as in ``ops.py``; the
matrix products are TensorFlow's.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_multimax import _formula

# Inputs in these dtypes are computed in float32 (chunk by chunk for `kernel`).
_UPCAST_DTYPES = (tf.float16, tf.bfloat16)


def _compute_dtype(dtype: tf.DType) -> tf.DType:
    return tf.float32 if dtype in _UPCAST_DTYPES else dtype


def _kernel(fn):
    return tf.function(fn, jit_compile=True, autograph=False)


# The chunk math (`_formula`), each call one fused XLA kernel.
_chunk_forward = _kernel(_formula.cross_entropy_chunk)
_chunk_backward = _kernel(_formula.cross_entropy_chunk_gradients)


def _logits(hidden, kernel, bias, start, size, compute):
    """z = hidden · kernel[:, start:start+size] + bias[start:start+size], float32."""
    width = kernel.shape[0]
    w = tf.cast(tf.slice(kernel, [0, start], [width, size]), compute)
    z = tf.matmul(hidden, w)
    if bias is not None:
        z = z + tf.cast(tf.slice(bias, [start], [size]), compute)[None, :]
    return z, w


def _over_chunks(step, state, vocab: int, chunk: int):
    """Folds ``state = step(state, start, size)`` over the chunks, in order.

    The full chunks run in a `tf.while_loop` (one at a time), the remainder
    after it with its static size.
    """
    full = vocab // chunk
    if full:

        def body(i, *carry):
            return (i + 1, *step(carry, i * chunk, chunk))

        out = tf.while_loop(
            lambda i, *_: i < full,
            body,
            (tf.constant(0), *state),
            parallel_iterations=1,
        )
        state = tuple(out[1:])
    if vocab % chunk:
        state = step(state, full * chunk, vocab % chunk)
    return state


def concrete_values(labels):
    """The labels as a NumPy array when known now (eager), else None (a graph)."""
    return np.asarray(labels) if tf.executing_eagerly() else None


def multimax_cross_entropy(
    hidden, kernel, labels, ranges, ts, bias, chunk, ignore_index
):
    """Per-token loss ``(tokens,)`` in the compute dtype; see the module docstring."""
    hidden = tf.convert_to_tensor(hidden)
    kernel = tf.convert_to_tensor(kernel)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    ranges = tf.convert_to_tensor(ranges)
    ts = tf.convert_to_tensor(ts)
    vocab = int(kernel.shape[1])
    compute = _compute_dtype(hidden.dtype)
    order = ts.shape[-1] // 2

    valid = tf.logical_and(labels >= 0, labels < vocab)
    if ignore_index is None:
        ignored = tf.zeros_like(valid)
    else:
        ignored = tf.equal(labels, ignore_index)
    # Graphs: out-of-range labels (not ignore_index) give NaN loss and gradients.
    weight = tf.where(ignored, 0.0, tf.where(valid, 1.0, np.nan))
    weight = tf.cast(weight, compute)

    def forward(h, w, b, r, t):
        hc = tf.cast(h, compute)
        rc, tc = tf.cast(r, compute), tf.cast(t, compute)
        tokens = tf.shape(hc)[0]

        def step(state, start, size):
            top, total, picked = state
            z, _ = _logits(hc, w, b, start, size, compute)
            c_top, c_total, c_picked = _chunk_forward(z, labels - start, rc, tc)
            top, total, _, _ = _formula.merge_logsumexp(top, total, c_top, c_total)
            return top, total, picked + c_picked

        init = (
            tf.fill([tokens], tf.constant(-np.inf, compute)),
            tf.zeros([tokens], compute),
            tf.zeros([tokens], compute),
        )
        top, total, picked = _over_chunks(step, init, vocab, chunk)
        lse = _formula.finish_logsumexp(top, total)
        loss = tf.where(ignored, tf.zeros_like(lse), (lse - picked) * weight)
        return loss, lse

    def backward(upstream, lse, h, w, b, r, t):
        hc = tf.cast(h, compute)
        rc, tc = tf.cast(r, compute), tf.cast(t, compute)
        g = tf.cast(upstream, compute) * weight
        full = vocab // chunk

        def step(state, start, size):
            d_hidden, sums, d_kernel, d_bias = state
            z, wc = _logits(hc, w, b, start, size, compute)
            dz, db, s = _chunk_backward(z, lse, g, labels - start, rc, tc)
            d_hidden = d_hidden + tf.matmul(dz, wc, transpose_b=True)
            dw = tf.cast(tf.matmul(hc, dz, transpose_a=True), w.dtype)
            if size == chunk and full:  # inside the loop: one slot per chunk
                index = start // chunk
                d_kernel = d_kernel.write(index, dw)
                if b is not None:
                    d_bias = d_bias.write(index, tf.cast(db, b.dtype))
                return d_hidden, sums + s, d_kernel, d_bias
            return d_hidden, sums + s, (d_kernel, dw), (d_bias, db)

        width = w.shape[0]
        slots = tf.TensorArray(w.dtype, size=max(full, 1), element_shape=[width, chunk])
        bias_slots = (
            tf.TensorArray(b.dtype, size=max(full, 1), element_shape=[chunk])
            if b is not None
            else tf.zeros([0])
        )
        tokens = tf.shape(hc)[0]
        per_token = tf.zeros([4 * order, tokens], compute)
        init = (tf.zeros_like(hc), per_token, slots, bias_slots)
        state = _over_chunks(step, init, vocab, chunk)
        d_hidden, sums = state[0], tf.reduce_sum(state[1], axis=1)
        kernel_parts, bias_parts = [], []
        d_kernel, d_bias = state[2], state[3]
        if vocab % chunk:
            (d_kernel, rest_kernel), (d_bias, rest_bias) = d_kernel, d_bias
        if full:
            stacked = tf.transpose(d_kernel.stack(), [1, 0, 2])
            kernel_parts.append(tf.reshape(stacked, [width, full * chunk]))
            if b is not None:
                bias_parts.append(tf.reshape(d_bias.stack(), [full * chunk]))
        if vocab % chunk:
            kernel_parts.append(rest_kernel)
            if b is not None:
                bias_parts.append(tf.cast(rest_bias, b.dtype))
        d_kernel = (
            tf.concat(kernel_parts, axis=1)
            if len(kernel_parts) > 1
            else kernel_parts[0]
        )
        d_ranges, d_ts = _formula.parameter_gradients(sums, tc)
        grads = [tf.cast(d_hidden, h.dtype), d_kernel]
        if b is not None:
            grads.append(
                tf.concat(bias_parts, 0) if len(bias_parts) > 1 else bias_parts[0]
            )
        grads += [tf.cast(d_ranges, r.dtype), tf.cast(d_ts, t.dtype)]
        return grads

    if bias is None:

        @tf.custom_gradient
        def fused(h, w, r, t):
            loss, lse = forward(h, w, None, r, t)
            return loss, lambda dy: backward(dy, lse, h, w, None, r, t)

        return fused(hidden, kernel, ranges, ts)

    bias = tf.convert_to_tensor(bias)

    @tf.custom_gradient
    def fused_bias(h, w, b, r, t):
        loss, lse = forward(h, w, b, r, t)
        return loss, lambda dy: backward(dy, lse, h, w, b, r, t)

    return fused_bias(hidden, kernel, bias, ranges, ts)
