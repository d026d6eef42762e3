"""The benchmarks still run and check their answers (small runs: the numbers mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


def test_the_throughput_benchmark_runs_and_every_output_is_right() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "bench_throughput.py"), "--json", "--jobs", "64",
         "--latency-jobs", "10", "--warmup", "4"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["wrong_outputs"] == 0, result


def test_the_floor_benchmark_runs_and_checks_its_answers() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "floor.py"), "--jobs", "20", "--warmup", "2"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("floor: 20 sequential jobs, p50 "), done.stdout
