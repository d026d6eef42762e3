"""Retries as a user sees them: --retry-on-failure, --queue-timeout, and the attempt history
in `status`, with a real master and real workers."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.conftest import ClusterFactory, SmallCluster, run_cli, wait_for


def test_retry_on_failure_reruns_a_failed_command_and_status_lists_the_attempts(
    small_cluster: SmallCluster, tmp_path: Path
) -> None:
    marker = tmp_path / "first-run"
    script = f"if [ -e {marker} ]; then echo second; else touch {marker}; echo first; exit 4; fi"
    result = run_cli(
        "run", "--retry-on-failure", "--max-retries", "2", "--json", script,
        master=small_cluster.address,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["status"] == "COMPLETED"
    assert job["output"] == "second\n"
    assert job["retries"] == 1
    assert [a["outcome"] for a in job["attempts"]] == ["RETRIED", "COMPLETED"]
    assert job["attempts"][0]["detail"] == "FAILURE: command exited with status 4"
    assert all(a["node_id"] in ("w1", "w2") for a in job["attempts"])

    shown = run_cli("status", job["id"], master=small_cluster.address)
    assert shown.code == 0, shown.stderr
    lines = shown.stdout.splitlines()
    history = lines[lines.index("attempts:") + 1 :]
    assert len(history) == 2
    assert history[0].startswith("  #1 w")
    assert "RETRIED: FAILURE: command exited with status 4" in history[0]
    assert history[1].startswith("  #2 w")
    assert "COMPLETED" in history[1]


def test_without_retry_on_failure_a_failed_command_runs_once(
    small_cluster: SmallCluster, tmp_path: Path
) -> None:
    counter = tmp_path / "runs"
    result = run_cli(
        "run", "--max-retries", "3", f"echo run >> {counter}; exit 4",
        master=small_cluster.address,
    )  # fmt: skip
    assert result.code == 4
    assert counter.read_text() == "run\n"


def test_queue_timeout_fails_a_job_no_node_can_start(small_cluster: SmallCluster) -> None:
    result = run_cli(
        "run", "--queue-timeout", "300ms", "--selector", "zone=nowhere", "true",
        master=small_cluster.address,
    )  # fmt: skip
    assert result.code == 125
    assert "did not start within its queue timeout of 300ms" in result.stderr
    bad = run_cli("run", "--queue-timeout", "0s", "true", master=small_cluster.address)
    assert bad.code == 2
    assert "'--queue-timeout': '0s' is shorter than 1ms" in bad.stderr


def test_a_job_whose_worker_is_killed_runs_again_elsewhere_and_its_history_says_so(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    master = cluster.master()
    first = cluster.worker(master, worker_id="w1")
    marker = tmp_path / "started"
    script = f"if [ -e {marker} ]; then echo again; else touch {marker}; sleep 60; fi"
    submitted = run_cli("run", "--detach", script, master=master.address)
    assert submitted.code == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    wait_for(marker.exists, 15, "the first attempt to start")
    cluster.worker(master, worker_id="w2")
    first.signal(signal.SIGKILL)

    def ended() -> dict[str, object] | None:
        shown = run_cli("status", "--json", job_id, master=master.address)
        job: dict[str, object] = json.loads(shown.stdout)
        return job if job["status"] not in ("PENDING", "RUNNING") else None

    job = wait_for(ended, 30, "the job to end on w2", poll=0.2)
    assert job["status"] == "COMPLETED"
    assert job["output"] == "again\n"
    attempts = job["attempts"]
    assert isinstance(attempts, list)
    assert [(a["node_id"], a["outcome"]) for a in attempts] == [
        ("w1", "WORKER_LOST"),
        ("w2", "COMPLETED"),
    ]
    assert "stopped responding" in attempts[0]["detail"]
