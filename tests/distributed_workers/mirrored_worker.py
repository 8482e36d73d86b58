"""MirroredStrategy vs. single-device training on the same global batches.

Run as ``python mirrored_worker.py OUT_DIR EPOCHS``. Splits the CPU into two
logical devices (or uses all GPUs when several are visible) *before*
TensorFlow initialises them, trains the same initial model once under
`tf.distribute.MirroredStrategy` and once without a strategy, and writes
``OUT_DIR/weights.npz`` (``init/``, ``single/``, ``mirrored/`` prefixes) and
``OUT_DIR/meta.json``. The comparison is the test's job.
"""

from __future__ import annotations

import os
import sys


def main(out_dir: str, epochs: int) -> None:
    import common

    common.quiet_tf()
    import keras
    import numpy as np
    import tensorflow as tf

    reason = common.split_cpu(2)
    print(f"MirroredStrategy devices: {reason}", flush=True)
    devices = common.mirrored_devices()
    strategy = tf.distribute.MirroredStrategy(devices)

    keras.utils.set_random_seed(7)
    x, y = common.make_data(seed=1)
    init = common.build_model().get_weights()

    def train(scope):
        with scope:
            model = common.build_model()
            model.set_weights(init)
            common.compile_sgd(model)
        history = model.fit(
            x,
            y,
            batch_size=common.GLOBAL_BATCH,
            epochs=epochs,
            shuffle=False,
            verbose=0,
        )
        return model, history.history["loss"]

    single, single_loss = train(tf.distribute.get_strategy().scope())
    mirrored, mirrored_loss = train(strategy.scope())

    ranges = mirrored.get_layer("pool_multimax").ranges
    arrays = {}
    for prefix, model in (("single", single), ("mirrored", mirrored)):
        for path, value in common.weights_by_path(model).items():
            arrays[f"{prefix}/{path}"] = value
    for v, value in zip(single.weights, init):
        arrays[f"init/{v.path}"] = value
    np.savez(os.path.join(out_dir, "weights.npz"), **arrays)
    common.write_json(
        os.path.join(out_dir, "meta.json"),
        {
            "reason": reason,
            "devices": devices,
            "num_replicas": strategy.num_replicas_in_sync,
            # The tf.Variable behind the Keras variable.
            "ranges_variable_type": type(ranges._value).__name__,
            "single_loss": single_loss,
            "mirrored_loss": mirrored_loss,
        },
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
