"""The benchmarks still run and check their answers (small runs: the numbers mean nothing)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"
BENCH_DEADLINE_S = 150.0


def _run(args: list[str]) -> tuple[int, str, str]:
    """Run a benchmark to its end, or stop it as a person would (SIGTERM: it stops the cluster
    it started) past the deadline, and fail. Its servers die with it in any case."""
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=BENCH_DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.communicate()
        pytest.fail(f"the benchmark ran longer than {BENCH_DEADLINE_S:.0f}s: {err[-2000:]}")
    return proc.returncode, out, err


@pytest.mark.timeout(BENCH_DEADLINE_S + 60)
def test_the_throughput_benchmark_runs_and_every_output_is_right(tmp_path: Path) -> None:
    code, out, err = _run(
        [str(BENCH / "bench_throughput.py"), "--json", "--jobs", "64", "--latency-jobs", "10",
         "--warmup", "4", "--tmp-dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 0, err[-2000:]
    result = json.loads(out)
    assert result["wrong_outputs"] == 0, result
    assert list(tmp_path.iterdir()) == []  # (its temp dir, removed once its cluster stopped)


@pytest.mark.timeout(BENCH_DEADLINE_S + 60)
def test_the_floor_benchmark_runs_and_checks_its_answers() -> None:
    code, out, err = _run([str(BENCH / "floor.py"), "--jobs", "20", "--warmup", "2"])
    assert code == 0, err[-2000:]
    assert out.startswith("floor: 20 sequential jobs, p50 "), out
