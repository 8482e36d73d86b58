"""keras_multimax: MultiMax (Zhou, Fritz & Keuper, ICML 2024) for Keras 3.

- ``layers``: `MultiMax`, `SegLU`, `MultiMaxAttention`,
  `MultiMaxGroupQueryAttention` (registered serializable).
- ``ops``: the functions the layers call (`ops.multimax`, `ops.seglu`).
- ``convert.to_multimax``: swaps MultiMax into an existing Functional or
  Sequential model.
- ``models``: ViT, language-model and translator builders with SoftMax or
  MultiMax; ``data``: their input pipelines; ``analysis``: attention sparsity,
  multi-modality, a parameter logger and plots; ``distribute``: strategy
  choice (TPU > workers > GPUs > CPU) that works with Keras' ``fit``;
  ``export.export_all``: every deployment format, checked against Keras;
  ``config``: global switches (the fused TensorFlow forward).

Backends: TensorFlow and JAX (``keras_multimax/backend/<name>/``).
"""

# First: an unsupported Keras backend (e.g. torch) is named before any import
# of it fails.
from keras_multimax import backend  # isort: skip

from keras_multimax import analysis
from keras_multimax import config
from keras_multimax import convert
from keras_multimax import data
from keras_multimax import distribute
from keras_multimax import export
from keras_multimax import layers
from keras_multimax import models
from keras_multimax import ops

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "analysis",
    "backend",
    "config",
    "convert",
    "data",
    "distribute",
    "export",
    "layers",
    "models",
    "ops",
]
