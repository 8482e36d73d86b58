"""Trains MultiMax models under strategies and exports them from the scope.

Run as ``python export_train_worker.py OUT_DIR``. Two models:

* ``mirrored``: built, trained and exported inside `MirroredStrategy.scope()`
  (2 logical CPUs, or all GPUs when several are visible);
* ``bf16``: the TPU-shaped path, ``mixed_bfloat16`` and ``jit_compile=True``
  with static batches, inside `TPUStrategy.scope()` when a TPU is reachable
  and the default strategy's scope otherwise.

Each is written as ``<name>_export`` (`model.export`), ``<name>_tfsave``
(`tf.saved_model.save`) and ``<name>.keras``; ``reference.npz`` holds the
probe inputs and each model's outputs on them, before and after training
(`predict`, so XLA for the ``jit_compile=True`` model).
"""

from __future__ import annotations

import os
import sys


def main(out_dir: str) -> None:
    import common

    common.quiet_tf()
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_multimax import distribute

    reason = common.split_cpu(2)
    print(f"MirroredStrategy devices: {reason}", flush=True)
    keras.utils.set_random_seed(11)
    x, y = common.make_data(seed=4)
    probe = common.make_data(seed=5, n=10)[0]
    reference = {"probe": probe}
    meta = {"reason": reason}

    def train_and_export(name, strategy, jit_compile):
        with strategy.scope():
            model = common.build_model()
            common.compile_sgd(model, jit_compile=jit_compile)
            # How far training moves the outputs: the scale the test's
            # tolerances must be small against.
            reference[f"{name}_untrained"] = np.asarray(model.predict(probe, verbose=0))
            dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(
                common.GLOBAL_BATCH, drop_remainder=True
            )
            model.fit(dataset, epochs=2, shuffle=False, verbose=0)
            reference[name] = np.asarray(model.predict(probe, verbose=0))
            model.export(os.path.join(out_dir, f"{name}_export"), verbose=False)
            tf.saved_model.save(model, os.path.join(out_dir, f"{name}_tfsave"))
            model.save(os.path.join(out_dir, f"{name}.keras"))
        meta[name] = {
            "strategy": type(strategy).__name__,
            "replicas": strategy.num_replicas_in_sync,
            "compute_dtype": model.get_layer("embed").compute_dtype,
            "output_dtype": str(model.output.dtype),
        }

    mirrored = tf.distribute.MirroredStrategy(common.mirrored_devices())
    train_and_export("mirrored", mirrored, jit_compile=False)

    reachable, why = distribute.tpu_reachable()
    print(f"bf16 model: {'TPUStrategy' if reachable else why}", flush=True)
    tpu_or_default = (
        distribute.choose_strategy("tpu") if reachable else tf.distribute.get_strategy()
    )
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    train_and_export("bf16", tpu_or_default, jit_compile=True)
    keras.mixed_precision.set_global_policy("float32")

    np.savez(os.path.join(out_dir, "reference.npz"), **reference)
    common.write_json(os.path.join(out_dir, "train_meta.json"), meta)


if __name__ == "__main__":
    main(sys.argv[1])
