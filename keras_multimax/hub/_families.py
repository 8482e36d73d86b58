"""The MultiMax classes of the KerasHub 0.32 families keras_multimax supports.

One explicit subclass per KerasHub Backbone and Task class of each family
(`register_model`), registered with Keras as ``keras_multimax>MultiMax<Name>``
(the names keras_multimax 0.2.0 wrote into ``.keras`` files and presets):

- a backbone ``MultiMax<Backbone>`` is ``<Backbone>`` with the twin of every
  attention layer in its place (`keras_multimax.hub.MultiMaxBackbone`);
- a task ``MultiMax<Task>`` is ``<Task>`` with that backbone as its
  ``backbone_cls``, so that KerasHub's loaders (``CausalLM.from_preset``...)
  find it for a MultiMax preset.

They exist once ``keras_multimax.hub`` is imported, which is the one import a
saved MultiMax KerasHub model needs before it loads.
"""

from __future__ import annotations

import keras
from keras_hub import models

from keras_multimax.hub._models import MultiMaxBackbone
from keras_multimax.hub._models import register_model


def _multimax_of(kerashub_class):
    """Registers the decorated class with Keras and as ``kerashub_class``'s
    MultiMax class."""

    def register(cls):
        keras.saving.register_keras_serializable(package="keras_multimax")(cls)
        register_model(kerashub_class, cls)
        return cls

    return register


@_multimax_of(models.BertBackbone)
class MultiMaxBertBackbone(MultiMaxBackbone, models.BertBackbone):
    """`keras_hub.models.BertBackbone` with MultiMax attention."""


@_multimax_of(models.BertMaskedLM)
class MultiMaxBertMaskedLM(models.BertMaskedLM):
    """`keras_hub.models.BertMaskedLM` on a `MultiMaxBertBackbone`."""

    backbone_cls = MultiMaxBertBackbone


@_multimax_of(models.BertTextClassifier)
class MultiMaxBertTextClassifier(models.BertTextClassifier):
    """`keras_hub.models.BertTextClassifier` on a `MultiMaxBertBackbone`."""

    backbone_cls = MultiMaxBertBackbone


@_multimax_of(models.BertTextEmbedder)
class MultiMaxBertTextEmbedder(models.BertTextEmbedder):
    """`keras_hub.models.BertTextEmbedder` on a `MultiMaxBertBackbone`."""

    backbone_cls = MultiMaxBertBackbone


@_multimax_of(models.GPT2Backbone)
class MultiMaxGPT2Backbone(MultiMaxBackbone, models.GPT2Backbone):
    """`keras_hub.models.GPT2Backbone` with MultiMax attention."""


@_multimax_of(models.GPT2CausalLM)
class MultiMaxGPT2CausalLM(models.GPT2CausalLM):
    """`keras_hub.models.GPT2CausalLM` on a `MultiMaxGPT2Backbone`."""

    backbone_cls = MultiMaxGPT2Backbone


@_multimax_of(models.LlamaBackbone)
class MultiMaxLlamaBackbone(MultiMaxBackbone, models.LlamaBackbone):
    """`keras_hub.models.LlamaBackbone` with MultiMax attention."""


@_multimax_of(models.LlamaCausalLM)
class MultiMaxLlamaCausalLM(models.LlamaCausalLM):
    """`keras_hub.models.LlamaCausalLM` on a `MultiMaxLlamaBackbone`."""

    backbone_cls = MultiMaxLlamaBackbone


@_multimax_of(models.Llama3Backbone)
class MultiMaxLlama3Backbone(MultiMaxBackbone, models.Llama3Backbone):
    """`keras_hub.models.Llama3Backbone` with MultiMax attention."""


@_multimax_of(models.Llama3CausalLM)
class MultiMaxLlama3CausalLM(models.Llama3CausalLM):
    """`keras_hub.models.Llama3CausalLM` on a `MultiMaxLlama3Backbone`."""

    backbone_cls = MultiMaxLlama3Backbone


@_multimax_of(models.GemmaBackbone)
class MultiMaxGemmaBackbone(MultiMaxBackbone, models.GemmaBackbone):
    """`keras_hub.models.GemmaBackbone` with MultiMax attention."""


@_multimax_of(models.GemmaCausalLM)
class MultiMaxGemmaCausalLM(models.GemmaCausalLM):
    """`keras_hub.models.GemmaCausalLM` on a `MultiMaxGemmaBackbone`."""

    backbone_cls = MultiMaxGemmaBackbone


@_multimax_of(models.Gemma3Backbone)
class MultiMaxGemma3Backbone(MultiMaxBackbone, models.Gemma3Backbone):
    """`keras_hub.models.Gemma3Backbone` with MultiMax attention."""


@_multimax_of(models.Gemma3CausalLM)
class MultiMaxGemma3CausalLM(models.Gemma3CausalLM):
    """`keras_hub.models.Gemma3CausalLM` on a `MultiMaxGemma3Backbone`."""

    backbone_cls = MultiMaxGemma3Backbone


@_multimax_of(models.Gemma3TextEmbedder)
class MultiMaxGemma3TextEmbedder(models.Gemma3TextEmbedder):
    """`keras_hub.models.Gemma3TextEmbedder` on a `MultiMaxGemma3Backbone`."""

    backbone_cls = MultiMaxGemma3Backbone


@_multimax_of(models.MistralBackbone)
class MultiMaxMistralBackbone(MultiMaxBackbone, models.MistralBackbone):
    """`keras_hub.models.MistralBackbone` with MultiMax attention."""


@_multimax_of(models.MistralCausalLM)
class MultiMaxMistralCausalLM(models.MistralCausalLM):
    """`keras_hub.models.MistralCausalLM` on a `MultiMaxMistralBackbone`."""

    backbone_cls = MultiMaxMistralBackbone


@_multimax_of(models.MixtralBackbone)
class MultiMaxMixtralBackbone(MultiMaxBackbone, models.MixtralBackbone):
    """`keras_hub.models.MixtralBackbone` with MultiMax attention."""


@_multimax_of(models.MixtralCausalLM)
class MultiMaxMixtralCausalLM(models.MixtralCausalLM):
    """`keras_hub.models.MixtralCausalLM` on a `MultiMaxMixtralBackbone`."""

    backbone_cls = MultiMaxMixtralBackbone


@_multimax_of(models.QwenBackbone)
class MultiMaxQwenBackbone(MultiMaxBackbone, models.QwenBackbone):
    """`keras_hub.models.QwenBackbone` with MultiMax attention."""


@_multimax_of(models.QwenCausalLM)
class MultiMaxQwenCausalLM(models.QwenCausalLM):
    """`keras_hub.models.QwenCausalLM` on a `MultiMaxQwenBackbone`."""

    backbone_cls = MultiMaxQwenBackbone


@_multimax_of(models.Qwen3Backbone)
class MultiMaxQwen3Backbone(MultiMaxBackbone, models.Qwen3Backbone):
    """`keras_hub.models.Qwen3Backbone` with MultiMax attention."""


@_multimax_of(models.Qwen3CausalLM)
class MultiMaxQwen3CausalLM(models.Qwen3CausalLM):
    """`keras_hub.models.Qwen3CausalLM` on a `MultiMaxQwen3Backbone`."""

    backbone_cls = MultiMaxQwen3Backbone


@_multimax_of(models.Qwen3TextEmbedder)
class MultiMaxQwen3TextEmbedder(models.Qwen3TextEmbedder):
    """`keras_hub.models.Qwen3TextEmbedder` on a `MultiMaxQwen3Backbone`."""

    backbone_cls = MultiMaxQwen3Backbone


@_multimax_of(models.Phi3Backbone)
class MultiMaxPhi3Backbone(MultiMaxBackbone, models.Phi3Backbone):
    """`keras_hub.models.Phi3Backbone` with MultiMax attention."""


@_multimax_of(models.Phi3CausalLM)
class MultiMaxPhi3CausalLM(models.Phi3CausalLM):
    """`keras_hub.models.Phi3CausalLM` on a `MultiMaxPhi3Backbone`."""

    backbone_cls = MultiMaxPhi3Backbone


@_multimax_of(models.OPTBackbone)
class MultiMaxOPTBackbone(MultiMaxBackbone, models.OPTBackbone):
    """`keras_hub.models.OPTBackbone` with MultiMax attention."""


@_multimax_of(models.OPTCausalLM)
class MultiMaxOPTCausalLM(models.OPTCausalLM):
    """`keras_hub.models.OPTCausalLM` on a `MultiMaxOPTBackbone`."""

    backbone_cls = MultiMaxOPTBackbone


@_multimax_of(models.FalconBackbone)
class MultiMaxFalconBackbone(MultiMaxBackbone, models.FalconBackbone):
    """`keras_hub.models.FalconBackbone` with MultiMax attention."""


@_multimax_of(models.FalconCausalLM)
class MultiMaxFalconCausalLM(models.FalconCausalLM):
    """`keras_hub.models.FalconCausalLM` on a `MultiMaxFalconBackbone`."""

    backbone_cls = MultiMaxFalconBackbone


@_multimax_of(models.BloomBackbone)
class MultiMaxBloomBackbone(MultiMaxBackbone, models.BloomBackbone):
    """`keras_hub.models.BloomBackbone` with MultiMax attention."""


@_multimax_of(models.BloomCausalLM)
class MultiMaxBloomCausalLM(models.BloomCausalLM):
    """`keras_hub.models.BloomCausalLM` on a `MultiMaxBloomBackbone`."""

    backbone_cls = MultiMaxBloomBackbone


@_multimax_of(models.GPTNeoXBackbone)
class MultiMaxGPTNeoXBackbone(MultiMaxBackbone, models.GPTNeoXBackbone):
    """`keras_hub.models.GPTNeoXBackbone` with MultiMax attention."""


@_multimax_of(models.GPTNeoXCausalLM)
class MultiMaxGPTNeoXCausalLM(models.GPTNeoXCausalLM):
    """`keras_hub.models.GPTNeoXCausalLM` on a `MultiMaxGPTNeoXBackbone`."""

    backbone_cls = MultiMaxGPTNeoXBackbone


@_multimax_of(models.BartBackbone)
class MultiMaxBartBackbone(MultiMaxBackbone, models.BartBackbone):
    """`keras_hub.models.BartBackbone` with MultiMax attention."""


@_multimax_of(models.BartSeq2SeqLM)
class MultiMaxBartSeq2SeqLM(models.BartSeq2SeqLM):
    """`keras_hub.models.BartSeq2SeqLM` on a `MultiMaxBartBackbone`."""

    backbone_cls = MultiMaxBartBackbone


@_multimax_of(models.WhisperBackbone)
class MultiMaxWhisperBackbone(MultiMaxBackbone, models.WhisperBackbone):
    """`keras_hub.models.WhisperBackbone` with MultiMax attention."""


@_multimax_of(models.DistilBertBackbone)
class MultiMaxDistilBertBackbone(MultiMaxBackbone, models.DistilBertBackbone):
    """`keras_hub.models.DistilBertBackbone` with MultiMax attention."""


@_multimax_of(models.DistilBertMaskedLM)
class MultiMaxDistilBertMaskedLM(models.DistilBertMaskedLM):
    """`keras_hub.models.DistilBertMaskedLM` on a `MultiMaxDistilBertBackbone`."""

    backbone_cls = MultiMaxDistilBertBackbone


@_multimax_of(models.DistilBertTextClassifier)
class MultiMaxDistilBertTextClassifier(models.DistilBertTextClassifier):
    """`keras_hub.models.DistilBertTextClassifier` on a `MultiMaxDistilBertBackbone`."""

    backbone_cls = MultiMaxDistilBertBackbone


@_multimax_of(models.RobertaBackbone)
class MultiMaxRobertaBackbone(MultiMaxBackbone, models.RobertaBackbone):
    """`keras_hub.models.RobertaBackbone` with MultiMax attention."""


@_multimax_of(models.RobertaMaskedLM)
class MultiMaxRobertaMaskedLM(models.RobertaMaskedLM):
    """`keras_hub.models.RobertaMaskedLM` on a `MultiMaxRobertaBackbone`."""

    backbone_cls = MultiMaxRobertaBackbone


@_multimax_of(models.RobertaTextClassifier)
class MultiMaxRobertaTextClassifier(models.RobertaTextClassifier):
    """`keras_hub.models.RobertaTextClassifier` on a `MultiMaxRobertaBackbone`."""

    backbone_cls = MultiMaxRobertaBackbone


@_multimax_of(models.DebertaV3Backbone)
class MultiMaxDebertaV3Backbone(MultiMaxBackbone, models.DebertaV3Backbone):
    """`keras_hub.models.DebertaV3Backbone` with MultiMax attention."""


@_multimax_of(models.DebertaV3MaskedLM)
class MultiMaxDebertaV3MaskedLM(models.DebertaV3MaskedLM):
    """`keras_hub.models.DebertaV3MaskedLM` on a `MultiMaxDebertaV3Backbone`."""

    backbone_cls = MultiMaxDebertaV3Backbone


@_multimax_of(models.DebertaV3TextClassifier)
class MultiMaxDebertaV3TextClassifier(models.DebertaV3TextClassifier):
    """`keras_hub.models.DebertaV3TextClassifier` on a `MultiMaxDebertaV3Backbone`."""

    backbone_cls = MultiMaxDebertaV3Backbone


@_multimax_of(models.AlbertBackbone)
class MultiMaxAlbertBackbone(MultiMaxBackbone, models.AlbertBackbone):
    """`keras_hub.models.AlbertBackbone` with MultiMax attention."""


@_multimax_of(models.AlbertMaskedLM)
class MultiMaxAlbertMaskedLM(models.AlbertMaskedLM):
    """`keras_hub.models.AlbertMaskedLM` on a `MultiMaxAlbertBackbone`."""

    backbone_cls = MultiMaxAlbertBackbone


@_multimax_of(models.AlbertTextClassifier)
class MultiMaxAlbertTextClassifier(models.AlbertTextClassifier):
    """`keras_hub.models.AlbertTextClassifier` on a `MultiMaxAlbertBackbone`."""

    backbone_cls = MultiMaxAlbertBackbone


@_multimax_of(models.ElectraBackbone)
class MultiMaxElectraBackbone(MultiMaxBackbone, models.ElectraBackbone):
    """`keras_hub.models.ElectraBackbone` with MultiMax attention."""


@_multimax_of(models.XLNetBackbone)
class MultiMaxXLNetBackbone(MultiMaxBackbone, models.XLNetBackbone):
    """`keras_hub.models.XLNetBackbone` with MultiMax attention."""


@_multimax_of(models.ViTBackbone)
class MultiMaxViTBackbone(MultiMaxBackbone, models.ViTBackbone):
    """`keras_hub.models.ViTBackbone` with MultiMax attention."""


@_multimax_of(models.ViTImageClassifier)
class MultiMaxViTImageClassifier(models.ViTImageClassifier):
    """`keras_hub.models.ViTImageClassifier` on a `MultiMaxViTBackbone`."""

    backbone_cls = MultiMaxViTBackbone


@_multimax_of(models.DeiTBackbone)
class MultiMaxDeiTBackbone(MultiMaxBackbone, models.DeiTBackbone):
    """`keras_hub.models.DeiTBackbone` with MultiMax attention."""


@_multimax_of(models.DeiTImageClassifier)
class MultiMaxDeiTImageClassifier(models.DeiTImageClassifier):
    """`keras_hub.models.DeiTImageClassifier` on a `MultiMaxDeiTBackbone`."""

    backbone_cls = MultiMaxDeiTBackbone


@_multimax_of(models.DINOV2Backbone)
class MultiMaxDINOV2Backbone(MultiMaxBackbone, models.DINOV2Backbone):
    """`keras_hub.models.DINOV2Backbone` with MultiMax attention."""
