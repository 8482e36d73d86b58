"""Decoding time per token of `TransformerLM.generate`, with and without a cache.

The models are `keras_multimax.models.TransformerLM` builders with the same
configuration, once with SoftMax attention and head and once with MultiMax in
every attention layer and the head (order 2). Each generates ``--new-tokens``
tokens (greedy) after a prompt of ``--prompt-length`` tokens, in one compiled
loop (`tf.function`):

- **cached**: ``generate()``: the prompt fills a key/value cache once, then
  each step runs one token through every layer;
- **cached, XLA**: the same with ``model.jit_compile = True`` (the loop is one
  XLA computation; Keras' default on CPU-only machines is False);
- **uncached**: ``generate(use_cache=False)``: each step runs the full forward
  pass on the whole ``prompt + new tokens`` buffer (causal attention) and
  reads the logits at the current position. A loop that recomputes only the
  prefix so far would do about half this work on average.

The six variants are timed in interleaved rounds (`_common.interleaved`);
"per token" is the median wall time of one ``generate`` call divided by the
number of new tokens; speed-ups and MultiMax/SoftMax ratios are medians of the
per-round ratios (wall time; the JSON also has process CPU time). Before
timing, the tokens of the three variants are checked equal.

Usage::

    python benchmarks/bench_decode.py            # ~1 min on 2 cores
    python benchmarks/bench_decode.py --quick    # tiny model, 8 tokens (smoke run)
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_multimax.models import TransformerLM  # noqa: E402

KINDS = ("softmax", "multimax")
MODES = ("cached", "cached, XLA", "uncached")


def build(kind: str, config: dict, jit_compile: bool) -> TransformerLM:
    keras.utils.set_random_seed(0)  # the same weights for every variant
    model = TransformerLM(
        config["vocab_size"],
        config["prompt_length"] + config["new_tokens"],
        num_layers=config["num_layers"],
        hidden_dim=config["hidden_dim"],
        num_heads=config["num_heads"],
        mlp_dim=config["mlp_dim"],
        attention=kind,
        head=kind,
    )
    model.jit_compile = jit_compile
    return model


def ratios(res: dict, numerator: str, denominator: str) -> float:
    """Median of the per-round wall-time ratios of two variants."""
    pairs = zip(res[numerator]["rounds_wall_ms"], res[denominator]["rounds_wall_ms"])
    return statistics.median(a / b for a, b in pairs)


def cell(summary: dict, mode: str) -> str:
    ms, ratio = summary[f"{mode}_ms_per_token"], summary[f"{mode}_vs_softmax"]
    return f"{ms:.3f} ms ({ratio:.2f}×)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    config = {
        "vocab_size": 64 if args.quick else 1000,
        "prompt_length": 4 if args.quick else 16,
        "new_tokens": args.new_tokens or (8 if args.quick else 256),
        "num_layers": 1 if args.quick else 2,
        "hidden_dim": 16 if args.quick else 128,
        "num_heads": 2 if args.quick else 4,
        "mlp_dim": 32 if args.quick else 512,
        "batch_size": 2 if args.quick else 4,
    }
    runs = args.runs or (2 if args.quick else 7)
    max_length = config["prompt_length"] + config["new_tokens"]
    prompt = np.random.default_rng(0).integers(
        0, config["vocab_size"], (config["batch_size"], config["prompt_length"])
    )
    prompt = prompt.astype("int32")

    env = _common.environment()
    print(
        f"# {env['date_utc']}  {env['cpu']}; TF {env['tensorflow']}, Keras {env['keras']}"
    )
    print(f"# TransformerLM {config}; median of {runs} interleaved rounds")
    calls, equal = {}, {}
    for kind in KINDS:
        graph, xla = build(kind, config, False), build(kind, config, True)
        tokens = []
        for mode, model in zip(MODES, (graph, xla, graph)):
            use_cache = mode != "uncached"
            calls[f"{kind} {mode}"] = lambda m=model, c=use_cache: m.generate(
                prompt, max_length=max_length, use_cache=c
            )
            tokens.append(calls[f"{kind} {mode}"]())  # also traces the loop
        equal[kind] = all(np.array_equal(tokens[0], t) for t in tokens[1:])
    res = _common.interleaved(
        calls, "softmax cached", runs=runs, warmup=1, min_seconds=0.0
    )

    n = config["new_tokens"]
    rows, summary = [], {}
    for kind in KINDS:
        s = {"tokens_equal": equal[kind]}
        for mode in MODES:
            key = mode.replace(", ", "_").lower()
            s[f"{key}_ms_per_token"] = res[f"{kind} {mode}"]["wall_ms"] / n
            s[f"{key}_cpu_ms_per_token"] = res[f"{kind} {mode}"]["cpu_ms"] / n
            s[f"{key}_vs_softmax"] = ratios(res, f"{kind} {mode}", f"softmax {mode}")
        s["speedup"] = ratios(res, f"{kind} uncached", f"{kind} cached")
        s["speedup_cpu"] = s["uncached_cpu_ms_per_token"] / s["cached_cpu_ms_per_token"]
        summary[kind] = s
        rows.append(
            [
                "SoftMax" if kind == "softmax" else "MultiMax",
                cell(s, "cached"),
                cell(s, "cached_xla"),
                cell(s, "uncached"),
                f"{s['speedup']:.1f}× (cpu {s['speedup_cpu']:.1f}×)",
                "yes" if s["tokens_equal"] else "NO",
            ]
        )
    print()
    header = [
        f"{n} new tokens",
        "cached, per token",
        "cached, XLA",
        "uncached",
        "cache speed-up",
        "same tokens",
    ]
    print(_common.markdown_table(header, rows))
    print("\n(×) = ratio to SoftMax in the same rounds")
    payload = {
        "environment": env,
        "config": config,
        "runs": runs,
        "summary": summary,
        "timings": res,
    }
    path = _common.write_json("decode.json", payload, args.output)
    print(f"\nwrote {path}")
    return 0 if all(equal.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
