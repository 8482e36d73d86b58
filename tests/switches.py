"""The keras_multimax switches, set for the length of a `with` block (tests only)."""

import contextlib

from keras_multimax import config


@contextlib.contextmanager
def fused_forward(enabled: bool = True):
    """The fused TensorFlow forward on (or off) inside the block, restored after."""
    if not enabled:
        with config.plain_forward():
            yield
        return
    was_enabled = config.is_fused_forward_enabled()
    config.enable_fused_forward()
    try:
        yield
    finally:
        if not was_enabled:
            config.disable_fused_forward()
