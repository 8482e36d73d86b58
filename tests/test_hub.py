"""MultiMax in KerasHub models: BERT, GPT-2, Llama, Gemma and ViT in depth.

The reference is always KerasHub's own SoftMax model, built from the same
constructor with the same weights.
"""

import json
import os
import subprocess
import sys
import textwrap

import hub_models as H
import keras
import keras_hub
import numpy as np
import pytest

import keras_multimax
from keras_multimax import Modulator
from keras_multimax import hub
from keras_multimax.convert import to_multimax

FAMILIES = tuple(H.TASKS)
CAUSAL = ("gpt2", "llama", "gemma", *H.CAUSAL_TASKS)
TS0_BOUND, ACTIVE_BOUND, CACHE_BOUND = H.TS0_BOUND, H.ACTIVE_BOUND, H.CACHE_BOUND


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _pair(name):
    """(KerasHub SoftMax task with O(1) random weights, its MultiMax copy)."""
    model = H.task(name)
    H.randomize(model)
    return model, to_multimax(model)


@pytest.mark.parametrize("name", FAMILIES)
def test_task_converts_keeping_class_weights_and_outputs(name):
    model, new = _pair(name)
    assert isinstance(new, type(model)) and type(new) is not type(model)
    assert type(new).__name__ == f"MultiMax{type(model).__name__}"
    assert hub.is_multimax(new) and not hub.is_multimax(model)
    assert isinstance(new.backbone, type(model.backbone))
    assert new.preprocessor is model.preprocessor
    # One modulator per attention layer, no SoftMax attention left.
    assert len(H.modulators(new)) == len(H.attention_layers(model)) == 2
    assert not H.softmax_attention(new)
    assert not H.modulators(model)  # the original is untouched
    # Same values in separate variables; the only new ones are ranges/ts.
    new_by_path = {w.path: w for w in new.weights}
    assert not {id(w) for w in model.weights} & {id(w) for w in new.weights}
    for w in model.weights:
        np.testing.assert_array_equal(_np(new_by_path[w.path]), _np(w), w.path)
    extra = set(new_by_path) - {w.path for w in model.weights}
    assert len(extra) == 4 and {p.rsplit("/", 1)[1] for p in extra} == {"ranges", "ts"}
    for layer in H.modulators(new):
        np.testing.assert_array_equal(_np(layer.ts), 0.0)
    x = H.inputs(model)
    reference = H.outputs(model, x)
    assert H.rel_diff(H.outputs(new, x), reference) <= TS0_BOUND
    # Changing the copy leaves the original as it was.
    H.activate(new)
    np.testing.assert_array_equal(H.outputs(model, x), reference)


def test_training_the_copy_leaves_the_original_as_it_was():
    # On JAX a compiled train step donates (deletes) the arrays of the
    # variables it updates: the copy must not share them with the original.
    model, new = _pair("gpt2")
    x = H.inputs(model)
    reference = H.outputs(model, x)
    # KerasHub compiles a task with a sparse cross-entropy of its logits.
    new.train_on_batch(x, np.zeros((H.B, H.T), "int32"))
    np.testing.assert_array_equal(H.outputs(model, x), reference)
    assert H.rel_diff(H.outputs(new, x), reference) > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_active_modulators_change_outputs_and_get_gradients(name):
    model, new = _pair(name)
    x = H.inputs(model)
    H.activate(new)
    assert H.rel_diff(H.outputs(new, x), H.outputs(model, x)) > ACTIVE_BOUND
    grads = H.modulator_gradients(new, x)
    assert len(grads) == 2 * len(H.modulators(new)) == 4
    for path, grad in grads.items():
        assert np.all(np.isfinite(grad)) and np.any(grad != 0), path


@pytest.mark.parametrize("name", CAUSAL)
def test_cached_decoding_equals_the_full_forward(name):
    model, new = _pair(name)
    H.activate(new)
    tokens = np.random.default_rng(3).integers(1, H.V, size=(H.B, H.T))
    full = _np(new({"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)}))
    cached = H.cached_steps(new, tokens)
    assert H.rel_diff(cached, full) <= CACHE_BOUND
    # MultiMax runs at every cached step: SoftMax's cached logits differ.
    assert H.rel_diff(H.cached_steps(model, tokens), full) > ACTIVE_BOUND


def _greedy_loop(lm, prompt, length):
    """Greedy decoding by full forward passes (no cache); the top-2 margins."""
    ids, margins = prompt, []
    for i in range(prompt.shape[1], length):
        pad = length - i
        x = {
            "token_ids": np.concatenate([ids, np.zeros((H.B, pad), "int32")], 1),
            "padding_mask": np.arange(length)[None].repeat(H.B, 0) < i,
        }
        logits = np.sort(_np(lm(x))[:, i - 1], axis=-1)
        margins.append(logits[:, -1] - logits[:, -2])
        next_ids = _np(lm(x))[:, i - 1].argmax(-1).astype("int32")
        ids = np.concatenate([ids, next_ids[:, None]], 1)
    return ids, np.min(margins)


@pytest.mark.parametrize("name", CAUSAL)
def test_compiled_generate_equals_an_uncached_greedy_loop(name):
    _, new = _pair(name)
    H.activate(new)
    prompt = np.random.default_rng(4).integers(1, H.V, size=(H.B, 3)).astype("int32")
    expected, margin = _greedy_loop(new, prompt, H.T)
    # Top-2 logit gaps far above the cached/uncached differences (≤ 1e-6), so
    # the argmax is the same on any CPU.
    assert margin > 1e-3
    x = {
        "token_ids": np.concatenate([prompt, np.zeros((H.B, H.T - 3), "int32")], 1),
        "padding_mask": np.arange(H.T)[None].repeat(H.B, 0) < 3,
    }
    # The other samplers, on one family: the sampler is KerasHub's code
    # around the same `call_with_cache` (each costs a compilation).
    samplers = ["top_k", keras_hub.samplers.BeamSampler(num_beams=2)]
    if name != "gpt2":
        samplers = []
    if isinstance(new, keras_hub.models.Gemma3CausalLM):
        # KerasHub 0.32's Gemma3CausalLM.generate_step, text only: it returns
        # the `images` it was given, and with no preprocessor `generate` fails
        # concatenating a None, so an empty image batch (also text only).
        size = new.backbone.image_size
        x["images"] = np.zeros((H.B, 0, size, size, 3), "float32")
    new.compile(sampler="greedy")
    out = new.generate(x, max_length=H.T, stop_token_ids=None)
    np.testing.assert_array_equal(_np(out["token_ids"]), expected)
    # The other samplers run on the MultiMax model too, keeping the prompt.
    for sampler in samplers:
        new.compile(sampler=sampler)
        out = _np(new.generate(x, max_length=H.T, stop_token_ids=None)["token_ids"])
        np.testing.assert_array_equal(out[:, :3], prompt)
        assert out.shape == (H.B, H.T) and np.all((out >= 0) & (out < H.V))


_RELOAD = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import keras_multimax.hub  # the one import a saved MultiMax model needs
    from keras_multimax.hub import MultiMaxTwin
    results = {}
    for name, path in json.loads(sys.argv[1]).items():
        model = keras.saving.load_model(path + ".keras")
        x = dict(np.load(path + ".npz"))
        x = x.pop("images") if "images" in x else x
        out = np.concatenate([np.ravel(keras.ops.convert_to_numpy(y))
                              for y in keras.tree.flatten(model(x))])
        converted = sum(isinstance(layer, MultiMaxTwin)
                        for layer in model._flatten_layers())
        results[name] = [type(model).__name__, converted, out.tolist()]
    print(json.dumps(results))
    """
)


@pytest.mark.slow
@pytest.mark.only_backend(
    "tensorflow",
    reason="what a fresh process needs to deserialize every family does not "
    "depend on the backend; on JAX, test_imports.py loads a saved model in a "
    "fresh process and test_preset_round_trip_through_keras_hub_loaders "
    "round-trips models in this one",
)
def test_keras_files_reload_in_a_fresh_process(tmp_path):
    expected, paths = {}, {}
    for name in FAMILIES:
        _, new = _pair(name)
        H.activate(new)
        x = H.inputs(new)
        path = str(tmp_path / name)
        new.save(path + ".keras")
        np.savez(path + ".npz", **(x if isinstance(x, dict) else {"images": x}))
        expected[name] = (type(new).__name__, H.outputs(new, x))
        paths[name] = path
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run(
        [sys.executable, "-c", _RELOAD, json.dumps(paths)],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(keras_multimax.__file__)),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (cls, out) in expected.items():
        loaded_cls, converted, loaded = results[name]
        assert loaded_cls == cls and converted == 2
        # Same graph, same weights: float32 rounding only.
        assert H.rel_diff(np.array(loaded), out) <= TS0_BOUND


BASE_TASKS = {
    "bert": keras_hub.models.TextClassifier,
    "gpt2": keras_hub.models.CausalLM,
    "vit": keras_hub.models.ImageClassifier,
}


# One family per KerasHub loader (CausalLM, TextClassifier, ImageClassifier).
@pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])
def test_preset_round_trip_through_keras_hub_loaders(name, tmp_path):
    model, new = _pair(name)
    H.activate(new)
    x = H.inputs(new)
    expected = H.outputs(new, x)
    preset = str(tmp_path / "multimax")
    new.save_to_preset(preset)
    with open(os.path.join(preset, "config.json")) as f:
        assert json.load(f)["registered_name"] == (
            f"keras_multimax>MultiMax{type(model.backbone).__name__}"
        )
    loaded = BASE_TASKS[name].from_preset(preset)
    assert type(loaded) is type(new)
    assert H.rel_diff(H.outputs(loaded, x), expected) <= TS0_BOUND
    backbone = keras_hub.models.Backbone.from_preset(preset)
    assert type(backbone) is type(new.backbone)
    assert backbone.modulator == new.backbone.modulator
    # A MultiMax preset comes back as saved; options for it would be ignored.
    assert type(hub.from_preset(preset, BASE_TASKS[name])) is type(new)
    with pytest.raises(ValueError, match="MultiMax model already.*order"):
        hub.from_preset(preset, BASE_TASKS[name], modulator=Modulator(order=1))
    # A SoftMax preset loads straight into a MultiMax model.
    plain = str(tmp_path / "softmax")
    model.save_to_preset(plain)
    converted = hub.from_preset(
        plain, BASE_TASKS[name], modulator=Modulator(order=1), per_head=True
    )
    assert type(converted) is type(new)
    assert converted.backbone.modulator.order == 1 and converted.backbone.per_head
    reference = H.outputs(model, x)
    assert H.rel_diff(H.outputs(converted, x), reference) <= TS0_BOUND


def _bpe_tokenizer():
    letters = "abcdeĠ"
    vocabulary = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(letters)}}
    vocabulary.update({"Ġa": 7, "ab": 8})
    return keras_hub.models.GPT2Tokenizer(vocabulary, ["Ġ a", "a b"])


def test_gpt2_with_its_preprocessor_generates_text_and_saves(tmp_path):
    tokenizer = _bpe_tokenizer()
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=8
    )
    kwargs = {**H.BACKBONES["gpt2"][1], "vocabulary_size": tokenizer.vocabulary_size()}
    model = keras_hub.models.GPT2CausalLM(
        keras_hub.models.GPT2Backbone(**kwargs), preprocessor=preprocessor
    )
    new = to_multimax(model)
    assert new.preprocessor is preprocessor
    H.activate(new)
    new.compile(sampler="greedy")
    text = new.generate(["ab ba", "cab"], max_length=8)
    assert [t[:3] for t in text] == ["ab ", "cab"]
    preset = str(tmp_path / "preset")
    new.save_to_preset(preset)
    loaded = keras_hub.models.CausalLM.from_preset(preset)
    assert type(loaded) is type(new)
    assert type(loaded.preprocessor) is type(preprocessor)
    loaded.compile(sampler="greedy")
    assert loaded.generate(["ab ba", "cab"], max_length=8) == text
