"""Converted KerasHub models against their SoftMax twins: training step and decoding.

For GPT-2, Llama and Gemma causal LMs (KerasHub 0.32, ``preprocessor=None``,
4 layers, width 128, sequence 128, batch 16, vocabulary 512, random weights),
the SoftMax model is KerasHub's own and the MultiMax model is
``keras_multimax.convert.to_multimax`` of it (default modulator: ``ts = 0``;
the time does not depend on the values). In one process per backend, both
are timed in interleaved rounds (`_common.interleaved`):

- **train step**: ``train_on_batch`` after ``compile(jit_compile=True)`` (XLA
  on TensorFlow, ``jax.jit`` on JAX), Adam, sparse cross-entropy on logits;
- **decode / token**: one compiled ``call_with_cache`` step of a batch of 4
  (one new token against a 128-position cache filled by the prompt), the
  step KerasHub's ``generate()`` loops over.

Reported: medians over rounds and the median (and quartiles) of the
per-round MultiMax/SoftMax ratios. The targets are ≤ 1.10 for both.

``--profile`` instead profiles one attention layer (the first block's) of
each converted model (``--families``) against KerasHub's, forward and backward under
the backend's compiler, with the backend's profiler: the time of every
compiled XLA operation, named by what it computes (from the optimized HLO).
``--profile-decode`` profiles the compiled decode step of each model the same
way and lists the loops that XLA's CPU backend splits into parallel tasks
(``outer_dimension_partitions`` in the optimized HLO), with their times.

Usage::

    python benchmarks/bench_hub.py                      # both backends, ~15 min on 2 cores
    python benchmarks/bench_hub.py --backend jax        # one backend, in this process
    python benchmarks/bench_hub.py --backend tensorflow --processes 5
    python benchmarks/bench_hub.py --profile [--backend tensorflow]
    python benchmarks/bench_hub.py --profile-decode --backend jax --families llama

``--processes N`` runs the timing in N fresh processes per backend, one after
the other, and reports the median over processes of each process's ratio
(with the lowest and highest). On TensorFlow one compiled program does not
run at the same speed in every process (the SoftMax step of the same model
has taken 243 ms in one process and 337 ms in the next), while the rounds
within a process agree: one process's ratio is a sample, not the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
BACKENDS = ("tensorflow", "jax")
FAMILIES = ("gpt2", "llama", "gemma")
CONFIG = {
    "num_layers": 4,
    "hidden_dim": 128,
    "sequence_length": 128,
    "batch_size": 16,
    "vocabulary_size": 512,
    "decode_batch_size": 4,
}
TARGET = 1.10


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, help="run one backend here")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument(
        "--what",
        default="train step,decode / token",
        help="comma-separated: 'train step', 'decode / token'",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="fresh processes per backend (timing only); the ratios' median "
        "over processes is reported",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--profile-decode",
        action="store_true",
        help="profile the compiled decode step instead, op by op, and list "
        "the loops XLA splits into parallel tasks",
    )
    parser.add_argument("--output", help="JSON path (default benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be at least 1. Received: {args.processes}")
    if args.processes > 1 and (args.profile or args.profile_decode):
        parser.error("--processes times the steps; profiles run in one process")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.backend is None or args.processes > 1:
        return run_processes(args)
    os.environ["KERAS_BACKEND"] = args.backend
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    if args.profile:
        return run_profile(args)
    if args.profile_decode:
        return run_decode_profile(args)
    return run_timing(args)


def run_processes(args):
    """Each backend in fresh processes (Keras fixes the backend at import).

    One process per backend writes its payload as is; with ``--processes N``
    each backend's entry holds the N payloads and their summary
    (`summarise`).
    """
    backends = (args.backend,) if args.backend else BACKENDS
    results = {}
    for backend in backends:
        payloads = []
        for _ in range(args.processes):
            with tempfile.TemporaryDirectory() as tmp:
                out = pathlib.Path(tmp) / "out.json"
                command = [sys.executable, __file__, "--backend", backend]
                command += ["--runs", str(args.runs), "--families", args.families]
                command += ["--what", args.what, "--output", str(out)]
                command += ["--profile"] if args.profile else []
                command += ["--profile-decode"] if args.profile_decode else []
                subprocess.run(command, check=True)
                payloads.append(json.loads(out.read_text()))
        if args.processes == 1:
            results[backend] = payloads[0]
        else:
            results[backend] = {
                "processes": payloads,
                "summary": summarise(payloads),
            }
    sys.path.insert(0, str(HERE))
    import _common

    if args.processes > 1:
        rows = [r for b in backends for r in results[b]["summary"]]
        print("\n" + markdown_over_processes(rows))
    name = (
        "hub_profile.json"
        if args.profile
        else "hub_decode_profile.json"
        if args.profile_decode
        else "hub.json"
    )
    path = _common.write_json(name, results, args.output)
    print(f"\nwrote {path}")


def summarise(payloads: list[dict]) -> list[dict]:
    """Per model and measure: each process's median ratio, and their median."""
    import statistics

    rows = []
    for i, first in enumerate(payloads[0]["results"]):
        same = [p["results"][i] for p in payloads]
        ratios = [r["multimax"]["ratio"] for r in same]
        rows.append(
            {
                "backend": first["backend"],
                "family": first["family"],
                "what": first["what"],
                "ratio": statistics.median(ratios),
                "ratios": ratios,
                "softmax_ms": [r["softmax"]["wall_ms"] for r in same],
                "multimax_ms": [r["multimax"]["wall_ms"] for r in same],
            }
        )
    return rows


def markdown_over_processes(rows) -> str:
    import _common

    table = []
    for r in rows:
        table.append(
            [
                r["backend"],
                r["family"],
                r["what"],
                f"{min(r['softmax_ms']):.2f}–{max(r['softmax_ms']):.2f} ms",
                f"{min(r['multimax_ms']):.2f}–{max(r['multimax_ms']):.2f} ms",
                f"**{r['ratio']:.2f}×** ({min(r['ratios']):.2f}–"
                f"{max(r['ratios']):.2f}), n = {len(r['ratios'])}",
            ]
        )
    header = [
        "backend",
        "model",
        "what",
        "SoftMax",
        "MultiMax",
        "ratio: median over processes (lowest–highest)",
    ]
    return _common.markdown_table(header, table)


# -- models ------------------------------------------------------------------


def build(family: str):
    import keras
    import keras_hub

    models = keras_hub.models
    keras.utils.set_random_seed(0)
    common = {
        "vocabulary_size": CONFIG["vocabulary_size"],
        "num_layers": CONFIG["num_layers"],
        "hidden_dim": CONFIG["hidden_dim"],
    }
    if family == "gpt2":
        backbone = models.GPT2Backbone(
            **common,
            num_heads=4,
            intermediate_dim=512,
            max_sequence_length=CONFIG["sequence_length"],
        )
        return models.GPT2CausalLM(backbone, preprocessor=None)
    if family == "llama":
        backbone = models.LlamaBackbone(
            **common, num_query_heads=4, num_key_value_heads=2, intermediate_dim=256
        )
        return models.LlamaCausalLM(backbone, preprocessor=None)
    if family == "gemma":
        backbone = models.GemmaBackbone(
            **common,
            num_query_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_dim=256,
        )
        return models.GemmaCausalLM(backbone, preprocessor=None)
    raise ValueError(f"Unknown family. Received: family={family!r}")


def twins(family: str):
    """KerasHub's SoftMax model and its MultiMax conversion, same weights."""
    from keras_multimax.convert import to_multimax

    softmax = build(family)
    return {"softmax": softmax, "multimax": to_multimax(softmax)}


def batch(rng, size):
    import numpy as np

    length = CONFIG["sequence_length"]
    ids = rng.integers(1, CONFIG["vocabulary_size"], size=(size, length + 1))
    x = {
        "token_ids": ids[:, :-1].astype("int32"),
        "padding_mask": np.ones((size, length), bool),
    }
    return x, ids[:, 1:].astype("int32")


def train_step(model, rng):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    x, y = batch(rng, CONFIG["batch_size"])
    return lambda: model.train_on_batch(x, y, sample_weight=x["padding_mask"])


def decode_step(model, rng):
    """One compiled `call_with_cache` step at position 64 of a filled cache."""
    import keras

    from keras_multimax.models._blocks import compile_for_backend

    x, _ = batch(rng, CONFIG["decode_batch_size"])
    model.jit_compile = True
    # KerasHub's own prefill (what `generate()` runs first).
    _, cache = model._build_cache(x["token_ids"])
    token = x["token_ids"][:, 64:65]
    step = compile_for_backend(
        model, lambda t, c, i: model.call_with_cache(t, c, i)[::2]
    )
    index = keras.ops.convert_to_tensor(64, "int32")
    return lambda: keras.ops.convert_to_numpy(step(token, cache, index)[0])


def run_timing(args):
    import _common
    import keras
    import numpy as np

    records = []
    measures = {"train step": train_step, "decode / token": decode_step}
    for family in args.families.split(","):
        models = twins(family)
        for what in args.what.split(","):
            variants = {
                kind: measures[what](model, np.random.default_rng(0))
                for kind, model in models.items()
            }
            # A decoding step takes milliseconds: rounds of many calls, and one
            # untimed call after the other variant ran.
            short = what == "decode / token"
            result = _common.interleaved(
                variants,
                "softmax",
                runs=args.runs,
                min_seconds=0.2 if short else 0.02,
                settle=1 if short else 0,
            )
            row = {"family": family, "what": what, "backend": keras.config.backend()}
            for kind, r in result.items():
                row[kind] = {k: r[k] for k in ("wall_ms", "ratio", "ratio_quartiles")}
            records.append(row)
            m = row["multimax"]
            print(
                f"{keras.config.backend():10s} {family:6s} {what:15s} "
                f"softmax {row['softmax']['wall_ms']:8.2f} ms  multimax "
                f"{m['wall_ms']:8.2f} ms  ratio {m['ratio']:.3f} "
                f"[{m['ratio_quartiles'][0]:.3f}, {m['ratio_quartiles'][1]:.3f}]",
                flush=True,
            )
    payload = {
        "environment": _common.environment(),
        "config": CONFIG,
        "results": records,
    }
    _common.write_json("hub.json", payload, args.output)
    print(markdown(records))


def markdown(records) -> str:
    import _common

    rows = []
    for r in records:
        m = r["multimax"]
        low, high = m["ratio_quartiles"]
        rows.append(
            [
                r["backend"],
                r["family"],
                r["what"],
                f"{r['softmax']['wall_ms']:.2f} ms",
                f"{m['wall_ms']:.2f} ms",
                f"**{m['ratio']:.2f}×** ({low:.2f}–{high:.2f})",
            ]
        )
    header = ["backend", "model", "what", "SoftMax", "MultiMax", "ratio (quartiles)"]
    return _common.markdown_table(header, rows)


# -- profile -----------------------------------------------------------------


def attention_inputs(family, layer, rng):
    """The arguments the first block passes to its attention layer."""
    import numpy as np

    b, t, d = CONFIG["batch_size"], CONFIG["sequence_length"], CONFIG["hidden_dim"]
    x = rng.normal(size=(b, t, d)).astype("float32")
    mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
    if family == "gpt2":
        return lambda layer, x: layer(query=x, value=x, attention_mask=mask), x
    return lambda layer, x: layer(x, attention_mask=mask), x


def forward_backward(layer, call, x):
    """`(f, args)`: the loss sum(y·u) and its gradients of x and every
    trainable weight of `layer`, as a pure function for the backend's compiler."""
    import keras
    import numpy as np

    trainable = layer.trainable_variables
    others = layer.non_trainable_variables
    upstream = np.random.default_rng(1).normal(size=x.shape).astype("float32")

    def loss(values, x):
        with keras.StatelessScope(
            state_mapping=list(zip(trainable, values)) + [(v, v.value) for v in others]
        ):
            y = call(layer, x)
        y = y[0] if isinstance(y, tuple) else y
        return keras.ops.sum(y * upstream)

    values = [v.value for v in trainable]
    if keras.config.backend() == "jax":
        import jax

        return jax.jit(jax.grad(loss, argnums=(0, 1))), (values, x)
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def step(values, x):
        with tf.GradientTape() as tape:
            tape.watch([values, x])
            total = loss(values, x)
        return tape.gradient(total, [values, x])

    return step, (values, tf.convert_to_tensor(x))


def optimized_hlo(fn, args) -> str:
    import keras

    if keras.config.backend() == "jax":
        return fn.lower(*args).compile().as_text()
    return fn.experimental_get_compiler_ir(*args)(stage="optimized_hlo")


def profile_events(fn, args, repeats=20) -> dict[str, float]:
    """Microseconds per call of every event the backend's profiler records."""
    import collections
    import glob

    import keras
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    def sync(out):
        keras.tree.map_structure(keras.ops.convert_to_numpy, out)

    for _ in range(3):
        sync(fn(*args))
    with tempfile.TemporaryDirectory() as logdir:
        if keras.config.backend() == "jax":
            import jax

            with jax.profiler.trace(logdir):
                for _ in range(repeats):
                    sync(fn(*args))
        else:
            import tensorflow as tf

            tf.profiler.experimental.start(logdir)
            for _ in range(repeats):
                sync(fn(*args))
            tf.profiler.experimental.stop()
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        space = xplane_pb2.XSpace()
        space.ParseFromString(pathlib.Path(path).read_bytes())
    totals = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name == "python" or line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                totals[name] += event.duration_ps / 1e6 / repeats
    return dict(totals)


def describe_hlo(hlo: str) -> dict[str, str]:
    """HLO instruction name -> ``opcode shape  source op`` (from its metadata)."""
    import re

    found = {}
    pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")
    for line in hlo.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        name, shape, opcode = match.groups()
        source = re.search(r'op_name="([^"]*)"', line)
        kind = re.search(r"kind=(k\w+)", line)
        what = source.group(1) if source else ""
        # The last two path components say which layer op it comes from.
        what = "/".join(what.split("/")[-2:])
        label = (
            f"{opcode}{'(' + kind.group(1) + ')' if kind else ''} {shape.split('{')[0]}"
        )
        found.setdefault(name, f"{label}  {what}")
    return found


def _is_product(what: str) -> bool:
    return what.startswith("dot") or "dot_general" in what or "MatMul" in what


def run_profile(args):
    import _common
    import keras
    import numpy as np

    records = {}
    for family in args.families.split(","):
        models = twins(family)
        for kind, model in models.items():
            block = model.backbone.transformer_layers[0]
            # GPT-2's and Llama's blocks hold it as `_self_attention_layer`,
            # Gemma's as `attention`.
            layer = getattr(block, "_self_attention_layer", None) or block.attention
            call, x = attention_inputs(family, layer, np.random.default_rng(0))
            fn, fn_args = forward_backward(layer, call, x)
            ops = describe_hlo(optimized_hlo(fn, fn_args))
            events = profile_events(fn, fn_args)
            table = sorted(
                (
                    (t, name, ops.get(name, ""))
                    for name, t in events.items()
                    if name in ops
                ),
                reverse=True,
            )
            total = sum(t for t, _, _ in table)
            # The projections and the two attention products are matrix
            # products in both layers; the rest is where they differ.
            products = [row for row in table if _is_product(row[2])]
            rest = [row for row in table if not _is_product(row[2])]
            records[f"{family}/{kind}"] = {
                "layer": type(layer).__name__,
                "total_us": total,
                "products_us": sum(t for t, _, _ in products),
                "ops": [{"us": t, "name": n, "what": w} for t, n, w in table],
            }
            print(
                f"\n{keras.config.backend()} {family} {kind} ({type(layer).__name__}): "
                f"{total:.0f} us per forward+backward, matrix products "
                f"{sum(t for t, _, _ in products):.0f} us, other ops "
                f"{sum(t for t, _, _ in rest):.0f} us; the other ops:"
            )
            for t, name, what in rest[:10]:
                print(f"  {t:9.1f} us  {name:28s} {what}")
    payload = {
        "environment": _common.environment(),
        "config": CONFIG,
        "profile": records,
    }
    _common.write_json("hub_profile.json", payload, args.output)


def decode_program(model, rng):
    """`decode_step`'s compiled function and its arguments, to profile."""
    import keras

    x, _ = batch(rng, CONFIG["decode_batch_size"])
    model.jit_compile = True
    _, cache = model._build_cache(x["token_ids"])
    token = keras.ops.convert_to_tensor(x["token_ids"][:, 64:65])
    index = keras.ops.convert_to_tensor(64, "int32")
    if keras.config.backend() == "jax":
        import jax

        variables = model.variables

        @jax.jit
        def step(values, token, cache, index):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return model.call_with_cache(token, cache, index)[::2]

        return step, ([v.value for v in variables], token, cache, index)
    import tensorflow as tf

    step = tf.function(
        lambda token, cache, index: model.call_with_cache(token, cache, index)[::2],
        jit_compile=True,
    )
    return step, (token, cache, index)


def parallel_loops(hlo: str) -> dict[str, str]:
    """HLO instruction name -> partitions, for the loops XLA's CPU backend
    splits into parallel tasks (``outer_dimension_partitions``)."""
    import re

    pattern = re.compile(
        r"^\s*(?:ROOT )?%?([\w.\-]+) = .*outer_dimension_partitions\":\[([^\]]+)\]"
    )
    found = {}
    for line in hlo.splitlines():
        match = pattern.match(line)
        if match:
            found[match.group(1)] = match.group(2).replace('"', "")
    return found


def run_decode_profile(args):
    import _common
    import keras
    import numpy as np

    records = {}
    for family in args.families.split(","):
        for kind, model in twins(family).items():
            fn, fn_args = decode_program(model, np.random.default_rng(0))
            hlo = optimized_hlo(fn, fn_args)
            ops = describe_hlo(hlo)
            split = parallel_loops(hlo)
            events = profile_events(fn, fn_args, repeats=100)
            timed = {name: t for name, t in events.items() if name in ops}
            split_us = sum(timed.get(name, 0.0) for name in split)
            records[f"{family}/{kind}"] = {
                "total_us": sum(timed.values()),
                "parallel_loops_us": split_us,
                "parallel_loops": [
                    {
                        "name": name,
                        "partitions": parts,
                        "us": timed.get(name),
                        "what": ops.get(name, ""),
                    }
                    for name, parts in split.items()
                ],
            }
            print(
                f"\n{keras.config.backend()} {family} {kind}: ops "
                f"{sum(timed.values()):.0f} us per decode step; {len(split)} "
                f"loops split into parallel tasks take {split_us:.0f} us:"
            )
            for name, parts in split.items():
                print(
                    f"  {timed.get(name, float('nan')):8.1f} us  {name:28s} "
                    f"[{parts}] {ops.get(name, '')}"
                )
    payload = {
        "environment": _common.environment(),
        "config": CONFIG,
        "decode_profile": records,
    }
    _common.write_json("hub_decode_profile.json", payload, args.output)


if __name__ == "__main__":
    main()
