"""`keras_multimax.Modulator`: one configuration, one set of defaults, everywhere."""

import keras
import numpy as np
import pytest

from keras_multimax import Modulator
from keras_multimax import convert
from keras_multimax import layers
from keras_multimax import models
from keras_multimax import modulator as modulators


def test_config_round_trips_through_keras_serialization():
    modulator = Modulator(
        order=3,
        ranges_initializer="ones",
        ts_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=3),
        ts_regularizer="l2",
        ranges_constraint="non_neg",
    )
    assert Modulator.from_config(modulator.get_config()) == modulator
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(modulator)
    )
    assert isinstance(revived, Modulator) and revived == modulator
    assert modulators.get(keras.saving.serialize_keras_object(modulator)) == modulator
    assert modulator != Modulator(order=3)


@pytest.mark.parametrize(
    "identifier, error, match",
    [
        (
            {"order": 0},
            ValueError,
            "`order` must be an integer >= 1. Received: order=0",
        ),
        ({"order": True}, ValueError, "Received: order=True"),
        ({"ts_initializer": "no_such"}, ValueError, "no_such"),
        ({"slopes": 1}, ValueError, r"Unknown modulator arguments \['slopes'\]"),
        ("sparse", ValueError, "Unknown modulator name.*Received: modulator='sparse'"),
        (2, TypeError, "Received: modulator=2"),
        (
            keras.saving.serialize_keras_object(keras.initializers.Ones()),
            TypeError,
            "Modulator",
        ),
    ],
)
def test_bad_configurations_name_the_argument(identifier, error, match):
    with pytest.raises(error, match=match):
        modulators.get(identifier)


def test_names_give_the_two_initialisations():
    assert modulators.get(None) == modulators.get("softmax") == Modulator()
    paper = modulators.get("paper")
    assert type(paper.ts_initializer).__name__ == "TruncatedNormal"
    assert paper.ts_initializer.get_config()["stddev"] == 0.02
    assert (
        paper.ranges_initializer.get_config()
        == Modulator().ranges_initializer.get_config()
    )


def _modulator_weights(model):
    found = {}
    for w in model.weights:
        leaf = w.path.split("/")[-1]
        if leaf in ("ranges", "ts"):
            found.setdefault(leaf, []).append(keras.ops.convert_to_numpy(w))
    return found


def _entry_points(modulator):
    """One model per entry point that creates modulators, all with ``modulator``."""
    kw = {} if modulator is None else {"modulator": modulator}
    x = keras.Input((4, 8))
    yield "MultiMax", keras.Model(x, layers.MultiMax(**kw)(x))
    yield "SegLU", keras.Model(x, layers.SegLU(**kw)(x))
    yield (
        "MultiMaxAttention",
        keras.Model(x, layers.MultiMaxAttention(num_heads=2, key_dim=4, **kw)(x, x)),
    )
    yield (
        "MultiMaxGroupQueryAttention",
        keras.Model(
            x,
            layers.MultiMaxGroupQueryAttention(
                head_dim=4, num_query_heads=2, num_key_value_heads=1, **kw
            )(x, x),
        ),
    )
    yield "MultiMaxLMHead", keras.Model(x, layers.MultiMaxLMHead(vocab_size=5, **kw)(x))
    softmax_model = keras.Model(
        x, keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(x, x)
    )
    yield "to_multimax", convert.to_multimax(softmax_model, **kw)
    yield (
        "vit_classifier",
        models.vit_classifier(
            (4, 4, 1),
            3,
            patch_size=2,
            num_layers=1,
            hidden_dim=8,
            num_heads=2,
            mlp_dim=8,
            **kw,
        ),
    )


def test_every_entry_point_has_the_same_defaults():
    """ts = 0 (exactly SoftMax) and the official truncated-normal ranges."""
    for name, model in _entry_points(None):
        found = _modulator_weights(model)
        assert found.get("ts"), name
        for ts in found["ts"]:
            np.testing.assert_array_equal(ts, 0.0, err_msg=name)
        for ranges in found["ranges"]:
            # TruncatedNormal(stddev=0.02) stays within 2 standard deviations.
            assert 0 < np.abs(ranges).max() <= 0.04, name


def test_every_entry_point_takes_the_paper_initialisation_by_name():
    for name, model in _entry_points("paper"):
        for ts in _modulator_weights(model)["ts"]:
            assert 0 < np.abs(ts).max() <= 0.04, name


def test_layers_serialise_the_modulator_once():
    layer = layers.MultiMaxAttention(
        num_heads=2, key_dim=4, modulator=Modulator(order=1)
    )
    config = layer.get_config()
    assert config["modulator"]["class_name"] == "Modulator"
    assert config["modulator"]["config"]["order"] == 1
    assert not {"order", "ts_initializer", "ranges_initializer"} & set(config)
    clone = layers.MultiMaxAttention.from_config(config)
    assert clone.modulator == layer.modulator and clone.order == 1
