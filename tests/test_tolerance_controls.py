"""Controls for the derived tolerances: real defects exceed them at least 10×.

`run_layer_test` compares mixed-precision outputs with float32 ones within
``depth · eps · scale`` in RMS (see `tolerances`). A bound that loose must still
catch a broken modulator, so each defect below is computed in float32 (no
rounding noise at all) and must land at least 10 bounds away from the correct
output, for the dtype and depth the real check uses.
"""

import numpy as np
import pytest
from backend_helpers import to_numpy
from layer_test_case import ACTIVATION_DEPTH
from layer_test_case import ATTENTION_DEPTH
from layer_test_case import strengthen_modulator
from tolerances import assert_defect_caught

from keras_multimax import Modulator
from keras_multimax import layers
from keras_multimax import ops

RNG = np.random.default_rng(5)
X = RNG.normal(size=(2, 5, 8)).astype("float32")
Y = RNG.normal(size=(2, 6, 8)).astype("float32")


def _strong(layer, *args, **kwargs):
    """The layer's outputs with a strong modulator and, for the other
    weights, Glorot-uniform values from NumPy: the same numbers on every
    backend (Keras' initializers draw from each backend's own generator)."""
    layer(*args, **kwargs)
    rng = np.random.default_rng(0)
    for w in layer.weights:
        if w.name not in ("ranges", "ts") and len(w.shape) > 1:
            fan_in = int(np.prod(w.shape[:-1])) if len(w.shape) > 2 else w.shape[0]
            fan_out = int(w.shape[-1])
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            w.assign(rng.uniform(-limit, limit, w.shape).astype("float32"))
    strengthen_modulator(layer)
    return to_numpy(layer(*args, **kwargs))


def _with_ts(layer, value_fn, *args, **kwargs):
    """Outputs with ``ts`` replaced by ``value_fn(ts)``; restores ``ts``."""
    old = to_numpy(layer.ts)
    layer.ts.assign(value_fn(old))
    try:
        return to_numpy(layer(*args, **kwargs))
    finally:
        layer.ts.assign(old)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ignored_ts_exceeds_the_attention_bound(dtype):
    layer = layers.MultiMaxAttention(num_heads=2, key_dim=4)
    expected = _strong(layer, X, Y)
    ignored = _with_ts(layer, np.zeros_like, X, Y)
    ratio = assert_defect_caught(
        ignored, expected, dtype, ATTENTION_DEPTH[dtype], norm="rms"
    )
    print(f"ts ignored: {ratio:.1f}× the {dtype} bound")


def test_parameters_of_the_wrong_head_exceed_the_float16_bound():
    # bfloat16's 8 bits leave no 10× room for a defect this subtle; float16
    # is where per-head mistakes must show.
    layer = layers.MultiMaxAttention(
        num_heads=2, key_dim=4, per_head=True, modulator=Modulator(order=1)
    )
    expected = _strong(layer, X, Y)
    old = to_numpy(layer.ranges)
    layer.ranges.assign(old[::-1])  # head 0 gets head 1's thresholds
    swapped = _with_ts(layer, lambda ts: ts[::-1], X, Y)
    layer.ranges.assign(old)
    assert_defect_caught(
        swapped, expected, "float16", ATTENTION_DEPTH["float16"], norm="rms"
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mask_applied_before_the_modulation_exceeds_the_bound(dtype):
    # The classic mistake: mask by adding a large negative number to the
    # scores, then modulate. With order 2 and ts[2] > 0 it is a huge score.
    x = RNG.normal(size=(3, 7)).astype("float32")
    mask = RNG.random((3, 7)) < 0.6
    mask[:, 0] = True
    ranges = np.array([-0.5, 0.5, -0.3, 0.4], "float32")
    ts = np.array([0.4, 0.3, 0.5, 0.2], "float32")
    expected = to_numpy(ops.multimax(x, ranges, ts, mask=mask))
    before = to_numpy(
        ops.multimax(np.where(mask, x, -1e9).astype("float32"), ranges, ts)
    )
    assert_defect_caught(before, expected, dtype, ACTIVATION_DEPTH[dtype], norm="rms")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "layer", [lambda: layers.MultiMax(axis=(1, 2)), lambda: layers.SegLU()]
)
def test_ignored_ts_exceeds_the_activation_bound(layer, dtype):
    layer = layer()
    expected = _strong(layer, X)
    ignored = _with_ts(layer, np.zeros_like, X)
    assert_defect_caught(ignored, expected, dtype, ACTIVATION_DEPTH[dtype], norm="rms")
