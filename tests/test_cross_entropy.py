"""`multimax_cross_entropy` against autodiff of SegLU + sparse softmax cross-entropy.

The reference materialises the logits: ``z = hidden·kernel + bias``, σ written
here in plain ops from the paper's formula (not `_formula`), then
``tf.nn.sparse_softmax_cross_entropy_with_logits``, differentiated by
TensorFlow. The fused op is compared with it for the loss and the five
gradients (hidden, kernel, bias, ranges, ts) under a random per-token upstream
gradient, in float64 where the comparison is tight.

Which tests run where: everything here runs on the TensorFlow backend (the
JAX check in a ``KERAS_BACKEND=jax`` subprocess); under ``KERAS_BACKEND=jax``
only the backend-neutral tests and `test_jax_matches_autodiff` (in process)
run.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_multimax._cross_entropy import default_chunk_size
from keras_multimax._cross_entropy import multimax_cross_entropy

ON_TF = keras.backend.backend() == "tensorflow"
tf_only = pytest.mark.skipif(not ON_TF, reason="TensorFlow backend test")
if ON_TF:
    import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parent.parent
ORDER1 = ([-0.5, 0.5], [0.3, 0.4])
ORDER2 = ([-1.0, 1.0, -2.0, 2.0], [0.3, 0.4, 0.1, -0.05])


# Machine epsilon per dtype (NumPy has no bfloat16).
EPS = {
    "float64": 2.0**-52,
    "float32": 2.0**-23,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
}


def _close(actual, expected, dtype, factor, what=""):
    """|actual − expected| <= factor · eps(dtype) · max(1, max|expected|).

    Relative to the magnitude of the whole tensor, not of each entry: the
    chunked sums add the same terms in another order than the reference, and
    that round-off scales with the largest terms, not the smallest. `factor`
    covers the length of those sums; it is not tuned to this CPU (AVX2 and
    AVX-512 round differently).
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    atol = factor * EPS[str(dtype)] * scale
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol, err_msg=what)


def _problem(shape, vocab, dtype="float64", order=ORDER2, seed=0, ignore=None):
    rng = np.random.default_rng(seed)
    width = 5
    hidden = rng.normal(size=(*shape, width)).astype(dtype)
    kernel = (rng.normal(size=(width, vocab)) / np.sqrt(width)).astype(dtype)
    bias = (0.3 * rng.normal(size=vocab)).astype(dtype)
    labels = rng.integers(0, vocab, size=shape).astype("int32")
    if ignore is not None:
        labels.flat[:: max(labels.size // 3, 1)] = ignore
    ranges = np.array(order[0], dtype)
    ts = np.array(order[1], dtype)
    upstream = rng.normal(size=shape).astype(dtype)
    return hidden, kernel, bias, labels, ranges, ts, upstream


def _plain_seglu(z, ranges, ts, relu):
    """σ from the paper's formula, with the backend's `relu`."""
    out = z
    for k in range(ts.shape[-1] // 2):
        out = out + ts[2 * k] * relu(ranges[2 * k] - z) ** (k + 1)
        out = out + ts[2 * k + 1] * relu(z - ranges[2 * k + 1]) ** (k + 1)
    return out


def _reference(hidden, kernel, bias, labels, ranges, ts, ignore=None):
    """Loss per token from materialised logits (ignored tokens: 0)."""
    z = tf.einsum("...h,hv->...v", hidden, kernel)
    if bias is not None:
        z = z + bias
    s = _plain_seglu(z, ranges, ts, tf.nn.relu)
    keep = np.ones(labels.shape, bool) if ignore is None else labels != ignore
    safe = np.where(keep, labels, 0)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(safe, s)
    return tf.where(keep, loss, tf.zeros_like(loss))


def _loss_and_grads(fn, hidden, kernel, bias, ranges, ts, upstream):
    variables = [tf.constant(v) for v in (hidden, kernel, ranges, ts)]
    if bias is not None:
        variables.append(tf.constant(bias))
    with tf.GradientTape() as tape:
        tape.watch(variables)
        b = variables[4] if bias is not None else None
        loss = fn(variables[0], variables[1], b, variables[2], variables[3])
        total = tf.reduce_sum(loss * tf.cast(upstream, loss.dtype))
    grads = tape.gradient(total, variables)
    assert all(g is not None for g in grads)
    return loss.numpy(), [g.numpy() for g in grads]


def _compare(problem, chunk_size, use_bias=True, ignore=None, fused_wrap=None):
    hidden, kernel, bias, labels, ranges, ts, upstream = problem
    bias = bias if use_bias else None

    def fused(h, w, b, r, t):
        return multimax_cross_entropy(
            h, w, labels, r, t, b, chunk_size=chunk_size, ignore_index=ignore
        )

    def reference(h, w, b, r, t):
        return _reference(h, w, b, labels, r, t, ignore)

    wrapped = fused_wrap(fused) if fused_wrap else fused
    got = _loss_and_grads(wrapped, hidden, kernel, bias, ranges, ts, upstream)
    want = _loss_and_grads(reference, hidden, kernel, bias, ranges, ts, upstream)
    return got, want


NAMES = ("loss", "hidden", "kernel", "ranges", "ts", "bias")


def _assert_all_close(got, want, dtype, factor):
    _close(got[0], want[0], dtype, factor, "loss")
    for name, g, w in zip(NAMES[1:], got[1], want[1]):
        assert g.shape == w.shape, name
        _close(g, w, dtype, factor, name)


# float64: sums of at most a few hundred terms; 1e3·eps ≈ 2e-13.
F64 = 1e3


@tf_only
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 23, 64, None])
@pytest.mark.parametrize("order", [ORDER1, ORDER2], ids=["order1", "order2"])
def test_matches_autodiff_float64(chunk_size, order):
    # 23 = vocab: one chunk; 4 and 7 leave a partial last chunk (23 = 5·4 + 3).
    problem = _problem((7,), 23, order=order)
    got, want = _compare(problem, chunk_size)
    _assert_all_close(got, want, "float64", F64)


@tf_only
def test_without_bias():
    got, want = _compare(_problem((6,), 11), chunk_size=4, use_bias=False)
    assert len(got[1]) == 4
    _assert_all_close(got, want, "float64", F64)


@tf_only
def test_leading_dimensions_and_ignore_index():
    problem = _problem((2, 3, 4), 13, ignore=-100)
    labels = problem[3]
    assert (labels == -100).any() and (labels != -100).any()
    got, want = _compare(problem, chunk_size=5, ignore=-100)
    _assert_all_close(got, want, "float64", F64)
    ignored = labels == -100
    assert np.all(got[0][ignored] == 0)
    assert np.all(got[1][0][ignored] == 0)  # no gradient to their hidden states
    assert np.all(got[0][~ignored] > 0)


@tf_only
def test_ignore_index_may_be_a_valid_id():
    # ignore_index=0 drops the tokens whose label is 0, also a vocabulary id.
    problem = _problem((9,), 6, ignore=0)
    got, want = _compare(problem, chunk_size=4, ignore=0)
    _assert_all_close(got, want, "float64", F64)


@tf_only
def test_ts_zero_is_softmax_cross_entropy():
    hidden, kernel, bias, labels, ranges, _, _ = _problem((8,), 19)
    ts = np.zeros_like(ranges)
    got = multimax_cross_entropy(hidden, kernel, labels, ranges, ts, bias, chunk_size=6)
    logits = hidden @ kernel + bias
    want = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    _close(got, want, "float64", F64)


@tf_only
def test_numerical_gradients_float64():
    hidden, kernel, bias, labels, ranges, ts, _ = _problem((4,), 9)
    # Thresholds away from the logits, where σ is not differentiable.
    ranges = np.array([-0.9, 0.8, -1.7, 1.6])

    def total(h, w, b, r, t):
        loss = multimax_cross_entropy(h, w, labels, r, t, b, chunk_size=4)
        return tf.reduce_sum(loss * np.linspace(0.5, 1.5, 4))

    theoretical, numerical = tf.test.compute_gradient(
        total, [hidden, kernel, bias, ranges, ts], delta=1e-6
    )
    for name, a, n in zip(
        ("hidden", "kernel", "bias", "ranges", "ts"), theoretical, numerical
    ):
        # Central differences with delta 1e-6: error ~ delta² · σ''' + eps/delta.
        np.testing.assert_allclose(
            a, n, atol=1e-7 * max(1, np.abs(n).max()), err_msg=name
        )


@tf_only
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_computed_in_float32(dtype):
    hidden, kernel, bias, labels, ranges, ts, upstream = _problem((3, 5), 37, "float32")
    rounded = [tf.cast(tf.cast(v, dtype), "float32").numpy() for v in (hidden, kernel)]

    def fused(h, w, b, r, t):
        return multimax_cross_entropy(
            tf.cast(h, dtype), tf.cast(w, dtype), labels, r, t, b, chunk_size=8
        )

    def reference(h, w, b, r, t):
        return _reference(h, w, b, labels, r, t)

    got = _loss_and_grads(fused, *rounded, bias, ranges, ts, upstream)
    want = _loss_and_grads(reference, *rounded, bias, ranges, ts, upstream)
    assert got[0].dtype == np.float32
    # The loss and the float32 gradients (bias, ranges, ts) are float32
    # computations of the same rounded inputs; the gradients of hidden and
    # kernel come back in `dtype`, rounded once more.
    _close(got[0], want[0], "float32", 256)
    for name, g, w in zip(NAMES[1:], got[1], want[1]):
        if name in ("ranges", "ts", "bias"):
            _close(g, w, "float32", 256, name)
        else:
            _close(g, w, dtype, 4, name)


@tf_only
@pytest.mark.parametrize("compile_mode", ["graph", "xla"])
def test_in_tf_function(compile_mode):
    problem = _problem((2, 7), 29, "float32", ignore=-1)

    def wrap(fn):
        return tf.function(fn, jit_compile=compile_mode == "xla")

    got, want = _compare(problem, chunk_size=8, ignore=-1, fused_wrap=wrap)
    # float32: sums over 29 logits and 5 products per logit.
    _assert_all_close(got, want, "float32", 128)


@tf_only
def test_chunks_are_sequential():
    """The loop runs one chunk at a time (`parallel_iterations=1`)."""
    hidden, kernel, bias, labels, ranges, ts, _ = _problem((4,), 40, "float32")
    fn = tf.function(
        lambda h: multimax_cross_entropy(h, kernel, labels, ranges, ts, chunk_size=8)
    )
    graph = fn.get_concrete_function(tf.TensorSpec(hidden.shape, "float32")).graph
    loops = [
        op for op in graph.get_operations() if op.type in ("While", "StatelessWhile")
    ]
    assert loops
    for op in loops:
        assert op.get_attr("parallel_iterations") == 1


@tf_only
def test_out_of_range_labels():
    hidden, kernel, bias, labels, ranges, ts, _ = _problem((4,), 10, "float32")
    labels[1] = 10
    with pytest.raises(ValueError, match=r"labels.*vocab_size=10.*Received.*\[10\]"):
        multimax_cross_entropy(hidden, kernel, labels, ranges, ts)
    # In a graph they cannot be checked: their loss is NaN (documented).
    loss = tf.function(multimax_cross_entropy)(hidden, kernel, labels, ranges, ts)
    assert np.isnan(loss[1]) and np.all(np.isfinite(np.delete(loss.numpy(), 1)))
    labels[1] = -1
    with pytest.raises(ValueError, match="ignore_index"):
        multimax_cross_entropy(hidden, kernel, labels, ranges, ts, ignore_index=-100)


def test_bad_arguments():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 4)).astype("float32")
    kernel = rng.normal(size=(4, 6)).astype("float32")
    labels = np.array([0, 1, 2])
    ranges = ts = np.zeros(4, "float32")
    cases = [
        (
            dict(kernel=kernel[:3]),
            ValueError,
            r"Received: hidden.shape=\(3, 4\), kernel",
        ),
        (dict(kernel=kernel[0]), ValueError, "Received: kernel.shape"),
        (dict(labels=labels[:2]), ValueError, "Received: hidden.shape.*labels.shape"),
        (dict(labels=labels.astype("float32")), TypeError, "labels.dtype=float32"),
        (dict(hidden=hidden.astype("int32")), TypeError, "hidden.dtype=int32"),
        (dict(ranges=np.zeros(2, "float32")), ValueError, "ranges.shape"),
        (
            dict(ts=np.zeros(3, "float32"), ranges=np.zeros(3, "float32")),
            ValueError,
            "ts.shape",
        ),
        (dict(ts=np.zeros((2, 4), "float32")), ValueError, "ts.shape"),
        (dict(bias=np.zeros(5, "float32")), ValueError, "bias.shape"),
        (dict(chunk_size=0), ValueError, "chunk_size=0"),
        (dict(chunk_size=True), TypeError, "chunk_size=True"),
        (dict(ignore_index=1.5), TypeError, "ignore_index=1.5"),
        (dict(labels=None), TypeError, "labels=None"),
    ]
    base = dict(hidden=hidden, kernel=kernel, labels=labels, ranges=ranges, ts=ts)
    for change, error, message in cases:
        kwargs = {**base, **change}
        with pytest.raises(error, match=message):
            multimax_cross_entropy(**kwargs)


def test_default_chunk_size():
    # 8 float32 buffers of [tokens, chunk] within the 128 MiB budget.
    assert default_chunk_size(4096, 32768) * 4096 * 4 * 8 <= 128 * 2**20
    assert default_chunk_size(4096, 32768) % 128 == 0
    assert default_chunk_size(10**7, 50000) == 128  # at least one tile
    assert default_chunk_size(8, 300) == 300  # at most the vocabulary
    assert default_chunk_size(None, 10**6) == default_chunk_size(8192, 10**6)


_MIRRORED = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from keras_multimax._cross_entropy import multimax_cross_entropy
rng = np.random.default_rng(0)
hidden = rng.normal(size=(8, 6, 5)).astype("float32")
labels = rng.integers(0, 21, size=(8, 6)).astype("int32")
labels[:, -1] = -100
weights = dict(kernel=rng.normal(size=(5, 21)).astype("float32") / 3,
               bias=rng.normal(size=21).astype("float32") / 3,
               ranges=np.array([-1.0, 1.0, -2.0, 2.0], "float32"),
               ts=np.array([0.3, 0.4, 0.1, 0.2], "float32"))
def run(strategy):
    with strategy.scope():
        v = {k: tf.Variable(x) for k, x in weights.items()}
    data = tf.data.Dataset.from_tensor_slices((hidden, labels)).batch(8)
    @tf.function
    def step(h, y):
        with tf.GradientTape() as tape:
            loss = multimax_cross_entropy(h, v["kernel"], y, v["ranges"], v["ts"],
                                          v["bias"], chunk_size=8, ignore_index=-100)
            loss = tf.reduce_sum(loss) / 8 / 6
        return loss, tape.gradient(loss, list(v.values()))
    def grads(h, y):
        loss, g = strategy.run(step, (h, y))
        return strategy.reduce("SUM", loss, None), [strategy.reduce("SUM", x, None) for x in g]
    (h, y), = strategy.experimental_distribute_dataset(data)
    loss, g = grads(h, y)
    return float(loss), [x.numpy() for x in g]
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert mirrored.num_replicas_in_sync == 2
one = tf.distribute.OneDeviceStrategy("/cpu:0")
(l2, g2), (l1, g1) = run(mirrored), run(one)
np.testing.assert_allclose(l2, l1, rtol=1e-5)
for a, b in zip(g2, g1):
    assert np.abs(b).max() > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1, np.abs(b).max()))
print("OK", mirrored.num_replicas_in_sync)
"""


def _run_python(code: str, backend: str) -> str:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@tf_only
@pytest.mark.slow
def test_mirrored_strategy_two_replicas_equal_one_device():
    # Two logical CPUs must be configured before TensorFlow starts: a subprocess.
    assert "OK 2" in _run_python(textwrap.dedent(_MIRRORED), "tensorflow")


def _jax_check():
    """The JAX custom_vjp against jax autodiff of materialised logits (float64)."""
    import jax
    import jax.numpy as jnp

    # float64 for the comparison, restored after it (tests share the process).
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        return _jax_compare(jax, jnp)
    finally:
        jax.config.update("jax_enable_x64", x64)


def _jax_compare(jax, jnp):
    hidden, kernel, bias, labels, ranges, ts, upstream = _problem((2, 5), 23, ignore=-7)
    keep = labels != -7

    def reference(h, w, b, r, t):
        s = _plain_seglu(h @ w + b, r, t, jax.nn.relu)
        picked = jnp.take_along_axis(s, jnp.where(keep, labels, 0)[..., None], -1)
        return jnp.where(keep, jax.nn.logsumexp(s, axis=-1) - picked[..., 0], 0.0)

    def fused(h, w, b, r, t):
        return multimax_cross_entropy(
            h, w, labels, r, t, b, chunk_size=6, ignore_index=-7
        )

    args = [jnp.asarray(v) for v in (hidden, kernel, bias, ranges, ts)]
    for fn in (fused, jax.jit(fused)):
        loss, pullback = jax.vjp(fn, *args)
        want, want_pullback = jax.vjp(reference, *args)
        _close(loss, want, "float64", F64, "loss")
        for name, g, w in zip(NAMES[1:], pullback(upstream), want_pullback(upstream)):
            _close(g, w, "float64", F64, name)
    # fp16 hidden is computed in float32 and returns float32 losses.
    loss = fused(args[0].astype("float16"), *args[1:])
    assert loss.dtype == jnp.float32, loss.dtype
    return "OK jax"


@pytest.mark.only_backend(
    "jax", reason="the JAX custom VJP, checked in the JAX pass's own process"
)
def test_jax_matches_autodiff():
    assert _jax_check() == "OK jax"
