"""The error for the Keras backends keras_multimax does not support.

The supported ones (TensorFlow, JAX) import in fresh processes in
tests/test_imports.py.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = str(pathlib.Path(__file__).resolve().parents[1])


def _import_with_backend(backend: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT  # this checkout's keras_multimax
    return subprocess.run(
        [sys.executable, "-c", "import keras_multimax"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.only_backend(
    "tensorflow",
    reason="the child processes choose their own backend: one pytest run is enough",
)
@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_unsupported_backend_is_a_clear_import_error(backend):
    """torch (installed or not: Keras then fails on `import torch`) and numpy."""
    proc = _import_with_backend(backend)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: keras_multimax supports the Keras backends")
    assert "tensorflow, jax" in last and f"backend={backend!r}" in last
