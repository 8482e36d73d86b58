"""Tests of keras_multimax.analysis: metrics against hand-computed values, the logger."""

import glob
import math
import os

import keras
import numpy as np
import numpy_reference as ref
import pytest

from keras_multimax import Modulator
from keras_multimax import analysis
from keras_multimax import layers
from keras_multimax import models

# ---------------------------------------------------------------------------
# Sparsity: S = (1/L) Σ_{φ_l < ε} exp((s − φ_l)/s − 1)
# ---------------------------------------------------------------------------


def test_sparsity_hand_computed_values():
    # Default ε = 0.1 / 4 = 0.025: only the exact zero counts, exp(0) = 1.
    assert analysis.attention_sparsity([0.5, 0.3, 0.2, 0.0]) == pytest.approx(0.25)
    # ε = 0.05, s = 0.02: 0.01 counts exp(-0.5), 0.0 counts 1, over L = 4.
    value = analysis.attention_sparsity(
        [0.7, 0.29, 0.01, 0.0], epsilon=0.05, scale=0.02
    )
    assert value == pytest.approx((0.6065306597126334 + 1.0) / 4, rel=1e-12)
    # s = ε (default scale): an entry just below ε counts 1/e.
    value = analysis.attention_sparsity([0.5, 0.49, 0.01], epsilon=0.02)
    assert value == pytest.approx(math.exp(-0.5) / 3, rel=1e-12)
    # Uniform rows have nothing below a tenth of the uniform share.
    assert analysis.attention_sparsity(np.full((3, 10), 0.1)) == 0.0
    # One-hot rows of length 5: four exact zeros.
    assert analysis.attention_sparsity(np.eye(5)) == pytest.approx(0.8)


def test_sparsity_averages_rows_and_respects_masks():
    causal = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    mask = np.tril(np.ones((3, 3), bool))
    # Unmasked, the future positions count as zeros: (2/3 + 1/3 + 0) / 3.
    assert analysis.attention_sparsity(causal) == pytest.approx(1 / 3)
    # Masked, rows have 1, 2, 3 entries and none is negligible.
    assert analysis.attention_sparsity(causal, mask) == 0.0
    # Fully masked rows are skipped, not counted as anything.
    probs = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    row_mask = np.array([[True, True, True], [False, False, False]])
    assert analysis.attention_sparsity(probs, row_mask) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------
# Multi-modality: M = 1 − (1/N) Σ_{ε < φ_n < φ_max} (φ_max − φ_n)
# ---------------------------------------------------------------------------


def test_multimodality_hand_computed_values():
    # ε = 0.025: gaps 0.2 (0.3) + 0.3 (0.2); the zero is negligible.
    assert analysis.attention_multimodality([0.5, 0.3, 0.2, 0.0]) == pytest.approx(
        1 - 0.5 / 4
    )
    # Gaps 0.1 + 0.2 + 0.3 over N = 4.
    assert analysis.attention_multimodality([0.4, 0.3, 0.2, 0.1]) == pytest.approx(0.85)
    # Two equal modes, one mode, uniform: no intermediate entries.
    assert analysis.attention_multimodality([0.5, 0.5, 0.0, 0.0]) == 1.0
    assert analysis.attention_multimodality([1.0, 0.0, 0.0]) == 1.0
    assert analysis.attention_multimodality(np.full(8, 0.125)) == 1.0
    # Rows are averaged.
    rows = [[0.5, 0.3, 0.2, 0.0], [0.4, 0.3, 0.2, 0.1]]
    assert analysis.attention_multimodality(rows) == pytest.approx((0.875 + 0.85) / 2)
    # An explicit ε that makes 0.1 and 0.2 negligible: only the gap 0.1 remains.
    assert analysis.attention_multimodality(
        [0.4, 0.3, 0.2, 0.1], epsilon=0.25
    ) == pytest.approx(1 - 0.1 / 4)


def test_multimodality_mask():
    probs = [0.6, 0.4, 0.3]  # the last entry is masked: N = 2, gap 0.2
    assert analysis.attention_multimodality(
        probs, [True, True, False]
    ) == pytest.approx(0.9)


def test_metrics_bad_input():
    with pytest.raises(ValueError, match="epsilon"):
        analysis.attention_sparsity([0.5, 0.5], epsilon=0.0)
    with pytest.raises(ValueError, match="scale"):
        analysis.attention_sparsity([0.5, 0.5], scale=-1.0)
    with pytest.raises(ValueError, match=r"mask.shape=\(3,\)"):
        analysis.attention_multimodality([0.5, 0.5], [True, True, False])
    with pytest.raises(TypeError, match="attention_maps"):
        analysis.attention_statistics(keras.Sequential([keras.Input((2,))]), [[0, 0]])


def test_multimax_sparser_than_softmax_on_the_same_scores():
    """A sparsifying modulator (steeper below b) raises the sparsity metric."""
    scores = np.random.default_rng(0).normal(size=(64, 16))
    ranges = np.array([0.0, 1.0, 0.0, 1.0])
    ts = np.array([-1.5, 0.0, 0.0, 0.0])
    soft = analysis.attention_sparsity(ref.softmax(scores))
    multi = analysis.attention_sparsity(ref.multimax(scores, ranges, ts))
    assert multi > soft + 0.1


def test_attention_statistics_uses_every_layer():
    model = models.TransformerLM(
        20, 8, num_layers=2, hidden_dim=8, num_heads=2, mlp_dim=8
    )
    tokens = np.random.default_rng(1).integers(0, 20, size=(3, 8))
    stats = analysis.attention_statistics(model, tokens)
    maps = model.attention_maps(tokens)
    assert [s["layer"] for s in stats] == list(maps)
    for s in stats:
        probs, mask = maps[s["layer"]]
        assert s["sparsity"] == analysis.attention_sparsity(probs, mask)
        assert s["multimodality"] == analysis.attention_multimodality(probs, mask)
        assert 0.0 <= s["sparsity"] <= 1.0 and 0.0 <= s["multimodality"] <= 1.0


# ---------------------------------------------------------------------------
# ModulatorLogger
# ---------------------------------------------------------------------------


def _read_events(log_dir):
    # TensorFlow reads the event files, whatever the Keras backend.
    import tensorflow as tf

    values = {}
    for path in glob.glob(os.path.join(log_dir, "modulator", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars"
                number = tf.make_ndarray(value.tensor).item()
                values.setdefault(value.tag, {})[event.step] = number
    return values


def test_modulator_logger_records_and_writes_tensorboard_scalars(tmp_path):
    inputs = keras.Input((4, 6))
    x = layers.MultiMaxAttention(2, 3, per_head=True, name="attn")(inputs, inputs)
    outputs = layers.SegLU(modulator=Modulator(order=1), name="head")(x)
    model = keras.Model(inputs, outputs, name="net")
    model.compile(keras.optimizers.SGD(0.5), "mse")
    logger = analysis.ModulatorLogger(log_dir=str(tmp_path), update_freq=2)
    data = np.random.default_rng(0).normal(size=(8, 4, 6)).astype("float32")
    model.fit(data, data, batch_size=2, epochs=1, verbose=0, callbacks=[logger])

    assert logger.steps == [0, 2, 4]
    assert sorted(logger.history) == ["attn", "head"]
    attn = model.get_layer("attn")
    np.testing.assert_array_equal(
        logger.history["attn"]["ts"][-1], keras.ops.convert_to_numpy(attn.ts)
    )
    assert logger.history["attn"]["ranges"][0].shape == (2, 4)
    assert not np.array_equal(
        logger.history["head"]["ts"][0], logger.history["head"]["ts"][-1]
    )

    events = _read_events(str(tmp_path))
    # 2 heads × 4 entries × 2 weights + 2 entries × 2 weights.
    assert len(events) == 2 * 4 * 2 + 2 * 2
    tag = "modulator/attn/ts_h1_3"
    assert set(events[tag]) == {0, 2, 4}
    for step, recorded in zip(logger.steps, logger.history["attn"]["ts"]):
        assert events[tag][step] == pytest.approx(float(recorded[1, 3]))
    assert events["modulator/head/ranges_1"][4] == pytest.approx(
        float(keras.ops.convert_to_numpy(model.get_layer("head").ranges)[1])
    )


def test_modulator_logger_bad_update_freq():
    with pytest.raises(ValueError, match="update_freq=0"):
        analysis.ModulatorLogger(update_freq=0)


def test_analysis_module_imports_without_tensorflow(monkeypatch):
    """Only a ModulatorLogger with a log_dir imports TensorFlow, when training starts."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("analysis_copy", analysis.__file__)
    module = importlib.util.module_from_spec(spec)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` fails
        spec.loader.exec_module(module)
        logger = module.ModulatorLogger(log_dir="unused")
        assert module.attention_sparsity([0.5, 0.5, 0.0]) == pytest.approx(1 / 3)
        with pytest.raises(ImportError):
            logger.on_train_begin()
