"""Global switches of keras_multimax, in the spirit of `keras.config`.

Only one so far: whether the TensorFlow forward of `keras_multimax.ops` is
one fused XLA kernel (`enable_fused_forward`), like
`keras.config.enable_flash_attention` for Keras' attention. Like Keras'
switches, it is kept in Keras' global state, which is per thread: set it in
the thread that traces or calls the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# No public route: Keras keeps its own switches (`keras.config.
# enable_flash_attention`, the dtype policy) in this module, per thread.
from keras.src.backend.common import global_state

__all__ = [
    "disable_fused_forward",
    "enable_fused_forward",
    "is_fused_forward_enabled",
    "plain_forward",
]

_FUSED_FORWARD = "keras_multimax_fused_forward"


def enable_fused_forward() -> None:
    """Runs the TensorFlow forward of MultiMax as one fused XLA kernel.

    By default the TensorFlow forward of `keras_multimax.ops.multimax` and
    `seglu` is the formula as plain builtin ops, in training and inference
    alike, which every exporter and runtime accepts (the backward is always
    fused XLA kernels). Graphs traced after this call hold a nested
    ``tf.function(jit_compile=True)`` instead: faster when the step itself is
    not compiled by XLA (``jit_compile=False``; Keras' default,
    ``jit_compile="auto"``, compiles the whole step, and then both are the
    same program: ``benchmarks/README.md``). But such graphs hold XLA-only
    functions that tf2onnx cannot convert and TF Serving on CPU cannot run:
    export with the switch off (`keras_multimax.export.export_all` turns it
    off while it traces). Graphs already traced keep what they were traced
    with. No effect on JAX, where `jax.jit` compiles the whole program.

    The switch is per thread, as Keras' own (`keras.config`).

    Example:

    >>> import keras_multimax
    >>> keras_multimax.config.enable_fused_forward()
    >>> keras_multimax.config.is_fused_forward_enabled()
    True
    >>> keras_multimax.config.disable_fused_forward()
    """
    global_state.set_global_attribute(_FUSED_FORWARD, True)


def disable_fused_forward() -> None:
    """Restores the default: the TensorFlow forward as plain builtin ops."""
    global_state.set_global_attribute(_FUSED_FORWARD, False)


def is_fused_forward_enabled() -> bool:
    """Whether `enable_fused_forward` is in effect in this thread."""
    return bool(global_state.get_global_attribute(_FUSED_FORWARD, False))


@contextlib.contextmanager
def plain_forward() -> Iterator[None]:
    """The plain-op TensorFlow forward inside this block, whatever the switch says.

    For code that traces graphs to export while `enable_fused_forward` may be
    on: the switch is turned off in this thread for the block and restored
    after (`keras_multimax.export.export_all` traces inside it).

    Example:

    >>> import keras_multimax
    >>> keras_multimax.config.enable_fused_forward()
    >>> with keras_multimax.config.plain_forward():
    ...     keras_multimax.config.is_fused_forward_enabled()
    False
    >>> keras_multimax.config.is_fused_forward_enabled()
    True
    >>> keras_multimax.config.disable_fused_forward()
    """
    was_enabled = is_fused_forward_enabled()
    disable_fused_forward()
    try:
        yield
    finally:
        if was_enabled:
            enable_fused_forward()
