"""Converted KerasHub models follow Keras' flash switch, on both backends.

With the switch on (Keras' default) and scores at least
`BLOCKWISE_MIN_SCORES` entries, their attention runs block by block
(`ops.multimax_dot_product_attention`); with
`keras.config.disable_flash_attention()` it materialises the scores. Both
compute the same model. The threshold is lowered here so that tiny models
take the blockwise path. As in their parents, the layers built on Keras'
MultiHeadAttention (GPT-2's) read the switch when they are created, the
KerasHub family layers (Llama's, Gemma's) when they are called.
"""

import hub_models as H
import keras
import numpy as np
import pytest

from keras_multimax.convert import to_multimax
from keras_multimax.layers import multimax_attention

# One family per attention implementation with a blockwise path: GPT-2
# (CachedMultiHeadAttention, MultiMaxAttention's path), Llama (the rotary
# twins) and Gemma (grouped heads read once per group).
NAMES = ("gpt2", "llama", "gemma")


@pytest.fixture
def blockwise_calls(blockwise_spy, monkeypatch):
    """The blockwise op's calls (conftest's `blockwise_spy`), with the
    blockwise path taken from the smallest scores up."""
    monkeypatch.setattr(multimax_attention, "BLOCKWISE_MIN_SCORES", 1)
    return blockwise_spy


def _materialised(fn):
    was = keras.config.is_flash_attention_enabled()
    keras.config.disable_flash_attention()
    try:
        return fn()
    finally:
        if was is not False:
            keras.config.enable_flash_attention()


@pytest.mark.parametrize("name", NAMES)
def test_blockwise_and_materialised_conversions_agree(blockwise_calls, name):
    model = H.task(name)
    H.randomize(model)
    new = to_multimax(model)
    plain = _materialised(lambda: to_multimax(model))
    for converted in (new, plain):
        H.activate(converted)  # the same draws for both
    x = H.inputs(new)
    expected = _materialised(lambda: H.outputs(plain, x))
    expected_grads = _materialised(lambda: H.modulator_gradients(plain, x))
    assert not blockwise_calls, "disable_flash_attention() ran the blockwise op"
    actual = H.outputs(new, x)
    assert blockwise_calls, "the switch on did not run the blockwise op"
    # The same float32 ops in another summation order: CACHE_BOUND's reason.
    assert H.rel_diff(actual, expected) <= H.CACHE_BOUND
    assert H.rel_diff(actual, H.outputs(model, x)) > H.ACTIVE_BOUND
    grads = H.modulator_gradients(new, x)
    for (path, grad), reference in zip(grads.items(), expected_grads.values()):
        assert np.any(reference != 0), path
        assert H.rel_diff(grad, reference) <= H.CACHE_BOUND, path


@pytest.mark.parametrize("name", ("llama", "gemma"))
def test_cached_decoding_runs_block_by_block(blockwise_calls, name):
    model = H.task(name)
    H.randomize(model)
    new = to_multimax(model)
    H.activate(new)
    tokens = np.random.default_rng(3).integers(1, H.V, size=(H.B, H.T))
    full = _materialised(
        lambda: keras.ops.convert_to_numpy(
            new({"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)})
        )
    )
    cached = H.cached_steps(new, tokens)
    assert blockwise_calls
    assert H.rel_diff(cached, full) <= H.CACHE_BOUND
