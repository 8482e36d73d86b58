"""Blockwise MultiMax attention on TensorFlow: `tf.custom_gradient`, `tf.while_loop`.

The algorithm is `keras_multimax._blockwise` (in `keras.ops`); this module
adds what TensorFlow needs around it: its loops and the custom gradient.
Arguments arrive validated by `keras_multimax._attention`.

The forward follows `keras_multimax.config.enable_fused_forward`, as
`ops.multimax` does: plain builtin ops by default (`tf.while_loop`s, which
exporters, TF Serving and LiteRT's builtin ``WHILE`` take), one XLA program
with the switch on. The backward is always one XLA program: it adds each block's
``∂L/∂q`` (and ``∂L/∂bias``) into a full-size buffer, which XLA updates in
place (`keras.ops.slice_update`) and TensorFlow's executor would copy at
every block. Gradient graphs only run in TensorFlow, which has XLA's CPU and
GPU compilers; a SavedModel keeps this custom gradient.

The loops run one block at a time (``parallel_iterations=1``): TensorFlow's
executor would otherwise start several blocks together and hold all their
buffers.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from keras_multimax import _blockwise
from keras_multimax import config


class _Primitives:
    """`_blockwise.Primitives`: `tf.while_loop`s.

    ``map_blocks`` stacks its outputs in `tf.TensorArray`s, which XLA writes
    in place (``in_arrays=True``, the XLA programs), or selects each into a
    buffer of all blocks (``False``, the plain-op forward): LiteRT's converter
    lowers `TensorArray`s to builtin ops only if their elements have a static
    shape, i.e. a static batch size. A select per block reads and writes the
    output once more per query block (``T / block`` times in all), a few
    percent of the forward.
    """

    def __init__(self, in_arrays: bool):
        self.in_arrays = in_arrays

    @staticmethod
    def fold(start, stop, body, carry):
        _, carry = tf.while_loop(
            lambda i, _: i < stop,
            lambda i, c: (i + 1, body(i, c)),
            (tf.convert_to_tensor(start), carry),
            parallel_iterations=1,
        )
        return carry

    def map_blocks(self, count, body, carry, like):
        if self.in_arrays:
            stacks = tuple(
                tf.TensorArray(x.dtype, size=count, element_shape=x.shape) for x in like
            )
        else:
            stacks = tuple(
                tf.zeros(tf.concat([[count], tf.shape(x)], 0), x.dtype) for x in like
            )

        def write(i, stack, y):
            if self.in_arrays:
                return stack.write(i, y)
            hit = tf.equal(tf.range(count), i)
            return tf.where(tf.reshape(hit, [-1] + [1] * len(y.shape)), y[None], stack)

        def step(i, c, stacks):
            c, ys = body(i, c)
            return i + 1, c, tuple(write(i, s, y) for s, y in zip(stacks, ys))

        _, carry, stacks = tf.while_loop(
            lambda i, *_: i < count,
            step,
            (tf.constant(0), carry, stacks),
            parallel_iterations=1,
        )
        if self.in_arrays:
            stacks = tuple(s.stack() for s in stacks)
        return carry, stacks

    @staticmethod
    def sum_products(products, axis):
        # One reduction each: XLA fuses each with its product (measured 30 %
        # faster for the backward than one reduction of the stacked products).
        return tf.stack([tf.reduce_sum(p, axis=axis) for p in products])


_PLAIN = _Primitives(in_arrays=False)
_XLA = _Primitives(in_arrays=True)


def _kernel(fn):
    return tf.function(
        functools.partial(fn, prims=_XLA), jit_compile=True, autograph=False
    )


_forward_kernel = _kernel(_blockwise.forward)
_backward_kernel = _kernel(_blockwise.backward)


def multimax_dot_product_attention(query, key, value, bias, mask, ranges, ts, tiling):
    """Blockwise MultiMax attention of validated tensors (see `_attention`)."""
    fused = config.is_fused_forward_enabled()
    # Keras variables (a layer's ranges and ts) are read here, once: a
    # `tf.custom_gradient` that reads a variable inside must differentiate it
    # as a variable, and these are ordinary inputs of the gradient below.
    query, key, value, ranges, ts = (
        tf.convert_to_tensor(x) for x in (query, key, value, ranges, ts)
    )
    if bias is not None:
        bias = tf.convert_to_tensor(bias)

    def run(q, k, v, b, r, t):
        if fused:
            out, lse = _forward_kernel(q, k, v, b, mask, r, t, tiling)
        else:
            out, lse = _blockwise.forward(q, k, v, b, mask, r, t, tiling, _PLAIN)
        # Nothing flows back into the forward loops but through `grad`. In a
        # reloaded SavedModel the log-sum-exp that `grad` reads becomes an
        # output of the forward function, and a `tf.function` that
        # differentiates it after an eager tape did sends that output a zero
        # gradient: TensorFlow would differentiate the loops by autodiff,
        # keeping every block's intermediates (and 0/0 = NaN for rows that
        # see no key).
        out, lse = tf.stop_gradient(out), tf.stop_gradient(lse)

        def grad(d_out):
            grads = _backward_kernel(q, k, v, b, mask, r, t, out, lse, d_out, tiling)
            return [g for g in grads if g is not None]

        return out, grad

    if bias is None:

        @tf.custom_gradient
        def attention(q, k, v, r, t):
            return run(q, k, v, None, r, t)

        return attention(query, key, value, ranges, ts)

    @tf.custom_gradient
    def attention_with_bias(q, k, v, b, r, t):
        return run(q, k, v, b, r, t)

    return attention_with_bias(query, key, value, bias, ranges, ts)
