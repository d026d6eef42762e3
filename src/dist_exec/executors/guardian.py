"""Kills a worker's commands when the worker dies without doing it itself (SIGKILL, OOM).

Commands run in their own sessions, so nothing else ends them with their worker: they would
run on next to their retries on other nodes, and linger. The guardian is a small process of its
own (its own session, deaf to SIGINT and SIGTERM) that the worker tells, over a pipe, which
process groups are running. When that pipe closes, the worker is gone, however it went: the
guardian kills every group it was told of and exits.

Protocol on the guardian's stdin: ``+PGID`` when a group starts, ``-PGID`` when it has ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger(__name__)


class ProcessGuard:
    """The worker's side: starts the guardian and tells it about process groups."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dist_exec.executors.guardian"],
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


if __name__ == "__main__":
    main()
