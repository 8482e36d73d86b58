"""The attention layers take Keras' ``flash_attention`` switch, with Keras' meaning.

``True`` computes the attention block by block
(`ops.multimax_dot_product_attention`), ``False`` materialises the scores,
``None`` lets `layers.use_blockwise_attention` choose by size. Both paths
must compute the same function, values and gradients, and the switch must
raise Keras' own errors where Keras' layers raise them.
"""

import re

import keras
import numpy as np
import pytest
from backend_helpers import to_numpy
from backend_helpers import variable_gradients
from tolerances import assert_close
from tolerances import assert_defect_caught

from keras_multimax import layers
from keras_multimax.layers import multimax_attention

RNG = np.random.default_rng(5)
X = RNG.normal(size=(2, 7, 8)).astype("float32")
Y = RNG.normal(size=(2, 9, 8)).astype("float32")
# Padding of the second sequence's last keys, and a query that sees nothing.
MASK = np.ones((2, 7, 9), bool)
MASK[1, :, 6:] = False
MASK[0, 3] = False

MHA_ARGS = {"num_heads": 4, "key_dim": 4}
GQA_ARGS = {"head_dim": 4, "num_query_heads": 4, "num_key_value_heads": 2}
KINDS = {
    "mha": (layers.MultiMaxAttention, keras.layers.MultiHeadAttention, MHA_ARGS),
    "gqa": (
        layers.MultiMaxGroupQueryAttention,
        keras.layers.GroupQueryAttention,
        GQA_ARGS,
    ),
}
# Both paths compute in float32 and differ in the order of their sums: over
# 9 keys (one online log-sum-exp step per block against one softmax) and 4
# features, through two projections. A few roundings per operation; 64 eps
# relative to the largest magnitude leaves a margin of ~10x over what is seen,
# and the control below shows that ignoring ts exceeds it 10 times.
DEPTH = 64
# The weights' gradients are sums over the score entries (up to B * H * T * S
# = 504: ranges, ts and the key bias) of terms that can be far larger than
# their sum: rounding errors add up as a random walk, so the bound grows with
# the square root of the count.
SUM_DEPTH = DEPTH * np.sqrt(2 * 4 * 7 * 9)


def _layer(kind, **kwargs):
    ours, _, args = KINDS[kind]
    layer = ours(**args, **kwargs)
    layer(X, Y)
    return layer


def _same_weights(target, source):
    for t, s in zip(target.weights, source.weights):
        t.assign(s.value)


def _pair(kind, per_head):
    """A blockwise and a materialised layer with the same weights, far from SoftMax."""
    flash = _layer(kind, flash_attention=True, per_head=per_head)
    rng = np.random.default_rng(1)
    for w in flash.weights:
        name = w.path.split("/")[-1]
        if name == "ts":
            value = rng.uniform(0.5, 1.0, w.shape) * rng.choice([-1, 1], w.shape)
        else:
            value = rng.normal(scale=0.5, size=w.shape)
        w.assign(value.astype("float32"))
    plain = _layer(kind, flash_attention=False, per_head=per_head)
    _same_weights(plain, flash)
    return flash, plain


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("masking", ["mask", "causal"])
def test_blockwise_layer_equals_the_materialised_one(
    blockwise_spy, kind, per_head, masking
):
    flash, plain = _pair(kind, per_head)
    kwargs = (
        {"attention_mask": MASK} if masking == "mask" else {"use_causal_mask": True}
    )

    def run(layer):
        return variable_gradients(
            lambda: layer(X, Y, **kwargs), layer.trainable_weights, mode="eager"
        )

    calls = len(blockwise_spy)
    expected, expected_grads = run(plain)
    assert len(blockwise_spy) == calls, "flash_attention=False ran the blockwise op"
    actual, grads = run(flash)
    assert len(blockwise_spy) > calls, (
        "flash_attention=True did not run the blockwise op"
    )
    assert_close(actual, expected, "float32", DEPTH, what="output")
    for w, g, e in zip(flash.trainable_weights, grads, expected_grads):
        assert_close(g, e, "float32", SUM_DEPTH, what=f"gradient of {w.path}")
    assert any(
        np.abs(g).max() > 0
        for w, g in zip(flash.trainable_weights, grads)
        if w.path.endswith("/ts")
    )
    # Control: the same layer with ts = 0 (SoftMax) is far outside the bound.
    for w in plain.weights:
        if w.path.endswith("/ts"):
            w.assign(np.zeros(w.shape, "float32"))
    softmax = to_numpy(plain(X, Y, **kwargs))
    assert_defect_caught(softmax, to_numpy(expected), "float32", DEPTH)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("flag", [True, False, None])
@pytest.mark.parametrize("enabled", [True, False])
def test_the_switch_is_computed_as_keras_computes_it(kind, flag, enabled):
    ours, parent, args = KINDS[kind]
    was = keras.config.is_flash_attention_enabled()
    try:
        if enabled:
            keras.config.enable_flash_attention()
        else:
            keras.config.disable_flash_attention()
        expected = parent(**args, flash_attention=flag)._flash_attention
        assert ours(**args, flash_attention=flag)._flash_attention is expected
    finally:
        if was is False:
            keras.config.disable_flash_attention()
        else:
            keras.config.enable_flash_attention()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_none_chooses_by_the_size_of_the_scores(blockwise_spy, kind, monkeypatch):
    layer = _layer(kind)  # flash_attention=None, Keras' default
    assert layer._flash_attention is None
    layer(X, Y)
    assert not blockwise_spy, "7 x 9 scores took the blockwise path"
    # B * H * T * S = 2 * 4 * 7 * 9 = 504 score entries.
    monkeypatch.setattr(multimax_attention, "BLOCKWISE_MIN_SCORES", 504)
    layer(X, Y)
    assert len(blockwise_spy) == 1
    # Dropout and returned scores need the probabilities: materialised.
    layer(X, Y, return_attention_scores=True)
    assert len(blockwise_spy) == 1


def _error(fn):
    """The class and message of what ``fn`` raises, without Keras' call wrapper
    ("Exception encountered when calling <class>.call() ...")."""
    with pytest.raises(Exception) as info:  # noqa: B017  # compared below
        fn()
    message = str(info.value)
    wrapped = re.search("\x1b\\[1m(.*)\x1b\\[0m", message, re.S)
    return type(info.value), wrapped.group(1) if wrapped else message


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_flash_attention_with_errors_as_in_keras(kind):
    """Keras' `test_flash_attention_with_errors`, ours against Keras' layers."""
    ours, parent, args = KINDS[kind]
    for make in (ours, parent):
        with pytest.raises(ValueError, match="Dropout is not supported"):
            make(**args, flash_attention=True, dropout=0.1)
    errors = []
    for make in (parent, ours):
        layer = make(**args, flash_attention=True)
        assert layer._flash_attention is True
        errors.append(
            _error(lambda layer=layer: layer(X, X, return_attention_scores=True))
        )
    assert errors[0][0] is ValueError and "Returning attention scores" in errors[0][1]
    assert errors[1] == errors[0]


def test_several_attention_axes_with_flash_attention_raise():
    layer = layers.MultiMaxAttention(2, 4, attention_axes=(1, 2), flash_attention=True)
    with pytest.raises(ValueError, match="one attention axis.*2 attention axes"):
        layer(np.ones((2, 3, 4, 8), "float32"), np.ones((2, 3, 4, 8), "float32"))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_functional_model_with_flash_attention_trains_and_reloads(kind, tmp_path):
    ours, _, args = KINDS[kind]
    inputs = keras.Input((7, 8))
    outputs = ours(**args, flash_attention=True, name="attention")(
        inputs, inputs, use_causal_mask=True
    )
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    history = model.fit(X, X, epochs=2, batch_size=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    path = str(tmp_path / "flash.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    # Keras does not serialise `flash_attention`; a loaded layer follows the
    # global switch, and either path computes the same function.
    assert_close(to_numpy(loaded(X)), to_numpy(model(X)), "float32", DEPTH)
