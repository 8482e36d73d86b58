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

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


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
