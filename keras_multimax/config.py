"""Global switches of keras_multimax, in the spirit of `keras.config`.

Only one so far: whether the TensorFlow forward of `keras_multimax.ops`
outside training steps is the fused XLA kernel
(`enable_fused_forward`), like `keras.config.enable_flash_attention` for
Keras' attention.
"""

from __future__ import annotations

__all__ = [
    "disable_fused_forward",
    "enable_fused_forward",
    "is_fused_forward_enabled",
]

_FUSED_FORWARD = False


def enable_fused_forward() -> None:
    """Runs the TensorFlow forward of MultiMax as one fused XLA kernel everywhere.

    By default, keras_multimax's TensorFlow forward is fused only in training
    steps (under a recording gradient tape); inference (`predict`,
    ``model(x)``) and every exported graph hold the same formula as plain
    builtin ops, which every exporter and runtime accepts. After this call,
    inference graphs traced from then on also use the fused kernel (several
    times faster per op on CPU; ``benchmarks/README.md``), but graphs
    exported while it is on hold XLA-only functions that tf2onnx cannot
    convert and TF Serving on CPU cannot run: call `disable_fused_forward`
    before exporting, or export inside `keras_multimax.ops.plain_ops` (as
    `keras_multimax.export.export_all` does). Graphs already traced keep what
    they were traced with. No effect on JAX, where `jax.jit` fuses the op.

    Example:

    >>> import keras_multimax
    >>> keras_multimax.config.enable_fused_forward()
    >>> keras_multimax.config.is_fused_forward_enabled()
    True
    >>> keras_multimax.config.disable_fused_forward()
    """
    global _FUSED_FORWARD
    _FUSED_FORWARD = True


def disable_fused_forward() -> None:
    """Restores the default: the fused TensorFlow forward in training steps only."""
    global _FUSED_FORWARD
    _FUSED_FORWARD = False


def is_fused_forward_enabled() -> bool:
    """Whether `enable_fused_forward` is in effect."""
    return _FUSED_FORWARD
