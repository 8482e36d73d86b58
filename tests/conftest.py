"""Shared pytest set-up: quiet TensorFlow, fixed seeds and a float32 policy per test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(autouse=True)
def _default_fused_forward():
    """Every test starts from keras_multimax's default (no global opt-in)."""
    from keras_multimax import config

    config.disable_fused_forward()
    yield
    config.disable_fused_forward()
