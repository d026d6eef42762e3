"""Kills a worker's commands when the worker dies without doing it itself (SIGKILL, OOM).

Commands run in their own sessions, so nothing else ends them with their worker: they would
run on next to their retries on other nodes, and linger. The guardian is a small process of its
own (its own session, deaf to SIGINT and SIGTERM) that the worker tells, over a pipe, which
process groups are running. When that pipe closes, the worker is gone, however it went: the
guardian kills every group it was told of and exits.

Protocol on the guardian's stdin: ``+PGID`` when a group starts, ``-PGID`` when it has ended.
Every command also carries the worker's guard token in its environment (GUARD_ENV), which its
descendants inherit: the guardian kills those too, so neither a command started just before the
worker died (not announced yet) nor one that left its group (setsid) survives it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Mapping

from dist_exec import procfs

log = logging.getLogger(__name__)
GUARD_ENV = "DIST_EXEC_WORKER_GUARD"
SCAN_ROUNDS = 5  # a process killed mid-fork may leave a child the previous scan missed


def tagged(tags: Mapping[str, str]) -> list[int]:
    """Processes whose environment has every ``name=value`` of ``tags`` (of those this user
    may read)."""
    needles = {f"{name}={value}".encode() for name, value in tags.items()}
    found = []
    for pid in procfs.pids():
        environ = procfs.environment(pid)
        if environ is not None and needles <= environ:
            found.append(pid)
    return found


def kill_tagged(tags: Mapping[str, str]) -> int:
    """SIGKILL every process with these environment ``tags``; returns how many were found."""
    killed = 0
    for _ in range(SCAN_ROUNDS):
        pids = [pid for pid in tagged(tags) if pid != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed += len(pids)
    return killed


class ProcessGuard:
    """The worker's side: starts the guardian and tells it about process groups."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)  # in every command's environment (GUARD_ENV)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dist_exec.executors.guardian", self.token],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self._proc.stdin is not None
        self._fd = self._proc.stdin.fileno()
        self._broken = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def unwatch(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def _send(self, line: str) -> None:
        if self._broken:
            return
        try:
            os.write(self._fd, line.encode())  # a few bytes: atomic, never a partial write
        except OSError as exc:
            self._broken = True
            log.error("process guardian %d is gone (%s): commands may outlive a crash of "
                      "this worker", self._proc.pid, exc)  # fmt: skip

    def close(self) -> None:
        """The worker ends normally, its commands already stopped: let the guardian go."""
        assert self._proc.stdin is not None
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def main() -> None:
    token = sys.argv[1]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the end of its pipe ends it
    groups: set[int] = set()
    with os.fdopen(sys.stdin.fileno(), "rb", buffering=0, closefd=False) as pipe:
        pending = b""
        while chunk := pipe.read(4096):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line[:1] == b"+":
                    groups.add(int(line[1:]))
                elif line[:1] == b"-":
                    groups.discard(int(line[1:]))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    kill_tagged({GUARD_ENV: token})


if __name__ == "__main__":
    main()
