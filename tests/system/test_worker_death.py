"""A worker killed with SIGKILL takes its commands with it (the process guardian), so they do
not run on next to their retries elsewhere."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

from tests.conftest import ClusterFactory, pid_alive, run_cli, wait_for


def processes_with(token: str) -> list[int]:
    """Live processes whose environment carries ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if token.encode() in environ and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_commands_die_with_a_sigkilled_worker(cluster: ClusterFactory, tmp_path: Path) -> None:
    master = cluster.master()
    worker = cluster.worker(master, worker_id="w1", max_tasks=4)
    token = f"DIST_EXEC_TEST_{uuid.uuid4().hex}"
    started = tmp_path / "started"
    for i in range(3):
        # A shell with a background child and a foreground one: a whole group per job.
        submitted = run_cli(
            "run", "--detach", "--max-retries", "0", "--env", f"MARK={token}",
            f"sleep 300 & echo {i} >> {started}; sleep 300",
            master=master.address,
        )  # fmt: skip
        assert submitted.code == 0, submitted.stderr
    wait_for(
        lambda: started.exists() and len(started.read_text().split()) == 3, 15, "3 jobs to start"
    )
    assert len(processes_with(token)) == 9  # 3 x (sh, sleep, sleep)

    worker.signal(signal.SIGKILL)
    worker.proc.wait(timeout=10)
    try:
        wait_for(lambda: not processes_with(token), 10, "the killed worker's commands to die")
    finally:
        for pid in processes_with(token):  # left behind only when the test fails
            os.kill(pid, signal.SIGKILL)


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
