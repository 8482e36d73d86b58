"""Trains a small MultiMax ViT on JAX under each distribution; saves weights.

Usage: python distribution_worker.py OUT_DIR
Writes OUT_DIR/{single,data,model}.npz: one device, data parallel, model
parallel, in this order, in this one process (each run sets its own
distribution, or none). Run with KERAS_BACKEND=jax and
XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""

import os
import sys

import keras
import numpy as np

from keras_multimax import distribute
from keras_multimax import models


def main(out_dir: str) -> None:
    for mode in ("single", "data", "model"):
        train(mode, os.path.join(out_dir, f"{mode}.npz"))


def train(mode: str, out: str) -> None:
    keras.distribution.set_distribution(None)
    if mode == "data":
        distribution = distribute.choose_distribution("cpu")
        assert len(distribution.device_mesh.devices.ravel()) == 2
        keras.distribution.set_distribution(distribution)
    elif mode == "model":
        mesh = keras.distribution.DeviceMesh((1, 2), ("batch", "model"))
        layout_map = keras.distribution.LayoutMap(mesh)
        # The attention projections, split over heads (kernels are
        # (hidden, heads, head_dim) for query/key/value and (heads, head_dim,
        # hidden) for the output).
        layout_map[".*attention.*(query|key|value).*kernel"] = (None, "model", None)
        layout_map[".*attention.*attention_output.*kernel"] = ("model", None, None)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(
                layout_map=layout_map, batch_dim_name="batch"
            )
        )

    keras.utils.set_random_seed(0)
    model = models.vit_classifier(
        (8, 8, 1), 10, patch_size=4, num_layers=1, hidden_dim=16, num_heads=2,
        mlp_dim=16, attention="multimax", head="multimax",
    )  # fmt: skip
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    images = rng.normal(size=(32, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 10, size=(32,))
    history = model.fit(
        images, labels, batch_size=8, epochs=2, shuffle=False, verbose=0
    )
    sharded = [
        v.path
        for v in model.weights
        if len(v.value.sharding.device_set) > 1
        and not v.value.sharding.is_fully_replicated
    ]
    np.savez(
        out,
        loss=np.asarray(history.history["loss"]),
        sharded=np.asarray(sharded, dtype=str),
        **{f"w{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.weights)},
    )


if __name__ == "__main__":
    main(sys.argv[1])
