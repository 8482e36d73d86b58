"""How the `.keras` files in this folder were written: by keras_multimax 0.2.0.

Run once, at commit 2b5852d (version 0.2.0), on the TensorFlow backend:

    python tests/data/v0_2_0/make_files.py

It is kept as the record of what the files hold; it calls the 0.2.0 API
(`order=`, `ts_initializer=`... on every layer) and is not run by the tests.
Each ``<name>.keras`` has a ``<name>.npz`` beside it with the inputs
(``x*``) and the outputs 0.2.0 computed from them (``y``), which
`tests/test_compatibility.py` compares after loading with today's code.
Every modulator has non-zero ``ts``, so a file loaded with the wrong
parameters (or none) gives other outputs.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_multimax  # noqa: E402
from keras_multimax import layers  # noqa: E402
from keras_multimax import models  # noqa: E402
from keras_multimax.convert import to_multimax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RNG = np.random.default_rng(20261207)
ACTIVE = {"class_name": "RandomUniform", "config": {"minval": 0.2, "maxval": 0.6}}
SPREAD = {"class_name": "RandomNormal", "config": {"stddev": 0.5}}


def _strengthen(model):
    """Non-zero, O(1) modulators, so that the files test the parameters."""
    for w in model.weights:
        leaf = w.path.split("/")[-1]
        if leaf == "ranges":
            w.assign(RNG.normal(0.0, 0.5, w.shape).astype("float32"))
        elif leaf == "ts":
            w.assign(RNG.uniform(0.2, 0.6, w.shape).astype("float32"))


def _save(name, model, inputs):
    _strengthen(model)
    outputs = model.predict(inputs, verbose=0)
    model.save(os.path.join(HERE, f"{name}.keras"))
    arrays = inputs if isinstance(inputs, dict) else {"x": inputs}
    np.savez(os.path.join(HERE, f"{name}.npz"), y=outputs, **arrays)


def main():
    assert keras_multimax.__version__ == "0.2.0", keras_multimax.__version__
    x = RNG.normal(size=(3, 6)).astype("float32")

    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5),
            layers.MultiMax(order=2, ranges_initializer=SPREAD, ts_initializer=ACTIVE),
        ]
    )
    _save("multimax", model, x)

    model = keras.Sequential(
        [keras.Input((6,)), layers.SegLU(order=3, ts_regularizer="l2")]
    )
    _save("seglu", model, x)

    seq = RNG.normal(size=(2, 5, 8)).astype("float32")
    inputs = keras.Input((5, 8))
    out = layers.MultiMaxAttention(num_heads=2, key_dim=4, per_head=True)(
        inputs, inputs, use_causal_mask=True
    )
    _save("attention", keras.Model(inputs, out), seq)

    inputs = keras.Input((5, 8))
    out = layers.MultiMaxGroupQueryAttention(
        head_dim=4, num_query_heads=4, num_key_value_heads=2, order=1
    )(inputs, inputs)
    _save("group_query_attention", keras.Model(inputs, out), seq)

    hidden = keras.Input((5, 8))
    out = layers.MultiMaxLMHead(vocab_size=11)(hidden)
    _save("lm_head", keras.Model(hidden, out), seq)

    dense = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4, activation="softmax")]
    )
    _save("converted_dense", to_multimax(dense, replace_softmax=True), x)

    images = RNG.normal(size=(2, 8, 8, 1)).astype("float32")
    vit = models.vit_classifier(
        (8, 8, 1), 3, patch_size=4, num_layers=1, hidden_dim=8, num_heads=2, mlp_dim=8
    )
    _save("vit", vit, images)

    tokens = RNG.integers(1, 20, size=(2, 6)).astype("int32")
    lm = models.transformer_lm(20, 6, num_layers=1, hidden_dim=8, num_heads=2, mlp_dim=8)
    _save("transformer_lm", lm, tokens)

    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=20,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    padding = np.ones_like(tokens)
    _save(
        "hub_gpt2_backbone",
        to_multimax(backbone),
        {"token_ids": tokens, "padding_mask": padding},
    )


if __name__ == "__main__":
    main()
