"""Starts a root worker's commands as another user without forking the worker.

A worker running as root runs commands as another user (``--run-as``, ``nobody`` by default).
Python's subprocess can only switch user in a full fork of the worker (vfork is not used with a
user switch), and forking a worker of ~80 MB cost ~1.6 ms of its CPU and ~1.3 ms of the child's
per command: a third of a short job's latency, and half the throughput (measured on 2 CPUs, see
the benchmark notes in README.md). The spawner is a small, single-threaded process of the
worker's that starts each command with vfork, as a worker that runs commands as itself does.

It stays root, so the commands cannot signal, trace or read it. For each start it takes the
user's ids as its real and effective ids, keeping root only as its saved ids (so its effective
capabilities are gone), vforks the command, and takes root back: the command execs with the
user's real, effective and saved ids, no supplementary groups and no capabilities, exactly as
after a setuid in a forked child. Only during those few syscalls could a command of the same
user signal it; if one stops or kills it, the worker notices (an answer late and the spawner
stopped, an answer overdue, or the socket closed), kills it, forks commands itself meanwhile
and starts a new one. It lets SIGINT,
SIGTERM and SIGHUP pass (its own session) and ends when the worker closes its end of the
socket, however the worker ended.

Protocol, over a Unix stream socket pair: frames of a 4-byte big-endian length and a JSON
object. The worker sends ``{"argv", "cwd", "env", "stdin"}`` (and ``"uid"`` when each task runs
as a uid of its own from the spawner's range) with the command's stdout and
stderr pipe ends (and its stdin's, if ``stdin``) attached (SCM_RIGHTS); the spawner answers each
request in order, ``{"pid": N}`` or ``{"error": [errno, strerror, filename]}``, and reports each
command's end as ``{"exit": N, "status": wait_status}``, always after its ``pid`` answer. It
starts with ``{"ready": its_pid}``.

Commands under limits (rlimits, cgroups) are still started by the worker itself: they need a
step between fork and exec that must run as root.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dist_exec import procfs
from dist_exec.executors.child import Child

log = logging.getLogger(__name__)
HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
START_TIMEOUT_S = 30.0  # for the spawner's "ready" (a Python start-up, slow on a busy host)
STOP_TIMEOUT_S = 5.0
ANSWER_TIMEOUT_S = 10.0  # a start unanswered this long: the spawner is stuck
STOPPED_CHECK_S = 0.05  # while a start is unanswered, whether the spawner is stopped, this often
COMM = "dist-exec-spawn"  # the process's name (at most 15 bytes)
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4  # prctl(2)


class SpawnerError(Exception):
    """The spawner could not be started (said once; the worker then forks commands itself)."""


class SpawnerGone(OSError):
    """The spawner has ended. ``sent``: the request had (at least partly) gone to it, so whether
    the command started is unknown; else nothing was started and the worker may start it."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


def _own_environment() -> dict[str, str]:
    """What the spawner needs of the worker's environment to start: not the worker's secrets
    (each command gets the environment the worker gives it)."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "LANG")}


def _frame(message: Mapping[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


class Spawner:
    """The worker's side: one spawner process, used from the worker's event loop."""

    def __init__(self, uid: int, gid: int, last_uid: int | None = None) -> None:
        """Start the spawner and wait until it is ready to start commands as ``uid``/``gid``,
        or (with ``last_uid``) as any uid of ``uid``..``last_uid`` with the same number as its
        gid, the one each request names (a uid per task); SpawnerError if it is not ready."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        last = uid if last_uid is None else last_uid
        try:
            self._proc = subprocess.Popen(
                # Isolated (-I: no current directory, user site or PYTHON* variables on its
                # import path) and started in /: it runs as root, and a directory the commands
                # may write must not give it a module.
                [
                    sys.executable,
                    "-I",
                    "-m",
                    __name__,
                    str(theirs.fileno()),
                    str(uid),
                    str(gid),
                    str(last),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd="/",
                start_new_session=True,
                pass_fds=(theirs.fileno(),),
                env=_own_environment(),
            )
        except OSError as exc:
            ours.close()
            raise SpawnerError(f"cannot start the command spawner: {exc}") from exc
        finally:
            theirs.close()
        self._sock = ours
        self._buffer = bytearray()
        try:
            ready = self._first_message()
        except (OSError, ValueError) as exc:
            self._stop_now()
            raise SpawnerError(f"the command spawner did not start: {exc}") from exc
        if ready.get("ready") != self._proc.pid:
            self._stop_now()
            raise SpawnerError(f"the command spawner said {ready!r} instead of being ready")
        ours.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sending = asyncio.Lock()
        # Requests sent and not answered yet, in order: (answer, the worker's pipe ends).
        self._waiting: deque[tuple[asyncio.Future[Child], list[int]]] = deque()
        self._overdue: asyncio.TimerHandle | None = None  # for the oldest request
        self._children: dict[int, Child] = {}
        self.alive = True

    @property
    def pid(self) -> int:
        return self._proc.pid

    def attach(self) -> asyncio.AbstractEventLoop:
        """Listen to the spawner in the running event loop (from the first start on, if not
        called before): its end is then noticed even while no command is being started."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.fileno(), self._read)
        return self._loop

    def _first_message(self) -> dict[str, Any]:
        self._sock.settimeout(START_TIMEOUT_S)
        while True:
            message = self._take_frame()
            if message is not None:
                return message
            data = self._sock.recv(65536)
            if not data:
                status = self._proc.wait()
                raise ValueError(f"it exited with status {status} (see the worker's log)")
            self._buffer += data

    def _take_frame(self) -> dict[str, Any] | None:
        if len(self._buffer) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self._buffer)
        if size > MAX_FRAME:
            raise ValueError(f"a message of {size} bytes")
        end = HEADER.size + size
        if len(self._buffer) < end:
            return None
        message = json.loads(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        if not isinstance(message, dict):
            raise ValueError(f"not a JSON object: {message!r}")
        return message

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: bool,
        cwd: str | None,
        env: Mapping[str, str],
        uid: int | None = None,
    ) -> Child:
        """Start ``argv`` in a new session as the spawner's user (or as ``uid`` of its range),
        stdout and stderr piped (stdin only if ``stdin``). Raises the OSError that starting it
        raised, or SpawnerGone."""
        if not self.alive:
            raise SpawnerGone("the command spawner has ended", sent=False)
        loop = self.attach()
        body: dict[str, object] = {"argv": list(argv), "cwd": cwd, "env": dict(env), "stdin": stdin}
        if uid is not None:
            body["uid"] = uid
        request = _frame(body)
        mine, theirs = _pipes(3 if stdin else 2)  # (out, err[, in]): the reading ends, then
        answer: asyncio.Future[Child] = loop.create_future()
        # Sending goes on if this caller goes away: a frame cut short would garble the stream.
        sending = asyncio.ensure_future(self._request(request, theirs, answer, mine))
        sending.add_done_callback(_retrieve)
        try:
            await asyncio.shield(sending)
            return await answer
        except asyncio.CancelledError:
            if not answer.done():
                answer.cancel()  # the answer, when it comes, stops the command
            elif not answer.cancelled() and answer.exception() is None:
                _abandon(answer.result())  # answered, but this caller has gone meanwhile
            raise
        except BaseException:
            if answer.done() and not answer.cancelled():
                answer.exception()  # said by the exception raised here
            raise

    async def _request(
        self, request: bytes, theirs: list[int], answer: asyncio.Future[Child], mine: list[int]
    ) -> None:
        try:
            async with self._sending:
                if not self.alive or answer.cancelled():  # (a caller gone: nothing to start)
                    for fd in mine:
                        os.close(fd)
                    if answer.cancelled():
                        return
                    raise SpawnerGone("the command spawner has ended", sent=False)
                self._waiting.append((answer, mine))
                if self._overdue is None:
                    self._watch_oldest()
                await self._send(request, theirs)
        finally:
            for fd in theirs:
                os.close(fd)

    async def _send(self, data: bytes, fds: list[int]) -> None:
        """The whole frame, the descriptors with its first bytes; a broken socket ends it all."""
        assert self._loop is not None
        view = memoryview(data)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        sent = False
        try:
            while view:
                try:
                    count = self._sock.sendmsg([view], ancillary)
                except BlockingIOError:
                    await _writable(self._loop, self._sock.fileno())
                    continue
                view, ancillary, sent = view[count:], [], True
        except OSError as exc:
            self._gone(f"cannot reach it: {exc}")
            raise SpawnerGone(f"the command spawner has ended ({exc})", sent) from exc

    def _read(self) -> None:
        try:
            data = self._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._gone(f"cannot read from it: {exc}")
            return
        if not data:
            self._gone("it closed its socket")
            return
        self._buffer += data
        try:
            while (message := self._take_frame()) is not None:
                self._handle(message)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            self._gone(f"it sent a bad message: {exc!r}")

    def _watch_oldest(self) -> None:
        """Kill the spawner if the oldest request waiting is not answered in time: a command of
        the same user stopped it (see the module's doc; seen within STOPPED_CHECK_S), or it is
        stuck (ANSWER_TIMEOUT_S). The worker then forks commands itself until a new spawner
        runs."""
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None
        if self._waiting and self._loop is not None:
            deadline = self._loop.time() + ANSWER_TIMEOUT_S
            self._overdue = self._loop.call_later(STOPPED_CHECK_S, self._check_late, deadline)

    def _check_late(self, deadline: float) -> None:
        """An answer is late: the spawner is killed if it is stopped, or once ``deadline``
        passes; else looked at again."""
        assert self._loop is not None
        self._overdue = None
        if not self.alive:
            return
        fields = procfs.stat(self._proc.pid)
        if fields is not None and fields[0] in ("T", "t"):
            reason = (
                "was stopped by a signal (a command of its user can send one while it starts "
                "another)"
            )
        elif self._loop.time() >= deadline:
            reason = f"has not answered for {ANSWER_TIMEOUT_S:.0f} s"
        else:
            self._overdue = self._loop.call_later(STOPPED_CHECK_S, self._check_late, deadline)
            return
        log.error("command spawner %d %s; killing it", self._proc.pid, reason)
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()  # its socket closes: _gone follows

    def _handle(self, message: dict[str, Any]) -> None:
        if "exit" in message:
            child = self._children.pop(int(message["exit"]), None)
            if child is not None:
                child.exited(int(message["status"]))
            return
        started: int | OSError
        if "pid" in message:
            started = int(message["pid"])
        elif "error" in message:
            number, text, filename = message["error"]
            started = OSError(int(number), str(text), filename)
        else:
            raise ValueError(f"not a message of the protocol: {message!r}")
        if not self._waiting:
            raise ValueError(f"an answer to no request: {message!r}")
        answer, mine = self._waiting.popleft()
        self._watch_oldest()
        if isinstance(started, OSError):
            for fd in mine:
                os.close(fd)
            if not answer.done():
                answer.set_exception(started)
            return
        pid = started
        out_r, err_r, *rest = mine
        child = Child(
            pid,
            os.fdopen(rest[0], "wb", buffering=0) if rest else None,
            os.fdopen(out_r, "rb", buffering=0),
            os.fdopen(err_r, "rb", buffering=0),
        )
        self._children[pid] = child
        if answer.done():  # its caller went away meanwhile: nobody will stop the command
            _abandon(child)
            return
        answer.set_result(child)

    def _gone(self, reason: str) -> None:
        """The spawner ended, or is given up on (killed): what waits on it learns so (a started
        command's exit status is lost: its task then ends as failed). The worker forks commands
        itself until a new spawner runs (``Containment``)."""
        if not self.alive:
            return
        self._detach()
        with contextlib.suppress(ProcessLookupError):  # (one that misbehaves must start nothing)
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # (close() reaps it otherwise)
            self._proc.wait(timeout=1.0)
        status = self._proc.returncode
        log.error(
            "command spawner %d ended (%s; exit status %s): the worker starts commands itself "
            "(a fork each) until a new one runs",
            self._proc.pid,
            reason,
            status,
        )
        while self._waiting:
            answer, mine = self._waiting.popleft()
            for fd in mine:
                os.close(fd)
            if not answer.done():
                answer.set_exception(
                    SpawnerGone("the command spawner ended while starting it", sent=True)
                )
        for child in self._children.values():
            child.exited(None)
        self._children.clear()

    def close(self) -> None:
        """Let the spawner end (its commands are stopped already), and reap it."""
        if self.alive:
            self._detach()
        self._sock.close()
        try:
            self._proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._stop_now()

    def _detach(self) -> None:
        """No longer alive: stop listening to it and watching for overdue answers."""
        self.alive = False
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None

    def _stop_now(self) -> None:
        self._sock.close()
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        self._proc.wait()


def _pipes(count: int) -> tuple[list[int], list[int]]:
    """``count`` pipes: the worker's ends (read, read, write), the command's (write, write,
    read)."""
    made: list[tuple[int, int]] = []
    try:
        for _ in range(count):
            made.append(os.pipe())
    except OSError:
        for pair in made:
            for fd in pair:
                os.close(fd)
        raise
    mine = [made[0][0], made[1][0], *([made[2][1]] if count == 3 else [])]
    theirs = [made[0][1], made[1][1], *([made[2][0]] if count == 3 else [])]
    return mine, theirs


def _abandon(child: Child) -> None:
    """A command started for a caller that went away: kill it (its exit is still reported)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    for pipe in (child.stdin, child.stdout, child.stderr):
        if pipe is not None:
            pipe.close()


def _retrieve(task: asyncio.Future[None]) -> None:
    """Its exception is raised to the caller, if the caller is still there."""
    if not task.cancelled():
        task.exception()


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def fire() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, fire)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


# ---- the spawner process ------------------------------------------------------------------------


def _read_request(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """One request's body and its descriptors; None at the end of the socket."""
    header = b""
    fds: list[int] = []
    while len(header) < HEADER.size:
        data, ancillary, _, _ = sock.recvmsg(
            HEADER.size - len(header), socket.CMSG_SPACE(3 * struct.calcsize("i"))
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                count = len(payload) // struct.calcsize("i")
                fds.extend(struct.unpack(f"{count}i", payload[: count * struct.calcsize("i")]))
        if not data:
            break
        header += data
    else:
        (size,) = HEADER.unpack(header)
        if size <= MAX_FRAME:
            body = bytearray()
            while len(body) < size and (data := sock.recv(size - len(body))):
                body += data
            if len(body) == size:
                return bytes(body), fds
    for fd in fds:  # the end of the socket, or a stream no longer in step: the end
        os.close(fd)
    return None


def _spawn(
    body: bytes, fds: list[int], user: tuple[int, int] | None, last_uid: int
) -> subprocess.Popen[bytes]:
    """Start the command (vfork, as a process that runs commands as itself does). ``user``:
    (uid, gid) to become just for the start; the command gets them as real, effective and
    saved ids, and no capabilities; this process keeps root as its saved ids, and returns. A
    request may name another uid up to ``last_uid`` (its gid the same number)."""
    request = json.loads(body)
    if "uid" in request and user is not None:
        uid = request["uid"]
        if not isinstance(uid, int) or not user[0] <= uid <= last_uid:
            raise ValueError(f"uid {uid!r} is not one this spawner starts commands as")
        user = (uid, uid)
    stdout, stderr, *rest = fds
    try:
        if user is not None:
            os.setresgid(user[1], user[1], 0)
            os.setresuid(user[0], user[0], 0)
        return subprocess.Popen(
            request["argv"],
            stdin=rest[0] if request["stdin"] else subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=request["cwd"],
            env=request["env"],
            start_new_session=True,
        )
    finally:
        if user is not None:
            try:
                os.setresuid(0, 0, 0)
                os.setresgid(0, 0, 0)
            except OSError:  # never go on serving with the user's ids
                os._exit(70)


PR_SET_NO_NEW_PRIVS = 38  # (linux/prctl.h)


# The files a task of a uid pool makes are its own (concurrent tasks run as other uids, and
# must not read them: /tmp is shared); one it means to share, it opens up itself (chmod).
POOL_UMASK = 0o077


def no_new_privileges() -> Callable[[], None]:
    """What makes the process that calls it, and what it starts, unable to gain privileges by
    exec: set-user-id and set-group-id bits and file capabilities do nothing for them. A
    task's uid of a pool must not let a later task, of another uid, become it through a
    set-user-id copy of a program it left behind. Resolved here (dlopen takes a lock): a
    forked child may call what this returns before it execs."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def call() -> None:
        if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"cannot set no_new_privs: {os.strerror(code)}")

    return call


def _clear_ambient_capabilities() -> None:
    """Ambient capabilities survive this process's id changes (its saved uid stays root) and
    would pass to the commands through exec: none."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        number = ctypes.get_errno()
        if number != errno.EINVAL:  # EINVAL: a kernel without ambient capabilities
            raise OSError(number, os.strerror(number))


def main() -> None:
    # FD UID GID [LAST_UID]: requests may name a uid of UID..LAST_UID (a uid per task).
    sock_fd, uid, gid = (int(arg) for arg in sys.argv[1:4])
    last_uid = int(sys.argv[4]) if len(sys.argv) > 4 else uid
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        # Only the end of the socket ends it. Caught, not ignored: an ignored signal would stay
        # ignored in the commands it starts (a caught one is reset when they exec).
        signal.signal(sig, _ignore)
    sock = socket.socket(fileno=sock_fd)
    with contextlib.suppress(OSError):  # its name in ps and top (not "python3")
        Path("/proc/self/comm").write_text(COMM)
    user = None
    if (uid, gid) != (os.getuid(), os.getgid()):
        os.setgroups([])  # the commands' supplementary groups: none
        _clear_ambient_capabilities()
        user = (uid, gid)
    if last_uid > uid:  # a uid per task (--run-as-pool): its commands, and so this process
        no_new_privileges()()
        os.umask(POOL_UMASK)
    os.close(os.pidfd_open(os.getpid()))  # no pidfds (Linux < 5.3): fail now, the worker forks
    sock.sendall(_frame({"ready": os.getpid()}))
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                got = _read_request(sock)
                if got is None:
                    return
                body, fds = got
                try:
                    proc = _spawn(body, fds, user, last_uid)
                    pidfd = _watch(proc)
                except OSError as exc:
                    sock.sendall(_frame({"error": [exc.errno or 0, exc.strerror or str(exc),
                                                   exc.filename]}))  # fmt: skip
                except Exception as exc:  # a malformed request: refused, not fatal
                    sock.sendall(_frame({"error": [0, f"{type(exc).__name__}: {exc}", None]}))
                else:
                    # Its end is seen by a pidfd (no SIGCHLD handler, no wake-up pipe).
                    selector.register(pidfd, selectors.EVENT_READ, proc)
                    sock.sendall(_frame({"pid": proc.pid}))
                finally:
                    for fd in fds:
                        os.close(fd)
            else:
                selector.unregister(key.fd)
                os.close(key.fd)
                proc = key.data
                _, status = os.waitpid(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                sock.sendall(_frame({"exit": proc.pid, "status": status}))


def _watch(proc: subprocess.Popen[bytes]) -> int:
    """A pidfd for the started command; if there can be none (out of descriptors), the command
    is killed and reaped, and the error raised."""
    try:
        return os.pidfd_open(proc.pid)
    except OSError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def _ignore(signum: int, frame: object) -> None:
    pass


if __name__ == "__main__":
    main()
