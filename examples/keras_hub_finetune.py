"""Fine-tune a KerasHub causal LM with SoftMax and with MultiMax, side by side.

    python examples/keras_hub_finetune.py [--preset DIR_OR_HANDLE] [--output-dir DIR]

Needs the keras-hub extra (``pip install -e ".[keras-hub]"``). The text is
the offline default of `keras_multimax.toolkit.data` (the English documentation that
ships with CPython, ``pydoc_data.topics``, split 90/10 in order).

- With ``--preset``, loads that KerasHub causal LM (``keras_hub.models.
  CausalLM.from_preset``: a local preset directory, or a handle KerasHub can
  download) with its own tokenizer. A model with learned positions
  (``max_sequence_length``, e.g. GPT-2) lowers ``--sequence-length`` to it.
- Without it (nothing is downloaded), builds a small GPT-2 from its
  constructor with random weights and a byte-level BPE tokenizer learned
  from the training text, and says so.

The SoftMax model is converted with `keras_multimax.convert.to_multimax`
(ts = 0: both start equal), then both are fine-tuned for the same steps on
the same batches. The script prints the perplexity of both on the held-out
text, generates text with both (greedy), then saves the MultiMax model as a
preset, reloads it with KerasHub's own ``CausalLM.from_preset`` and checks
that it generates the same text.

About 2-4 minutes on 2 CPU cores with the defaults. ``--smoke`` runs a
seconds-long version (tiny model, a few steps) used by the tests; with
``--preset`` it keeps the preset's model and only shortens the run.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_multimax  # noqa: E402
import keras_multimax.hub  # noqa: E402, F401  # MultiMax KerasHub classes, for from_preset

# tf.data pipelines are shuffled already; Keras warns that fit's shuffle is unused.
warnings.filterwarnings("ignore", message=".*shuffle=True.*")

PROMPTS = ["The", "A function"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="a KerasHub CausalLM preset (optional)")
    parser.add_argument(
        "--output-dir",
        default=os.path.join("outputs", "keras_hub_finetune"),
        help="where the MultiMax preset goes",
    )
    parser.add_argument("--steps", type=int, default=400, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--merges", type=int, default=300, help="BPE merges to learn")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny, seconds-long run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.sequence_length, args.merges = 4, 4, 16, 20
    for name in ("steps", "batch_size", "sequence_length", "merges"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def python_docs_text() -> tuple[str, str]:
    """The offline text of `keras_multimax.toolkit.data` ("pydoc"), split 90/10."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


# GPT-2's pre-tokenization: words with their leading space, digits, symbols.
_WORDS = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")


def learn_bpe(text: str, num_merges: int):
    """A byte-level BPE vocabulary and merges for `GPT2Tokenizer`.

    The classic algorithm (Sennrich et al., 2016) on GPT-2's byte-to-unicode
    alphabet: start from the 256 bytes, repeatedly merge the most frequent
    adjacent pair inside words.
    """
    from keras_hub.src.tokenizers.byte_pair_tokenizer import bytes_to_unicode

    byte_list, unicode_list = bytes_to_unicode()
    # One unicode symbol per byte value; `byte_list` holds 1-byte strings.
    to_unicode = {b[0]: u for b, u in zip(byte_list, unicode_list)}
    words = collections.Counter(
        tuple(to_unicode[b] for b in word.encode("utf-8"))
        for word in _WORDS.findall(text)
    )
    vocabulary = {"<|endoftext|>": 0}
    for symbol in unicode_list:
        vocabulary[symbol] = len(vocabulary)
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append(f"{a} {b}")
        vocabulary.setdefault(a + b, len(vocabulary))
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return vocabulary, merges


def build_model(args, train_text):
    import keras_hub

    if args.preset:
        print(f"Loading the KerasHub preset {args.preset!r}.")
        model = keras_hub.models.CausalLM.from_preset(args.preset)
        if model.preprocessor is None:
            raise ValueError(
                "The preset has no preprocessor (tokenizer), which fine-tuning "
                f"on text needs. Received: preset={args.preset!r}"
            )
        # Models with learned position embeddings (GPT-2, OPT, ...) take at
        # most `max_sequence_length` tokens; longer batches fail in training
        # with a shape error deep in the position embedding.
        limit = getattr(model.backbone, "max_sequence_length", None)
        if limit is not None and args.sequence_length > limit:
            print(
                f"The preset takes at most {limit} tokens: --sequence-length "
                f"{args.sequence_length} lowered to {limit}."
            )
            args.sequence_length = limit
        model.preprocessor.sequence_length = args.sequence_length
        return model
    print(
        "No --preset given: building a small GPT-2 from its constructor "
        "(random weights, a byte-level BPE tokenizer learned from the "
        "training text). Pass --preset to fine-tune a pretrained model."
    )
    vocabulary, merges = learn_bpe(train_text, args.merges)
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary, merges)
    size = (
        {"num_layers": 2, "num_heads": 2, "hidden_dim": 16, "intermediate_dim": 32}
        if args.smoke
        else {
            "num_layers": 2,
            "num_heads": 4,
            "hidden_dim": 64,
            "intermediate_dim": 256,
        }
    )
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        max_sequence_length=args.sequence_length,
        **size,
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=args.sequence_length
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)


def text_batches(text: str, args, repeat: bool) -> tf.data.Dataset:
    """Chunks of roughly `sequence_length` tokens' worth of characters."""
    width = 3 * args.sequence_length
    chunks = [text[i : i + width] for i in range(0, len(text) - width, width)]
    ds = tf.data.Dataset.from_tensor_slices(chunks)
    if repeat:
        ds = ds.shuffle(len(chunks), seed=args.seed).repeat()
    return ds.batch(args.batch_size, drop_remainder=True)


def perplexity(model, test_ds) -> float:
    """exp(mean token cross-entropy) on the held-out text (padding excluded)."""
    loss = model.evaluate(test_ds, verbose=0, return_dict=True)["loss"]
    return math.exp(loss)


def generate(model, args):
    """Greedy continuations of PROMPTS, to the full length.

    No stop token: KerasHub's GPT-2 uses "<|endoftext|>" as both end and
    padding token, and a small model trained on text chunks ending with it
    stops almost at once; the fixed length shows what it learned.
    """
    return model.generate(PROMPTS, max_length=args.sequence_length, stop_token_ids=None)


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    train_text, test_text = python_docs_text()
    print(
        f"Text: CPython's pydoc topics, {len(train_text):,} / {len(test_text):,} characters."
    )
    softmax = build_model(args, train_text)
    multimax = keras_multimax.convert.to_multimax(softmax)
    n_mod = sum(1 for w in multimax.weights if w.name == "ts")
    print(
        f"{type(softmax).__name__} -> {type(multimax).__name__}: MultiMax in "
        f"{n_mod} attention layers, {softmax.count_params():,} parameters "
        f"(+{multimax.count_params() - softmax.count_params()})."
    )
    results = {}
    for name, model in (("SoftMax", softmax), ("MultiMax", multimax)):
        keras.utils.set_random_seed(args.seed)  # the same batches for both
        model.compile(
            optimizer=keras.optimizers.AdamW(args.learning_rate),
            weighted_metrics=["sparse_categorical_accuracy"],
            sampler="greedy",
        )
        start = time.perf_counter()
        model.fit(
            text_batches(train_text, args, repeat=True),
            steps_per_epoch=args.steps,
            epochs=1,
            verbose=0,
        )
        seconds = time.perf_counter() - start
        test_ds = text_batches(test_text, args, repeat=False)
        ppl = perplexity(model, test_ds.take(2) if args.smoke else test_ds)
        text = generate(model, args)
        results[name] = (ppl, seconds, text)
    print(f"\n{'model':<10}{'test perplexity':>18}{'train seconds':>16}")
    for name, (ppl, seconds, _) in results.items():
        print(f"{name:<10}{ppl:>18.2f}{seconds:>16.1f}")
    ts = [keras.ops.convert_to_numpy(w) for w in multimax.weights if w.name == "ts"]
    print(
        f"MultiMax |ts| after fine-tuning: max {max(np.abs(t).max() for t in ts):.3f}"
    )
    for name, (_, _, text) in results.items():
        print(f"\n{name} generates:")
        for line in text:
            print("  " + repr(line))

    preset = os.path.join(args.output_dir, "multimax_preset")
    multimax.save_to_preset(preset)
    import keras_hub

    reloaded = keras_hub.models.CausalLM.from_preset(preset)
    reloaded.compile(sampler="greedy")
    again = generate(reloaded, args)
    same = again == results["MultiMax"][2]
    print(
        f"\nSaved the MultiMax preset to {preset}; KerasHub's CausalLM.from_preset "
        f"gives back a {type(reloaded).__name__} that generates "
        f"{'the same' if same else 'DIFFERENT'} text."
    )
    if not same:
        raise SystemExit("The reloaded preset does not generate the same text.")


if __name__ == "__main__":
    main()
