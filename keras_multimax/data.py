"""Deprecated: moved to `keras_multimax.toolkit.data`; removed in 0.4.0.

Importing this module warns (`DeprecationWarning`) and re-exports the names
of `keras_multimax.toolkit.data`, the examples' input pipelines, which are no
longer part of the library (see `keras_multimax.toolkit`).
"""

import warnings

from keras_multimax.toolkit.data import *  # noqa: F403
from keras_multimax.toolkit.data import END_ID  # noqa: F401
from keras_multimax.toolkit.data import PAD_ID  # noqa: F401
from keras_multimax.toolkit.data import START_ID  # noqa: F401
from keras_multimax.toolkit.data import UNK_ID  # noqa: F401
from keras_multimax.toolkit.data import __all__  # noqa: F401

warnings.warn(
    "`keras_multimax.data` moved to `keras_multimax.toolkit.data`; the old "
    "module will be removed in 0.4.0.",
    DeprecationWarning,
    stacklevel=2,
)
