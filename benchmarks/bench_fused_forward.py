"""What `keras_multimax.config.enable_fused_forward` buys on TensorFlow.

The TensorFlow forward is plain builtin ops by default, the fused XLA kernel
with the switch on. This times both, in the same process and interleaved
rounds (`_common.interleaved`), for the op at the attention scores of the
quickstart-sized ViT ([16, 6, 197, 197], order 2):

- a forward+backward traced by `tf.function` without XLA (what
  ``jit_compile=False`` training runs), and by `tf.function(jit_compile=True)`
  (what Keras' default ``jit_compile="auto"`` runs);
- a forward alone (inference), without XLA.

Ratios are fused / plain (below 1: the switch is faster).

Usage: ``python benchmarks/bench_fused_forward.py [--runs 11]``
"""

from __future__ import annotations

import argparse

import _common
import numpy as np
import tensorflow as tf

from keras_multimax import config
from keras_multimax import ops

SHAPE = (16, 6, 197, 197)


def _traced(fn, fused: bool, xla: bool):
    """`fn` traced (and warmed up) with the switch set as asked."""
    compiled = tf.function(fn, jit_compile=xla, autograph=False)
    (config.enable_fused_forward if fused else config.disable_fused_forward)()
    try:
        compiled()
    finally:
        config.disable_fused_forward()
    return compiled


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=SHAPE).astype("float32"))
    upstream = tf.constant(rng.normal(size=SHAPE).astype("float32"))
    ranges = tf.Variable([-1.0, 1.0, -2.0, 2.0])
    ts = tf.Variable([0.1, 0.1, 0.02, 0.02])

    def forward():
        return ops.multimax(x, ranges, ts)

    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ops.multimax(x, ranges, ts)
        return tape.gradient(y, [x, ranges, ts], output_gradients=upstream)

    print(f"env: {_common.environment()}")
    for label, fn, xla in (
        ("forward+backward, tf.function", forward_backward, False),
        ("forward+backward, XLA", forward_backward, True),
        ("forward (inference), tf.function", forward, False),
    ):
        variants = {
            "plain": _traced(fn, fused=False, xla=xla),
            "fused": _traced(fn, fused=True, xla=xla),
        }
        result = _common.interleaved(variants, "plain", runs=args.runs, settle=1)
        fused = result["fused"]
        low, high = fused["ratio_quartiles"]
        print(
            f"{label}: plain {result['plain']['wall_ms']:.1f} ms, fused "
            f"{fused['wall_ms']:.1f} ms, fused/plain {fused['ratio']:.2f}x "
            f"(quartiles {low:.2f}-{high:.2f})"
        )


if __name__ == "__main__":
    main()
