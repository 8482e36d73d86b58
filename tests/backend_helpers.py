"""What a backend-neutral test cannot write with `keras.ops`: gradients and tracing.

Tests are written once with `keras.ops` and run on every backend; the few
things Keras has no public op for live here, one branch per backend:
gradients (`value_and_gradients`), compiled functions (`traced`), float64
on JAX (`float64`), and finite differences in NumPy
(`numerical_gradients`), an independent check of every gradient.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np

BACKEND = keras.backend.backend()

# The ways a function runs where the way can matter: eagerly, traced
# (`tf.function` / `jax.jit`), and on TensorFlow traced with the fused
# forward (`config.enable_fused_forward`, the XLA kernel). On JAX only
# traced: there is no fused switch, and eager JAX runs the same custom VJP
# op by op, compiling each op on first use (seconds per new shape on 2
# cores, the largest cost of the JAX run when it was a mode of its own).
MODES = ["eager", "traced", "fused"] if BACKEND == "tensorflow" else ["traced"]
# Where the mode is not what a test is about: one `jax.jit` of the whole
# function is one compilation of the same program.
DEFAULT_MODE = "traced" if BACKEND == "jax" else "eager"


def to_numpy(x) -> np.ndarray:
    """A tensor (or array, or number) as a NumPy array."""
    return np.asarray(keras.ops.convert_to_numpy(x))


@contextlib.contextmanager
def float64():
    """float64 arrays inside the block.

    JAX keeps float32 unless x64 is enabled (`jax.enable_x64` as a context,
    so the rest of the session keeps JAX's float32 default); TensorFlow
    needs nothing. Convert the inputs inside the block.
    """
    if BACKEND == "jax":
        import jax

        with jax.enable_x64(True):
            yield
    else:
        yield


def _total(value, upstream):
    """``sum(value · upstream)``, the upstream in the value's dtype."""
    if upstream is None:
        return keras.ops.sum(value)
    return keras.ops.sum(value * keras.ops.cast(upstream, value.dtype))


def _gradient_function(fn, count: int, upstream=None):
    """``(*tensors) -> (fn(*tensors), [d sum(fn · upstream) / d tensor])``."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def run(*tensors):
            with tf.GradientTape() as tape:
                tape.watch(tensors)
                value = fn(*tensors)
                total = _total(value, upstream)
            return value, tape.gradient(total, list(tensors))

        return run
    if BACKEND == "jax":
        import jax

        def total(*a):
            value = fn(*a)
            return _total(value, upstream), value

        grad = jax.value_and_grad(total, argnums=tuple(range(count)), has_aux=True)

        def run(*arrays):
            (_, value), grads = grad(*arrays)
            return value, list(grads)

        return run
    raise NotImplementedError(f"No gradients for backend {BACKEND!r}")


def value_and_gradients(fn, *args, upstream=None, mode: str = DEFAULT_MODE):
    """``fn(*args)`` and the gradients of ``sum(fn(*args) · upstream)`` for each of ``args``.

    ``fn`` returns one tensor (or a scalar loss); the arguments are arrays
    or tensors, and the gradients come back as NumPy arrays in the
    arguments' dtypes (the value as a tensor). ``upstream`` (default: ones)
    is the gradient flowing into the output, cast to its dtype. ``mode`` is
    one of `MODES`: the computation runs eagerly, `traced`, or traced with
    the fused TensorFlow forward (default: `DEFAULT_MODE`); ``"xla"`` traces
    with XLA (`traced` with ``xla=True``).
    """
    run = _gradient_function(fn, len(args), upstream)
    tensors = [keras.ops.convert_to_tensor(a) for a in args]
    if mode == "eager":
        value, grads = run(*tensors)
    elif mode in ("traced", "xla"):
        value, grads = traced(run, xla=mode == "xla")(*tensors)
    elif mode == "fused":
        from switches import fused_forward

        with fused_forward():
            value, grads = traced(run)(*tensors)
    else:
        raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}")
    return value, [None if g is None else to_numpy(g) for g in grads]


def variable_gradients(fn, variables, upstream=None, mode: str = DEFAULT_MODE):
    """``fn()`` and the gradients of ``sum(fn() · upstream)`` for each of ``variables``.

    ``fn`` takes no argument and reads the Keras variables (a layer or model
    call); their values are passed in through a `keras.StatelessScope`,
    as Keras' own trainers do, so the same code differentiates on every
    backend. Returns the value and NumPy gradients, as `value_and_gradients`.
    """

    def pure(*values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn()

    values = [v.value for v in variables]
    return value_and_gradients(pure, *values, upstream=upstream, mode=mode)


def run_in_mode(fn, *args, mode: str = "eager"):
    """``fn(*args)`` eagerly, `traced`, or traced with the fused forward (`MODES`)."""
    if mode == "eager":
        return fn(*args)
    if mode == "traced":
        return traced(fn)(*args)
    if mode == "fused":
        from switches import fused_forward

        with fused_forward():
            return traced(fn)(*args)
    raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}")


def traced(fn, xla: bool = False):
    """``fn`` compiled the backend's way: `tf.function` (XLA if asked) or `jax.jit`."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=xla, autograph=False)
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    raise NotImplementedError(f"No tracing for backend {BACKEND!r}")


def numerical_gradients(loss, args, delta: float = 1e-6) -> list[np.ndarray]:
    """Central differences of a scalar ``loss(*args)`` in float64 NumPy.

    ``loss`` takes NumPy float64 arrays and returns a number; each entry of
    each argument is moved by ``±delta`` in turn. The error of the estimate
    is ``O(delta²)`` from the third derivative plus ``O(eps · |loss| /
    delta)`` from rounding: about 1e-10 for losses of O(1) and delta 1e-6.
    """
    args = [np.array(a, dtype=np.float64) for a in args]
    grads = []
    for i, a in enumerate(args):
        g = np.zeros_like(a)
        for index in np.ndindex(a.shape):
            moved = [b.copy() for b in args]
            moved[i][index] = a[index] + delta
            up = float(loss(*moved))
            moved[i][index] = a[index] - delta
            down = float(loss(*moved))
            g[index] = (up - down) / (2 * delta)
        grads.append(g)
    return grads
