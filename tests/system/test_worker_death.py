"""The process guardian (and the command spawner of a worker that runs commands as another
user) come and go with their worker, and what the guardian kills when the worker is killed.
(That it kills the commands of a worker killed with SIGKILL under load is shown by
tests/system/test_faults.py.)"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from tests.conftest import ClusterFactory, pid_alive, run_cli, wait_for

# Tests run as root; None: the worker's default, commands as nobody (through its spawner).
AS_ROOT_OR_NOBODY = pytest.mark.parametrize(
    "run_as",
    [
        "root",
        pytest.param(
            None,
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="runs commands as nobody"),
        ),
    ],
)


@AS_ROOT_OR_NOBODY
def test_the_helpers_leave_with_a_worker_that_stops_normally(
    cluster: ClusterFactory, run_as: str | None
) -> None:
    master = cluster.master()
    worker = cluster.worker(master, worker_id="w1", run_as=run_as)
    result = run_cli("run", "echo ok", master=master.address)
    assert (result.code, result.stdout) == (0, "ok\n")
    guardians = _helpers(worker.proc.pid, b"guardian")
    spawners = _helpers(worker.proc.pid, b"spawner")
    assert len(guardians) == 1
    assert len(spawners) == (1 if run_as is None else 0)
    assert worker.stop() == 0
    wait_for(lambda: not any(map(pid_alive, guardians + spawners)), 10, "the helpers to exit")


@AS_ROOT_OR_NOBODY
def test_a_killed_workers_command_dies_even_with_its_environment_cleared(
    cluster: ClusterFactory, run_as: str | None
) -> None:
    """The guard token in the environment cannot find this process: the guardian's table of
    the worker's process groups must. (As nobody, the command is the spawner's child.)"""
    master = cluster.master()
    worker = cluster.worker(master, worker_id="w1", run_as=run_as)
    spawners = _helpers(worker.proc.pid, b"spawner")
    assert len(spawners) == (1 if run_as is None else 0)
    mark = f"3000.{uuid.uuid4().int % 10**9}"  # a sleep only this test starts
    result = run_cli("run", "--detach", f"env -i sleep {mark} & wait", master=master.address)
    assert result.code == 0, result.stderr
    sleeper = wait_for(lambda: _find(f"sleep {mark}".encode()), 10, "the command's sleep")
    try:
        assert b"DIST_EXEC" not in Path(f"/proc/{sleeper}/environ").read_bytes()
        worker.kill()
        wait_for(lambda: not pid_alive(sleeper), 10, "the sleep to die with its worker")
        wait_for(lambda: not any(map(pid_alive, spawners)), 10, "the spawner to end with it")
    finally:
        if pid_alive(sleeper):
            os.kill(sleeper, signal.SIGKILL)


def _helpers(worker: int, name: bytes) -> list[int]:
    """The worker's helper processes (``python -m dist_exec.executors.NAME``)."""
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and b"dist_exec.executors." + name in _cmdline(p) and _ppid(p) == worker
    ]


def _find(cmdline: bytes) -> int | None:
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and _cmdline(p) == cmdline:
            return int(p.name)
    return None


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").strip()
    except OSError:
        return b""


def _ppid(proc_dir: Path) -> int:
    try:
        stat = (proc_dir / "stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rfind(")") + 2 :].split()[1])
