"""One worker of a 2-worker `MultiWorkerMirroredStrategy` job on 127.0.0.1.

Run as ``python multiworker_worker.py INDEX PORTS INPUT_NPZ OUT_DIR EPOCHS``
(PORTS comma-separated, one per worker). Builds ``TF_CONFIG`` for its index,
trains the model of `common.build_model` with `model.fit` from the initial
weights and data in INPUT_NPZ (arrays ``x``, ``y``, ``w0``, ``w1``, ...), and
writes its final weights to ``OUT_DIR/worker<INDEX>.npz``.

The dataset is batched with the *global* batch size and auto-sharded by DATA:
tf.distribute rebatches every global batch into per-replica slices and hands
worker i the i-th slice, so each step sees the same global batch a
single-process run sees (FILE sharding would fail on in-memory data, OFF would
give every worker the same slice).
"""

from __future__ import annotations

import json
import os
import sys


def main(index: int, ports: str, input_npz: str, out_dir: str, epochs: int) -> None:
    workers = [f"127.0.0.1:{p}" for p in ports.split(",")]
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    )
    import common

    common.quiet_tf()
    import numpy as np
    import tensorflow as tf

    common.no_tf32()

    from keras_multimax import distribute

    strategy = distribute.choose_strategy("multi_worker")
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    data = np.load(input_npz)
    init = [data[f"w{i}"] for i in range(len(data.files) - 2)]
    dataset = tf.data.Dataset.from_tensor_slices((data["x"], data["y"])).batch(
        common.GLOBAL_BATCH
    )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = dataset.with_options(options)

    with strategy.scope():
        model = common.build_model()
        model.set_weights(init)
        common.compile_sgd(model)
    history = model.fit(dataset, epochs=epochs, shuffle=False, verbose=0)
    arrays = common.weights_by_path(model)
    np.savez(os.path.join(out_dir, f"worker{index}.npz"), **arrays)
    common.write_json(
        os.path.join(out_dir, f"worker{index}.json"),
        {
            "num_replicas": strategy.num_replicas_in_sync,
            "loss": history.history["loss"],
            "variable_type": type(
                model.get_layer("pool_multimax").ranges._value
            ).__name__,
        },
    )
    print(f"worker {index} done: {strategy.num_replicas_in_sync} replicas", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
