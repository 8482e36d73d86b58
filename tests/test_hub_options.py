"""MultiMax in KerasHub models: more families, options, errors and packaging."""

import os
import subprocess
import sys
import textwrap
import warnings

import hub_models as H
import keras
import keras_hub
import numpy as np
import pytest

import keras_multimax
from keras_multimax import Modulator
from keras_multimax import hub
from keras_multimax.convert import to_multimax

TS0_BOUND, ACTIVE_BOUND, CACHE_BOUND = H.TS0_BOUND, H.ACTIVE_BOUND, H.CACHE_BOUND
QUICK = [name for name in H.BACKBONES if name not in H.TASKS]


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _pair(name):
    model = H.backbone(name)
    H.randomize(model)
    return model, to_multimax(model)


@pytest.mark.parametrize("name", QUICK)
def test_more_families_convert_every_attention_layer(name):
    model, new = _pair(name)
    assert isinstance(new, type(model)) and hub.is_multimax(new)
    # ALBERT shares one transformer layer between its 2 layers.
    assert len(H.modulators(new)) == len(H.attention_layers(model)) >= 1
    x = H.inputs(model)
    reference = H.outputs(model, x)
    assert H.rel_diff(H.outputs(new, x), reference) <= TS0_BOUND
    H.activate(new)
    assert H.rel_diff(H.outputs(new, x), reference) > ACTIVE_BOUND


# GPT-NeoX is left out: KerasHub 0.32's own SoftMax GPTNeoXCausalLM gives
# cached logits 0.3 (relative) away from its full forward pass.
@pytest.mark.parametrize(
    "name", [n for n in QUICK if n in H.DECODERS and n != "gpt_neo_x"]
)
def test_more_decoders_cache_equals_the_full_forward(name):
    model = H.backbone(name)
    H.randomize(model)
    lm_cls = {
        c.backbone_cls: c
        for c in keras.saving.get_custom_objects().values()
        if isinstance(c, type) and issubclass(c, keras_hub.models.CausalLM)
    }[type(model)]
    lm = to_multimax(lm_cls(backbone=model, preprocessor=None))
    H.activate(lm)
    tokens = np.random.default_rng(3).integers(1, H.V, size=(H.B, H.T))
    full = _np(lm({"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)}))
    assert H.rel_diff(H.cached_steps(lm, tokens), full) <= CACHE_BOUND


def test_bart_seq2seq_converts_encoder_and_both_decoder_attentions():
    lm = keras_hub.models.BartSeq2SeqLM(backbone=H.backbone("bart"), preprocessor=None)
    H.randomize(lm)
    new = to_multimax(lm)
    assert type(new).__name__ == "MultiMaxBartSeq2SeqLM"
    # 2 encoder self-attentions, 2 decoder self- and 2 cross-attentions.
    assert len(H.modulators(new)) == len(H.attention_layers(lm)) == 6
    x = H.inputs(new.backbone)
    reference = H.outputs(lm, x)
    assert H.rel_diff(H.outputs(new, x), reference) <= TS0_BOUND
    H.activate(new)
    assert H.rel_diff(H.outputs(new, x), reference) > ACTIVE_BOUND


@pytest.mark.parametrize("name", sorted(H.UNREACHABLE))
def test_families_without_a_multimax_class_raise_naming_the_hooks(name):
    model = H.backbone(name)
    with pytest.raises(ValueError, match="has no MultiMax class") as error:
        to_multimax(model)
    message = str(error.value)
    assert f"{type(model).__module__}.{type(model).__name__}" in message
    assert "register_attention" in message and "register_model" in message
    assert not H.modulators(model)


def test_fused_attention_path_is_off_in_converted_layers(monkeypatch):
    """JAX and torch make Llama-style layers call `ops.dot_product_attention`
    (a fused SoftMax) instead of their Softmax sublayer; simulated here."""
    from keras_hub.src.models.llama import llama_attention

    model, new = _pair("llama")
    H.activate(new)
    x = H.inputs(model)
    softmax_out, multimax_out = H.outputs(model, x), H.outputs(new, x)
    calls = []
    fused = keras.ops.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(llama_attention, "fused_attention_op_available", lambda: True)
    monkeypatch.setattr(keras.ops, "dot_product_attention", spy)
    assert H.rel_diff(H.outputs(model, x), softmax_out) <= TS0_BOUND
    assert len(calls) == 2  # the SoftMax model takes the fused path ...
    np.testing.assert_array_equal(H.outputs(new, x), multimax_out)
    assert len(calls) == 2  # ... the MultiMax model never does.


def test_per_head_and_order():
    for name, heads in [("gpt2", 2), ("llama", 4), ("gemma", 4), ("bert", 2)]:
        model = H.backbone(name)
        H.randomize(model)
        new = to_multimax(model, per_head=True, modulator=Modulator(order=3))
        for layer in H.modulators(new):
            assert tuple(layer.ts.shape) == tuple(layer.ranges.shape) == (heads, 6)
        x = H.inputs(model)
        reference = H.outputs(model, x)
        assert H.rel_diff(H.outputs(new, x), reference) <= TS0_BOUND
        H.activate(new)
        per_head = H.outputs(new, x)
        assert H.rel_diff(per_head, reference) > ACTIVE_BOUND
        # Heads really get their own modulator: giving every head the first
        # head's parameters changes the outputs.
        for layer in H.modulators(new):
            for w in (layer.ranges, layer.ts):
                w.assign(np.repeat(_np(w)[:1], heads, axis=0))
        assert H.rel_diff(H.outputs(new, x), per_head) > ACTIVE_BOUND, name


def _trainable(model):
    return sorted(w.path for w in model.trainable_weights)


def test_lora_after_conversion_trains_lora_and_modulators():
    lm = keras_hub.models.GPT2CausalLM(backbone=H.backbone("gpt2"), preprocessor=None)
    new = to_multimax(lm)
    new.backbone.enable_lora(2)
    lm.backbone.enable_lora(2)
    # What KerasHub trains under LoRA, plus every ranges/ts.
    modulators = [w.path for w in new.weights if w.name in ("ranges", "ts")]
    assert len(modulators) == 4
    assert _trainable(new) == sorted(_trainable(lm) + modulators)
    x = H.inputs(new)
    before = H.outputs(new, x)
    np.testing.assert_array_equal(before, H.outputs(lm, x))  # LoRA b = 0, ts = 0
    ts = [layer.ts for layer in H.modulators(new)]
    new.compile(optimizer=keras.optimizers.Adam(0.05))
    y = np.roll(x["token_ids"], -1, axis=1)
    new.train_on_batch(x, y, sample_weight=x["padding_mask"])
    assert all(np.any(_np(t) != 0) for t in ts)
    assert H.rel_diff(H.outputs(new, x), before) > 1e-4


def test_lora_before_conversion_is_carried_over(tmp_path):
    lm = keras_hub.models.LlamaCausalLM(backbone=H.backbone("llama"), preprocessor=None)
    lm.backbone.enable_lora(2)
    for w in lm.weights:
        if w.path.endswith("lora_kernel_b"):
            w.assign(np.random.default_rng(0).normal(size=w.shape))
    new = to_multimax(lm)
    modulators = [w.path for w in new.weights if w.name in ("ranges", "ts")]
    assert _trainable(new) == sorted(_trainable(lm) + modulators)
    x = H.inputs(new)
    assert H.rel_diff(H.outputs(new, x), H.outputs(lm, x)) <= TS0_BOUND
    # KerasHub's own LoRA bookkeeping came along: the adapters save and load
    # (into a converted model whose adapters are still zero).
    path = str(tmp_path / "adapters.lora.h5")
    new.backbone.save_lora_weights(path)
    fresh = to_multimax(
        keras_hub.models.LlamaCausalLM(backbone=H.backbone("llama"), preprocessor=None)
    )
    fresh.backbone.enable_lora(2)
    for w in fresh.weights:
        if "lora" not in w.path:
            w.assign({v.path: v for v in new.weights}[w.path])
    fresh.backbone.load_lora_weights(path)
    assert H.rel_diff(H.outputs(fresh, x), H.outputs(new, x)) <= TS0_BOUND


def _quantize(model, mode):
    with warnings.catch_warnings():  # "Layer ... has no `quantize` method"
        warnings.simplefilter("ignore", UserWarning)
        model.quantize(mode)


def _int8_paths(model):
    return sorted(
        layer.path
        for layer in model._flatten_layers()
        if getattr(layer, "quantization_mode", None) == "int8"
    )


@pytest.mark.slow  # int8 quantization of 2 models: ~15 s
# No preset round trip here: KerasHub 0.32 cannot reload an int8 preset of
# its own SoftMax GPT-2 or Llama either (".weights.h5" layout mismatch). One
# family: quantized MultiHeadAttention twins are tested in test_convert.py.
def test_quantized_backbones_convert_and_converted_ones_quantize():
    model = H.backbone("llama")
    H.randomize(model)
    converted = to_multimax(model)  # float, for the second half
    _quantize(model, "int8")
    new = to_multimax(model)
    assert _int8_paths(new) == _int8_paths(model) and len(_int8_paths(new)) >= 8
    x = H.inputs(model)
    reference = H.outputs(model, x)
    assert H.rel_diff(H.outputs(new, x), reference) <= TS0_BOUND
    # Convert first, quantize after: the same int8 model as KerasHub's.
    _quantize(converted, "int8")
    assert _int8_paths(converted) == _int8_paths(model)
    assert H.rel_diff(H.outputs(converted, x), reference) <= TS0_BOUND
    H.activate(converted)
    assert H.rel_diff(H.outputs(converted, x), reference) > ACTIVE_BOUND


def test_already_converted_and_bad_options_raise():
    model = H.backbone("gpt2")
    new = to_multimax(model)
    with pytest.raises(ValueError, match="MultiMaxGPT2Backbone already"):
        to_multimax(new)
    with pytest.raises(ValueError, match="replace_softmax=True"):
        to_multimax(model, replace_softmax=True)
    with pytest.raises(ValueError, match="order=0"):
        to_multimax(model, modulator={"order": 0})
    with pytest.raises(TypeError, match="per_head='yes'"):
        to_multimax(model, per_head="yes")
    cls = hub.multimax_class(type(model))
    with pytest.raises(TypeError, match="modulator=3"):
        cls(**H.BACKBONES["gpt2"][1], modulator=3)
    with pytest.raises(TypeError, match="model_class=<class 'str'>"):
        hub.from_preset("unused", str)
    with pytest.raises(TypeError, match="KerasHub Backbone or Task class"):
        hub.multimax_class(keras.layers.Dense)
    with pytest.raises(TypeError, match="kerashub_class=3"):
        hub.register_attention(3, hub.MultiMaxTwin)
    with pytest.raises(TypeError, match="multimax_class=<class .*Dense"):
        hub.register_model(keras_hub.models.GPT2Backbone, keras.layers.Dense)


def test_multimax_backbone_from_its_constructor_and_a_0_2_0_config():
    cls = hub.multimax_class(keras_hub.models.LlamaBackbone)
    assert hub.multimax_class(cls) is cls
    model = cls(**H.BACKBONES["llama"][1], modulator=Modulator(order=1), per_head=True)
    config = model.get_config()
    assert config["modulator"]["config"]["order"] == 1 and config["per_head"]
    assert [tuple(layer.ts.shape) for layer in H.modulators(model)] == [(4, 2)] * 2
    assert type(cls.from_config(config)) is cls
    # keras_multimax 0.2.0 wrote `multimax`: per_head and the modulator's
    # arguments in one flat dict.
    legacy = {k: v for k, v in config.items() if k not in ("modulator", "per_head")}
    legacy["multimax"] = {"per_head": True, "order": 1, "ts_initializer": "ones"}
    old = cls.from_config(legacy)
    assert old.per_head and old.modulator == Modulator(order=1, ts_initializer="ones")
    assert all(np.all(_np(layer.ts) == 1) for layer in H.modulators(old))


@pytest.mark.slow  # a fresh interpreter importing TensorFlow
def test_keras_multimax_imports_without_keras_hub():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["keras_hub"] = None  # as if keras-hub were not installed
        import keras_multimax
        assert "keras_multimax.hub" not in sys.modules
        try:
            import keras_multimax.hub
        except ImportError as error:
            print(error)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        cwd=os.path.dirname(os.path.dirname(keras_multimax.__file__)),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'pip install -e ".[keras-hub]"' in run.stdout
    assert 'pip install "keras-multimax[keras-hub]"' in run.stdout


def test_lora_weights_file_carries_the_modulators(tmp_path):
    model = hub.multimax_class(keras_hub.models.GemmaBackbone)(
        **H.BACKBONES["gemma"][1]
    )
    model.enable_lora(2)
    H.activate(model)
    for w in model.weights:
        if w.path.endswith("lora_kernel_b"):
            w.assign(np.random.default_rng(0).normal(size=w.shape))
    x = H.inputs(model)
    expected = H.outputs(model, x)
    path = str(tmp_path / "adapters.lora.h5")
    model.save_lora_weights(path)
    # A new instance: other auto-numbered layer names, same modulator order.
    other = type(model).from_config(model.get_config())
    source = {w.path: w for w in model.weights}
    for w in other.weights:
        if w.name not in ("ranges", "ts"):
            w.assign(source[w.path])
    assert H.rel_diff(H.outputs(other, x), expected) > ACTIVE_BOUND
    other.load_lora_weights(path)
    assert H.rel_diff(H.outputs(other, x), expected) <= TS0_BOUND


@pytest.mark.parametrize("num_heads", [None, 2])
def test_attention_multimax_standard_checks(num_heads):
    from layer_test_case import run_layer_test

    scores = np.random.default_rng(0).normal(size=(2, 2, 3, 3)).astype("float32")
    run_layer_test(
        hub.AttentionMultiMax,
        # ts ≠ 0: at ts = 0 the gradient of `ranges` is 0, and one training
        # step must move every MultiMax weight.
        {
            "num_heads": num_heads,
            "modulator": Modulator(order=1, ts_initializer="ones", ts_regularizer="l2"),
        },
        scores,
        expected_output_shape=scores.shape,
        expected_num_trainable_weights=2,
    )


def test_attention_multimax_per_head_matches_the_formula_and_checks_heads():
    import numpy_reference as ref

    layer = hub.AttentionMultiMax(num_heads=4)
    scores = np.random.default_rng(0).normal(size=(2, 2, 2, 3, 5)).astype("float32")
    layer(scores)  # Gemma's layout: (B, kv_heads, groups, T, S)
    layer.ranges.assign(np.random.default_rng(1).normal(size=(4, 4)))
    layer.ts.assign(np.random.default_rng(2).uniform(-1, 1, size=(4, 4)))
    out = _np(layer(scores))
    flat = scores.reshape(2, 4, 3, 5)
    for h in range(4):
        expected = ref.multimax(flat[:, h], _np(layer.ranges)[h], _np(layer.ts)[h])
        # float32 exp/sum of one formula: a few ulps relative.
        np.testing.assert_allclose(
            out.reshape(2, 4, 3, 5)[:, h], expected, rtol=1e-5, atol=1e-6
        )
    with pytest.raises(ValueError, match=r"4 per-head modulators.*\(3,\)"):
        layer(np.zeros((2, 3, 3, 5), "float32"))
    with pytest.raises(ValueError, match="num_heads=0"):
        hub.AttentionMultiMax(num_heads=0)


def test_bfloat16_backbone_converts(monkeypatch):
    from keras_hub.src.models.llama import llama_attention

    model = keras_hub.models.LlamaBackbone(**H.BACKBONES["llama"][1], dtype="bfloat16")
    H.randomize(model)
    new = to_multimax(model)
    assert new.dtype_policy.name == "bfloat16"
    assert all(layer.ranges.dtype == "float32" for layer in H.modulators(new))
    x = H.inputs(model)
    # The reference is KerasHub's non-fused branch, which the twin computes
    # (on JAX KerasHub takes its fused kernel, which rounds elsewhere).
    monkeypatch.setattr(llama_attention, "fused_attention_op_available", lambda: False)
    # Same bfloat16 graph, MultiMax computed in float32 as the Softmax was:
    # bfloat16 rounding (2^-8) of the few values that differ by a float32 ulp.
    assert H.rel_diff(H.outputs(new, x), H.outputs(model, x)) <= 2**-7


class _ToyAttention(keras.layers.Layer):
    """Attention of another family: it normalises through a Softmax sublayer."""

    def __init__(self, num_heads=1, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads

    def build(self, input_shape):
        self.qkv = keras.layers.Dense(3 * input_shape[-1], name="qkv")
        self.qkv.build(input_shape)
        self._softmax = keras.layers.Softmax(axis=-1)

    def call(self, x):
        q, k, v = keras.ops.split(self.qkv(x), 3, axis=-1)
        scores = keras.ops.einsum("btd,bsd->bts", q, k)[:, None]  # one head
        return keras.ops.einsum("bts,bsd->btd", self._softmax(scores)[:, 0], v)


class _ToyBlock(keras.layers.Layer):
    """A transformer block: it creates its attention layer in `build`, as
    KerasHub's blocks do."""

    def build(self, input_shape):
        self.attention = _ToyAttention(name="attention")
        self.attention.build(input_shape)

    def call(self, x):
        return x + self.attention(x)


@keras.saving.register_keras_serializable(package="tests")
class _ToyBackbone(keras_hub.models.Backbone):
    def __init__(self, hidden_dim=8, **kwargs):
        inputs = keras.Input((None, hidden_dim))
        outputs = _ToyBlock(name="block")(inputs)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.hidden_dim = hidden_dim

    def get_config(self):
        return {**super().get_config(), "hidden_dim": self.hidden_dim}


def test_a_new_family_converts_once_its_classes_are_registered():
    model = _ToyBackbone()
    H.randomize(model, std=1.0)
    with pytest.raises(ValueError, match="_ToyBackbone has no MultiMax class"):
        to_multimax(model)

    @keras.saving.register_keras_serializable(package="tests")
    class MultiMaxToyBackbone(hub.MultiMaxBackbone, _ToyBackbone):
        pass

    hub.register_model(_ToyBackbone, MultiMaxToyBackbone)
    with pytest.raises(
        ValueError, match=r"block/attention': .*_ToyAttention\n.*register_attention"
    ):
        to_multimax(model)

    class MultiMaxToyAttention(hub.SoftmaxSublayerTwin, _ToyAttention):
        heads_attribute = "num_heads"

    hub.register_attention(_ToyAttention, MultiMaxToyAttention)
    new = to_multimax(model, per_head=True)
    assert type(new) is MultiMaxToyBackbone
    assert type(new.get_layer("block").attention) is MultiMaxToyAttention
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    assert H.rel_diff(_np(new(x)), _np(model(x))) <= TS0_BOUND
    H.activate(new)
    assert H.rel_diff(_np(new(x)), _np(model(x))) > ACTIVE_BOUND
    revived = type(new).from_config(new.get_config())
    revived.set_weights(new.get_weights())
    assert H.rel_diff(_np(revived(x)), _np(new(x))) <= TS0_BOUND


class _FlatAttention(_ToyAttention):
    """Called directly in a backbone's Functional graph, in no block."""


@keras.saving.register_keras_serializable(package="tests")
class _FlatBackbone(keras_hub.models.Backbone):
    def __init__(self, **kwargs):
        inputs = keras.Input((None, 8))
        outputs = _FlatAttention(name="attention")(inputs)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)


def test_attention_called_in_the_functional_graph_itself_raises():
    class MultiMaxFlatBackbone(hub.MultiMaxBackbone, _FlatBackbone):
        pass

    class MultiMaxFlatAttention(hub.SoftmaxSublayerTwin, _FlatAttention):
        heads_attribute = "num_heads"

    hub.register_model(_FlatBackbone, MultiMaxFlatBackbone)
    hub.register_attention(_FlatAttention, MultiMaxFlatAttention)
    with pytest.raises(ValueError, match="node of a Functional graph"):
        to_multimax(_FlatBackbone())


def test_multimax_twin_needs_a_built_layer_with_a_twin():
    with pytest.raises(ValueError, match="not built yet"):
        hub.multimax_twin(keras.layers.MultiHeadAttention(2, 4))
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    with pytest.raises(ValueError, match=r"keras.src.*Dense.*register_attention"):
        hub.multimax_twin(dense)


def test_multimax_twin_is_a_new_layer_with_the_originals_state():
    layer = keras_hub.layers.CachedMultiHeadAttention(2, 4, name="attention")
    layer.build((None, 3, 8), (None, 3, 8))
    H.randomize(layer)
    twin = hub.multimax_twin(layer, per_head=True)
    # The original stays what it was: a SoftMax layer, of its own class.
    assert type(layer) is keras_hub.layers.CachedMultiHeadAttention
    assert not isinstance(layer, hub.MultiMaxTwin)
    assert isinstance(twin, keras_hub.layers.CachedMultiHeadAttention)
    assert isinstance(twin, hub.MultiMaxTwin) and tuple(twin.ts.shape) == (2, 4)
    # Same variables, by path and value, besides the modulator.
    weights = {v.path: _np(v) for v in layer.weights}
    twin_weights = {v.path: _np(v) for v in twin.weights}
    assert set(twin_weights) - set(weights) == {"attention/ranges", "attention/ts"}
    for path, value in weights.items():
        np.testing.assert_array_equal(twin_weights[path], value)
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    assert H.rel_diff(_np(twin(x, x)), _np(layer(x, x))) <= TS0_BOUND


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma", "qwen3", "xlnet"])
def test_a_multimax_backbone_holds_twins_where_the_blocks_held_attention(family):
    """Each twin sits at its block's attribute, and at the same place in the
    block's tracked layers (so that the weights keep their order), with the
    constructor arguments of the layer it replaced."""
    original = H.backbone(family)
    new = to_multimax(original)
    old_blocks = [
        la
        for la in original._flatten_layers()
        if any(hub.attention_twin(type(child)) for child in _children(la))
    ]
    new_blocks = [
        la
        for la in new._flatten_layers()
        if any(isinstance(child, hub.MultiMaxTwin) for child in _children(la))
    ]
    assert old_blocks
    for old_block, new_block in zip(old_blocks, new_blocks, strict=True):
        for old, twin in zip(_children(old_block), _children(new_block), strict=True):
            if not isinstance(twin, hub.MultiMaxTwin):
                assert type(twin) is type(old)
                continue
            assert hub.attention_twin(type(old)) is type(twin)
            held = [name for name, value in vars(new_block).items() if value is twin]
            assert held and all(getattr(old_block, name) is old for name in held)
            for name, value in vars(old).items():
                if not name.startswith("_") and isinstance(
                    value, (bool, int, float, str, type(None))
                ):
                    assert getattr(twin, name) == value, name
    assert [_relative_path(v, original) for v in original.weights] == [
        _relative_path(v, new) for v in new.weights if v.name not in ("ranges", "ts")
    ]


def _children(layer):
    return layer._flatten_layers(include_self=False, recursive=False)


def _relative_path(variable, model):
    return variable.path.removeprefix(f"{model.name}/")


def test_a_backbone_nested_in_a_functional_model_converts():
    backbone = H.backbone("bert")
    H.randomize(backbone)
    inputs = {
        name: keras.Input(t.shape[1:], dtype=t.dtype, name=name)
        for name, t in backbone.input.items()
    }
    pooled = backbone(inputs)["pooled_output"]
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(pooled))
    new = to_multimax(model)
    (nested,) = [la for la in new.layers if isinstance(la, keras_hub.models.Backbone)]
    assert hub.is_multimax(nested) and not hub.is_multimax(backbone)
    x = H.inputs(backbone)
    assert H.rel_diff(_np(new(x)), _np(model(x))) <= TS0_BOUND
    np.testing.assert_array_equal(
        _np(new.get_layer("head").kernel), _np(model.get_layer("head").kernel)
    )
