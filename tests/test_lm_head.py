"""`layers.MultiMaxLMHead`: the standard layer checks, the loss against Dense → SegLU →
SparseCategoricalCrossentropy at the same weights, tied embeddings, `fit`, and a
smoke run of ``benchmarks/bench_lm_head.py`` (a TensorFlow benchmark).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from backend_helpers import to_numpy
from backend_helpers import variable_gradients
from layer_test_case import paper_modulator
from layer_test_case import run_layer_test

from keras_multimax import layers
from keras_multimax import models

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
VOCAB, WIDTH = 13, 6
# float32 gradients summed over 13 logits and 6 products: 64 ulps of the scale.
ATOL = 64 * 2.0**-23


def _data(shape=(2, 5), seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(*shape, WIDTH)).astype("float32")
    labels = rng.integers(0, VOCAB, size=shape).astype("int32")
    return hidden, labels


def _set_modulator(layer):
    layer.ranges.assign([-1.0, 1.0, -2.0, 2.0])
    layer.ts.assign([0.3, 0.4, 0.1, -0.05])


def _grads(fn, weights):
    """The per-token loss (2, 5) and the gradients of its weighted sum."""
    loss, grads = variable_gradients(fn, weights, upstream=np.linspace(0.5, 1.5, 5))
    return to_numpy(loss), grads


def _assert_close(a, b, what=""):
    b = np.asarray(b)
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=0, atol=ATOL * scale, err_msg=what)


def test_standard_layer_checks():
    hidden, _ = _data()
    run_layer_test(
        layers.MultiMaxLMHead,
        {
            "vocab_size": VOCAB,
            "chunk_size": 4,
            "ignore_index": -100,
            "modulator": paper_modulator(),
        },
        hidden,
        expected_output_shape=(2, 5, VOCAB),
        expected_num_trainable_weights=4,  # kernel, bias, ranges, ts
        trainable_weight_names=("kernel", "bias", "ranges", "ts"),
    )


def test_loss_equals_dense_seglu_sparse_crossentropy():
    hidden, labels = _data()
    head = layers.MultiMaxLMHead(VOCAB, chunk_size=4)
    head.build(hidden.shape)
    _set_modulator(head)
    dense = keras.layers.Dense(VOCAB)
    dense.build(hidden.shape)
    seglu = layers.SegLU()
    seglu.build(None)
    for a, b in zip(
        (dense.kernel, dense.bias, seglu.ranges, seglu.ts),
        (head.kernel, head.bias, head.ranges, head.ts),
    ):
        a.assign(to_numpy(b))
    scce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    got = _grads(lambda: head(hidden, labels=labels), head.trainable_weights)
    reference_weights = [dense.kernel, dense.bias, seglu.ranges, seglu.ts]
    want = _grads(lambda: scce(labels, seglu(dense(hidden))), reference_weights)
    _assert_close(got[0], want[0], "loss")
    for name, g, w in zip(("kernel", "bias", "ranges", "ts"), got[1], want[1]):
        _assert_close(g, w, name)
    # Inference: the modulated logits of the same head, and their top-k.
    logits = head(hidden)
    _assert_close(logits, seglu(dense(hidden)), "logits")
    values, ids = head(hidden, top_k=3)
    np.testing.assert_array_equal(
        ids, np.argsort(-np.asarray(logits), axis=-1)[..., :3]
    )
    _assert_close(values, np.sort(logits, axis=-1)[..., ::-1][..., :3], "top_k")


def test_tied_embedding():
    hidden, labels = _data()
    embedding = keras.layers.Embedding(VOCAB, WIDTH)
    embedding.build((None,))
    head = layers.MultiMaxLMHead(VOCAB, use_bias=False, tied_embedding=embedding)
    head.build(hidden.shape)
    _set_modulator(head)
    assert not hasattr(head, "kernel")
    untied = layers.MultiMaxLMHead(VOCAB, use_bias=False)
    untied.build(hidden.shape)
    untied.kernel.assign(to_numpy(embedding.embeddings).T)
    untied.ranges.assign(head.ranges)
    untied.ts.assign(head.ts)
    got = _grads(lambda: head(hidden, labels=labels), [embedding.embeddings, head.ts])
    want = _grads(lambda: untied(hidden, labels=labels), [untied.kernel, untied.ts])
    _assert_close(got[0], want[0], "loss")
    _assert_close(got[1][0], want[1][0].T, "embeddings = kernelᵀ")
    _assert_close(got[1][1], want[1][1], "ts")

    revived = layers.MultiMaxLMHead.from_config(head.get_config())
    assert isinstance(revived.tied_embedding, keras.layers.Embedding)
    assert revived.get_config() == head.get_config()

    wrong = layers.MultiMaxLMHead(VOCAB + 1, tied_embedding=embedding)
    with pytest.raises(
        ValueError, match=r"\(14, 6\). Received: embeddings.shape=\(13, 6\)"
    ):
        wrong(hidden)


def test_fit_decreases_the_loss_and_ignores_padding():
    hidden, labels = _data((8, 6))
    labels[:, -2:] = -1  # padding
    h_in = keras.Input((6, WIDTH))
    y_in = keras.Input((6,), dtype="int32")
    head = layers.MultiMaxLMHead(VOCAB, ignore_index=-1, chunk_size=5)
    model = keras.Model([h_in, y_in], head(h_in, labels=y_in))
    assert tuple(model.output.shape) == (None, 6)
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=lambda _, per_token: keras.ops.sum(per_token) / (8 * 4),
    )
    before = [to_numpy(w) for w in head.trainable_weights]
    history = model.fit([hidden, labels], np.zeros((8, 6)), epochs=5, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    for w, b in zip(head.trainable_weights, before):
        assert not np.array_equal(to_numpy(w), b), w.path
    per_token = model.predict([hidden, labels], verbose=0)
    assert np.all(per_token[:, -2:] == 0) and np.all(per_token[:, :-2] > 0)


def test_mixed_precision_loss_is_float32():
    hidden, labels = _data()
    head = layers.MultiMaxLMHead(VOCAB, dtype="mixed_bfloat16")
    loss = head(hidden, labels=labels)
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    assert keras.backend.standardize_dtype(head(hidden).dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(head.ts.dtype) == "float32"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"vocab_size": 0}, ValueError, "vocab_size=0"),
        ({"vocab_size": 5, "chunk_size": 0}, ValueError, "chunk_size=0"),
        ({"vocab_size": 5, "ignore_index": "pad"}, TypeError, "ignore_index='pad'"),
        (
            {"vocab_size": 5, "tied_embedding": np.zeros((5, 2))},
            TypeError,
            "tied_embedding",
        ),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        layers.MultiMaxLMHead(**kwargs)


@pytest.mark.slow
@pytest.mark.only_backend("tensorflow", reason="the benchmark times tf.function steps")
def test_bench_lm_head_quick(tmp_path):
    """The head's run end to end: a memory subprocess per variant, and timing."""
    output = tmp_path / "lm_head.json"
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_lm_head.py"),
            "--quick",
            "--runs",
            "2",
            "--output",
            str(output),
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    (head,) = json.loads(output.read_text())["results"]
    assert head["shape"] == [512, 64, 4096]
    _assert_memory_and_timing(head)
    # Fresh processes: each step allocates above what importing left.
    assert all(m["step_peak_above_start_mib"] > 0 for m in head["memory"].values())
    assert head["idle"]["max_rss_mib"] > 0


@pytest.mark.only_backend("tensorflow", reason="the benchmark times tf.function steps")
def test_bench_lm_head_transformer_lm_workers(monkeypatch):
    """``--lm``'s workers, in this process: the subprocess plumbing they share
    with the head's is the test above's."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_lm_head

    config = [2, 16, 16, 256]  # batch, length, width, vocabulary
    memory = {
        v: bench_lm_head.lm_memory_worker(f"lm_{v}", config)
        for v in ("unfused", "fused")
    }
    timing = bench_lm_head.lm_time_worker(config, runs=2)
    _assert_memory_and_timing({"memory": memory, "timing": timing})


def _assert_memory_and_timing(record):
    assert set(record["memory"]) == set(record["timing"]) == {"unfused", "fused"}
    for variant in ("unfused", "fused"):
        # In the test's own process the step may reuse memory already held:
        # only fresh processes (the test above) must show a peak above 0.
        assert np.isfinite(record["memory"][variant]["step_peak_above_start_mib"])
        assert record["memory"][variant]["max_rss_mib"] > 0
        assert record["timing"][variant]["wall_ms"] > 0
    assert record["timing"]["unfused"]["ratio"] == 1.0


def _adamw(model):
    optimizer = keras.optimizers.AdamW(learning_rate=1e-3)
    models.exclude_modulator_from_weight_decay(optimizer, model)
    return optimizer


def test_transformer_lm_fused_head_trains_as_the_unfused_model():
    tiny = dict(num_layers=1, hidden_dim=8, num_heads=2, mlp_dim=8)
    fused = models.TransformerLM(20, 8, fused_head=True, **tiny)
    plain = models.TransformerLM(20, 8, **tiny)
    fused_weights = {w.path: w for w in fused.weights}
    for w in plain.weights:  # head_dense/{kernel,bias}, head_seglu/{ranges,ts}
        path = w.path.replace("head_dense/", "head/").replace("head_seglu/", "head/")
        fused_weights.pop(path).assign(to_numpy(w))  # a copy, not a shared buffer
    assert not fused_weights  # the same weights under other names
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, (4, 8)).astype("int32")
    y = rng.integers(0, 20, (4, 8)).astype("int32")
    _assert_close(fused.predict(x, verbose=0), plain.predict(x, verbose=0), "logits")
    # The fused head's loss is its own (compute_loss): no loss, no metric on
    # the logits, which a compiled step then prunes.
    fused.compile(optimizer=_adamw(fused))
    plain.compile(
        optimizer=_adamw(plain),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    got = fused.fit(x, y, epochs=3, verbose=0).history["loss"]
    want = plain.fit(x, y, epochs=3, verbose=0).history["loss"]
    # Three AdamW steps: the float32 round-off of the two losses' gradients.
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[-1] < got[0]
    config = fused.get_config()
    assert config["fused_head"] is True
    assert models.TransformerLM.from_config(config).get_config() == config
    with pytest.raises(ValueError, match="Received: head='softmax'"):
        models.TransformerLM(20, 8, head="softmax", fused_head=True, **tiny)
