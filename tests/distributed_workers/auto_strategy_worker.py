"""One worker of a 2-worker job that relies on ``choose_strategy()``'s "auto".

Run as ``python auto_strategy_worker.py INDEX PORTS OUT_DIR`` (PORTS
comma-separated, one per worker). Sets ``TF_CONFIG`` for its index, calls
`keras_multimax.distribute.choose_strategy` with its default preference
(as examples/train_distributed.py does on every machine of a real job),
all-reduces ``INDEX + 1`` across the workers and writes the strategy's class,
its replica count and the sum to ``OUT_DIR/worker<INDEX>.json``.
"""

from __future__ import annotations

import json
import os
import sys


def main(index: int, ports: str, out_dir: str) -> None:
    workers = [f"127.0.0.1:{p}" for p in ports.split(",")]
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    )
    import common

    common.quiet_tf()
    import tensorflow as tf

    from keras_multimax import distribute

    strategy = distribute.choose_strategy()

    @tf.function
    def all_reduce():
        value = strategy.run(lambda: tf.constant(float(index + 1)))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)

    total = float(all_reduce().numpy())
    common.write_json(
        os.path.join(out_dir, f"worker{index}.json"),
        {
            "is_multi_worker": isinstance(
                strategy, tf.distribute.MultiWorkerMirroredStrategy
            ),
            "num_replicas": strategy.num_replicas_in_sync,
            "sum": total,
        },
    )
    print(f"worker {index} done: sum {total}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
