"""The MultiMax twins of the KerasHub 0.32 attention classes (`register_attention`).

One class per KerasHub attention implementation, each overriding what that
class normalises its scores with (see `keras_multimax.hub._attention`):

| KerasHub class | families | twin's normalisation |
|---|---|---|
| ``keras.layers.MultiHeadAttention`` | BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA, ViT, DeiT, DINOv2, BART encoder | MultiMaxAttention's ``_compute_attention`` |
| ``CachedMultiHeadAttention`` | GPT-2, OPT, BART decoder | the same, cache of `CachedAttention` |
| ``WhisperCachedMultiHeadAttention`` | Whisper | the same, cache of `CachedAttention` |
| ``TwoStreamRelativeAttention`` | XLNet | MultiMaxAttention's ``_masked_softmax`` |
| ``LlamaAttention``, ``CachedMistralAttention``, ``CachedMixtralAttention``, ``QwenAttention``, ``Qwen3Attention``, ``Phi3Attention`` | Llama, Llama 3, Mistral, Mixtral, Qwen, Qwen3, Phi-3 | ``_compute_attention`` of `_RotaryAttentionTwin` |
| ``CachedGemmaAttention``, ``CachedGemma3Attention`` | Gemma, Gemma 3 | ``_compute_attention`` of `_GemmaTwin` |
| ``GPTNeoXAttention`` | GPT-NeoX | ``_compute_attention`` below |
| ``FalconAttention``, ``BloomAttention``, ``DisentangledSelfAttention`` | Falcon, Bloom, DeBERTa-v3 | their own code, which calls the ``Softmax`` sublayer (no fused branch) |

The ``_compute_attention`` overrides are KerasHub's own non-fused branch
with the ``Softmax`` sublayer replaced by `AttentionMultiMax`
(``self.multimax``): the fused ``ops.dot_product_attention`` branch, which
KerasHub takes on JAX and torch GPUs/TPUs, is a SoftMax kernel.
"""

from __future__ import annotations

import numpy as np
from keras import layers
from keras import ops
from keras_hub.layers import CachedMultiHeadAttention

# Private modules: KerasHub exports its family attention classes nowhere
# public (`keras_hub.layers` has `CachedMultiHeadAttention` alone), and a twin
# must subclass the class itself.
from keras_hub.src.models.bloom.bloom_attention import BloomAttention
from keras_hub.src.models.deberta_v3.disentangled_self_attention import (
    DisentangledSelfAttention,
)
from keras_hub.src.models.falcon.falcon_attention import FalconAttention
from keras_hub.src.models.gemma.gemma_attention import CachedGemmaAttention
from keras_hub.src.models.gemma3.gemma3_attention import CachedGemma3Attention
from keras_hub.src.models.gpt_neo_x.gpt_neo_x_attention import GPTNeoXAttention
from keras_hub.src.models.llama.llama_attention import LlamaAttention
from keras_hub.src.models.mistral.mistral_attention import CachedMistralAttention
from keras_hub.src.models.mixtral.mixtral_attention import CachedMixtralAttention
from keras_hub.src.models.phi3.phi3_attention import Phi3Attention
from keras_hub.src.models.qwen.qwen_attention import QwenAttention
from keras_hub.src.models.qwen3.qwen3_attention import Qwen3Attention
from keras_hub.src.models.whisper.whisper_cached_multi_head_attention import (
    WhisperCachedMultiHeadAttention,
)
from keras_hub.src.models.xlnet.relative_attention import TwoStreamRelativeAttention

from keras_multimax.hub._attention import MultiHeadAttentionTwin
from keras_multimax.hub._attention import SoftmaxSublayerTwin
from keras_multimax.hub._attention import register_attention
from keras_multimax.layers.multimax_attention import MultiMaxAttention
from keras_multimax.models._cached_attention import CachedAttention

# -- MultiHeadAttention and its KerasHub subclasses -------------------------


class MultiMaxMultiHeadAttention(
    MultiHeadAttentionTwin, MultiMaxAttention, layers.MultiHeadAttention
):
    """`keras.layers.MultiHeadAttention` of a KerasHub model, with MultiMax."""


class MultiMaxCachedMultiHeadAttention(
    MultiHeadAttentionTwin,
    CachedAttention,
    MultiMaxAttention,
    CachedMultiHeadAttention,
):
    """KerasHub's ``CachedMultiHeadAttention`` with MultiMax, cached or not."""


class MultiMaxWhisperCachedMultiHeadAttention(
    MultiHeadAttentionTwin,
    CachedAttention,
    MultiMaxAttention,
    WhisperCachedMultiHeadAttention,
):
    """Whisper's cached attention (no key bias) with MultiMax."""


class MultiMaxTwoStreamRelativeAttention(
    MultiHeadAttentionTwin, MultiMaxAttention, TwoStreamRelativeAttention
):
    """XLNet's relative attention, whose ``compute_attention`` normalises
    through ``_masked_softmax``: MultiMaxAttention's."""

    def build(self, content_stream_shape):
        # XLNet's build (one stream's shape), not MultiMaxAttention's
        # (query, value and key shapes), then the modulator.
        TwoStreamRelativeAttention.build(self, content_stream_shape)
        self._build_attention_modulator(self._num_heads)


# -- Layers with a Softmax sublayer ----------------------------------------


def _same_names(*names: str) -> dict:
    """`MultiMaxTwin.constructor_arguments` stored under their own names."""
    return {name: name for name in names}


class _RotaryAttentionTwin(SoftmaxSublayerTwin):
    """``_compute_attention`` of the Llama-style layers, always with MultiMax.

    Scores ``(B, heads, T, S)`` from queries and (repeated) keys
    ``(B, T|S, heads, head_dim)``, scaled by ``_inv_norm_factor``; mask
    ``(B, T, S)``. Block by block (`ops.multimax_dot_product_attention`)
    where Keras' flash switch and the size of the scores say so
    (`SoftmaxSublayerTwin._use_blockwise`), materialised otherwise.
    """

    def _windowed_mask(self, attention_mask, cache_update_index):
        return attention_mask

    def _compute_attention(
        self, query, key, value, attention_mask=None, cache_update_index=None
    ):
        attention_mask = self._windowed_mask(attention_mask, cache_update_index)
        batch, queries, heads, _ = query.shape
        if self._use_blockwise((batch, heads, queries, key.shape[1])):
            return self._blockwise_attention(
                query, key, value, attention_mask, self._inv_norm_factor
            )
        scores = ops.einsum("bquh,bkuh->buqk", query, key)
        scores = ops.multiply(
            scores, ops.cast(self._inv_norm_factor, self.compute_dtype)
        )
        if attention_mask is not None:
            attention_mask = attention_mask[:, None, :, :]
        weights = ops.cast(self.multimax(scores, attention_mask), self.compute_dtype)
        return ops.einsum("buqk,bkuh->bquh", weights, value)


class MultiMaxLlamaAttention(_RotaryAttentionTwin, LlamaAttention):
    """Llama's (and Llama 3's) attention with MultiMax."""

    # KerasHub 0.32's `LlamaAttention.get_config` reads an attribute that
    # `__init__` never sets (`rope_scaling_factor`).
    constructor_arguments = _same_names(
        "num_query_heads",
        "num_key_value_heads",
        "rope_max_wavelength",
        "rope_position_scaling_factor",
        "rope_frequency_adjustment_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "rope_pretraining_sequence_length",
        "kernel_initializer",
        "dropout",
    )


class MultiMaxCachedMistralAttention(_RotaryAttentionTwin, CachedMistralAttention):
    """Mistral's attention with MultiMax."""

    heads_attribute = "_num_query_heads"


class MultiMaxCachedMixtralAttention(_RotaryAttentionTwin, CachedMixtralAttention):
    """Mixtral's attention with MultiMax."""

    softmax_attribute = "softmax"


class MultiMaxPhi3Attention(_RotaryAttentionTwin, Phi3Attention):
    """Phi-3's attention with MultiMax."""

    softmax_attribute = "softmax"


class MultiMaxQwenAttention(_RotaryAttentionTwin, QwenAttention):
    """Qwen's attention with MultiMax (and its optional sliding window)."""

    def _windowed_mask(self, attention_mask, cache_update_index):
        if not self.use_sliding_window_attention:
            return attention_mask
        return self._mask_sliding_window(
            attention_mask, cache_update_index=cache_update_index or 0
        )


class MultiMaxQwen3Attention(_RotaryAttentionTwin, Qwen3Attention):
    """Qwen3's attention with MultiMax (and its optional sliding window)."""

    # KerasHub 0.32's `Qwen3Attention.get_config` leaves out `head_dim` and
    # `layer_norm_epsilon`.
    constructor_arguments = _same_names(
        "num_query_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_max_wavelength",
        "rope_scaling_factor",
        "kernel_initializer",
        "dropout",
        "layer_norm_epsilon",
        "sliding_window_size",
    )

    def _windowed_mask(self, attention_mask, cache_update_index):
        if not self.sliding_window_size:
            return attention_mask
        index = 0 if cache_update_index is None else cache_update_index
        return self._mask_sliding_window(attention_mask, cache_update_index=index)


class _GemmaTwin(SoftmaxSublayerTwin):
    """``_compute_attention`` of Gemma and Gemma 3, always with MultiMax.

    Grouped scores ``(B, kv_heads, groups, T, S)``, optionally soft-capped;
    per-head modulators lie over ``kv_heads × groups`` (the query heads).
    Without a soft cap, block by block where Keras' flash switch and the size
    of the scores say so, reading each key/value head once for its group.
    """

    softmax_attribute = "softmax"

    def _compute_attention(
        self, q, k, v, attention_mask, training=False, cache_update_index=0
    ):
        if self.query_head_dim_normalize:
            query_normalization = 1 / np.sqrt(self.head_dim)
        else:
            query_normalization = 1 / np.sqrt(self.hidden_dim // self.num_query_heads)
        if self.use_sliding_window_attention and attention_mask is not None:
            attention_mask = self._mask_sliding_window(
                attention_mask, cache_update_index=cache_update_index
            )
        q *= ops.cast(query_normalization, dtype=q.dtype)
        scores_shape = (q.shape[0], self.num_query_heads, q.shape[1], k.shape[1])
        # The soft cap (Gemma 2) is applied between the scores and MultiMax:
        # the blockwise op has no place for it.
        if self.logit_soft_cap is None and self._use_blockwise(
            scores_shape, self.dropout if training else 0.0
        ):
            return self._blockwise_attention(q, k, v, attention_mask, 1.0)
        q_shape = ops.shape(q)
        groups = self.num_query_heads // self.num_key_value_heads
        q = ops.reshape(
            q, (*q_shape[:-2], self.num_key_value_heads, groups, q_shape[-1])
        )
        b, q_len, _, _, h = ops.shape(q)
        logits = ops.einsum("btkgh,bskh->bkgts", q, k)
        if self.logit_soft_cap is not None:
            logits = ops.divide(logits, self.logit_soft_cap)
            logits = ops.multiply(ops.tanh(logits), self.logit_soft_cap)
        if attention_mask is not None:
            attention_mask = attention_mask[:, None, None, :, :]
        weights = ops.cast(self.multimax(logits, mask=attention_mask), logits.dtype)
        if self.dropout:
            weights = self.dropout_layer(weights, training=training)
        results = ops.einsum("bkgts,bskh->btkgh", weights, v)
        return ops.reshape(results, (b, q_len, self.num_query_heads, h))


# KerasHub 0.32's Gemma attention classes have no `get_config`.
_GEMMA_ARGUMENTS = {
    **_same_names(
        "head_dim",
        "num_query_heads",
        "num_key_value_heads",
        "logit_soft_cap",
        "use_sliding_window_attention",
        "sliding_window_size",
        "query_head_dim_normalize",
        "dropout",
    ),
    "kernel_initializer": "_kernel_initializer",
}


class MultiMaxCachedGemmaAttention(_GemmaTwin, CachedGemmaAttention):
    """Gemma's (and Gemma 2's) attention with MultiMax."""

    constructor_arguments = _GEMMA_ARGUMENTS


class MultiMaxCachedGemma3Attention(_GemmaTwin, CachedGemma3Attention):
    """Gemma 3's attention with MultiMax."""

    constructor_arguments = {
        **_GEMMA_ARGUMENTS,
        **_same_names(
            "use_query_key_norm",
            "layer_norm_epsilon",
            "rope_wavelength",
            "rope_scaling_factor",
            "use_bidirectional_attention",
        ),
    }


class MultiMaxGPTNeoXAttention(SoftmaxSublayerTwin, GPTNeoXAttention):
    """GPT-NeoX's attention with MultiMax."""

    heads_attribute = "num_heads"

    def _compute_attention(self, query, key, value, attention_mask=None, training=None):
        scores = ops.einsum("aecd,abcd->acbe", key, query)
        scores = ops.multiply(
            scores, ops.cast(self._inv_norm_factor, self.compute_dtype)
        )
        if attention_mask is not None:
            for _ in range(len(scores.shape) - len(attention_mask.shape)):
                attention_mask = ops.expand_dims(attention_mask, axis=-3)
        weights = self.multimax(scores, attention_mask)
        weights = self._attn_dropout_layer(weights, training=training)
        return ops.einsum("acbe,aecd->abcd", weights, value)


class MultiMaxFalconAttention(SoftmaxSublayerTwin, FalconAttention):
    """Falcon's attention with MultiMax: its ``call`` normalises through
    ``self.softmax``, an `AttentionMultiMax` here."""

    softmax_attribute = "softmax"
    heads_attribute = "num_heads"


class MultiMaxBloomAttention(SoftmaxSublayerTwin, BloomAttention):
    """Bloom's attention with MultiMax: its ``call`` normalises through
    ``self._softmax``, an `AttentionMultiMax` here."""

    heads_attribute = "num_heads"


class MultiMaxDisentangledSelfAttention(SoftmaxSublayerTwin, DisentangledSelfAttention):
    """DeBERTa-v3's attention with MultiMax: its ``_masked_softmax``
    normalises through ``self._softmax``, an `AttentionMultiMax` here."""

    heads_attribute = "num_heads"


TWINS = {
    layers.MultiHeadAttention: MultiMaxMultiHeadAttention,
    CachedMultiHeadAttention: MultiMaxCachedMultiHeadAttention,
    WhisperCachedMultiHeadAttention: MultiMaxWhisperCachedMultiHeadAttention,
    TwoStreamRelativeAttention: MultiMaxTwoStreamRelativeAttention,
    LlamaAttention: MultiMaxLlamaAttention,
    CachedMistralAttention: MultiMaxCachedMistralAttention,
    CachedMixtralAttention: MultiMaxCachedMixtralAttention,
    Phi3Attention: MultiMaxPhi3Attention,
    QwenAttention: MultiMaxQwenAttention,
    Qwen3Attention: MultiMaxQwen3Attention,
    CachedGemmaAttention: MultiMaxCachedGemmaAttention,
    CachedGemma3Attention: MultiMaxCachedGemma3Attention,
    GPTNeoXAttention: MultiMaxGPTNeoXAttention,
    FalconAttention: MultiMaxFalconAttention,
    BloomAttention: MultiMaxBloomAttention,
    DisentangledSelfAttention: MultiMaxDisentangledSelfAttention,
}
for _kerashub_class, _multimax_class in TWINS.items():
    register_attention(_kerashub_class, _multimax_class)
