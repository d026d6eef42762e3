"""The process guardian comes and goes with its worker. (That it kills the commands of a worker
killed with SIGKILL is shown under load by tests/system/test_faults.py.)"""

from __future__ import annotations

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
