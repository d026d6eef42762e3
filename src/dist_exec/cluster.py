"""The embedded local cluster behind ``dist-exec up`` and ``dist-exec down``.

``up`` starts a master and N workers as child processes on this machine and waits until each has
printed its "listening on" line. In the foreground it stops them all on Ctrl-C or SIGTERM; with
``-d`` it runs itself in the background and leaves a pid file that ``down`` uses.

It is zero-configuration but not open: on first use it makes a CA, certificates for the master,
each worker and an ``admin`` client, and an admin token, under DATA_DIR/tls (mutual TLS on
every link), and writes a client config that the CLI finds by the master's address. The data
directory and everything written there are for the user who started it only (0700, 0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeGuard

from dist_exec import procfs, supervised
from dist_exec.config import dial_address, split_address
from dist_exec.security import certs
from dist_exec.security.credentials import remove_client_config, write_client_config
from dist_exec.security.identity import Role
from dist_exec.security.private_files import open_private, private_dir, write_private
from dist_exec.security.tokens import add_token, read_tokens, revoke_token

READY_TIMEOUT_S = 30.0
WORKER_RESTART_S = 1.0  # a worker that keeps dying waits this long, doubling to the max
WORKER_RESTART_MAX_S = 60.0
STOP_TIMEOUT_S = 45.0
PID_FILE = "cluster.pid"
PID_MAX = 4_194_304  # the most a Linux pid can be
STATE_FILE = "cluster.json"
TLS_DIR = "tls"
ADMIN = "admin"
ADMIN_TOKEN_FILE = "admin.token"
AUTOSCALED = "auto"  # the pool certificate of the workers the master starts (auto-1, ...)


class ClusterError(Exception):
    """The local cluster could not be started or stopped."""


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    data_dir: Path
    listen: str
    workers: int
    max_concurrent_tasks: int
    # Autoscale: the master starts and stops min..max workers itself (local scaler backend).
    autoscale: tuple[int, int] | None = None
    # --allow-command/--block-command, for the master and the workers alike.
    policy_args: tuple[str, ...] = ()
    # How the workers run tasks (--label, --run-as, limits...): worker options, which `up` takes
    # under the same names.
    task_args: tuple[str, ...] = ()
    # --run-as-pool FIRST-LAST, shared out: each worker hands out a range of its own.
    run_as_pool: str = ""

    def pool_args(self, worker: int) -> list[str]:
        """Worker ``worker``'s (from 1) share of the uid pool: two workers handing out one uid
        would each kill the other's task at the end of theirs."""
        if not self.run_as_pool:
            return []
        first, _, last = self.run_as_pool.partition("-")
        share = (int(last) - int(first) + 1) // self.workers
        start = int(first) + (worker - 1) * share
        return ["--run-as-pool", f"{start}-{start + share - 1}"]

    def master_args(self) -> list[str]:
        args = ["master", "--listen", self.listen, "--data-dir", str(self.data_dir)]
        args += self.policy_args
        if self.autoscale is not None:
            low, high = self.autoscale
            args += [
                "--scaler", "local", "--min-replicas", str(low), "--max-replicas", str(high),
                "--tasks-per-worker", str(self.max_concurrent_tasks),
            ]  # fmt: skip
            args += [f"--local-worker-arg={a}" for a in self.worker_args()]
        return args

    def worker_args(self) -> list[str]:
        """The options every worker of this cluster gets from ``up``: the command policy and
        the task options (its address, name, slots and certificate come on their own)."""
        return [*self.policy_args, *self.task_args]

    def up_args(self) -> list[str]:
        """``up`` arguments that start this cluster again (in the foreground)."""
        args = [
            "up", "--workers", str(self.workers), "--listen", self.listen,
            "--data-dir", str(self.data_dir),
            "--max-concurrent-tasks", str(self.max_concurrent_tasks),
        ]  # fmt: skip
        if self.autoscale is not None:
            args += ["--autoscale", "--min-workers", str(self.autoscale[0])]
            args += ["--max-workers", str(self.autoscale[1])]
        if self.run_as_pool:
            args += ["--run-as-pool", self.run_as_pool]
        return [*args, *self.worker_args()]  # (`up` takes them under the same names)


def _spawn(args: list[str], log_path: Path) -> tuple[subprocess.Popen[str], IO[str]]:
    """A server of the cluster: it stops (SIGTERM) when this process dies, however it dies."""
    log = _open_log(log_path)
    proc = subprocess.Popen(
        supervised.argv(args),
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    return proc, log


def _open_log(path: Path) -> IO[str]:
    """A log file of the cluster, for its owner only (jobs' errors and commands show up)."""
    private_dir(path.parent)
    return os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND), "a")


def _wait_ready(
    proc: subprocess.Popen[str],
    what: str,
    log_path: Path,
    stopping: Callable[[], bool] = lambda: False,
) -> str:
    """Read the child's stdout until its 'listening on ADDRESS' line: for at most
    READY_TIMEOUT_S, and not once ``stopping`` (a Ctrl-C, `down`) says so."""
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = ""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline and not stopping():
            if not selector.select(timeout=0.2):
                continue
            data = os.read(proc.stdout.fileno(), 4096).decode(errors="replace")
            if not data:  # (it exited)
                break
            *lines, pending = (pending + data).split("\n")
            for line in lines:
                if " listening on " in line:
                    return line.rsplit(" listening on ", 1)[1].strip()
    if stopping():
        raise ClusterError(f"stopped while {what} was starting")
    if proc.poll() is None:
        raise ClusterError(
            f"{what} did not start within {READY_TIMEOUT_S:g}s: {_last_line(log_path)} "
            f"(log: {log_path})"
        )
    raise ClusterError(f"{what} did not start: {_last_line(log_path)} (log: {log_path})")


def _supervise(
    procs: list[subprocess.Popen[str]],
    start_worker: Callable[[int], subprocess.Popen[str]],
    record: Callable[[], None],
    stopping: Callable[[], bool],
    logs: Path,
) -> None:
    """Until ``stopping``: a worker that dies (a command that kills it, the OOM killer) is
    started again, as a supervisor would (its jobs are retried elsewhere meanwhile): at once,
    then, while it keeps dying, after WORKER_RESTART_S, doubling up to WORKER_RESTART_MAX_S.
    The master's end is the cluster's. ``procs``: the master, then worker 1, 2, ..."""
    backoff = dict.fromkeys(range(1, len(procs)), WORKER_RESTART_S)
    due = dict.fromkeys(range(1, len(procs)), 0.0)
    while not stopping():
        if procs[0].poll() is not None:
            raise ClusterError(f"the master exited unexpectedly; see {logs / 'master.log'}")
        now = time.monotonic()
        for i in range(1, len(procs)):
            code = procs[i].poll()
            if code is None:
                if now - due[i] > WORKER_RESTART_MAX_S:  # (it ran a while: forgiven)
                    backoff[i] = WORKER_RESTART_S
                continue
            if now < due[i]:
                continue
            _say(f"worker local-{i} exited ({code}); starting it again")
            if (out := procs[i].stdout) is not None:
                out.close()
            procs[i] = start_worker(i)
            record()
            due[i] = now + backoff[i]
            backoff[i] = min(backoff[i] * 2, WORKER_RESTART_MAX_S)
        time.sleep(0.2)


def _say(message: str) -> None:
    """A line on up's stderr (the terminal; logs/up.log for `up -d`)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with contextlib.suppress(OSError):
        sys.stderr.write(f"{stamp} dist-exec up: {message}\n")
        sys.stderr.flush()


def _last_line(log_path: Path) -> str:
    """The last line a process that failed wrote to its log (its one-line error), without
    the "dist-exec: " it starts with."""
    lines = log_path.read_text(errors="replace").strip().splitlines()
    return lines[-1].removeprefix("dist-exec: ") if lines else "it wrote nothing"


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


def _tls_args(tls: Path, name: str) -> list[str]:
    return [
        "--tls-cert", str(tls / f"{name}.crt"), "--tls-key", str(tls / f"{name}.key"),
        "--tls-ca", str(tls / certs.CA_CERT),
    ]  # fmt: skip


def prepare_credentials(options: ClusterOptions) -> Path:
    """The cluster's CA, certificates and admin token (made once, reused by later starts)."""
    tls = options.data_dir / TLS_DIR
    if not (tls / certs.CA_CERT).exists():
        certs.init_ca(tls, name="dist-exec local cluster CA")
    host, _ = split_address(options.listen)
    wanted = [("master", "master", (host,) if host not in ("", "0.0.0.0", "::") else ())]
    wanted += [(f"local-{i}", "worker", ()) for i in range(1, options.workers + 1)]
    wanted.append((ADMIN, ADMIN, ()))
    if options.autoscale is not None:
        wanted.append((AUTOSCALED, Role.WORKERS.value, ()))
    for name, role, hosts in wanted:
        if not (tls / f"{name}.crt").exists() or name == "master":
            certs.issue(tls, name, role, tls, hosts, replace=True)
    tokens = options.data_dir / "tokens.json"
    token_file = options.data_dir / ADMIN_TOKEN_FILE
    if not token_file.exists() or all(e.name != ADMIN for e in read_tokens(tokens)):
        revoke_token(tokens, ADMIN)
        write_private(token_file, add_token(tokens, ADMIN, Role.ADMIN) + "\n")
    return tls


def run_foreground(options: ClusterOptions, on_ready: Callable[[str], None]) -> None:
    private_dir(options.data_dir)
    tls = prepare_credentials(options)
    logs = options.data_dir / "logs"
    procs: list[subprocess.Popen[str]] = []
    files: list[IO[str]] = []
    stop_requested = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    def stopping() -> bool:
        return stop_requested

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    address = ""
    try:
        master_args = [*options.master_args(), *_tls_args(tls, "master")]
        if options.autoscale is not None:  # its workers share a pool certificate: auto-N
            master_args += [f"--local-worker-arg={a}" for a in _tls_args(tls, AUTOSCALED)]
        master, log = _spawn(master_args, logs / "master.log")
        procs.append(master)
        files.append(log)
        address = dial_address(_wait_ready(master, "master", logs / "master.log", stopping))

        def start_worker(i: int) -> subprocess.Popen[str]:
            worker, log = _spawn(
                [
                    "worker", "--master", address, "--listen", "127.0.0.1:0",
                    "--worker-id", f"local-{i}",
                    "--max-concurrent-tasks", str(options.max_concurrent_tasks),
                    *options.worker_args(), *options.pool_args(i), *_tls_args(tls, f"local-{i}"),
                ],
                logs / f"worker-{i}.log",
            )  # fmt: skip
            log.close()  # (the worker has it)
            return worker

        def record() -> None:
            state = {
                "master": address,
                "pid": os.getpid(),
                "workers": options.workers,
                # So `down` can stop them should this process be gone: (pid, start time) each.
                "servers": [[p.pid, _start_time(p.pid)] for p in procs],
            }
            write_private(options.data_dir / STATE_FILE, json.dumps(state))

        procs += [
            start_worker(i) for i in range(1, 0 if options.autoscale else options.workers + 1)
        ]
        for i, worker in enumerate(procs[1:], start=1):
            _wait_ready(worker, f"worker local-{i}", logs / f"worker-{i}.log", stopping)
        write_client_config(
            options.data_dir, address, tls / certs.CA_CERT, tls / f"{ADMIN}.crt",
            tls / f"{ADMIN}.key", options.data_dir / ADMIN_TOKEN_FILE,
        )  # fmt: skip
        record()
        on_ready(address)
        _supervise(procs, start_worker, record, stopping, logs)
    finally:
        _stop(procs)
        for f in files:
            f.close()
        with contextlib.suppress(FileNotFoundError):
            (options.data_dir / STATE_FILE).unlink()
        if address:
            remove_client_config(options.data_dir, address)
        for s, handler in previous.items():
            signal.signal(s, handler)


def start_background(options: ClusterOptions) -> str:
    """Run ``up`` (foreground) as a background session; return the master address once ready."""
    private_dir(options.data_dir)
    pid_path = options.data_dir / PID_FILE
    if _up_process(pid_path, options.data_dir) is not None or any(
        _is(pid, started) for pid, started in _recorded_servers(options.data_dir)
    ):
        raise ClusterError(
            f"a cluster is already running from {options.data_dir}; stop it with 'dist-exec down'"
        )
    state = options.data_dir / STATE_FILE
    with contextlib.suppress(FileNotFoundError):
        state.unlink()
    log_path = options.data_dir / "logs" / "up.log"
    with _open_log(log_path) as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dist_exec", *options.up_args()],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    write_private(pid_path, str(proc.pid))
    deadline = time.monotonic() + READY_TIMEOUT_S * 2
    while time.monotonic() < deadline:
        if state.exists():
            return str(json.loads(state.read_text())["master"])
        if proc.poll() is not None:
            pid_path.unlink(missing_ok=True)
            raise ClusterError(f"cluster did not start: {_last_line(log_path)}")
        time.sleep(0.05)
    raise ClusterError(f"cluster not ready after {READY_TIMEOUT_S * 2:.0f}s; see {log_path}")


def stop_background(data_dir: Path) -> bool:
    """Stop the cluster that ``up -d`` runs from ``data_dir``: its ``up`` process, which stops
    its servers; or, if that died without doing so, the servers it recorded. Whether anything
    was running. Only processes that are this cluster's are ever signalled."""
    pid_path = data_dir / PID_FILE
    up = _up_process(pid_path, data_dir)
    servers = [] if up is not None else _recorded_servers(data_dir)
    if up is None and not any(_is(pid, started) for pid, started in servers):
        _forget(data_dir)
        return False
    deadline = time.monotonic() + STOP_TIMEOUT_S + 5
    if up is not None:
        os.kill(up, signal.SIGTERM)
        while _alive(up):
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"cluster process {up} did not stop within {STOP_TIMEOUT_S + 5:.0f}s"
                )
            time.sleep(0.05)
    else:  # workers first (they drain), then the master, each with the time to stop
        for group in (servers[1:], servers[:1]):
            _stop_recorded(group, time.monotonic() + STOP_TIMEOUT_S)
    _forget(data_dir)
    return True


def _stop_recorded(servers: list[tuple[int, int]], deadline: float) -> None:
    """SIGTERM these processes (each still the one recorded), SIGKILL them after ``deadline``."""
    for pid, started in servers:
        if _is(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    while any(_is(pid, started) for pid, started in servers):
        if time.monotonic() > deadline:
            for pid, started in servers:
                if _is(pid, started):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def _up_process(pid_path: Path, data_dir: Path) -> int | None:
    """The pid of this cluster's running ``up``: from the pid file of ``up -d``, else from the
    state a foreground ``up`` records. A process that is not ``up`` for this data dir (a pid
    reused since, a file written by hand) is not it."""
    try:
        raw = pid_path.read_bytes().strip()
    except FileNotFoundError:
        pid = _state(data_dir).get("pid")
        return pid if _is_pid(pid) and _is_up(pid, data_dir) else None
    if not raw.isdigit() or not _is_pid(int(raw)):  # (bytes: ASCII digits only)
        shown = raw[:20].decode(errors="replace")
        raise ClusterError(f"{pid_path} does not hold a process id ({shown!r}); remove it")
    pid = int(raw)
    return pid if _is_up(pid, data_dir) else None


def _is_up(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` runs ``dist-exec up`` for ``data_dir``."""
    if not _alive(pid):
        return False
    try:
        args = (procfs.PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(procfs.PROC / str(pid) / "cwd"))
    except OSError:
        return False
    dist_exec = any(a == b"dist_exec" or os.path.basename(a) == b"dist-exec" for a in args)
    if not dist_exec or b"up" not in args:  # (python -m dist_exec, or the dist-exec script)
        return False
    given = args[args.index(b"--data-dir") + 1] if b"--data-dir" in args[:-1] else b""
    return bool(given) and (cwd / os.fsdecode(given)).resolve() == data_dir.resolve()


def _recorded_servers(data_dir: Path) -> list[tuple[int, int]]:
    """The servers a running cluster recorded (master first): (pid, start time) each."""
    servers = _state(data_dir).get("servers")
    if not isinstance(servers, list):
        return []
    return [
        (s[0], s[1])
        for s in servers
        if isinstance(s, list) and len(s) == 2 and _is_pid(s[0]) and isinstance(s[1], int)
    ]


def _state(data_dir: Path) -> dict[str, Any]:
    """What a running ``up`` recorded in STATE_FILE ({} when nothing readable is there)."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _is_pid(value: object) -> TypeGuard[int]:
    return type(value) is int and 1 < value <= PID_MAX


def _forget(data_dir: Path) -> None:
    """What a stopped cluster leaves behind: its pid and state files, its client config."""
    master = _state(data_dir).get("master")
    if isinstance(master, str):
        remove_client_config(data_dir, master)
    (data_dir / STATE_FILE).unlink(missing_ok=True)
    (data_dir / PID_FILE).unlink(missing_ok=True)


def _start_time(pid: int) -> int:
    """When ``pid`` started (clock ticks since boot): with the pid, names one process."""
    fields = procfs.stat(pid)
    return int(fields[19]) if fields is not None else 0


def _is(pid: int, started: int) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (not a zombie)."""
    fields = procfs.live(pid)
    return fields is not None and int(fields[19]) == started


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (it has ended, its parent has not reaped it yet) does
    not, and is reaped when it is a child of this process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return procfs.live(pid) is not None
