"""The embedded local cluster behind ``dist-exec up`` and ``dist-exec down``.

``up`` starts a master and N workers as child processes on this machine and waits until each has
printed its "listening on" line. In the foreground it stops them all on Ctrl-C or SIGTERM; with
``-d`` it runs itself in the background and leaves a pid file that ``down`` uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dist_exec.config import dial_address

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 45.0
PID_FILE = "cluster.pid"
STATE_FILE = "cluster.json"


class ClusterError(Exception):
    """The local cluster could not be started or stopped."""


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    data_dir: Path
    listen: str
    workers: int
    max_concurrent_tasks: int


def _spawn(args: list[str], log_path: Path) -> tuple[subprocess.Popen[str], IO[str]]:
    log = log_path.open("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", *args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    return proc, log


def _wait_ready(proc: subprocess.Popen[str], what: str, log_path: Path) -> str:
    """Read the child's stdout until its 'listening on ADDRESS' line."""
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    for line in proc.stdout:
        if " listening on " in line:
            return line.rsplit(" listening on ", 1)[1].strip()
        if time.monotonic() > deadline:
            break
    proc.poll()
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    raise ClusterError(
        f"{what} did not start; last log lines ({log_path}):\n  " + "\n  ".join(tail)
    )


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    """SIGTERM workers first (they drain), then the master; SIGKILL what outlives the deadline."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for group in (procs[1:], procs[:1]):
        for proc in group:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in group:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_foreground(options: ClusterOptions, on_ready: Callable[[str], None]) -> None:
    logs = options.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[str]] = []
    files: list[IO[str]] = []
    stop_requested = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        master, log = _spawn(
            ["master", "--listen", options.listen, "--data-dir", str(options.data_dir)],
            logs / "master.log",
        )
        procs.append(master)
        files.append(log)
        address = dial_address(_wait_ready(master, "master", logs / "master.log"))
        for i in range(1, options.workers + 1):
            worker, log = _spawn(
                [
                    "worker", "--master", address, "--listen", "127.0.0.1:0",
                    "--worker-id", f"local-{i}",
                    "--max-concurrent-tasks", str(options.max_concurrent_tasks),
                ],
                logs / f"worker-{i}.log",
            )  # fmt: skip
            procs.append(worker)
            files.append(log)
        for i, worker in enumerate(procs[1:], start=1):
            _wait_ready(worker, f"worker local-{i}", logs / f"worker-{i}.log")
        (options.data_dir / STATE_FILE).write_text(
            json.dumps({"master": address, "pid": os.getpid(), "workers": options.workers})
        )
        on_ready(address)
        while not stop_requested:
            if any(p.poll() is not None for p in procs):
                raise ClusterError(f"a cluster process exited unexpectedly; see {logs}")
            time.sleep(0.2)
    finally:
        _stop(procs)
        for f in files:
            f.close()
        with contextlib.suppress(FileNotFoundError):
            (options.data_dir / STATE_FILE).unlink()
        for s, handler in previous.items():
            signal.signal(s, handler)


def start_background(options: ClusterOptions) -> str:
    """Run ``up`` (foreground) as a background session; return the master address once ready."""
    options.data_dir.mkdir(parents=True, exist_ok=True)
    pid_path = options.data_dir / PID_FILE
    if _running_pid(pid_path) is not None:
        raise ClusterError(
            f"a cluster is already running from {options.data_dir}; stop it with 'dist-exec down'"
        )
    state = options.data_dir / STATE_FILE
    with contextlib.suppress(FileNotFoundError):
        state.unlink()
    log_path = options.data_dir / "logs" / "up.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "dist_exec", "up", "--workers", str(options.workers),
                "--listen", options.listen, "--data-dir", str(options.data_dir),
                "--max-concurrent-tasks", str(options.max_concurrent_tasks),
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    pid_path.write_text(str(proc.pid))
    deadline = time.monotonic() + READY_TIMEOUT_S * 2
    while time.monotonic() < deadline:
        if state.exists():
            return str(json.loads(state.read_text())["master"])
        if proc.poll() is not None:
            pid_path.unlink(missing_ok=True)
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise ClusterError("cluster did not start:\n  " + "\n  ".join(tail))
        time.sleep(0.05)
    raise ClusterError(f"cluster not ready after {READY_TIMEOUT_S * 2:.0f}s; see {log_path}")


def stop_background(data_dir: Path) -> bool:
    pid_path = data_dir / PID_FILE
    pid = _running_pid(pid_path)
    if pid is None:
        pid_path.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S + 5
    while time.monotonic() < deadline:
        if not _alive(pid):
            pid_path.unlink(missing_ok=True)
            return True
        time.sleep(0.05)
    raise ClusterError(f"cluster process {pid} did not stop within {STOP_TIMEOUT_S + 5:.0f}s")


def _running_pid(pid_path: Path) -> int | None:
    try:
        pid = int(pid_path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is one.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True
