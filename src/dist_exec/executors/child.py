"""A command's process, watched by the event loop without asyncio's subprocess transport.

asyncio's transport costs a few loop iterations and about 0.15 ms of CPU per process here (a
task and a protocol to connect each pipe, a child watcher, the transport's bookkeeping): a fifth
of what a worker spends on a short command. Here the process is spawned with subprocess.Popen
(vfork, as asyncio does), its exit comes from a pidfd in the loop (no thread, no SIGCHLD
handler), and its pipes are read and written straight from their file descriptors, each
registered with the loop only while it is waited on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import IO, Any

READ_CHUNK = 64 * 1024
log = logging.getLogger(__name__)


class Child:
    """A started process (in its own session: its pid is its process group's id). Its exit is
    reported to ``exited`` by whoever reaps it: this worker (``spawn``) or its spawner."""

    def __init__(
        self, pid: int, stdin: IO[bytes] | None, stdout: IO[bytes] | None, stderr: IO[bytes] | None
    ) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self.status_lost = False  # it was reaped elsewhere: its real exit status is unknown
        self._exited = asyncio.Event()

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        stdin: bool,
        cwd: str | None,
        env: Mapping[str, str],
        **options: Any,
    ) -> Child:
        """Start ``argv`` in a new session, stdout and stderr piped (stdin only if ``stdin``).
        Raises what subprocess.Popen raises when the program cannot be started."""
        popen = subprocess.Popen(
            argv,
            bufsize=0,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
            **options,
        )
        child = cls(popen.pid, popen.stdin, popen.stdout, popen.stderr)
        _Reaper(child, popen)
        return child

    def exited(self, status: int | None) -> None:
        """Its wait status; None if it is lost (reaped elsewhere)."""
        if status is None:
            log.warning("exit status of process %d was lost", self.pid)
            self.status_lost = True
            code = 255  # (not reported as its exit code: see status_lost)
        else:
            code = os.waitstatus_to_exitcode(status)
        self.returncode = code
        self._exited.set()

    async def wait(self) -> int:
        """Until the process has exited (not until its pipes close: a background child that
        holds them open cannot put this off)."""
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode


class _Reaper:
    """Reaps a child of this process once it has exited, told by a pidfd in the event loop."""

    def __init__(self, child: Child, popen: subprocess.Popen[bytes]) -> None:
        self._child = child
        self._popen = popen
        self._loop = asyncio.get_running_loop()
        try:
            self._pidfd: int | None = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # not Linux 5.3+: a thread of its own waits for it
            self._pidfd = None
            threading.Thread(
                target=self._wait_in_thread, name=f"wait-{popen.pid}", daemon=True
            ).start()
        else:
            self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        assert self._pidfd is not None
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._exit(_status(self._popen.pid))  # a pidfd is readable once the process has exited

    def _wait_in_thread(self) -> None:
        status = _status(self._popen.pid)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._exit, status)

    def _exit(self, status: int | None) -> None:
        self._child.exited(status)
        self._popen.returncode = self._child.returncode  # reaped: Popen must not wait for it


def _status(pid: int) -> int | None:
    """The exit status of ``pid``, once it has exited; None if it was reaped elsewhere."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


async def read_pipe(pipe: IO[bytes] | None, write: Callable[[bytes], Awaitable[None]]) -> None:
    """Pass what comes out of ``pipe`` to ``write`` until EOF; then close it."""
    if pipe is None:
        return
    loop = asyncio.get_running_loop()
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                await _ready(fd, loop.add_reader, loop.remove_reader)
                continue
            if not data:
                return
            await write(data)
    finally:
        pipe.close()


async def write_pipe(pipe: IO[bytes] | None, data: bytes) -> None:
    """Write ``data`` to ``pipe`` (stopping quietly if the reader has gone), then close it."""
    if pipe is None:
        return
    loop = asyncio.get_running_loop()
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                await _ready(fd, loop.add_writer, loop.remove_writer)
            except (BrokenPipeError, ConnectionResetError):
                return
    finally:
        pipe.close()  # unbuffered: closing writes nothing


async def _ready(
    fd: int,
    add: Callable[[int, Callable[[], object]], object],
    remove: Callable[[int], object],
) -> None:
    """Until ``fd`` is ready; it is watched only meanwhile, so a reader that is slow to take
    what is ready (its sink waits) never makes the loop spin."""
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def fire() -> None:
        if not ready.done():
            ready.set_result(None)

    add(fd, fire)
    try:
        await ready
    finally:
        remove(fd)
