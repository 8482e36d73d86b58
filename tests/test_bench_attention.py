"""`benchmarks/bench_attention.py` runs end to end and records what it reports.

A smoke test at T = 128 on the current backend (the timings themselves are
not asserted: these machines are shared): every variant has a memory record
from its own worker and a time from the interleaved rounds, and the table
has one row.
"""

import json
import pathlib
import subprocess
import sys

import keras
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
def test_bench_attention_writes_every_variant(tmp_path):
    output = tmp_path / "attention.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_attention.py"),
            "--backends",
            keras.backend.backend(),
            "--lengths",
            "128",
            "--causal",
            "1",
            "--runs",
            "3",
            "--output",
            str(output),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    (record,) = json.loads(output.read_text())["results"]
    assert (record["length"], record["causal"]) == (128, True)
    assert (
        set(record["memory"])
        == set(record["timing"])
        == {
            "flash",
            "materialised",
            "softmax",
        }
    )
    for variant, memory in record["memory"].items():
        assert memory["step_peak_above_start_mib"] >= 0, variant
        assert record["timing"][variant]["wall_ms"] > 0, variant
    assert record["timing"]["materialised"]["ratio"] == 1.0
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 and f"| {keras.backend.backend()} | causal | 128 |" in rows[1]
