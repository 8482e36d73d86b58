"""Picking how to distribute MultiMax models: TPU > GPUs > CPU.

On TensorFlow, a `tf.distribute.Strategy` (`choose_strategy`); on JAX, a
`keras.distribution.Distribution` (`choose_distribution`). TensorFlow is
imported by the functions that build a `tf.distribute` strategy, when they
are called, not with this module.
"""

from __future__ import annotations

import glob
import json
import os
from typing import TYPE_CHECKING

import keras

if TYPE_CHECKING:  # annotations only; imported when used, see the docstring
    import tensorflow as tf

__all__ = [
    "choose_distribution",
    "choose_strategy",
    "multi_worker_strategy",
    "tpu_reachable",
]

_PREFERENCES = ("auto", "tpu", "multi_worker", "gpus", "cpu")


def _tf_config_workers() -> int:
    try:
        config = json.loads(os.environ.get("TF_CONFIG", "") or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(
            f"`TF_CONFIG` is not valid JSON. Received: TF_CONFIG={os.environ['TF_CONFIG']!r}"
        ) from e
    cluster = config.get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def _tpu_hint(tpu: str | None) -> str | None:
    """The cheap TPU checks (argument, env vars, /dev): never starts the runtime."""
    if tpu:
        return f"TPU given explicitly: {tpu!r}"
    for var in ("TPU_NAME", "COLAB_TPU_ADDR"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]!r} is set"
    local = glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*")
    if local:
        return f"local TPU devices found: {', '.join(sorted(local))}"
    return None


def tpu_reachable(tpu: str | None = None) -> tuple[bool, str]:
    """Whether a TPU can be used, without probing the network blindly.

    A TPU counts as reachable when `tpu` (a name or ``grpc://`` address) is
    given, when ``TPU_NAME`` or ``COLAB_TPU_ADDR`` is set, when a TPU VM's
    local devices (``/dev/accel*``, ``/dev/vfio/<n>``) exist, or when
    TensorFlow already lists TPU devices. Cloud metadata servers are never
    contacted, so this is fast and offline-safe. Only the last check asks
    TensorFlow, which initialises its runtime: call `choose_strategy` (or
    create a `tf.distribute.MultiWorkerMirroredStrategy`) first in a
    multi-worker job.

    Example:

    >>> ok, reason = tpu_reachable()
    >>> isinstance(ok, bool) and isinstance(reason, str)
    True

    Args:
        tpu: Optional TPU name or address for `TPUClusterResolver`.

    Returns:
        ``(reachable, reason)``; ``reason`` says what was found or missing.
    """
    import tensorflow as tf

    hint = _tpu_hint(tpu)
    if hint:
        return True, hint
    if tf.config.list_logical_devices("TPU"):
        return True, "TensorFlow already lists TPU devices"
    return False, (
        "no TPU: TensorFlow lists no TPU device, TPU_NAME and COLAB_TPU_ADDR "
        "are unset and there is no /dev/accel* or /dev/vfio/<n> device"
    )


def _connect_tpu(tpu: str | None) -> tf.distribute.Strategy:
    import tensorflow as tf

    if tpu is None and glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*"):
        if not (os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR")):
            tpu = "local"
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu != "local":
        tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _reduce_nests(strategy: tf.distribute.Strategy) -> tf.distribute.Strategy:
    """Makes Keras 3's `fit` work under `MultiWorkerMirroredStrategy`.

    Keras 3 (up to at least 3.15) calls ``strategy.reduce`` in two ways that
    `MultiWorkerMirroredStrategy` rejects (keras-team/keras#20585): with a
    nested ``(x, y)`` batch before training, and with ``axis=0`` on the
    scalar per-replica loss and metric values of every step. This wraps the
    instance's ``reduce`` to reduce leaf by leaf and to reduce scalars across
    replicas only (there is no axis 0 to reduce). Any other call is passed
    through unchanged.
    """
    import tensorflow as tf

    reduce = strategy.reduce

    def reduce_leaf(reduce_op, value, axis):
        if axis is not None:
            local = strategy.experimental_local_results(value)[0]
            if getattr(local, "shape", None) is not None and local.shape.rank == 0:
                axis = None
        return reduce(reduce_op, value, axis)

    def reduce_nested(reduce_op, value, axis=None):
        return tf.nest.map_structure(lambda v: reduce_leaf(reduce_op, v, axis), value)

    strategy.reduce = reduce_nested
    return strategy


def multi_worker_strategy(**kwargs) -> tf.distribute.MultiWorkerMirroredStrategy:
    """A `tf.distribute.MultiWorkerMirroredStrategy` that Keras 3's `fit` can use.

    Same arguments as `tf.distribute.MultiWorkerMirroredStrategy`
    (``cluster_resolver``, ``communication_options``); the cluster comes from
    ``TF_CONFIG`` by default. Keras 3 (up to at least 3.15) calls
    ``strategy.reduce`` with a nested ``(x, y)`` batch and with ``axis=0`` on
    scalar losses, which this strategy rejects (keras-team/keras#20585); the
    returned strategy reduces such values leaf by leaf, across replicas.

    Example (one process per worker, each with its own ``TF_CONFIG``):

    ```python
    strategy = multi_worker_strategy()
    with strategy.scope():
        model = build_model()
        model.compile(...)
    model.fit(dataset_batched_with_the_global_batch_size)
    ```

    Returns:
        The strategy. Create it before any other TensorFlow operation.
    """
    import tensorflow as tf

    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(**kwargs)
    except RuntimeError as e:
        if "program startup" not in str(e):
            raise
        raise RuntimeError(
            f"{e}: TensorFlow's runtime was started (by an op, a device "
            "listing such as `tf.config.list_logical_devices`, or a model) "
            "before the multi-worker strategy was created. Call "
            "`choose_strategy()` or `multi_worker_strategy()` first in every "
            "worker."
        ) from e
    return _reduce_nests(strategy)


def choose_strategy(
    preference: str = "auto", tpu: str | None = None
) -> tf.distribute.Strategy:
    """Returns the distribution strategy for the hardware at hand.

    With ``preference="auto"`` the order is: a reachable TPU
    (`tf.distribute.TPUStrategy`, see `tpu_reachable`), a ``TF_CONFIG``
    naming several workers (`tf.distribute.MultiWorkerMirroredStrategy`,
    chosen before anything starts TensorFlow's runtime, as that strategy
    requires: call this first in every worker), several GPUs
    (`tf.distribute.MirroredStrategy`), one GPU (`tf.distribute.OneDeviceStrategy`),
    else the default strategy (CPU). ``"cpu"`` pins the CPU even when GPUs
    are visible. Build and compile the model inside
    ``strategy.scope()``.

    Example:

    >>> import keras
    >>> if keras.backend.backend() == "tensorflow":  # a RuntimeError elsewhere
    ...     strategy = choose_strategy("cpu")
    ...     assert strategy.num_replicas_in_sync == 1

    Args:
        preference: One of ``"auto"``, ``"tpu"``, ``"multi_worker"``,
            ``"gpus"`` (all visible GPUs, mirrored) or ``"cpu"``. A preference
            the machine cannot satisfy raises `RuntimeError`.
        tpu: Optional TPU name or ``grpc://`` address (a pod slice's name
            for TPU pods); default: ``TPU_NAME`` or the local TPU VM.

    Returns:
        A `tf.distribute.Strategy`.
    """
    import tensorflow as tf

    if preference not in _PREFERENCES:
        raise ValueError(
            f"`preference` must be one of {_PREFERENCES}. "
            f"Received: preference={preference!r}"
        )
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "`choose_strategy` returns a `tf.distribute.Strategy`, which only "
            "Keras' TensorFlow backend uses. On this backend use "
            "`keras.distribution.set_distribution(choose_distribution())`. "
            f"Received: backend={keras.backend.backend()!r}"
        )
    # `MultiWorkerMirroredStrategy` must be created before TensorFlow's
    # runtime starts (listing devices starts it): in "auto" mode only the
    # cheap TPU checks may run before the TF_CONFIG check.
    if preference == "auto" and _tpu_hint(tpu):
        return _connect_tpu(tpu)
    if preference in ("auto", "multi_worker"):
        if _tf_config_workers() > 1:
            return multi_worker_strategy()
        if preference == "multi_worker":
            raise RuntimeError(
                "`preference='multi_worker'` needs a TF_CONFIG environment "
                "variable naming at least two workers."
            )
    if preference in ("auto", "tpu"):
        reachable, reason = tpu_reachable(tpu)
        if reachable:
            return _connect_tpu(tpu)
        if preference == "tpu":
            raise RuntimeError(f"`preference='tpu'` but {reason}.")
    gpus = tf.config.list_logical_devices("GPU")
    if preference in ("auto", "gpus"):
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy([d.name for d in gpus])
        if len(gpus) == 1:
            return tf.distribute.OneDeviceStrategy(gpus[0].name)
        if preference == "gpus":
            raise RuntimeError("`preference='gpus'` but no GPU is visible.")
    if preference == "cpu":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    return tf.distribute.get_strategy()


_JAX_PLATFORMS = {"tpu": "tpu", "gpus": "gpu", "cpu": "cpu"}


def choose_distribution(preference: str = "auto") -> keras.distribution.DataParallel:
    """Returns data parallelism over the best devices, for Keras' JAX backend.

    With ``preference="auto"`` the devices are those of JAX's default
    platform, which JAX picks as TPU > GPU > CPU; ``"tpu"``, ``"gpus"`` or
    ``"cpu"`` ask for one platform. Every visible device of the platform
    (all hosts of a multi-host TPU slice, once `jax.distributed` is
    initialised) gets a replica. Use it before building the model; for
    sharded weights build a `keras.distribution.ModelParallel` instead.

    Example:

    >>> import keras
    >>> if keras.backend.backend() == "jax":
    ...     keras.distribution.set_distribution(choose_distribution("cpu"))

    Args:
        preference: One of ``"auto"``, ``"tpu"``, ``"gpus"`` or ``"cpu"``. A
            platform with no device raises `RuntimeError`.

    Returns:
        A `keras.distribution.DataParallel`; pass it to
        `keras.distribution.set_distribution`.
    """
    choices = ("auto", *_JAX_PLATFORMS)
    if preference not in choices:
        raise ValueError(
            f"`preference` must be one of {choices}. Received: preference={preference!r}"
        )
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            "`choose_distribution` is for Keras' JAX backend; on TensorFlow "
            "use `choose_strategy()` and build the model in its `scope()`. "
            f"Received: backend={keras.backend.backend()!r}"
        )
    import jax

    if preference == "auto":
        devices = jax.devices()
    else:
        try:
            devices = jax.devices(_JAX_PLATFORMS[preference])
        except RuntimeError as e:  # JAX's error for a platform it lacks
            raise RuntimeError(
                f"`preference={preference!r}` but JAX finds no such device: {e}"
            ) from e
    names = [f"{d.platform}:{d.id}" for d in devices]
    return keras.distribution.DataParallel(devices=names)
