"""keras_multimax's backends, side by side as in ``keras/src/backend/<name>/``.

Each backend package holds the same modules (``multimax``: the custom
gradients of `keras_multimax.ops`), and `load_backend_module` picks the one
of Keras' current backend. PyTorch is not supported.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

SUPPORTED_BACKENDS = ("tensorflow", "jax")


def _unsupported(name: str) -> ImportError:
    return ImportError(
        f"keras_multimax supports the Keras backends {', '.join(SUPPORTED_BACKENDS)}. "
        f"Received: backend={name!r} (from the KERAS_BACKEND environment variable "
        "or ~/.keras/keras.json). Set KERAS_BACKEND=tensorflow or "
        "KERAS_BACKEND=jax before importing Keras."
    )


try:
    import keras
except ImportError as error:
    # Keras imports its backend's framework when it is imported (torch for
    # KERAS_BACKEND=torch): if that is a backend we do not support anyway,
    # say so instead of naming the missing framework.
    _config = sys.modules.get("keras.src.backend.config")
    _requested = _config.backend() if _config is not None else None
    if _requested is not None and _requested not in SUPPORTED_BACKENDS:
        raise _unsupported(_requested) from error
    raise


def backend_name() -> str:
    """Keras' current backend, checked to be one keras_multimax supports."""
    name = keras.backend.backend()
    if name not in SUPPORTED_BACKENDS:
        raise _unsupported(name)
    return name


def load_backend_module(module: str) -> ModuleType:
    """``keras_multimax.backend.<current backend>.<module>``."""
    return importlib.import_module(f"keras_multimax.backend.{backend_name()}.{module}")
