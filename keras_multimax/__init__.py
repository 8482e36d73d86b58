"""keras_multimax: MultiMax (Zhou, Fritz & Keuper, ICML 2024) for Keras 3.

- ``layers``: `MultiMax`, `SegLU`, `MultiMaxAttention`,
  `MultiMaxGroupQueryAttention` (registered serializable).
- ``ops``: the functions the layers call (`ops.multimax`, `ops.seglu`).
- ``convert.to_multimax``: swaps MultiMax into an existing Functional or
  Sequential model, or a KerasHub model; ``hub``: MultiMax KerasHub classes
  and ``from_preset`` (imported with the package when keras-hub is
  installed).
- ``models``: ViT, language-model and translator builders with SoftMax or
  MultiMax; ``analysis``: attention sparsity and multi-modality (the paper's
  metrics) and a parameter logger; ``distribute``: strategy
  choice (TPU > workers > GPUs > CPU) that works with Keras' ``fit``;
  ``export.export_all``: every deployment format, checked against Keras;
  ``config``: global switches (the fused TensorFlow forward).

Backends: TensorFlow and JAX (``keras_multimax/backend/<name>/``).

Not imported here: ``keras_multimax.toolkit``, the examples' input pipelines,
plots and step timer (with heavier dependencies; see its docstring).
"""

import importlib.util

# First: an unsupported Keras backend (e.g. torch) is named before any import
# of it fails.
from keras_multimax import backend  # noqa: F401  # isort: skip

from keras_multimax import analysis
from keras_multimax import config
from keras_multimax import convert
from keras_multimax import distribute
from keras_multimax import export
from keras_multimax import layers
from keras_multimax import models
from keras_multimax import ops

if importlib.util.find_spec("keras_hub") is not None:
    # Registers the MultiMax KerasHub classes, so that saved MultiMax KerasHub
    # models (.keras files, presets) load after `import keras_multimax`.
    from keras_multimax import hub  # noqa: F401

__version__ = "0.2.0"

__all__ = [
    "__version__",
    "analysis",
    "config",
    "convert",
    "distribute",
    "export",
    "layers",
    "models",
    "ops",
]


def __getattr__(name: str):
    # `keras_multimax.data` without importing it first, as before 0.3.0: the
    # deprecated module (it warns; removed in 0.4.0).
    if name == "data":
        return importlib.import_module("keras_multimax.data")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
