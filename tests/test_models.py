"""Tests of the model builders (tiny configurations)."""

import os

import keras
import numpy as np
import numpy_reference as ref
import pytest
from backend_helpers import to_numpy

from keras_multimax import Modulator
from keras_multimax import layers
from keras_multimax import models
from keras_multimax.models._cached_attention import CachedMultiHeadAttention

TINY = {"hidden_dim": 8, "num_heads": 2, "mlp_dim": 8}
RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(size=(4, 8, 8, 1)).astype("float32")
LABELS = RNG.integers(0, 10, size=(4,)).astype("int32")
TOKENS = RNG.integers(1, 20, size=(4, 8)).astype("int32")
SOURCE = np.concatenate(
    [RNG.integers(3, 12, size=(4, 4)), np.zeros((4, 2))], axis=1
).astype("int32")
DECODER = RNG.integers(1, 10, size=(4, 5)).astype("int32")


def vit(**kwargs):
    return models.ViTClassifier(
        (8, 8, 1), 10, **{"patch_size": 4, "num_layers": 1, **TINY, **kwargs}
    )


def lm(**kwargs):
    return models.TransformerLM(20, 8, num_layers=1, **{**TINY, **kwargs})


def translator(**kwargs):
    return models.TransformerTranslator(
        12,
        10,
        source_length=6,
        target_length=5,
        num_encoder_layers=1,
        num_decoder_layers=1,
        **{**TINY, **kwargs},
    )


CASES = {
    "vit": (vit, IMAGES, LABELS),
    "lm": (lm, TOKENS, np.roll(TOKENS, -1, axis=1)),
    "translator": (translator, [SOURCE, DECODER], np.roll(DECODER, -1, axis=1)),
}


def _compile(model, optimizer, **kwargs):
    """Keras' own compile: the builders output logits; the translator pads with 0."""
    ignore = (
        {"ignore_class": 0} if isinstance(model, models.TransformerTranslator) else {}
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, **ignore)
    model.compile(optimizer=optimizer, loss=loss, **kwargs)


def _adamw(model, **kwargs):
    """AdamW with the modulators, biases and norms kept out of weight decay."""
    optimizer = keras.optimizers.AdamW(**kwargs)
    models.exclude_modulator_from_weight_decay(optimizer, model)
    return optimizer


def _modulator_paths(model):
    return sorted(
        w.path for w in model.weights if w.path.split("/")[-1] in ("ranges", "ts")
    )


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["multimax", "softmax"])
def test_config_round_trip_keeps_every_argument(case, kind):
    build, x, _ = CASES[case]
    model = build(
        attention=kind, head=kind, per_head=True, modulator=Modulator(order=3)
    )
    config = model.get_config()
    assert config["modulator"]["config"]["order"] == 3
    for name in (
        "attention",
        "head",
        "modulator",
        "per_head",
        "hidden_dim",
        "num_heads",
        "mlp_dim",
        "dropout",
    ):
        assert name in config, name
    clone = type(model).from_config(config)
    assert clone.get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(model)
    )
    assert type(revived) is type(model)
    assert revived.get_config() == config


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_and_head_choice_picks_the_layers(case):
    build, _, _ = CASES[case]
    multimax = build(attention="multimax", head="multimax")
    softmax = build(attention="softmax", head="softmax")
    mixed = build(attention="softmax", head="multimax")
    assert any(isinstance(lay, layers.MultiMaxAttention) for lay in _all(multimax))
    assert isinstance(multimax.head_layers[-1], layers.SegLU)
    assert not any(isinstance(lay, layers.MultiMaxAttention) for lay in _all(softmax))
    # MultiHeadAttention with the builders' key/value cache.
    assert any(type(lay) is CachedMultiHeadAttention for lay in _all(softmax))
    assert _modulator_paths(softmax) == []
    # Only the head carries a modulator.
    assert _modulator_paths(mixed) == ["head_seglu/ranges", "head_seglu/ts"]


def _all(model):
    return model._flatten_layers(include_self=False, recursive=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_keras_file_round_trip_and_one_fit_step(case, tmp_path):
    build, x, y = CASES[case]
    # ts != 0 at the start: at ts = 0 the gradient of `ranges` is zero.
    model = build(per_head=True, modulator="paper")
    _compile(model, _adamw(model, learning_rate=1e-2))
    before = {w.path: to_numpy(w) for w in model.weights}
    history = model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    paths = _modulator_paths(model)
    assert paths  # attention layers and head
    for w in model.weights:
        if w.path in paths:
            assert not np.array_equal(before[w.path], to_numpy(w)), w.path
    expected = model.predict(x, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    # Keras' compile configuration comes back (exclusions from weight decay
    # are not part of it: exclude_modulator_from_weight_decay says so).
    assert isinstance(loaded.optimizer, keras.optimizers.AdamW)


@pytest.mark.parametrize("case", sorted(CASES))
def test_zero_ts_multimax_model_equals_softmax_model(case):
    """With ts = 0 every MultiMax is SoftMax: same weights give the same outputs."""
    build, x, _ = CASES[case]
    softmax = build(attention="softmax", head="softmax")
    multimax = build(attention="multimax", head="multimax")  # ts = 0 by default
    source = {w.path: w for w in softmax.weights}
    shared = 0
    for w in multimax.weights:
        if w.path in source:
            w.assign(to_numpy(source[w.path]))  # a copy: JAX predict donates buffers
            shared += 1
    assert shared == len(softmax.weights)
    np.testing.assert_allclose(
        multimax.predict(x, verbose=0), softmax.predict(x, verbose=0), atol=1e-5
    )
    # ... and a non-zero ts changes them.
    for w in multimax.weights:
        if w.path.endswith("/ts"):
            w.assign(np.full(w.shape, 0.5, "float32"))
    assert not np.allclose(
        multimax.predict(x, verbose=0), softmax.predict(x, verbose=0), atol=1e-4
    )


# Eager fit on TensorFlow only: on JAX it runs op by op (a minute here) the
# same optimizer code that the compiled step runs.
@pytest.mark.parametrize(
    "run_eagerly", [False] + ([True] if keras.backend.backend() == "tensorflow" else [])
)
def test_adamw_decays_everything_but_modulators_biases_and_norms(run_eagerly):
    model = vit()
    # A loss with zero gradients: Adam moves nothing, only decoupled weight
    # decay acts, multiplying decayed weights by 1 - lr * wd = 0.95.
    model.compile(
        optimizer=_adamw(model, learning_rate=0.1, weight_decay=0.5),
        loss=lambda y, logits: 0.0 * keras.ops.sum(logits),
        run_eagerly=run_eagerly,
    )
    variables = model.trainable_variables
    before = [to_numpy(v) for v in variables]
    model.fit(IMAGES, LABELS, epochs=1, batch_size=len(IMAGES), verbose=0)
    kept = {"ranges", "ts", "bias", "gamma", "beta"}
    checked = set()
    for v, old in zip(variables, before):
        name = v.path.split("/")[-1]
        expected = old if name in kept else old * 0.95
        np.testing.assert_allclose(to_numpy(v), expected, rtol=1e-6, err_msg=v.path)
        checked.add(name)
    assert {"ranges", "ts", "kernel", "embeddings"} <= checked


def test_exclude_modulator_from_weight_decay_returns_the_variables_it_excludes():
    model = vit()
    excluded = models.exclude_modulator_from_weight_decay(
        keras.optimizers.AdamW(weight_decay=0.1), model
    )
    expected = {
        v.path
        for v in model.trainable_variables
        if v.path.split("/")[-1] in ("ranges", "ts", "bias", "gamma", "beta")
    }
    assert {v.path for v in excluded} == expected
    assert "encoder_block_0/self_attention/ts" in expected
    with pytest.raises(ValueError, match="optimizer=Adam with weight_decay=None"):
        models.exclude_modulator_from_weight_decay(keras.optimizers.Adam(), model)


def test_lm_attention_maps_equal_numpy_multimax_of_the_layer_weights():
    """Independent reference: the first layer's causal MultiMax attention by hand."""
    model = lm(per_head=True)
    block = model.blocks[0]
    attention = block.attention
    for name in ("ranges", "ts"):
        w = getattr(attention, name)
        w.assign(RNG.normal(scale=0.5, size=w.shape).astype("float32"))
    x = to_numpy(model.token_embedding.embeddings)[TOKENS]
    x = x + to_numpy(model.position_embedding.embeddings)[: TOKENS.shape[1]]
    gamma, beta = to_numpy(block.norm1.gamma), to_numpy(block.norm1.beta)
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    h = (x - mean) / np.sqrt(var + 1e-6) * gamma + beta
    q = np.einsum("btd,dhk->bthk", h, to_numpy(attention.query_dense.kernel))
    q = q + to_numpy(attention.query_dense.bias)
    k = np.einsum("btd,dhk->bthk", h, to_numpy(attention.key_dense.kernel))
    k = k + to_numpy(attention.key_dense.bias)
    scores = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    causal = np.tril(np.ones((8, 8), bool))
    ranges = to_numpy(attention.ranges)[:, None, None, :]
    ts = to_numpy(attention.ts)[:, None, None, :]
    expected = ref.multimax(scores, ranges, ts, mask=causal)

    maps = model.attention_maps(TOKENS)
    assert sorted(maps) == ["decoder_block_0/self_attention"]
    probs, mask = maps["decoder_block_0/self_attention"]
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    np.testing.assert_array_equal(mask[0, 0], causal)


def test_translator_attention_maps_mask_padding_keys():
    model = translator()
    maps = model.attention_maps([SOURCE, DECODER])
    assert sorted(maps) == [
        "decoder_block_0/cross_attention",
        "decoder_block_0/self_attention",
        "encoder_block_0/self_attention",
    ]
    for name in ("encoder_block_0/self_attention", "decoder_block_0/cross_attention"):
        probs, mask = maps[name]
        # The last two source positions are padding: zero weight, masked out.
        np.testing.assert_array_equal(probs[..., 4:], 0.0)
        assert not mask[..., 4:].any() and mask[..., :4].all()
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    probs, _ = maps["decoder_block_0/self_attention"]
    np.testing.assert_array_equal(probs * np.triu(np.ones((5, 5)), 1), 0.0)


def test_greedy_decode_equals_step_by_step_decoding_with_the_full_model():
    """greedy_decode (encoder once, decoder per step) vs predict on the whole model."""
    model = translator(per_head=True)
    for w in model.weights:
        if w.path.split("/")[-1] == "ts":
            w.assign(RNG.normal(scale=0.5, size=w.shape).astype("float32"))
    # Make some tokens end the sequence early.
    model.head_layers[0].bias.assign(np.linspace(-1, 1, 10).astype("float32"))
    generated = to_numpy(model.greedy_decode(SOURCE))
    assert generated.shape == (4, 5)

    tokens = np.zeros((4, 5), "int32")
    tokens[:, 0] = 1
    expected = np.zeros((4, 5), "int32")
    finished = np.zeros(4, bool)
    for i in range(5):
        logits = model.predict([SOURCE, tokens], verbose=0)
        nxt = np.where(finished, 0, logits[:, i].argmax(-1))
        expected[:, i] = nxt
        finished |= nxt == 2
        if i + 1 < 5:
            tokens[:, i + 1] = nxt
    np.testing.assert_array_equal(generated, expected)
    with pytest.raises(ValueError, match="max_length=6"):
        model.greedy_decode(SOURCE, max_length=6)


def test_greedy_decode_applies_multimax_at_every_step():
    """Changing the decoder's modulator changes the decoding (it is not skipped)."""
    model = translator()
    model.head_layers[0].bias.assign(np.linspace(-1, 1, 10).astype("float32"))
    for w in model.weights:
        if w.path.split("/")[-1] == "ts":
            w.assign(np.zeros(w.shape, "float32"))
    plain = to_numpy(model.greedy_decode(SOURCE))
    changed = []
    for scale in (2.0, -2.0, 5.0):
        for w in model.decoder_blocks[0].attention.weights:
            if w.path.endswith("/ts"):
                w.assign(np.full(w.shape, scale, "float32"))
        changed.append(not np.array_equal(to_numpy(model.greedy_decode(SOURCE)), plain))
    assert any(changed)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attention": "sparsemax"}, "attention='sparsemax'"),
        ({"head": "linear"}, "head='linear'"),
        ({"num_heads": 3}, "hidden_dim=8, num_heads=3"),
        ({"dropout": 1.5}, "dropout=1.5"),
        ({"num_layers": 0}, "num_layers=0"),
        ({"patch_size": 3}, "patch_size=3"),
    ],
)
def test_vit_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vit(**kwargs)


def test_lm_and_translator_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size=0"):
        models.TransformerLM(0, 8)
    with pytest.raises(ValueError, match="target_vocab_size=2"):
        models.TransformerTranslator(10, 2)
    with pytest.raises(ValueError, match=r"image_shape=\(8, 8\)"):
        models.ViTClassifier((8, 8), 10)


def test_inputs_longer_than_the_maximum_length_raise_a_clear_value_error():
    translator = models.TransformerTranslator(
        12, 10, source_length=6, target_length=4, num_encoder_layers=1,
        num_decoder_layers=1, hidden_dim=8, num_heads=2, mlp_dim=16,
    )  # fmt: skip
    lm = models.TransformerLM(
        20, 8, num_layers=1, hidden_dim=8, num_heads=2, mlp_dim=16
    )
    ids = lambda length: np.ones((2, length), "int32")  # noqa: E731
    # The maximum lengths themselves and shorter inputs work.
    assert translator((ids(6), ids(4))).shape == (2, 4, 10)
    assert translator((ids(3), ids(2))).shape == (2, 2, 10)
    assert lm(ids(8)).shape == (2, 8, 20)
    with pytest.raises(ValueError, match=r"'source_position_embedding'.* 7,.*=6"):
        translator((ids(7), ids(4)))
    with pytest.raises(ValueError, match=r"'target_position_embedding'.* 5,.*=4"):
        translator((ids(6), ids(5)))
    with pytest.raises(ValueError, match=r"'position_embedding'.* 9,.*=8"):
        lm(ids(9))
    # Also inside predict's traced function (static batch shape).
    with pytest.raises(ValueError, match=r"'source_position_embedding'.* 7,.*=6"):
        translator.predict((ids(7), ids(4)), verbose=0)


def test_mlp_gelu_equals_keras_exact_gelu():
    from keras_multimax.models._blocks import exact_gelu

    x = np.linspace(-10.0, 10.0, 2001, dtype="float32")
    np.testing.assert_allclose(
        to_numpy(exact_gelu(x)),
        to_numpy(keras.activations.gelu(x, approximate=False)),
        atol=1e-6,
    )


TF2ONNX = "tf2onnx converts TensorFlow graphs (model.export(format='onnx') on TF)"


@pytest.mark.only_backend("tensorflow", reason=TF2ONNX)
def test_builders_trace_erf_not_erfc():
    """The builders' GELU avoids the `Erfc` op of Keras' GELU.

    tf2onnx cannot convert `Erfc`: with it, a direct
    `model.export(format="onnx")` of any builder failed.
    """
    import tensorflow as tf

    for model, inputs in ((vit(), IMAGES), (lm(), TOKENS)):
        spec = tf.TensorSpec([None, *inputs.shape[1:]], inputs.dtype)
        fn = tf.function(lambda x, m=model: m(x, training=False))
        graph = fn.get_concrete_function(spec).graph
        op_types = {op.type for op in graph.get_operations()}
        for f in graph.as_graph_def().library.function:
            op_types |= {node.op for node in f.node_def}
        assert "Erf" in op_types and "Erfc" not in op_types, model.name


@pytest.mark.slow
@pytest.mark.only_backend("tensorflow", reason=TF2ONNX)
def test_vit_exports_to_onnx_directly(tmp_path):
    import onnxruntime as ort

    model = vit()
    want = to_numpy(model(IMAGES, training=False))
    path = str(tmp_path / "vit.onnx")
    model.export(path, format="onnx", verbose=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: IMAGES})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
