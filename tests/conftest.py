"""Shared fixtures: real master and worker processes on 127.0.0.1, and a condition waiter.

Fixtures are factories that own cleanup (arq's style): every process a test starts is stopped
when the test ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest

from dist_exec.models import Stream
from dist_exec.security import certs
from dist_exec.security.credentials import Credentials

T = TypeVar("T")
READY_TIMEOUT_S = 20.0


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    what: str = "condition",
    poll: float = 0.02,
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


async def wait_until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll a sync or async predicate until it is truthy, with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def _read_ready_line(proc: subprocess.Popen[bytes], log: Path, what: str) -> str:
    """Wait (with a deadline) for the 'listening on ADDRESS' line on the child's stdout."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT_S
    buf = b""
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            if b"\n" in buf:
                line = buf.split(b"\n", 1)[0].decode()
                if " listening on " in line:
                    return line.rsplit(" listening on ", 1)[1].strip()
    finally:
        sel.close()
    raise AssertionError(f"{what} did not become ready; log:\n{log.read_text()[-3000:]}")


@dataclass
class Proc:
    """A dist-exec server process started by a test."""

    kind: str
    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes]
    address: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.kind} did not stop within {timeout}s") from None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class Pki:
    """A CA in a test's directory, and certificates issued by it on demand."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        certs.init_ca(directory)
        self.ca = directory / certs.CA_CERT

    def issue(self, name: str, role: str, **kwargs: Any) -> certs.Issued:
        existing = certs.Issued(self.dir / f"{name}.crt", self.dir / f"{name}.key")
        if not kwargs and existing.cert.exists():
            return existing
        return certs.issue(self.dir, name, role, self.dir, replace=True, **kwargs)

    def tls_args(self, name: str, role: str) -> list[str]:
        issued = self.issue(name, role)
        return [
            "--tls-cert", str(issued.cert), "--tls-key", str(issued.key),
            "--tls-ca", str(self.ca),
        ]  # fmt: skip

    def credentials(self, name: str, role: str, token: str = "") -> Credentials:
        issued = self.issue(name, role)
        return Credentials(
            self.ca.read_bytes(), issued.cert.read_bytes(), issued.key.read_bytes(), token
        )


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """This process's umask meanwhile (child processes started meanwhile inherit it)."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


FACTORY_RUN_AS = "<the factory's run_as>"
# The workers a test starts without TLS take calls from whoever sends this (--call-token), so
# that a test can call one directly, as only its master may otherwise.
CALL_TOKEN = "test-call-token"


class _CallToken:
    """Adds the workers' CALL_TOKEN to every call (one interceptor per kind of call: grpc.aio
    files each interceptor under one kind only)."""

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add("authorization", f"Bearer {CALL_TOKEN}")
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials,
            details.wait_for_ready,
        )  # fmt: skip


class _UnaryUnaryToken(_CallToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _UnaryStreamToken(_CallToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _StreamStreamToken(_CallToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


def call_token_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """For a channel to a test's worker (no TLS): every call sends the workers' CALL_TOKEN."""
    return [_UnaryUnaryToken(), _UnaryStreamToken(), _StreamStreamToken()]


def worker_channel(address: str) -> grpc.aio.Channel:
    """A channel to a test's worker (no TLS) that calls it as its master may."""
    return grpc.aio.insecure_channel(address, interceptors=call_token_interceptors())


class ClusterFactory:
    """Starts masters and workers as real processes; stops whatever is left at teardown.

    ``secure=True`` gives a master or worker mutual TLS with certificates from ``self.pki``
    (the master's named "master", each worker's named by its worker id)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        # Tests run as root and many write into pytest's private tmp_path, so workers run
        # commands as root unless a test asks for the default (None: 'nobody').
        self.run_as: str | None = "root"
        self.procs: list[Proc] = []
        self._count = 0
        self._pki: Pki | None = None

    @property
    def pki(self) -> Pki:
        if self._pki is None:
            self._pki = Pki(self.tmp / "pki")
        return self._pki

    def _start(
        self,
        kind: str,
        args: list[str],
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> Proc:
        """``prefix``: a command the server runs under, e.g. ``ip netns exec NS`` (it must exec
        the server in place, so the pid is the server's)."""
        self._count += 1
        log = self.tmp / f"{kind}-{self._count}.log"
        full_env = {**os.environ, **(env or {})}
        full_env.pop("DIST_EXEC_MASTER", None)
        with log.open("ab") as log_file:
            proc = subprocess.Popen(
                [*(prefix or []), sys.executable, "-m", "dist_exec", kind, *args],
                stdout=subprocess.PIPE,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                env=full_env,
            )
        try:
            address = _read_ready_line(proc, log, kind)
        except AssertionError:
            proc.kill()
            proc.communicate()
            raise
        started = Proc(kind, args, log, proc, address)
        self.procs.append(started)
        return started

    def master(
        self,
        data_dir: Path | None = None,
        listen: str = "127.0.0.1:0",
        heartbeat_interval: str = "0.5s",
        heartbeat_timeout: str = "2s",
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        retry_backoff: str = "50ms",
        secure: bool = False,
        prefix: list[str] | None = None,
    ) -> Proc:
        """``prefix``: as for ``_start``."""
        data_dir = data_dir or self.tmp / "master-data"
        args = [
            "--listen", listen, "--data-dir", str(data_dir),
            "--heartbeat-interval", heartbeat_interval,
            "--heartbeat-timeout", heartbeat_timeout,
            "--retry-backoff", retry_backoff,
            *(self.pki.tls_args("master", "master") if secure else []),
            *(extra or []),
        ]  # fmt: skip
        proc = self._start("master", args, env, prefix)
        proc.extra["data_dir"] = data_dir
        return proc

    def worker(
        self,
        master: Proc | str,
        worker_id: str | None = None,
        max_tasks: int = 4,
        labels: dict[str, str] | None = None,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        secure: bool = False,
        run_as: str | None = FACTORY_RUN_AS,
        listen: str = "127.0.0.1:0",
        prefix: list[str] | None = None,
        call_token: str | None = CALL_TOKEN,
    ) -> Proc:
        """``run_as``: the user commands run as (``--run-as``; None: the worker's default),
        by default the factory's ``run_as``. ``call_token``: the worker's ``--call-token``
        without TLS (None: its own random one)."""
        if run_as == FACTORY_RUN_AS:
            run_as = self.run_as
        address = master if isinstance(master, str) else master.address
        worker_id = worker_id or f"w{self._count + 1}"
        args = [
            "--master", address, "--listen", listen, "--worker-id", worker_id,
            "--max-concurrent-tasks", str(max_tasks),
            *[f"--label={k}={v}" for k, v in (labels or {}).items()],
            *(self.pki.tls_args(worker_id, "worker") if secure else []),
            *(["--call-token", call_token] if call_token and not secure else []),
            *(["--run-as", run_as] if run_as is not None else []),
            *(extra or []),
        ]  # fmt: skip
        proc = self._start("worker", args, env, prefix)
        proc.extra["id"] = worker_id
        return proc

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            if p.alive():
                p.proc.kill()
        for p in self.procs:
            try:
                p.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.proc.kill()
            if p.proc.stdout is not None:
                p.proc.stdout.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterFactory]:
    factory = ClusterFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


@dataclass
class SmallCluster:
    master: Proc
    workers: list[Proc]

    @property
    def address(self) -> str:
        return self.master.address


@pytest.fixture
def small_cluster(cluster: ClusterFactory) -> SmallCluster:
    """A master and two workers (w1, w2), four slots each, short heartbeat timings."""
    master = cluster.master()
    workers = [cluster.worker(master, worker_id=f"w{i}") for i in (1, 2)]
    return SmallCluster(master, workers)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(
    *args: str,
    master: str | None = None,
    timeout: float = 60.0,
    input_text: str | None = None,
    env: dict[str, str] | None = None,
) -> CliResult:
    """Run the real ``dist-exec`` command line in a child process."""
    full_env = {**os.environ, **(env or {})}
    if master is not None:
        full_env["DIST_EXEC_MASTER"] = master
    done = subprocess.run(
        [sys.executable, "-m", "dist_exec", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        input=input_text,
        stdin=None if input_text is not None else subprocess.DEVNULL,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


def up_address(said: str) -> str:
    """The master's address in what ``up`` printed ('' when it did not say it)."""
    found = re.search(r"master at (\S+), ", said)
    return found.group(1) if found else ""


@contextlib.contextmanager
def detached_cluster(
    data: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[CliResult, str]]:
    """``dist-exec up -d`` on a port it picks itself (a port picked here first could be taken
    before it binds it): its result and the master's address, and ``down`` afterwards, also
    when it failed halfway (a master up, a worker not)."""
    up = run_cli("up", "-d", "--listen", "127.0.0.1:0", "--data-dir", str(data), *args, env=env)
    try:
        yield up, up_address(up.stdout)
    finally:
        down = run_cli("down", "--data-dir", str(data))
        assert down.code == 0, down.stderr


class RecordingSink:
    """An executor OutputSink for tests: keeps everything, signals the first stdout bytes."""

    def __init__(self) -> None:
        self.data: dict[Stream, bytearray] = {s: bytearray() for s in Stream}
        self.first_stdout = asyncio.Event()

    async def write(self, stream: Stream, data: bytes) -> None:
        assert data, "empty writes are noise"
        self.data[stream] += data
        if stream == Stream.STDOUT:
            self.first_stdout.set()

    @property
    def stdout(self) -> bytes:
        return bytes(self.data[Stream.STDOUT])

    @property
    def stderr(self) -> bytes:
        return bytes(self.data[Stream.STDERR])


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that commands running as nobody may write (pytest's tmp_path is root's)."""
    path = Path(tempfile.mkdtemp(prefix="dist-exec-test-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path)
