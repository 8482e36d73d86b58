"""The op benchmark runs end to end and records every variant it reports.

A smoke test on the [256, 10] shape in graph mode (the timings themselves are
not asserted: these machines are shared). It checks the JSON that
``benchmarks/bench_ops.py`` writes: every pass has SoftMax, both baselines and
MultiMax at orders 1 and 2, forward passes also the two ``softmax(x + 1)``
floors, and positive times and ratios.
"""

import json
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.only_backend(
    "tensorflow",
    reason="bench_ops.py times TensorFlow's eager, tf.function and XLA modes "
    "(bench_jax.py is the JAX benchmark)",
)
def test_bench_ops_writes_every_variant(tmp_path):
    output = tmp_path / "ops.json"
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_ops.py"),
            "--shapes",
            "small",
            "--modes",
            "graph",
            "--runs",
            "10",
            "--output",
            str(output),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    records = json.loads(output.read_text())["results"]
    found = {}
    for r in records:
        found.setdefault(r["pass"], set()).add(r["variant"])
        assert r["wall_ms"] > 0 and r["ratio"] > 0, r
    models = {"softmax", "plain_o1", "multimax_o1", "plain_o2", "multimax_o2"}
    floors = {"softmax_pass", "softmax_xla_pass"}
    assert found == {
        "forward": models | floors,
        "forward (plain ops)": models | floors,
        "forward (tape)": models | floors,
        "forward+backward": models,
    }


def test_interleaved_rotates_the_order_and_settles_each_round():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _common
    finally:
        sys.path.remove(str(BENCHMARKS))
    calls = []
    variants = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    res = _common.interleaved(
        variants, "a", runs=3, warmup=1, min_seconds=0.0, settle=2
    )
    # Warm-up (1 each), the reference's sizing call, then per round and
    # variant 2 untimed calls and `number` = 1 timed call.
    rounds = calls[4:]
    firsts = [rounds[i * 9] for i in range(3)]
    assert firsts == ["a", "b", "c"]
    assert all(rounds[i * 3 : i * 3 + 3] == [rounds[i * 3]] * 3 for i in range(9))
    assert len(calls) == 4 + 3 * 3 * 3
    low, high = res["b"]["ratio_quartiles"]
    assert low <= res["b"]["ratio"] <= high


def test_bench_hub_reports_the_median_ratio_over_processes(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # bench_hub and its _common
    import bench_hub

    def payload(softmax_ms, multimax_ms):
        row = {"backend": "tensorflow", "family": "gpt2", "what": "train step"}
        row["softmax"] = {"wall_ms": softmax_ms, "ratio": 1.0}
        row["multimax"] = {"wall_ms": multimax_ms, "ratio": multimax_ms / softmax_ms}
        return {"results": [row]}

    # Three processes: the MultiMax step steady, the SoftMax step not.
    (row,) = bench_hub.summarise(
        [payload(250.0, 325.0), payload(330.0, 330.0), payload(300.0, 330.0)]
    )
    assert row["ratios"] == [1.3, 1.0, 1.1]
    assert row["ratio"] == 1.1  # the median process, not the mean (1.133)
    assert row["softmax_ms"] == [250.0, 330.0, 300.0]
    table = bench_hub.markdown_over_processes([row])
    assert "| 250.00–330.00 ms | 325.00–330.00 ms | **1.10×** (1.00–1.30), n = 3 |" in (
        table
    )


def test_bench_hub_finds_the_loops_xla_splits_into_parallel_tasks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_hub

    # Two instructions of an optimized HLO module as XLA's CPU backend prints
    # them (JAX 0.10): the first split in 2 along its outer dimension, the
    # library call with an empty list not split, the copy split in 2 × 3.
    hlo = (
        "  %clamp_select_fusion.3 = f32[4,4,1,128]{3,2,1,0} fusion(%p.1, %dot.10), "
        'kind=kLoop, calls=%fused_computation.10, backend_config={"outer_dimension_'
        'partitions":["2"]}\n'
        "  %subtract_exponential_fusion = f32[4,4,1,128]{3,2,1,0} fusion(%a, %b), "
        "kind=kLoop, calls=%fused_computation.9\n"
        "  %ynn_fusion.3 = f32[4,128]{1,0} fusion(%c, %d), kind=kCustom, calls=%f.3, "
        'backend_config={"outer_dimension_partitions":[],"fusion_config":{}}\n'
        '  ROOT %copy.7 = f32[64,512]{1,0} copy(%x), backend_config={"outer_dimension_'
        'partitions":["2","3"]}\n'
    )
    assert bench_hub.parallel_loops(hlo) == {
        "clamp_select_fusion.3": "2",
        "copy.7": "2,3",
    }
