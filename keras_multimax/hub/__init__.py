"""MultiMax in KerasHub models: convert, generate, save and load presets.

`keras_multimax.convert.to_multimax` takes KerasHub Backbone and Task models
(``CausalLM``, ``TextClassifier``, ``ImageClassifier``, ``Seq2SeqLM``...) and
returns an instance of a registered MultiMax subclass of the model's class
(``MultiMaxGPT2CausalLM`` for a ``GPT2CausalLM``), with the same weights and
preprocessor and MultiMax in every attention layer; `from_preset` loads any
KerasHub preset straight into such a model. Generation (``generate()``,
``call_with_cache``), ``.keras`` files, presets, LoRA and quantization keep
working. See `keras_multimax.hub._layers` for the attention layers reached.

Needs the ``keras-hub`` extra (``pip install "keras-multimax[keras-hub]"``).
`keras_multimax` imports this module itself when keras-hub is installed, so
that saved MultiMax KerasHub models load after ``import keras_multimax``.
"""

import importlib.util

if importlib.util.find_spec("keras_hub") is None:
    raise ImportError(
        "keras_multimax.hub needs KerasHub. Install the extra: "
        'pip install -e ".[keras-hub]" in a checkout, or '
        'pip install "keras-multimax[keras-hub]".'
    )

from keras_multimax.hub._layers import AttentionMultiMax  # noqa: E402
from keras_multimax.hub._models import MultiMaxBackbone  # noqa: E402
from keras_multimax.hub._models import is_multimax  # noqa: E402
from keras_multimax.hub._models import multimax_class  # noqa: E402
from keras_multimax.hub._models import register_keras_hub_classes  # noqa: E402
from keras_multimax.hub._preset import from_preset  # noqa: E402

register_keras_hub_classes()

__all__ = [
    "AttentionMultiMax",
    "MultiMaxBackbone",
    "from_preset",
    "is_multimax",
    "multimax_class",
]
