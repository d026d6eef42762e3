"""Kills a worker's commands when the worker dies without doing it itself (SIGKILL, OOM).

Commands run in their own sessions, so nothing else ends them with their worker: they would
run on next to their retries on other nodes, and linger. The guardian is a small process of its
own (its own session, deaf to SIGINT and SIGTERM) that holds the read end of a pipe from the
worker. When that pipe closes, the worker is gone, however it went: the guardian kills every
process group in the worker's table of running groups, and exits.

The table is shared memory (a memfd both map): the worker writes a group's id into a slot when
the group starts and zero when it has ended. The guardian reads it once, at the end, so a
command costs no message and wakes no process (a message per start and end woke the guardian
twice per command: 40 us of its CPU per command). Every command also carries the worker's
guard token in its environment (GUARD_ENV), which its descendants inherit: the guardian kills
those too, so neither a command started just before the worker died (not in the table yet) nor
one that left its group (setsid) survives it. The table covers what the token cannot: a
process that stayed in its group but cleared its environment.

A command that the worker was still spawning when it died takes the token only when it execs,
and that can come after the pipe closed (the child closes its copy of the pipe first). So after
a death the guardian keeps looking for the token until SETTLE_S pass without finding any. A
worker that ends normally writes to the pipe before closing it: its commands are already
stopped, and the guardian makes one pass and exits.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Mapping

from dist_exec import procfs

log = logging.getLogger(__name__)
GUARD_ENV = "DIST_EXEC_WORKER_GUARD"
# How the guardian gets the token: its environment, which only its user (and root) can read;
# its command line any process can (ps).
TOKEN_ENV = "DIST_EXEC_GUARD_TOKEN"
SCAN_ROUNDS = 5  # a process killed mid-fork may leave a child the previous scan missed
SLOT = 4  # bytes per group id in the table (a pid_t, written with one aligned store)
FIRST_SLOTS = 256  # the table doubles when full
# After the worker died: tagged processes are looked for until no new one was found for SETTLE_S.
SETTLE_S = 1.0
SETTLE_POLL_S = 0.02
ENDED = b"ended"  # what a worker that ends normally writes before it closes the pipe


def tagged(
    tags: Mapping[str, str] | Collection[Mapping[str, str]], uids: Collection[int] | None = None
) -> list[int]:
    """Processes whose environment has every ``name=value`` of ``tags`` (or of one of several
    such sets), in one pass over /proc, of those this user may read; only of ``uids`` when
    given: one of them is any of its user ids (real, effective, saved: a leftover that ran a
    set-user-id program keeps its real one), told before its environment is read."""
    sets = [tags] if isinstance(tags, Mapping) else list(tags)
    needles = [{f"{name}={value}".encode() for name, value in one.items()} for one in sets]
    wanted_uids = None if uids is None else set(uids)
    found = []
    for pid in procfs.pids():
        if wanted_uids is not None:
            ids = procfs.ids(pid)
            if ids is None or wanted_uids.isdisjoint(ids[0]):
                continue
        environ = procfs.environment(pid)
        if environ is not None and any(wanted <= environ for wanted in needles):
            found.append(pid)
    return found


def kill_tagged(tags: Mapping[str, str]) -> set[int]:
    """SIGKILL every process with these environment ``tags``; returns the pids found."""
    killed: set[int] = set()
    for _ in range(SCAN_ROUNDS):
        pids = [pid for pid in tagged(tags) if pid != os.getpid()]
        if not pids:
            break
        _kill(pids)
        killed.update(pids)
    return killed


def signal_outside(tags: Mapping[str, str], group: int, sig: int) -> None:
    """Send ``sig`` to every process with these tags that is not in process group ``group``
    (what left it, setsid: it gets the stop signal when the group does, not only the KILL
    after the grace; the group's own get it from killpg, once)."""
    for pid in tagged(tags):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pid != os.getpid() and os.getpgid(pid) != group:
                os.kill(pid, sig)


def kill_left_behind(attempts: Collection[Mapping[str, str]], uids: Collection[int]) -> None:
    """SIGKILL every process of these users that has all the environment tags of one of
    ``attempts`` (one pass over /proc for them all)."""
    _kill([pid for pid in tagged(attempts, uids) if pid != os.getpid()])


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def settle(tags: Mapping[str, str], seen: set[int] | None = None) -> None:
    """Kill tagged processes until SETTLE_S pass without a new one (one that SIGKILL does not
    end at once, stuck in the kernel, say, does not keep this going); ``seen``: those killed
    already (else the first scan happens here)."""
    if seen is None:
        seen = kill_tagged(tags)
    quiet_until = time.monotonic() + SETTLE_S
    while time.monotonic() < quiet_until:
        time.sleep(SETTLE_POLL_S)
        new = kill_tagged(tags) - seen
        if new:
            seen |= new
            quiet_until = time.monotonic() + SETTLE_S


class ProcessGuard:
    """The worker's side: starts the guardian and keeps the table of running process groups."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)  # in every command's environment (GUARD_ENV)
        self._table = _shared_file()
        self._slots: dict[int, int] = {}  # group id -> its slot
        self._free: list[int] = []  # free slots, the lowest last
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._grow(FIRST_SLOTS)
        self._proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            # Isolated and in /: a directory the commands may write must not give it a module.
            [sys.executable, "-I", "-m", __name__, str(self._table)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            cwd="/",
            env={**os.environ, TOKEN_ENV: self.token},
            start_new_session=True,
            pass_fds=(self._table,),
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def keep_alive(self) -> bool:
        """Start a new guardian if this one is gone (killed, OOM): the commands running now,
        and those started since, would outlive a crash of the worker. It takes over the same
        table and token. Whether it had to."""
        if self._proc.poll() is None:
            return False
        log.error(
            "process guardian %d is gone (exit status %s); starting a new one",
            self._proc.pid,
            self._proc.returncode,
        )
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        self._proc = self._start()
        return True

    def watch(self, pgid: int) -> None:
        if pgid in self._slots:
            return
        if not self._free:
            self._grow(2 * len(self._slots))
        assert self._view is not None
        slot = self._free.pop()
        self._view[slot] = pgid
        self._slots[pgid] = slot

    def unwatch(self, pgid: int) -> None:
        slot = self._slots.pop(pgid, None)
        if slot is None:
            return
        assert self._view is not None
        self._view[slot] = 0
        self._free.append(slot)

    def _grow(self, slots: int) -> None:
        """Make the table ``slots`` long; the new slots are zero (free)."""
        had = len(self._slots) + len(self._free)
        os.ftruncate(self._table, slots * SLOT)
        self._release()
        self._map = mmap.mmap(self._table, slots * SLOT)
        self._view = memoryview(self._map).cast("i")
        self._free[:0] = range(slots - 1, had - 1, -1)

    def _release(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def close(self) -> None:
        """The worker ends normally, its commands already stopped: let the guardian go."""
        stdin = self._proc.stdin
        assert stdin is not None
        with contextlib.suppress(OSError):  # the guardian may be gone (it is logged)
            stdin.write(ENDED)
            stdin.flush()
        with contextlib.suppress(OSError):
            stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._release()
        os.close(self._table)


def _shared_file() -> int:
    """A file for the table that only this worker and its guardian reach: a memfd, or where
    there is none, a temporary file unlinked at once."""
    try:
        return os.memfd_create("dist-exec-guard", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd, path = tempfile.mkstemp(prefix="dist-exec-guard-")
        os.unlink(path)
        return fd


def groups(table: int) -> list[int]:
    """The group ids in a table (its file descriptor)."""
    size = os.fstat(table).st_size // SLOT * SLOT
    if size == 0:
        return []
    with mmap.mmap(table, size, access=mmap.ACCESS_READ) as shared:
        view = memoryview(shared).cast("i")
        try:
            return [pgid for pgid in view if pgid > 0]
        finally:
            view.release()


def main() -> None:
    token, table = os.environ.pop(TOKEN_ENV), int(sys.argv[1])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the end of its pipe ends it
    ended = False  # the worker wrote before closing: it ends normally
    while os.read(sys.stdin.fileno(), 4096):
        ended = True
    for pgid in groups(table):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    tags = {GUARD_ENV: token}
    seen = kill_tagged(tags)
    if not ended:
        settle(tags, seen)


if __name__ == "__main__":
    main()
