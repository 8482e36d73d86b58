"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 with `fit`.

Each worker (tests/distributed_workers/multiworker_worker.py) gets its own
``TF_CONFIG`` naming both workers on free loopback ports. Both are killed
in a ``finally`` whatever happens, and the whole job has a time limit.
"""

import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from distributed_workers import common

from keras_multimax import distribute

pytestmark = pytest.mark.only_backend(
    "tensorflow", reason="tf.distribute.MultiWorkerMirroredStrategy"
)

ATOL = 1e-5  # float32 round-off of a different all-reduce order
RTOL = 1e-4
TIMEOUT = 240  # seconds for the whole 2-worker job


def _run_workers(tmp_path, *args, script="multiworker_worker.py", timeout=TIMEOUT):
    """Runs ``script INDEX PORTS *args`` for INDEX 0 and 1 as one job."""
    ports = [common.free_port(), common.free_port()]
    while ports[1] == ports[0]:
        ports[1] = common.free_port()
    script = os.path.join(common.WORKERS_DIR, script)
    procs, logs = [], []
    try:
        for index in range(2):
            log = open(tmp_path / f"worker{index}.log", "w+")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        script,
                        str(index),
                        ",".join(map(str, ports)),
                        *map(str, args),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=common.worker_env(),
                    cwd=common.WORKERS_DIR,
                )
            )
        deadline = time.monotonic() + timeout
        for proc in procs:
            remaining = deadline - time.monotonic()
            try:
                proc.wait(timeout=max(remaining, 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"multi-worker job exceeded {timeout} s")
        for index, proc in enumerate(procs):
            logs[index].seek(0)
            text = logs[index].read()
            assert proc.returncode == 0, f"worker {index} failed:\n{text[-3000:]}"
            print(f"worker {index} on 127.0.0.1:{ports[index]}: exit 0")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


@pytest.mark.slow
def test_two_workers_fit_equals_single_process(tmp_path):
    epochs = 3
    x, y = common.make_data(seed=2)
    model = common.build_model()
    init = model.get_weights()
    input_npz = tmp_path / "input.npz"
    np.savez(input_npz, x=x, y=y, **{f"w{i}": w for i, w in enumerate(init)})

    _run_workers(tmp_path, input_npz, tmp_path, epochs)

    # The single-process reference: same initial weights, same global batches,
    # full float32 as in the workers.
    tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
    common.no_tf32()
    try:
        common.compile_sgd(model)
        history = model.fit(
            x,
            y,
            batch_size=common.GLOBAL_BATCH,
            epochs=epochs,
            shuffle=False,
            verbose=0,
        )
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(tf32)
    reference = common.weights_by_path(model)
    initial = {v.path: w for v, w in zip(model.weights, init)}
    workers = [np.load(tmp_path / f"worker{i}.npz") for i in range(2)]
    metas = [common.read_json(tmp_path / f"worker{i}.json") for i in range(2)]
    for meta in metas:
        assert meta["num_replicas"] == 2
        assert "MirroredVariable" in meta["variable_type"]
        np.testing.assert_allclose(meta["loss"], history.history["loss"], rtol=1e-5)

    assert set(workers[0].files) == set(reference)
    assert {"pool_multimax/ranges", "pool_multimax/ts"} <= set(reference)
    assert {"head_seglu/ranges", "head_seglu/ts"} <= set(reference)
    assert {"attention/ranges", "attention/ts"} <= set(reference)
    for path, expected in reference.items():
        assert np.max(np.abs(expected - initial[path])) > 10 * ATOL, path
        # All-reduce hands both workers the same update: bitwise identical.
        np.testing.assert_array_equal(workers[0][path], workers[1][path], path)
        np.testing.assert_allclose(
            workers[0][path], expected, atol=ATOL, rtol=RTOL, err_msg=path
        )
    keras.backend.clear_session()


def test_auto_creates_the_multi_worker_strategy_before_the_runtime(monkeypatch):
    # `MultiWorkerMirroredStrategy` fails once TensorFlow's runtime has
    # started, and listing devices starts it: with a multi-worker TF_CONFIG
    # and no TPU hint, "auto" must not list devices before creating it.
    monkeypatch.setenv(
        "TF_CONFIG",
        '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
        '"task": {"type": "worker", "index": 0}}',
    )
    for var in ("TPU_NAME", "COLAB_TPU_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distribute.glob, "glob", lambda pattern: [])

    def runtime_call(*args, **kwargs):
        raise AssertionError("TensorFlow's runtime queried before the strategy")

    for name in ("list_logical_devices", "list_physical_devices"):
        monkeypatch.setattr(tf.config, name, runtime_call)
    created = object()
    monkeypatch.setattr(distribute, "multi_worker_strategy", lambda: created)
    assert distribute.choose_strategy() is created
    assert distribute.choose_strategy("multi_worker") is created


def test_multi_worker_strategy_after_runtime_start_says_what_to_do(monkeypatch):
    monkeypatch.setenv(
        "TF_CONFIG",
        '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
        '"task": {"type": "worker", "index": 0}}',
    )
    tf.constant(1.0) + 1.0  # the runtime is running in this process
    with pytest.raises(RuntimeError, match="Call `choose_strategy\\(\\)`"):
        distribute.multi_worker_strategy()


@pytest.mark.slow
def test_example_runs_a_local_two_worker_job(tmp_path):
    example = os.path.join(
        os.path.dirname(common.WORKERS_DIR),
        os.pardir,
        "examples",
        "train_distributed.py",
    )
    cmd = [sys.executable, example, "--local-workers", "2", "--epochs", "1"]
    cmd += ["--output-dir", str(tmp_path), "--timeout", str(TIMEOUT)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=common.worker_env(),
        timeout=TIMEOUT + 30,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MultiWorkerMirroredStrategy, 2 replica(s)" in proc.stdout
    assert "worker exit codes: [0, 0]" in proc.stdout
    # Both workers report the same training loss: one job, not two.
    lines = [line for line in proc.stdout.splitlines() if line.startswith("worker ")]
    losses = {line.split(":", 1)[1] for line in lines if "loss" in line}
    assert len(lines) >= 2 and len(losses) == 1, lines
    results = common.read_json(tmp_path / "results.json")
    assert results["replicas"] == 2
    assert np.all(np.isfinite(results["loss"]))
    assert (tmp_path / "saved_model" / "saved_model.pb").exists()
