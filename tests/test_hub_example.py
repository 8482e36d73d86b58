"""Runs of examples/keras_hub_finetune.py: one end to end on a tiny local preset, and its model builders."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_example(tmp_path, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "keras_hub_finetune.py")]
        + [*args, "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(tmp_path),
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _assert_trained_generated_and_reloaded(out, tmp_path):
    assert "GPT2CausalLM -> MultiMaxGPT2CausalLM: MultiMax in 2 attention layers" in out
    perplexities = dict(re.findall(r"^(SoftMax|MultiMax) +([0-9.]+) ", out, re.M))
    assert set(perplexities) == {"SoftMax", "MultiMax"}
    assert all(1.0 < float(p) < 1e4 for p in perplexities.values())
    assert "gives back a MultiMaxGPT2CausalLM that generates the same text" in out
    assert os.path.exists(tmp_path / "multimax_preset" / "config.json")


def _load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "keras_hub_finetune", os.path.join(ROOT, "examples", "keras_hub_finetune.py")
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_keras_hub_finetune_without_a_preset_builds_a_small_gpt2(capsys):
    # The one end-to-end run (below) loads a preset; this is the other way
    # `build_model` starts, in-process: the rest of the run is the same.
    import keras_hub

    example = _load_example()
    args = example.parse_args(["--smoke"])
    model = example.build_model(args, "the cat sat on the mat. " * 20)
    assert "No --preset given" in capsys.readouterr().out
    assert isinstance(model, keras_hub.models.GPT2CausalLM)
    assert model.preprocessor.sequence_length == args.sequence_length == 16
    assert model.backbone.max_sequence_length == 16


def _save_tiny_gpt2_preset(path, max_sequence_length):
    """A GPT-2 preset of 265 tokens: GPT-2's 256 byte symbols, end, 8 merges."""
    import keras_hub
    from keras_hub.src.tokenizers.byte_pair_tokenizer import bytes_to_unicode

    _, alphabet = bytes_to_unicode()
    vocabulary = {"<|endoftext|>": 0, **{s: i + 1 for i, s in enumerate(alphabet)}}
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "r e"]
    for merge in merges:
        vocabulary[merge.replace(" ", "")] = len(vocabulary)
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary, merges)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=max_sequence_length,
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=max_sequence_length
    )
    model = keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)
    model.save_to_preset(str(path))
    return tokenizer.vocabulary_size()


# The end-to-end run: a preset loaded, two models trained, saved, reloaded
# (about 40 s on TensorFlow, 70 s on JAX).
@pytest.mark.slow
@pytest.mark.only_backend(
    "tensorflow",
    reason="a smoke run of the example script, once; what it calls (preset "
    "loading, conversion, training, generate, preset round trip) is tested on "
    "JAX in test_hub.py and test_hub_options.py",
)
def test_keras_hub_finetune_runs_a_local_preset(tmp_path):
    preset = tmp_path / "tiny_gpt2"
    # 12 positions, fewer than the 16 tokens of --smoke: the example must
    # lower its sequence length to what the preset's model takes.
    vocabulary_size = _save_tiny_gpt2_preset(preset, max_sequence_length=12)
    out = _run_example(tmp_path, "--smoke", "--preset", str(preset))
    assert f"Loading the KerasHub preset {str(preset)!r}" in out
    assert "No --preset given" not in out
    assert "at most 12 tokens: --sequence-length 16 lowered to 12" in out
    _assert_trained_generated_and_reloaded(out, tmp_path)
    # The saved model is the preset's, converted, with the preset's tokenizer.
    saved = tmp_path / "multimax_preset"
    with open(saved / "config.json") as f:
        config = json.load(f)
    assert config["registered_name"] == "keras_multimax>MultiMaxGPT2Backbone"
    assert config["config"]["vocabulary_size"] == vocabulary_size
    assert config["config"]["max_sequence_length"] == 12
    for name in ("vocabulary.json", "merges.txt"):
        tokenizer_file = os.path.join("assets", "tokenizer", name)
        with open(saved / tokenizer_file) as a, open(preset / tokenizer_file) as b:
            assert a.read() == b.read()


def test_keras_hub_finetune_rejects_a_preset_with_no_preprocessor(tmp_path):
    import hub_models as H

    example = _load_example()
    H.task("gpt2").save_to_preset(str(tmp_path))  # preprocessor=None
    args = example.parse_args(["--preset", str(tmp_path)])
    with pytest.raises(ValueError, match=r"no preprocessor.*preset='.*'"):
        example.build_model(args, "some text")
