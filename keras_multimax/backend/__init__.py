"""keras_multimax's backends, side by side as in ``keras/src/backend/<name>/``.

Each backend package holds the same modules (``multimax``: the custom
gradients of `keras_multimax.ops.multimax`/`seglu`; ``cross_entropy``: the
fused LM-head loss), and `load_backend_module` picks the one
of Keras' current backend. PyTorch is not supported.
"""

from __future__ import annotations

import importlib
import json
import os
from types import ModuleType

SUPPORTED_BACKENDS = ("tensorflow", "jax")


def _unsupported(name: str) -> ImportError:
    return ImportError(
        f"keras_multimax supports the Keras backends {', '.join(SUPPORTED_BACKENDS)}. "
        f"Received: backend={name!r} (from the KERAS_BACKEND environment variable "
        "or ~/.keras/keras.json). Set KERAS_BACKEND=tensorflow or "
        "KERAS_BACKEND=jax before importing Keras."
    )


def _requested_backend() -> str | None:
    """The backend Keras is asked for, read as Keras reads it, without Keras.

    ``KERAS_BACKEND``, else the ``backend`` of ``$KERAS_HOME/keras.json``
    (default ``~/.keras``); None if neither says.
    """
    if "KERAS_BACKEND" in os.environ:
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend")
    except (OSError, ValueError):
        return None


try:
    import keras
except ImportError as error:
    # Keras imports its backend's framework when it is imported (torch for
    # KERAS_BACKEND=torch): if that is a backend we do not support anyway,
    # say so instead of naming the missing framework.
    _requested = _requested_backend()
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
