"""What a backend-neutral test cannot write with `keras.ops`: gradients and tracing.

Tests are written once with `keras.ops` and run on every backend; the few
things Keras has no public op for live here, one branch per backend.
"""

from __future__ import annotations

import keras
import numpy as np

BACKEND = keras.backend.backend()


def value_and_gradients(fn, *args):
    """``fn(*args)`` and the gradients of ``sum(fn(*args))`` for each of ``args``.

    ``fn`` returns one tensor (or a scalar loss); the arguments are arrays
    or tensors, and the gradients come back as NumPy arrays in the
    arguments' dtypes. For an upstream gradient other than ones, return
    ``sum(y * upstream)`` from ``fn``.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tensors = [tf.convert_to_tensor(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            value = fn(*tensors)
            total = tf.reduce_sum(value)
        grads = tape.gradient(total, tensors)
        return value, [None if g is None else g.numpy() for g in grads]
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        arrays = [jnp.asarray(a) for a in args]

        def total(*a):
            value = fn(*a)
            return jnp.sum(value), value

        (_, value), grads = jax.value_and_grad(
            total, argnums=tuple(range(len(arrays))), has_aux=True
        )(*arrays)
        return value, [np.asarray(g) for g in grads]
    raise NotImplementedError(f"No gradients for backend {BACKEND!r}")


def traced(fn, xla: bool = False):
    """``fn`` compiled the backend's way: `tf.function` (XLA if asked) or `jax.jit`."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=xla, autograph=False)
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    raise NotImplementedError(f"No tracing for backend {BACKEND!r}")
