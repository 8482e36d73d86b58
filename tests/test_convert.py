"""Tests of `keras_multimax.convert.to_multimax` on small transformer models."""

import warnings

import keras
import numpy as np
import numpy_reference as ref
import pytest
from layer_test_case import run_layer_test

from keras_multimax import Modulator
from keras_multimax import convert
from keras_multimax import layers

T, D, VOCAB, CLASSES = 6, 16, 20, 3
RNG = np.random.default_rng(31)
X = RNG.normal(size=(4, T, D)).astype("float32")
TOKENS = RNG.integers(1, VOCAB, size=(4, T))
TOKENS[0, 4:] = 0  # padding
TOKENS[2, 2:] = 0
LABELS = RNG.integers(0, CLASSES, size=(4,))


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _block(name="block"):
    """A functional transformer encoder block (MHA + FFN, residuals, norms)."""
    inputs = keras.Input((T, D))
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="self_attention")(
        inputs, inputs, use_causal_mask=True
    )
    h = keras.layers.LayerNormalization(name="norm1")(inputs + h)
    f = keras.layers.Dense(32, activation="relu", name="ffn_in")(h)
    f = keras.layers.Dense(D, name="ffn_out")(f)
    outputs = keras.layers.LayerNormalization(name="norm2")(h + f)
    return keras.Model(inputs, outputs, name=name)


def _functional_model():
    """Outer GQA layer + a nested functional block + a softmax head."""
    inputs = keras.Input((T, D))
    h = keras.layers.GroupQueryAttention(
        head_dim=4, num_query_heads=4, num_key_value_heads=2, name="gqa"
    )(inputs, inputs)
    h = _block()(inputs + h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="head")(h)
    return keras.Model(inputs, outputs, name="classifier")


def _sequential_model():
    """Embedding -> nested functional block -> Softmax layer head."""
    return keras.Sequential(
        [
            keras.Input((T,), dtype="int32"),
            keras.layers.Embedding(VOCAB, D, name="embed"),
            _block(),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(CLASSES, name="logits"),
            keras.layers.Softmax(name="probs"),
        ],
        name="seq_classifier",
    )


def _all_layers(model):
    return list(model._flatten_layers(include_self=False))


def _assert_converted(old, new, renamed=None):
    """`renamed` maps old layer names to new ones (a softmax Dense "x" -> "x_logits")."""
    renamed = renamed or {}
    kinds = [type(layer) for layer in _all_layers(new)]
    assert keras.layers.MultiHeadAttention not in kinds
    assert keras.layers.GroupQueryAttention not in kinds
    n_old = sum(
        type(layer)
        in (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention)
        for layer in _all_layers(old)
    )
    n_new = sum(
        isinstance(
            layer, (layers.MultiMaxAttention, layers.MultiMaxGroupQueryAttention)
        )
        for layer in _all_layers(new)
    )
    assert n_old == n_new > 0
    # Same values, separate variables, for every weight of the old model.
    new_by_path = {w.path: w for w in new.weights}
    old_ids = {id(w) for w in old.weights}
    assert not old_ids & {id(w) for w in new.weights}
    old_paths = []
    for w in old.weights:
        layer, _, rest = w.path.partition("/")
        path = f"{renamed.get(layer, layer)}/{rest}"
        old_paths.append(path)
        np.testing.assert_array_equal(_np(new_by_path[path]), _np(w), err_msg=w.path)
    extra = sorted(set(new_by_path) - set(old_paths))
    assert extra and all(p.split("/")[-1] in ("ranges", "ts") for p in extra), extra


@pytest.mark.parametrize("replace_softmax", [False, True])
def test_functional_with_nested_block_keeps_outputs(replace_softmax):
    model = _functional_model()
    new = convert.to_multimax(model, replace_softmax=replace_softmax)
    _assert_converted(model, new, {"head": "head_logits"} if replace_softmax else {})
    assert type(new.get_layer("gqa")) is layers.MultiMaxGroupQueryAttention
    block = new.get_layer("block")
    assert type(block.get_layer("self_attention")) is layers.MultiMaxAttention
    assert new.output_names == model.output_names == ["head"]
    if replace_softmax:
        assert new.get_layer("head_logits").get_config()["activation"] == "linear"
        assert type(new.get_layer("head")) is convert.ActivationMultiMax
    else:
        assert new.get_layer("head").get_config()["activation"] == "softmax"
    np.testing.assert_allclose(_np(new(X)), _np(model(X)), atol=1e-6)

    # Non-zero slopes: the new model is no longer the SoftMax model.
    for w in new.weights:
        if w.name == "ts":
            w.assign(np.full(w.shape, 0.5))
    assert np.max(np.abs(_np(new(X)) - _np(model(X)))) > 1e-4


def test_sequential_keeps_outputs():
    model = _sequential_model()
    new = convert.to_multimax(model, replace_softmax=True)
    assert isinstance(new, keras.Sequential) and new.name == model.name
    _assert_converted(model, new)
    assert type(new.get_layer("probs")) is layers.MultiMax
    np.testing.assert_allclose(_np(new(TOKENS)), _np(model(TOKENS)), atol=1e-6)


def test_padding_masks_keep_outputs():
    tokens = keras.Input((T,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, D, mask_zero=True)(tokens)
    h = keras.layers.MultiHeadAttention(2, 8, name="mha")(x, x)
    h = keras.layers.GlobalAveragePooling1D()(h)  # uses the propagated mask
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="head")(h)
    model = keras.Model(tokens, outputs)
    new = convert.to_multimax(model, replace_softmax=True)
    _assert_converted(model, new, {"head": "head_logits"})
    # Padded query positions attend to nothing under MultiMax (uniformly under
    # the fused SoftMax kernel): only there do the attention outputs differ ...
    old_att, new_att = (
        _np(keras.Model(m.inputs[0], m.get_layer("mha").output)(TOKENS))
        for m in (model, new)
    )
    pad = TOKENS == 0
    np.testing.assert_allclose(new_att[~pad], old_att[~pad], atol=1e-6)
    assert np.all(np.max(np.abs(new_att[pad] - old_att[pad]), axis=-1) > 1e-4)
    # ... and the masked pooling ignores them, so the model outputs agree.
    np.testing.assert_allclose(_np(new(TOKENS)), _np(model(TOKENS)), atol=1e-6)


def test_converted_attention_equals_multimax_formula():
    """The swapped-in output layer is MultiMax of the unchanged Dense logits."""
    model = _functional_model()
    new = convert.to_multimax(
        model, replace_softmax=True, modulator=Modulator(ts_initializer="ones")
    )
    head, multimax = new.get_layer("head_logits"), new.get_layer("head")
    np.testing.assert_array_equal(_np(head.kernel), _np(model.get_layer("head").kernel))
    pooled = keras.Model(new.inputs[0], head.input)(X)
    logits = _np(pooled) @ _np(head.kernel) + _np(head.bias)
    expected = ref.multimax(logits, _np(multimax.ranges), _np(multimax.ts))
    np.testing.assert_allclose(_np(new(X)), expected, rtol=1e-5, atol=1e-6)


def test_activation_softmax_and_options_pass_through():
    inputs = keras.Input((T, D))
    h = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    outputs = keras.layers.Activation("softmax", name="act")(h)
    model = keras.Model(inputs, outputs)
    modulator = Modulator(order=1, ts_regularizer="l2", ranges_constraint="non_neg")
    new = convert.to_multimax(
        model, replace_softmax=True, modulator=modulator, per_head=True
    )
    mha = new.get_layer("mha")
    assert mha.per_head and mha.modulator == modulator and tuple(mha.ts.shape) == (2, 2)
    assert isinstance(mha.modulator.ts_regularizer, keras.regularizers.L2)
    act = new.get_layer("act")
    assert type(act) is convert.ActivationMultiMax and act.modulator == modulator
    np.testing.assert_allclose(_np(new(X)), _np(model(X)), atol=1e-6)
    # 0.2.0's separate arguments still work, with a DeprecationWarning.
    with pytest.warns(DeprecationWarning, match="removed in 0.4.0"):
        old = convert.to_multimax(model, order=1, ts_regularizer="l2")
    assert old.get_layer("mha").modulator == Modulator(order=1, ts_regularizer="l2")


def test_lora_and_already_converted_layers_are_copied():
    inputs = keras.Input((T, D))
    mha = keras.layers.MultiHeadAttention(2, 4, name="mha")
    mm = layers.MultiMaxAttention(2, 4, name="mm")
    outputs = mm(mha(inputs, inputs), inputs)
    model = keras.Model(inputs, outputs)
    mha.query_dense.enable_lora(2)
    lora_b = mha.query_dense.lora_kernel_b
    lora_b.assign(RNG.normal(size=lora_b.shape))
    mm.ts.assign([0.5, -0.5, 0.3, 0.2])  # an existing MultiMax layer keeps its ts
    new = convert.to_multimax(model)
    assert new.get_layer("mha").query_dense.lora_enabled
    np.testing.assert_array_equal(_np(new.get_layer("mm").ts), _np(mm.ts))
    np.testing.assert_allclose(_np(new(X)), _np(model(X)), atol=1e-6)


@pytest.mark.slow
def test_converted_model_trains_and_saves(tmp_path):
    model = _sequential_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(TOKENS, LABELS, epochs=1, verbose=0)  # a "pretrained" model
    new = convert.to_multimax(model, replace_softmax=True, per_head=True)
    assert new.compiled  # compiled as the original, fresh optimizer
    new.compile(optimizer=keras.optimizers.Adam(0.01), loss=model.loss)
    before = {w.path: _np(w).copy() for w in new.weights if w.name in ("ranges", "ts")}
    assert all(np.all(v == 0) for p, v in before.items() if p.endswith("ts"))
    history = new.fit(TOKENS, LABELS, epochs=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for w in new.weights:
        if w.name in ("ranges", "ts"):
            assert np.any(_np(w) != before[w.path]), f"{w.path} did not train"
    path = str(tmp_path / "converted.keras")
    new.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(TOKENS, verbose=0), new.predict(TOKENS, verbose=0), atol=1e-6
    )


def test_original_model_is_untouched():
    model = _functional_model()
    before = [_np(w).copy() for w in model.weights]
    reference = _np(model(X))
    new = convert.to_multimax(model)
    for w in new.weights:
        w.assign(_np(w) + 1.0)
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(_np(w), b)
    np.testing.assert_array_equal(_np(model(X)), reference)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.mha = keras.layers.MultiHeadAttention(2, 4)

    def call(self, x):
        return self.mha(x, x)


class _BlockLayer(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.mha = keras.layers.MultiHeadAttention(2, 4)

    def call(self, x):
        return self.mha(x, x)


class _MyAttention(keras.layers.MultiHeadAttention):
    pass


def test_models_it_cannot_rebuild_get_clear_errors():
    sub = _Subclassed()
    sub(X)
    with pytest.raises(TypeError, match="subclassed.*MultiMaxAttention"):
        convert.to_multimax(sub)

    inputs = keras.Input((T, D))
    model = keras.Model(inputs, _BlockLayer(name="custom")(inputs))
    with pytest.raises(TypeError, match="'custom'.*inside its own code"):
        convert.to_multimax(model)

    inputs = keras.Input((T, D))
    model = keras.Model(inputs, _MyAttention(2, 4, name="mine")(inputs, inputs))
    with pytest.raises(TypeError, match="'mine'.*subclass of MultiHeadAttention"):
        convert.to_multimax(model)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"replace_softmax": "yes"}, TypeError, "replace_softmax='yes'"),
        ({"modulator": {"order": 0}}, ValueError, "order=0"),
        ({"per_head": None}, TypeError, "per_head=None"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        convert.to_multimax(_functional_model(), **kwargs)


def test_not_a_model():
    with pytest.raises(TypeError, match="expects a `keras.Model`"):
        convert.to_multimax(keras.layers.Dense(2))


def test_activation_multimax_standard_checks():
    run_layer_test(
        convert.ActivationMultiMax,
        # ts ≠ 0: at ts = 0 the gradient of `ranges` is 0, and one training
        # step must move every MultiMax weight.
        {"modulator": Modulator(order=1, ts_initializer="ones", ts_regularizer="l1")},
        X,
        expected_output_shape=X.shape,
        expected_num_trainable_weights=2,
    )


def test_dense_softmax_on_masked_sequence_ignores_the_mask_like_dense():
    # T == number of classes: a Keras (B, T) mask would broadcast silently
    # onto the class axis if the inserted MultiMax applied it.
    tokens = keras.Input((T,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, D, mask_zero=True)(tokens)
    outputs = keras.layers.Dense(T, activation="softmax", name="tagger")(x)
    model = keras.Model(tokens, outputs)
    new = convert.to_multimax(model, replace_softmax=True)
    out = new(TOKENS)
    np.testing.assert_allclose(_np(out), _np(model(TOKENS)), atol=1e-6)
    np.testing.assert_array_equal(_np(out._keras_mask), TOKENS != 0)


def test_bad_activation_multimax_axis():
    with pytest.raises(ValueError, match="axis=1"):
        convert.ActivationMultiMax(axis=1)


def test_run_layer_test_fails_when_no_multimax_weight_is_trained():
    # Control: a layer without `ranges`/`ts` must not pass the "one training
    # step moves every MultiMax weight" check by checking nothing.
    with pytest.raises(AssertionError, match="no trainable weight named"):
        run_layer_test(
            keras.layers.Dense,
            {"units": 3},
            X,
            expected_output_shape=(4, T, 3),
            expected_num_trainable_weights=2,
        )


def _two_output_inputs_and_heads():
    inputs = keras.Input((T, D))
    h = keras.layers.MultiHeadAttention(2, 8, name="mha")(inputs, inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    cls = keras.layers.Dense(CLASSES, activation="softmax", name="cls")(h)
    reg = keras.layers.Dense(1, name="reg")(h)
    return inputs, cls, reg


@pytest.mark.parametrize("outputs_as", ["list", "dict"])
def test_output_names_and_compiled_dicts_keyed_by_them_survive(outputs_as):
    inputs, cls, reg = _two_output_inputs_and_heads()
    outputs = [cls, reg] if outputs_as == "list" else {"cls": cls, "reg": reg}
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer="sgd",
        loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"},
        loss_weights={"cls": 1.0, "reg": 0.5},
        metrics={"cls": ["sparse_categorical_accuracy"], "reg": ["mae"]},
    )
    y_reg = RNG.normal(size=(4, 1)).astype("float32")
    y = [LABELS, y_reg] if outputs_as == "list" else {"cls": LABELS, "reg": y_reg}
    old_history = model.fit(X, y, epochs=1, verbose=0).history

    new = convert.to_multimax(model, replace_softmax=True)
    assert new.output_names == model.output_names == ["cls", "reg"]
    assert type(new.get_layer("cls")) is convert.ActivationMultiMax
    assert new.get_layer("cls_logits").get_config()["activation"] == "linear"
    assert new.compiled
    new_history = new.fit(X, y, epochs=1, verbose=0).history
    assert sorted(new_history) == sorted(old_history)
    assert "cls_sparse_categorical_accuracy" in new_history
    assert all(np.isfinite(v[0]) for v in new_history.values())


def test_logits_name_collision_gets_a_suffix():
    inputs = keras.Input((D,))
    h = keras.layers.Dense(D, name="head_logits")(inputs)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="head")(h)
    model = keras.Model(inputs, outputs)
    new = convert.to_multimax(model, replace_softmax=True)
    assert new.get_layer("head_logits").get_config()["activation"] == "linear"
    assert new.get_layer("head_logits").units == D
    assert new.get_layer("head_logits_1").units == CLASSES
    assert new.output_names == ["head"]
    x = X[:, 0]
    np.testing.assert_allclose(_np(new(x)), _np(model(x)), atol=1e-6)


def test_sequential_dense_softmax_keeps_its_name():
    model = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(CLASSES, activation="softmax", name="probs"),
        ]
    )
    new = convert.to_multimax(model, replace_softmax=True)
    assert [layer.name for layer in new.layers] == ["probs_logits", "probs"]
    x = X[:, 0]
    np.testing.assert_allclose(_np(new(x)), _np(model(x)), atol=1e-6)


def _quantized_model(mode):
    inputs = keras.Input((T, D))
    h = keras.layers.MultiHeadAttention(2, 8, name="mha")(inputs, inputs)
    h = keras.layers.GroupQueryAttention(4, 4, 2, name="gqa")(h, h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="head")(h)
    model = keras.Model(inputs, outputs)
    with warnings.catch_warnings():  # "Layer ... has no `quantize` method"
        warnings.simplefilter("ignore", UserWarning)
        model.quantize(mode)
    return model


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantized_model_converts_with_the_same_quantized_weights(mode):
    model = _quantized_model(mode)
    if mode != "float8":  # QLoRA: adapters on a quantized projection
        model.get_layer("mha").query_dense.enable_lora(2)
        lora_b = model.get_layer("mha").query_dense.lora_kernel_b
        lora_b.assign(RNG.normal(size=lora_b.shape))
    new = convert.to_multimax(model, replace_softmax=True)
    _assert_converted(model, new, {"head": "head_logits"})
    for name in ("mha", "gqa"):
        for attr in ("_query_dense", "_key_dense", "_value_dense", "_output_dense"):
            assert getattr(new.get_layer(name), attr).quantization_mode == mode
    assert new.get_layer("head_logits").quantization_mode == mode
    assert new.get_layer("head").dtype_policy.quantization_mode is None
    if mode != "float8":
        assert new.get_layer("mha").query_dense.lora_enabled
    np.testing.assert_allclose(_np(new(X)), _np(model(X)), atol=1e-6)
    for w in new.weights:
        if w.name == "ts":
            w.assign(np.full(w.shape, 0.5))
    assert np.max(np.abs(_np(new(X)) - _np(model(X)))) > 1e-4


def test_quantization_that_cannot_be_repeated_says_convert_first(monkeypatch):
    model = _quantized_model("int8")

    def refuse(self, mode=None, type_check=True, config=None):
        raise NotImplementedError(f"cannot quantize to {mode}")

    monkeypatch.setattr(keras.layers.EinsumDense, "quantize", refuse)
    with pytest.raises(
        ValueError,
        match="'int8'-quantized layer 'mha/query'.*Convert before quantizing",
    ):
        convert.to_multimax(model)


class _SoftmaxAttention(keras.layers.Layer):
    """A custom attention layer normalising through a `keras.layers.Softmax`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scores_softmax = keras.layers.Softmax(axis=-1, name="scores_softmax")

    def call(self, x):
        scores = keras.ops.einsum("btd,bsd->bts", x, x)
        return keras.ops.einsum("bts,bsd->btd", self.scores_softmax(scores), x)


def test_softmax_inside_a_custom_layer_raises_naming_it():
    # B7: on aba9263 this returned a plain copy without MultiMax, silently.
    inputs = keras.Input((T, D))
    h = keras.layers.MultiHeadAttention(2, 8, name="mha")(inputs, inputs)
    outputs = _SoftmaxAttention(name="custom_attention")(h)
    model = keras.Model(inputs, outputs)
    with pytest.raises(
        ValueError,
        match=r"'custom_attention' \(_SoftmaxAttention\) holds the Softmax layer "
        r"'scores_softmax'(.|\n)*keras_multimax.layers.MultiMax",
    ):
        convert.to_multimax(model)


@pytest.mark.parametrize("replace_softmax", [False, True])
def test_nothing_to_convert_raises(replace_softmax):
    # B7: on aba9263 this returned a plain copy without MultiMax, silently.
    inputs = keras.Input((T, D))
    h = keras.layers.Dense(D, activation="relu", name="ffn")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, name="logits")(h))
    with pytest.raises(ValueError, match="found nothing to convert.*'ffn', 'logits'"):
        convert.to_multimax(model, replace_softmax=replace_softmax)
    sequential = keras.Sequential([keras.Input((D,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="found nothing to convert"):
        convert.to_multimax(sequential, replace_softmax=replace_softmax)


def test_unbuilt_sequential_raises():
    # B8: on aba9263 this returned an unbuilt model.
    model = keras.Sequential(
        [keras.layers.Embedding(VOCAB, D), keras.layers.MultiHeadAttention(2, 8)]
    )
    with pytest.raises(ValueError, match="is not built.*keras.Input.*built=False"):
        convert.to_multimax(model)
