"""Tiny KerasHub models (2 layers, width 16, random weights) for the hub tests."""

import keras
import keras_hub
import numpy as np

from keras_multimax.hub import AttentionMultiMax
from keras_multimax.hub import MultiMaxTwin
from keras_multimax.layers.multimax_attention import AttentionModulator

V, T, B = 40, 8, 2  # vocabulary, sequence length, batch
TEXT = {"vocabulary_size": V, "num_layers": 2, "hidden_dim": 16, "intermediate_dim": 32}
GQA = {**TEXT, "num_query_heads": 4, "num_key_value_heads": 2}
MHA = {**TEXT, "num_heads": 2}
IMAGE = {"image_shape": (16, 16, 3), "patch_size": 4, "num_layers": 2, "num_heads": 2}
M = keras_hub.models

# ts = 0: MultiMax then is SoftMax computed by another kernel (same float32
# formula, other summation order): a few ulps (2^-24 ≈ 6e-8) per probability,
# through 2 layers of width 16. Measured ≤ 5e-7 relative (ViT; 0 for the
# others); 1e-5 relative to max(1, |output|) covers other CPUs' rounding.
TS0_BOUND = 1e-5
# ts ≠ 0 (ranges ~ N(0, 1), ts ~ U(0.5, 1)) on O(1) scores: measured ≥ 0.4
# relative; a 10x smaller change would still be far above TS0_BOUND.
ACTIVE_BOUND = 0.04
# Token-by-token `call_with_cache` vs one full pass, ts ≠ 0: the bound.
# Measured ≤ 2.5e-6 relative (Bloom; ≤ 1.1e-6 for the others): the same
# float32 ops on other shapes, so other summation orders.
CACHE_BOUND = 1e-4


# name -> (backbone constructor, its kwargs)
BACKBONES = {
    "bert": (M.BertBackbone, {**MHA, "max_sequence_length": 32}),
    "gpt2": (M.GPT2Backbone, {**MHA, "max_sequence_length": 32}),
    "llama": (M.LlamaBackbone, GQA),
    "gemma": (M.GemmaBackbone, {**GQA, "head_dim": 4}),
    "vit": (M.ViTBackbone, {**IMAGE, "hidden_dim": 16, "mlp_dim": 32}),
    # Quick checks of more families. (Gemma3, text-only as it has no
    # `vision_encoder`, also runs test_hub.py's cached-decoding and generate
    # tests: see CAUSAL_TASKS.)
    "opt": (M.OPTBackbone, {**MHA, "max_sequence_length": 32}),
    "mistral": (M.MistralBackbone, GQA),
    "qwen": (M.QwenBackbone, GQA),
    "qwen3": (M.Qwen3Backbone, {**GQA, "head_dim": 4}),
    "phi3": (M.Phi3Backbone, GQA),
    "falcon": (M.FalconBackbone, {**TEXT, "num_attention_heads": 2}),
    "bloom": (M.BloomBackbone, MHA),
    "gpt_neo_x": (M.GPTNeoXBackbone, MHA),
    "mixtral": (M.MixtralBackbone, {**GQA, "num_experts": 2}),
    "distil_bert": (M.DistilBertBackbone, {**MHA, "max_sequence_length": 32}),
    "roberta": (M.RobertaBackbone, {**MHA, "max_sequence_length": 32}),
    "deberta_v3": (M.DebertaV3Backbone, {**MHA, "max_sequence_length": 32}),
    "bart": (M.BartBackbone, {**MHA, "max_sequence_length": 32}),
    "deit": (M.DeiTBackbone, {**IMAGE, "hidden_dim": 16, "intermediate_dim": 32}),
    "dinov2": (
        M.DINOV2Backbone,
        {**IMAGE, "hidden_dim": 16, "intermediate_dim": 32, "image_shape": (16, 16, 3)},
    ),
    "llama3": (M.Llama3Backbone, GQA),
    "gemma3": (M.Gemma3Backbone, {**GQA, "head_dim": 4, "image_size": 16}),
    "albert": (M.AlbertBackbone, {**MHA, "embedding_dim": 8}),
    "electra": (
        M.ElectraBackbone,
        {**{k: v for k, v in MHA.items() if k != "vocabulary_size"}, "vocab_size": V}
        | {"embedding_dim": 8},
    ),
    "xlnet": (M.XLNetBackbone, MHA),
    "whisper": (
        M.WhisperBackbone,
        {
            **MHA,
            "num_mels": 8,
            "max_encoder_sequence_length": 16,
            "max_decoder_sequence_length": 16,
        },
    ),
}
# Families keras_multimax does not convert (no MultiMax class): their
# attention computes an inline softmax or an unconditional fused SoftMax.
UNREACHABLE = {
    "roformer_v2": (M.RoformerV2Backbone, {**MHA, "head_size": 8}),
    "esm": (M.ESMBackbone, MHA),
    "t5": (M.T5Backbone, MHA),
    "gpt_oss": (M.GptOssBackbone, {**GQA, "num_experts": 2}),
}
# name -> task class, for the families tested in depth.
TASKS = {
    "bert": M.BertTextClassifier,
    "gpt2": M.GPT2CausalLM,
    "llama": M.LlamaCausalLM,
    "gemma": M.GemmaCausalLM,
    "vit": M.ViTImageClassifier,
}
# name -> causal LM class, for quick-check families that also run test_hub.py's
# cached-decoding and generate tests (so they are left out of DECODERS, whose
# quick cache test the former extends).
CAUSAL_TASKS = {"gemma3": M.Gemma3CausalLM}
DECODERS = ("gpt2", "llama", "gemma", "opt", "mistral", "qwen", "qwen3", "phi3")
DECODERS += ("falcon", "bloom", "gpt_neo_x", "mixtral", "llama3")


def backbone(name):
    cls, kwargs = {**BACKBONES, **UNREACHABLE}[name]
    return cls(**kwargs)


def task(name):
    kwargs = {"num_classes": 3} if name in ("bert", "vit") else {}
    cls = {**TASKS, **CAUSAL_TASKS}[name]
    return cls(backbone=backbone(name), preprocessor=None, **kwargs)


def inputs(model, seed=0):
    """A batch for `model`'s inputs: tokens with some right padding, images."""
    rng = np.random.default_rng(seed)
    specs = model.input
    if not isinstance(specs, dict):
        return rng.normal(size=(B,) + tuple(specs.shape[1:])).astype("float32")
    batch = {}
    for key, spec in specs.items():
        shape = (B,) + tuple(T if d is None else d for d in spec.shape[1:])
        if "padding_mask" in key:
            mask = np.ones(shape, bool)
            mask[0, -2:] = False
            batch[key] = mask
        elif "segment" in key:
            batch[key] = np.zeros(shape, "int32")
        elif "int" in spec.dtype:
            batch[key] = rng.integers(1, V, size=shape).astype("int32")
        else:
            batch[key] = rng.normal(size=shape).astype("float32")
    return batch


def outputs(model, x):
    """Every output of `model(x)` as one float64 vector."""
    leaves = keras.tree.flatten(model(x))
    return np.concatenate(
        [np.ravel(keras.ops.convert_to_numpy(y)).astype("float64") for y in leaves]
    )


def attention_layers(model):
    """SoftMax attention layers: MHA, and layers with a Softmax sublayer."""
    found = []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.MultiHeadAttention):
            found.append(layer)
        elif any(type(sub) is keras.layers.Softmax for sub in layer._layers):
            found.append(layer)
    return found


def softmax_attention(model):
    """The attention layers of `model` that are not MultiMax twins."""
    return [
        layer
        for layer in attention_layers(model)
        if not isinstance(layer, MultiMaxTwin)
    ]


def modulators(model):
    """The layers that own MultiMax `ranges`/`ts` in a converted model."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, (AttentionModulator, AttentionMultiMax))
    ]


def activate(model, seed=1, scale=1.0):
    """Non-zero modulators: ranges ~ N(0, 1), ts ~ U(0.5, 1) * scale."""
    rng = np.random.default_rng(seed)
    for layer in modulators(model):
        layer.ranges.assign(rng.normal(size=layer.ranges.shape))
        layer.ts.assign(scale * rng.uniform(0.5, 1.0, size=layer.ts.shape))


def modulator_gradients(model, x):
    """Gradients of sum(outputs²) for every ranges/ts of `model`, by path."""
    from backend_helpers import value_and_gradients

    trainable = model.trainable_variables
    values = [v.value for v in trainable]
    others = [v.value for v in model.non_trainable_variables]
    wanted = [i for i, v in enumerate(trainable) if v.name in ("ranges", "ts")]

    def loss(*modulators):
        for i, value in zip(wanted, modulators):
            values[i] = value
        outputs, _ = model.stateless_call(values, others, x)
        leaves = keras.tree.flatten(outputs)
        return sum(keras.ops.sum(keras.ops.square(y)) for y in leaves)

    _, grads = value_and_gradients(loss, *[values[i] for i in wanted])
    return {trainable[i].path: g for i, g in zip(wanted, grads)}


def rel_diff(a, b):
    return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))))


def randomize(model, seed=0, std=0.3):
    """Re-draws every matrix of `model` from N(0, std²).

    KerasHub initialises projections with std 0.02, so the attention scores
    of a fresh model are all near 0, where any modulation is a constant shift
    that SoftMax ignores; random O(1) scores make MultiMax visible.
    """
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if len(w.shape) >= 2 and "float" in str(w.dtype):
            w.assign(rng.normal(0.0, std, size=w.shape))


def cached_steps(lm, token_ids):
    """Logits of `token_ids` fed one token at a time through the KV cache."""
    # Gemma3CausalLM's `_build_cache` also takes the image inputs and the
    # padding mask, with no defaults; text only, they are None, as in its
    # `generate_step`.
    extra = ("img_embeddings", "vision_mask", "padding_mask", "vision_indices")
    kwargs = dict.fromkeys(extra) if isinstance(lm, M.Gemma3CausalLM) else {}
    _, cache = lm._build_cache(np.zeros_like(token_ids), **kwargs)
    steps = []
    for i in range(token_ids.shape[1]):
        logits, _, cache = lm.call_with_cache(token_ids[:, i : i + 1], cache, i)
        steps.append(keras.ops.convert_to_numpy(logits)[:, 0])
    return np.stack(steps, axis=1)
