"""MultiMax in KerasHub models: twins of KerasHub's attention, models, presets.

How it works, in three explicit pieces:

1. **Attention twins.** For each KerasHub attention class it supports,
   keras_multimax defines a subclass (``keras_multimax/hub/_twins.py``) that
   overrides where the class normalises its scores (``_compute_attention``,
   as KerasHub's own families do) so that its weights are MultiMax, and
   registers it (`register_attention`). `multimax_twin` builds the twin of a
   built layer from its config, with its weights, LoRA and quantization.
2. **Model classes.** Each supported Backbone and Task class has a MultiMax
   subclass (``keras_multimax/hub/_families.py``, `register_model`,
   registered with Keras as ``keras_multimax>MultiMax<Name>``): the backbone
   builds the original architecture, then puts the twin of every attention
   layer where the layer was, in the block that holds it; its config adds
   ``modulator`` and ``per_head``.
3. **Conversion and loading.** `keras_multimax.convert.to_multimax` builds
   the MultiMax class from the original's config and copies its weights,
   LoRA adapters and quantization; `from_preset` loads any KerasHub preset
   that way. A saved MultiMax model (``.keras`` file or preset) names its
   MultiMax class, which exists after ``import keras_multimax.hub``: that one
   import, before ``keras.saving.load_model`` or KerasHub's ``from_preset``,
   is all a fresh process needs.

Needs the ``keras-hub`` extra (``pip install "keras-multimax[keras-hub]"``);
``import keras_multimax`` does not import it.
"""

import importlib.util

if importlib.util.find_spec("keras_hub") is None:
    raise ImportError(
        "keras_multimax.hub needs KerasHub. Install the extra: "
        'pip install -e ".[keras-hub]" in a checkout, or '
        'pip install "keras-multimax[keras-hub]".'
    )

from keras_multimax.hub import _families  # noqa: E402, F401  # registers the models
from keras_multimax.hub import _twins  # noqa: E402, F401  # registers the twins
from keras_multimax.hub._attention import AttentionMultiMax  # noqa: E402
from keras_multimax.hub._attention import MultiHeadAttentionTwin  # noqa: E402
from keras_multimax.hub._attention import MultiMaxTwin  # noqa: E402
from keras_multimax.hub._attention import SoftmaxSublayerTwin  # noqa: E402
from keras_multimax.hub._attention import attention_twin  # noqa: E402
from keras_multimax.hub._attention import multimax_twin  # noqa: E402
from keras_multimax.hub._attention import register_attention  # noqa: E402
from keras_multimax.hub._models import MultiMaxBackbone  # noqa: E402
from keras_multimax.hub._models import is_multimax  # noqa: E402
from keras_multimax.hub._models import multimax_class  # noqa: E402
from keras_multimax.hub._models import register_model  # noqa: E402
from keras_multimax.hub._preset import from_preset  # noqa: E402

__all__ = [
    "AttentionMultiMax",
    "MultiHeadAttentionTwin",
    "MultiMaxBackbone",
    "MultiMaxTwin",
    "SoftmaxSublayerTwin",
    "attention_twin",
    "from_preset",
    "is_multimax",
    "multimax_class",
    "multimax_twin",
    "register_attention",
    "register_model",
]
