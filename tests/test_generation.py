"""KV-cached decoding of the model builders: cached equals the uncached forward pass.

References are always the uncached full forward pass (``model(ids)``) run
eagerly on the growing prefix, never the cached code. MultiMax is active in
every test with ``attention="multimax"``: ``ts`` is drawn with standard
deviation 0.5 (checked to change the logits).
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_multimax import Modulator
from keras_multimax import models

VOCAB, LENGTH = 24, 12


def active(order=2):
    """A modulator far from SoftMax, so that a cache bug shows in the logits."""
    return Modulator(
        order=order,
        ts_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=1),
        ranges_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=2),
    )


PROMPTS = np.random.default_rng(0).integers(0, VOCAB, size=(3, 4)).astype("int32")
# float32 logits computed with differently shaped matmuls (one query against S
# cached keys vs T x T): a few ulps per op over two layers; 1e-4 relative to the
# largest |logit| is the bound of issue 12 and ~100x the rounding seen.
RTOL = 1e-4
# Token tests: where the two largest reference logits differ by more than twice
# the logit bound, rounding within the bound cannot change the argmax.
MIN_GAP = 2 * RTOL


def lm(**kwargs):
    config = {
        "num_layers": 2,
        "hidden_dim": 16,
        "num_heads": 2,
        "mlp_dim": 16,
        "modulator": active(),
        **kwargs,
    }
    return models.TransformerLM(VOCAB, LENGTH, **config)


def logits(model, ids):
    return keras.ops.convert_to_numpy(model(np.asarray(ids, "int32")))


def reference_greedy(model, prompt, max_length):
    """Greedy continuation of one prompt by the full forward pass, step by step.

    Returns the ids and the smallest gap between the two largest logits of a
    chosen token relative to the largest |logit| (a near tie, below
    ``MIN_GAP``, would make the argmax depend on float rounding). Every step
    runs the whole ``max_length`` buffer, zeros after the ids so far: the
    attention is causal, so they do not change the logits read, and one
    input shape spares JAX an eager compilation per length.
    """
    ids = np.zeros((1, max_length), "int32")
    length = len(prompt)
    ids[0, :length] = prompt
    gaps = []
    while length < max_length:
        step = logits(model, ids)[0, length - 1]
        top2 = np.sort(step)[-2:]
        gaps.append((top2[1] - top2[0]) / np.abs(step).max())
        ids[0, length] = step.argmax()
        length += 1
    return ids[0], min(gaps)


CONFIGS = {
    "multimax": {},
    "multimax-per-head": {"per_head": True},
    "multimax-order-3": {"modulator": active(order=3), "head": "softmax"},
    "multimax-fused-head": {"fused_head": True},  # MultiMaxLMHead gives the logits
    "softmax": {"attention": "softmax", "head": "softmax"},
}


# The modulator's order does not touch the cache: order 2 (the default) runs
# here, order 3 in the translator's decoding test.
@pytest.mark.parametrize(
    "config", ["multimax", "multimax-fused-head", "multimax-per-head", "softmax"]
)
def test_call_with_cache_token_by_token_and_in_chunks_equals_the_full_forward(config):
    model = lm(**CONFIGS[config])
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(2, LENGTH))
    ids = ids.astype("int32")
    full = logits(model, ids)
    bound = RTOL * np.abs(full).max()
    for chunks in ([1] * LENGTH, [5, 1, 4, 2]):
        cache, index, steps = model.empty_cache(2), 0, []
        for size in chunks:
            out, cache = model.call_with_cache(
                ids[:, index : index + size], cache, index
            )
            steps.append(keras.ops.convert_to_numpy(out))
            index += size
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=bound)
    if model.attention == "multimax":
        # The modulator is on: ts = 0 (SoftMax) moves the logits far beyond the bound.
        for w in model.weights:
            if w.path.endswith("/ts"):
                w.assign(np.zeros(w.shape, "float32"))
        assert np.abs(logits(model, ids) - full).max() > 100 * bound


# The token tests use a SoftMax head: the MultiMax head with these large ts
# packs the top logits within ~1e-5 of each other (its cached logits are
# tested above).
@pytest.mark.parametrize("config", ["multimax", "multimax-per-head", "softmax"])
def test_generate_equals_an_uncached_greedy_loop_with_and_without_cache(config):
    model = lm(**{**CONFIGS[config], "head": "softmax"})
    expected, gaps = zip(*(reference_greedy(model, p, LENGTH) for p in PROMPTS))
    # A near tie would compare rounding, not decoding: pick other weights then.
    assert min(gaps) > MIN_GAP, "near-tie in the reference: change the seed"
    np.testing.assert_array_equal(model.generate(PROMPTS), np.stack(expected))
    np.testing.assert_array_equal(
        model.generate(PROMPTS, use_cache=False), np.stack(expected)
    )
    if keras.backend.backend() == "tensorflow":
        # XLA, TensorFlow's opt-in (on JAX the loop above already is one
        # `jax.jit` computation: it would only compile again).
        model.jit_compile = True
        np.testing.assert_array_equal(model.generate(PROMPTS), np.stack(expected))


def test_generate_with_right_padded_prompts_continues_each_prompt_as_alone():
    model = lm(head="softmax")
    lengths = [4, 2, 3]
    mask = np.arange(4)[None] < np.array(lengths)[:, None]
    padded = np.where(mask, PROMPTS, 7)  # the padding ids are ignored
    out = model.generate(padded, max_length=9, padding_mask=mask)
    for row, n in enumerate(lengths):
        expected, gap = reference_greedy(model, PROMPTS[row, :n], 9)
        assert gap > MIN_GAP, "near-tie in the reference: change the seed"
        np.testing.assert_array_equal(out[row], expected)


def test_generate_pads_after_the_end_token_and_stops():
    model = lm(head="softmax")
    full = model.generate(PROMPTS)
    end = int(full[0, 5])  # row 0 generates it at position 5 (or before)
    out = model.generate(PROMPTS, end_token_id=end, pad_token_id=0)
    expected = full.copy()
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(full[row, 4:] == end)
        if hits.size:
            expected[row, 4 + hits[0] + 1 :] = 0
    np.testing.assert_array_equal(out, expected)
    assert (out[0, 6:] == 0).all()


def test_sampling_is_seeded_and_the_same_with_and_without_cache():
    model = lm(head="softmax")
    first = model.generate(PROMPTS, temperature=1.0, seed=5)
    np.testing.assert_array_equal(
        first, model.generate(PROMPTS, temperature=1.0, seed=5)
    )
    np.testing.assert_array_equal(
        first, model.generate(PROMPTS, temperature=1.0, seed=5, use_cache=False)
    )
    np.testing.assert_array_equal(first[:, :4], PROMPTS)
    assert first.min() >= 0 and first.max() < VOCAB
    # At temperature 1e-8 a top-2 gap > MIN_GAP * max|logit| (max|logit| of a
    # random model with LayerNorm before the head is O(1)) becomes a log-odds
    # > 2e4 * max|logit|: all the mass is on the argmax.
    expected, gaps = zip(*(reference_greedy(model, p, LENGTH) for p in PROMPTS))
    assert min(gaps) > MIN_GAP, "near-tie in the reference: change the seed"
    np.testing.assert_array_equal(
        model.generate(PROMPTS, temperature=1e-8, seed=5), np.stack(expected)
    )


def test_sampled_token_frequencies_follow_the_softmax_of_the_logits():
    model = lm(head="softmax")
    n, temperature = 4000, 0.7
    prompts = np.repeat(PROMPTS[:1], n, axis=0)
    sampled = model.generate(prompts, max_length=5, temperature=temperature, seed=9)
    scaled = logits(model, PROMPTS[:1])[0, -1] / temperature
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    freq = np.bincount(sampled[:, 4], minlength=VOCAB) / n
    # 5 binomial standard deviations per token (a false alarm ~1e-5 over 24).
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_length": 3}, "max_length=3"),
        ({"max_length": LENGTH + 1}, f"max_length={LENGTH + 1}"),
        ({"max_length": 0}, "max_length=0"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"seed": 3}, "seed=3"),
        ({"end_token_id": VOCAB}, f"end_token_id={VOCAB}"),
        ({"padding_mask": [[True, False, True, True]] * 3}, "padding_mask="),
        ({"padding_mask": [[False] * 4] * 3}, "padding_mask="),
        ({"padding_mask": [[True] * 3] * 3}, r"padding_mask.shape=\(3, 3\)"),
    ],
)
def test_generate_bad_arguments_raise_value_errors_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lm(num_layers=1).generate(PROMPTS, **kwargs)


def test_generate_bad_prompts_raise():
    model = lm(num_layers=1)
    with pytest.raises(ValueError, match=r"prompt_ids.shape=\(4,\)"):
        model.generate(PROMPTS[0])
    with pytest.raises(ValueError, match="ids from 0 to 24"):
        model.generate(np.array([[0, VOCAB]], "int32"))
    with pytest.raises(TypeError, match="prompt_ids.dtype=float32"):
        model.generate(PROMPTS.astype("float32"))
    with pytest.raises(TypeError, match="use_cache=1"):
        model.generate(PROMPTS, use_cache=1)


def test_call_with_cache_outside_the_cache_raises():
    model = lm(num_layers=1)
    with pytest.raises(ValueError, match="cache_update_index=11"):
        model.call_with_cache(PROMPTS[:, :2], model.empty_cache(3), 11)
    with pytest.raises(ValueError, match="length=13"):
        model.empty_cache(3, length=LENGTH + 1)


def test_generate_after_a_keras_file_round_trip(tmp_path):
    model = lm(per_head=True)
    expected = model.generate(PROMPTS)
    model.save(tmp_path / "lm.keras")
    loaded = keras.saving.load_model(tmp_path / "lm.keras")
    assert loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(loaded.generate(PROMPTS), expected)


@pytest.mark.parametrize("config", ["multimax-order-3", "softmax"])
def test_translator_cached_greedy_decode_equals_an_uncached_loop(config):
    kwargs = {k: v for k, v in CONFIGS[config].items()}
    model = models.TransformerTranslator(
        14,
        12,
        source_length=6,
        target_length=7,
        num_encoder_layers=1,
        num_decoder_layers=2,
        hidden_dim=16,
        num_heads=2,
        mlp_dim=16,
        **{"modulator": active(), **kwargs},
    )
    # Make the end id likely, so that some rows end early.
    model.head_layers[0].bias.assign(np.linspace(-1, 1, 12).astype("float32"))
    source = np.random.default_rng(3).integers(3, 14, size=(4, 6)).astype("int32")
    source[:2, 4:] = 0  # padding
    # The full forward pass on the whole target buffer at every step (the
    # decoder's self-attention is causal: the zeros after step i do not
    # change its logits; one shape spares JAX an eager compilation per step).
    tokens = np.zeros((4, 7), "int32")
    tokens[:, 0] = 1  # start id
    finished = np.zeros(4, bool)
    expected, gaps = [], []
    for i in range(7):
        step = keras.ops.convert_to_numpy(model([source, tokens]))[:, i]
        top2 = np.sort(step, axis=-1)[:, -2:]
        gaps.append(((top2[:, 1] - top2[:, 0]) / np.abs(step).max())[~finished])
        nxt = np.where(finished, 0, step.argmax(-1)).astype("int32")
        finished |= nxt == 2
        expected.append(nxt)
        if i + 1 < 7:
            tokens[:, i + 1] = nxt
    assert np.concatenate(gaps).min() > MIN_GAP, "near-tie: change the seed"
    got = keras.ops.convert_to_numpy(model.greedy_decode(source))
    np.testing.assert_array_equal(got, np.stack(expected, axis=1))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.greedy_decode(source, max_length=3)),
        np.stack(expected, axis=1)[:, :3],
    )
    if keras.backend.backend() == "tensorflow":
        # XLA, TensorFlow's opt-in (on JAX the loop above already is one
        # `jax.jit` computation: it would only compile again).
        model.jit_compile = True
        got = keras.ops.convert_to_numpy(model.greedy_decode(source))
        np.testing.assert_array_equal(got, np.stack(expected, axis=1))


ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_python(args):
    """Runs ``python *args`` from the repository root, this checkout first."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow  # ~10 s alone, more on a loaded machine (XLA compilations)
@pytest.mark.only_backend(
    "tensorflow",
    reason="bench_decode.py times tf.function loops (with and without XLA); "
    "its figures are TensorFlow's",
)
def test_decode_benchmark_quick_run(tmp_path):
    output = tmp_path / "decode.json"
    stdout = run_python(
        ["benchmarks/bench_decode.py", "--quick", "--runs", "1", "--output", output]
    )
    assert "| MultiMax |" in stdout
    summary = json.loads(output.read_text())["summary"]
    assert all(summary[kind]["tokens_equal"] for kind in ("softmax", "multimax"))
    assert all(summary[kind]["cached_ms_per_token"] > 0 for kind in summary)
