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


@pytest.fixture
def blockwise_spy(monkeypatch):
    """Records the ``is_causal`` of every call of the blockwise attention op.

    The layers and converted models reach the op through
    `keras_multimax.ops`, so replacing it there sees every call.
    """
    from keras_multimax import ops

    calls = []
    blockwise = ops.multimax_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("is_causal"))
        return blockwise(*args, **kwargs)

    monkeypatch.setattr(ops, "multimax_dot_product_attention", counted)
    return calls


def pytest_collection_modifyitems(config, items):
    """Skips tests marked ``only_backend("tensorflow", reason=...)`` on other backends."""
    backend = keras.backend.backend()
    for item in items:
        marker = item.get_closest_marker("only_backend")
        if marker is None:
            continue
        if "reason" not in marker.kwargs:
            raise pytest.UsageError(
                f"{item.nodeid}: `only_backend` needs a reason= saying why"
            )
        if backend not in marker.args:
            item.add_marker(
                pytest.mark.skip(
                    reason=f"needs {' or '.join(marker.args)}: {marker.kwargs['reason']}"
                )
            )
