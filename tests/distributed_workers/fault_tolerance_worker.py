"""A preempted MirroredStrategy job and its restart, as two processes.

Run as ``python fault_tolerance_worker.py MODE OUT_DIR`` with MODE:

* ``crash``: trains uninterrupted (weights to ``OUT_DIR/uninterrupted.npz``),
  then trains again with `BackupAndRestore` into ``OUT_DIR/backup`` and dies
  mid-epoch with ``os._exit(3)``, like a preempted machine (no clean-up);
* ``resume``: a new process, model and optimizer (other initial weights) that
  resumes from ``OUT_DIR/backup`` and writes ``OUT_DIR/resumed.npz``.

Both use `MirroredStrategy` on 2 logical CPUs (or all GPUs) and AdamW with
the MultiMax ``ranges``/``ts`` excluded from weight decay.
"""

from __future__ import annotations

import os
import sys

EPOCHS = 4
CRASH_EPOCH, CRASH_BATCH = 2, 1
CRASH_EXIT_CODE = 3


def main(mode: str, out_dir: str) -> None:
    import common

    common.quiet_tf()
    import keras
    import numpy as np
    import tensorflow as tf

    print(common.split_cpu(2), flush=True)
    strategy = tf.distribute.MirroredStrategy(common.mirrored_devices())
    x, y = common.make_data(seed=8)

    def model_and_fit(init_seed, callbacks):
        keras.utils.set_random_seed(init_seed)
        with strategy.scope():
            model = common.build_model()
            optimizer = keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=0.05)
            optimizer.exclude_from_weight_decay(
                var_list=[
                    v for v in model.trainable_variables if v.name in ("ranges", "ts")
                ]
            )
            model.compile(
                optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        model.fit(
            x,
            y,
            batch_size=common.GLOBAL_BATCH,
            epochs=EPOCHS,
            shuffle=False,
            callbacks=callbacks,
            verbose=0,
        )
        return model

    class Preempt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == CRASH_EPOCH and batch == CRASH_BATCH:
                np.savez(
                    os.path.join(out_dir, "at_crash.npz"),
                    **common.weights_by_path(self.model),
                )
                os._exit(CRASH_EXIT_CODE)

    backup = keras.callbacks.BackupAndRestore(os.path.join(out_dir, "backup"))
    if mode == "crash":
        model = model_and_fit(21, [])
        arrays = common.weights_by_path(model)
        arrays["iterations"] = np.array(int(model.optimizer.iterations.numpy()))
        np.savez(os.path.join(out_dir, "uninterrupted.npz"), **arrays)
        model_and_fit(21, [backup, Preempt()])
        raise AssertionError("the run was not interrupted")
    model = model_and_fit(99, [backup])  # other initial weights: restore must win
    arrays = common.weights_by_path(model)
    arrays["iterations"] = np.array(int(model.optimizer.iterations.numpy()))
    np.savez(os.path.join(out_dir, "resumed.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
