"""keras_multimax: MultiMax (Zhou, Fritz & Keuper, ICML 2024) for Keras 3.

``from keras_multimax import layers`` gives the Keras layers, ``ops`` the
functions they call (`ops.multimax`, `ops.seglu`), ``convert.to_multimax``
swaps MultiMax into an existing Functional or Sequential model.
"""

from keras_multimax import convert
from keras_multimax import layers
from keras_multimax import ops

__version__ = "0.1.0"

__all__ = ["__version__", "convert", "layers", "ops"]
