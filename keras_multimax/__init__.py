"""keras_multimax: MultiMax (Zhou, Fritz & Keuper, ICML 2024) for Keras 3.

Imported with the package (no TensorFlow on JAX, no KerasHub):

- ``ops``: the math, as Keras operations (`ops.multimax`, `ops.seglu`,
  `ops.multimax_cross_entropy`);
- ``layers``: `MultiMax`, `SegLU`, `MultiMaxAttention`,
  `MultiMaxGroupQueryAttention`, `MultiMaxLMHead` (registered serializable);
- `Modulator` (``modulator``): the modulator's configuration, which every
  entry point takes;
- ``convert.to_multimax``: MultiMax in an existing Functional or Sequential
  model (and, with KerasHub installed, a KerasHub model);
- ``models``: ViT, language-model and translator builders;
- ``config``: global switches (the fused TensorFlow forward).

Imported when first used (``keras_multimax.export`` or ``import
keras_multimax.export``), since they need more than Keras:

- ``hub``: MultiMax KerasHub models (needs keras-hub). Saved MultiMax
  KerasHub models load after ``import keras_multimax.hub``;
- ``export``: every deployment format, checked against Keras (SavedModel and
  LiteRT import TensorFlow);
- ``distribute``: strategy choice (``tf.distribute`` on TensorFlow, a
  ``keras.distribution`` on JAX);
- ``analysis``: the paper's attention sparsity and multi-modality, and a
  logger of the modulators;
- ``data``: deprecated alias of ``keras_multimax.toolkit.data`` (it warns;
  removed in 0.4.0).

Backends: TensorFlow and JAX (``keras_multimax/backend/<name>/``).

Not imported here: ``keras_multimax.toolkit``, the examples' input pipelines,
plots and step timer (with heavier dependencies; see its docstring).
"""

import importlib

# First: an unsupported Keras backend (e.g. torch) is named before any import
# of it fails.
from keras_multimax import backend  # noqa: F401  # isort: skip

from keras_multimax import config
from keras_multimax import convert
from keras_multimax import layers
from keras_multimax import models
from keras_multimax import modulator
from keras_multimax import ops
from keras_multimax.modulator import Modulator

__version__ = "0.3.0.dev0"

# Submodules loaded on first access (PEP 562), so that `import keras_multimax`
# loads neither TensorFlow on JAX nor KerasHub.
_LAZY_SUBMODULES = ("analysis", "data", "distribute", "export", "hub")

__all__ = [
    "Modulator",
    "__version__",
    "analysis",
    "config",
    "convert",
    "distribute",
    "export",
    "layers",
    "models",
    "modulator",
    "ops",
]


def __getattr__(name: str):
    # `keras_multimax.data` works without an import, as before 0.3.0: it is
    # the deprecated module, which warns.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
