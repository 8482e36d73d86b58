"""Files and calls of 0.2.0 keep working in 0.3.0.

`tests/data/v0_2_0/` holds `.keras` files written by keras_multimax 0.2.0
(`make_files.py` there says how), each with the inputs and the outputs 0.2.0
computed. Their configs carry the modulator's arguments one by one, as 0.2.0
wrote them; today they are one `Modulator`.
"""

import pathlib

import keras
import numpy as np
import pytest
from tolerances import assert_close

import keras_multimax
from keras_multimax import layers

DATA = pathlib.Path(__file__).parent / "data" / "v0_2_0"
FILES = sorted(p.stem for p in DATA.glob("*.keras"))
# The same float32 computation as 0.2.0's, maybe in another order (other
# kernels, the other backend): a few roundings per layer, amplified by at
# most the depth of these 1-2 block models. 64 eps of max(|y|, 1).
DEPTH = 64


def _inputs(arrays):
    inputs = {k: arrays[k] for k in arrays.files if k != "y"}
    return inputs["x"] if list(inputs) == ["x"] else inputs


@pytest.mark.parametrize("name", FILES)
def test_files_written_by_0_2_0_load_and_compute_the_same(name):
    if name.startswith("hub_"):
        pytest.importorskip("keras_hub")
        import keras_multimax.hub  # noqa: F401  # the one documented import
    arrays = np.load(DATA / f"{name}.npz")
    model = keras.saving.load_model(DATA / f"{name}.keras")
    outputs = keras.ops.convert_to_numpy(model.predict(_inputs(arrays), verbose=0))
    assert_close(outputs, arrays["y"], "float32", DEPTH, floor=1.0, what=name)
    # Control: the modulators matter at these weights (ts ≠ 0), so a file
    # loaded with its modulators dropped would fail the check above.
    ts = [w for w in model.weights if w.path.endswith("/ts")]
    assert ts and all(np.abs(w.numpy()).min() > 0.1 for w in ts)


def test_the_modulator_of_a_0_2_0_file_is_one_modulator():
    model = keras.saving.load_model(DATA / "multimax.keras")
    layer = model.layers[-1]
    assert isinstance(layer.modulator, keras_multimax.Modulator)
    # 0.2.0 stored ts_initializer=RandomUniform(0.2, 0.6) for this layer.
    assert type(layer.modulator.ts_initializer).__name__ == "RandomUniform"
    assert "ts_initializer" not in layer.get_config()
    assert layer.get_config()["modulator"]["config"]["order"] == 2


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: layers.MultiMax(**kw),
        lambda **kw: layers.SegLU(**kw),
        lambda **kw: layers.MultiMaxAttention(num_heads=2, key_dim=4, **kw),
        lambda **kw: layers.MultiMaxGroupQueryAttention(
            head_dim=4, num_query_heads=2, num_key_value_heads=1, **kw
        ),
        lambda **kw: layers.MultiMaxLMHead(vocab_size=5, **kw),
    ],
)
def test_the_0_2_0_arguments_still_work_with_a_deprecation_warning(make):
    with pytest.warns(DeprecationWarning, match="removed in 0.4.0"):
        layer = make(order=3, ts_initializer="ones")
    assert layer.modulator == keras_multimax.Modulator(order=3, ts_initializer="ones")
    with pytest.raises(ValueError, match="not both"):
        make(order=3, modulator="paper")


def test_plain_ops_warns_and_still_works():
    with pytest.warns(DeprecationWarning, match="plain_forward"):
        with keras_multimax.ops.plain_ops():
            assert not keras_multimax.config.is_fused_forward_enabled()
