"""Keras layers of keras_multimax."""

from keras_multimax.layers.multimax import MultiMax
from keras_multimax.layers.multimax_attention import MultiMaxAttention
from keras_multimax.layers.multimax_attention import use_blockwise_attention
from keras_multimax.layers.multimax_group_query_attention import (
    MultiMaxGroupQueryAttention,
)
from keras_multimax.layers.multimax_lm_head import MultiMaxLMHead
from keras_multimax.layers.seglu import SegLU

__all__ = [
    "MultiMax",
    "MultiMaxAttention",
    "MultiMaxGroupQueryAttention",
    "MultiMaxLMHead",
    "SegLU",
    "use_blockwise_attention",
]
