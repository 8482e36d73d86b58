"""Model builders with SoftMax or MultiMax attention and output heads.

Each builder is a functional, serializable `keras.Model` subclass taking
``attention="multimax"|"softmax"``, ``head="multimax"|"softmax"`` and a
``modulator``; its outputs are logits (train with a ``from_logits=True``
loss), and ``attention_maps(inputs)`` returns every layer's attention
probabilities (see `keras_multimax.analysis`). To keep the MultiMax
``ranges``/``ts`` out of weight decay, call
`exclude_modulator_from_weight_decay` on the optimizer before ``compile``.
"""

from keras_multimax.models._blocks import NO_DECAY_NAMES
from keras_multimax.models._blocks import PositionEmbedding
from keras_multimax.models._blocks import exclude_modulator_from_weight_decay
from keras_multimax.models._blocks import masked_token_accuracy
from keras_multimax.models.language_model import TransformerLM
from keras_multimax.models.language_model import transformer_lm
from keras_multimax.models.translator import TransformerTranslator
from keras_multimax.models.translator import transformer_translator
from keras_multimax.models.vit import ViTClassifier
from keras_multimax.models.vit import vit_classifier

__all__ = [
    "NO_DECAY_NAMES",
    "PositionEmbedding",
    "TransformerLM",
    "TransformerTranslator",
    "ViTClassifier",
    "exclude_modulator_from_weight_decay",
    "masked_token_accuracy",
    "transformer_lm",
    "transformer_translator",
    "vit_classifier",
]
