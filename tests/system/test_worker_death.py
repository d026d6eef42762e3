"""The process guardian comes and goes with its worker, and what it kills when the worker is
killed. (That it kills the commands of a worker killed with SIGKILL under load is shown by
tests/system/test_faults.py.)"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

from tests.conftest import ClusterFactory, pid_alive, run_cli, wait_for


def test_the_guardian_leaves_with_a_worker_that_stops_normally(cluster: ClusterFactory) -> None:
    master = cluster.master()
    worker = cluster.worker(master, worker_id="w1")
    result = run_cli("run", "echo ok", master=master.address)
    assert (result.code, result.stdout) == (0, "ok\n")
    guardians = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and b"dist_exec.executors.guardian" in _cmdline(p)
        and _ppid(p) == worker.proc.pid
    ]
    assert len(guardians) == 1
    assert worker.stop() == 0
    wait_for(lambda: not pid_alive(guardians[0]), 10, "the guardian to exit")


def test_a_killed_workers_command_dies_even_with_its_environment_cleared(
    cluster: ClusterFactory,
) -> None:
    """The guard token in the environment cannot find this process: the guardian's table of
    the worker's process groups must."""
    master = cluster.master()
    worker = cluster.worker(master, worker_id="w1")
    mark = f"3000.{uuid.uuid4().int % 10**9}"  # a sleep only this test starts
    result = run_cli("run", "--detach", f"env -i sleep {mark} & wait", master=master.address)
    assert result.code == 0, result.stderr
    sleeper = wait_for(lambda: _find(f"sleep {mark}".encode()), 10, "the command's sleep")
    try:
        assert b"DIST_EXEC" not in Path(f"/proc/{sleeper}/environ").read_bytes()
        worker.kill()
        wait_for(lambda: not pid_alive(sleeper), 10, "the sleep to die with its worker")
    finally:
        if pid_alive(sleeper):
            os.kill(sleeper, signal.SIGKILL)


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
