"""Reloads the artifacts of export_train_worker.py in a fresh process.

Run as ``python export_reload_worker.py EXPORT_DIR``. For each SavedModel
(``{mirrored,bf16}_{export,tfsave}``) it records the outputs on the probe
inputs loaded with no strategy, loaded inside a `MirroredStrategy` scope
(run on every replica with ``strategy.run``), and through
``tf.function(jit_compile=True)``, plus the serving signature's dtypes. Each
``.keras`` file is loaded under a strategy other than the one it was saved
under. Writes ``reloaded.npz`` and ``reload_meta.json``; the test compares.
"""

from __future__ import annotations

import os
import sys


def _serving_fn(loaded, kind):
    if kind == "export":
        return loaded.serve  # model.export's endpoint
    return loaded.signatures["serving_default"]


def _call(fn, kind, x):
    if kind == "export":
        out = fn(x)
    else:  # a signature takes keyword arguments named after its inputs
        (name,) = fn.structured_input_signature[1]
        out = fn(**{name: x})
    if isinstance(out, dict):
        (out,) = out.values()
    return out


def main(export_dir: str) -> None:
    import common

    common.quiet_tf()
    import numpy as np
    import tensorflow as tf

    common.split_cpu(2)
    strategy = tf.distribute.MirroredStrategy(common.mirrored_devices())
    probe = np.load(os.path.join(export_dir, "reference.npz"))["probe"]
    x = tf.constant(probe)
    results, meta = {}, {}

    for name in ("mirrored", "bf16"):
        for kind in ("export", "tfsave"):
            key = f"{name}_{kind}"
            path = os.path.join(export_dir, key)
            # 1. no strategy
            loaded = tf.saved_model.load(path)
            fn = _serving_fn(loaded, kind)
            results[f"{key}/plain"] = _call(fn, kind, x).numpy()
            signature = loaded.signatures[
                "serve" if kind == "export" else "serving_default"
            ]
            specs = tf.nest.flatten(signature.structured_input_signature)
            outputs = tf.nest.flatten(signature.structured_outputs)
            meta[key] = {
                "input_dtypes": [s.dtype.name for s in specs],
                "output_dtypes": [s.dtype.name for s in outputs],
            }
            # 2. XLA
            jit = tf.function(lambda t, fn=fn, kind=kind: _call(fn, kind, t))
            jit = tf.function(jit, jit_compile=True)
            results[f"{key}/jit"] = jit(x).numpy()
            # 3. inside a strategy's scope: the variables become mirrored and
            # the restored functions run in replica context (strategy.run);
            # TF refuses to call them in cross-replica context.
            with strategy.scope():
                loaded_in_scope = tf.saved_model.load(path)
                fn_in_scope = _serving_fn(loaded_in_scope, kind)
                per_replica = strategy.run(
                    tf.function(lambda t, f=fn_in_scope, k=kind: _call(f, k, t)),
                    args=(x,),
                )
            replicas = strategy.experimental_local_results(per_replica)
            meta[key]["replicas"] = len(replicas)
            for i, value in enumerate(replicas):
                results[f"{key}/replica{i}"] = value.numpy()

    # .keras files under another strategy than the one they were saved under.
    import keras

    import keras_multimax  # noqa: F401  registers the layers

    one_device = tf.distribute.OneDeviceStrategy(common.mirrored_devices()[-1])
    with one_device.scope():
        model = keras.saving.load_model(os.path.join(export_dir, "mirrored.keras"))
    results["mirrored_keras/one_device"] = np.asarray(model.predict(probe, verbose=0))
    with strategy.scope():
        model = keras.saving.load_model(os.path.join(export_dir, "bf16.keras"))
        meta["bf16_keras_variable"] = type(
            model.get_layer("pool_multimax").ranges._value
        ).__name__
    results["bf16_keras/mirrored"] = np.asarray(model.predict(probe, verbose=0))
    meta["bf16_keras_compute_dtype"] = model.get_layer("embed").compute_dtype

    np.savez(os.path.join(export_dir, "reloaded.npz"), **results)
    common.write_json(os.path.join(export_dir, "reload_meta.json"), meta)


if __name__ == "__main__":
    main(sys.argv[1])
