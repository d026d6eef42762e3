"""The dist-exec command line: servers (master, worker, up, down) and client commands.

Exit codes: client commands exit 0 on success, 1 when dist-exec reports an error (one line on
stderr), 2 on bad usage, 3 when the master does not accept the credentials (UNAUTHENTICATED)
and 4 when the identity may not do that (PERMISSION_DENIED). ``run`` exits with the command's
own exit code, 124 when it timed out, 130 when it was cancelled, 125 when dist-exec could not
run it, and 3 or 4 as above. Ctrl-C (SIGTERM, SIGHUP) cancels the job of ``run``, which then
dies of the signal (see interrupts.py); Ctrl-C ends any other client command as it ends a local
program (killed by SIGINT: the shell shows 130).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from dist_exec import __version__
from dist_exec.autoscaler.options import autoscaler_config, scaler_options
from dist_exec.client import Client, command_spec
from dist_exec.config import (
    DEFAULT_MASTER_ADDRESS,
    MASTER_ENV,
    MasterConfig,
    WorkerConfig,
    check_bindable,
    default_data_dir,
    default_worker_id,
    parse_duration,
    parse_size,
    split_address,
)
from dist_exec.errors import (
    AccessDenied,
    DistExecError,
    InvalidTaskSpec,
    JobAlreadyFinished,
    JobNotFound,
    Unauthenticated,
)
from dist_exec.executors import describe_task
from dist_exec.executors.containment import Mode
from dist_exec.executors.http import HttpSpec
from dist_exec.executors.limits import LIMIT_METADATA_KEY, MAX_PROCS
from dist_exec.executors.limits import check as check_limits
from dist_exec.executors.limits import summary as limits_summary
from dist_exec.interrupts import Interrupted, Interrupts, die_of
from dist_exec.master.balancer import BALANCERS, DEFAULT_BALANCER
from dist_exec.models import (
    Job,
    JobId,
    JobStatus,
    NodeInfo,
    OutputChunk,
    ScalerStatus,
    Stream,
    TaskLimits,
    TaskSpec,
)
from dist_exec.security.commands import certs_group, tokens_group
from dist_exec.security.credentials import (
    TOKEN_ENV,
    Credentials,
    CredentialsError,
    discover,
    load_client_config,
)
from dist_exec.security.tls import INSECURE_FLAG, TlsConfigError, TlsFiles, is_loopback
from dist_exec.tuning import run_server, tune_gc

T = TypeVar("T")
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAUTHENTICATED = 3
EXIT_FORBIDDEN = 4
EXIT_TIMEOUT = 124
EXIT_NOT_RUN = 125
EXIT_CANCELLED = 130
EXIT_HTTP_ERROR = 22  # an HTTP job answered with a 4xx or 5xx status (curl --fail's code)


# ---- parameter types ------------------------------------------------------------------------


class DurationType(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class SizeType(click.ParamType):  # type: ignore[type-arg]
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class AddressType(click.ParamType):  # type: ignore[type-arg]
    name = "host:port"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            split_address(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


class KeyValueType(click.ParamType):  # type: ignore[type-arg]
    name = "key=value"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        key, sep, val = str(value).partition("=")
        if not sep or not key:
            self.fail(f"expected KEY=VALUE, got {value!r}", param, ctx)
        return key, val


DURATION = DurationType()
SIZE = SizeType()
ADDRESS = AddressType()
KEY_VALUE = KeyValueType()
_CREDENTIAL_KEYS = ("token", "ca", "cert", "key", "client_config")


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta[f"dist_exec.{param.name}"] = value
    return value


def master_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--master, and the credentials to show it (stored in the click context; see connect)."""
    path = click.Path(dir_okay=False, path_type=Path)
    for name, kind, env, help_text in reversed(
        [
            ("token", None, TOKEN_ENV, "Bearer token"),
            ("ca", path, "DIST_EXEC_CA", "CA certificate that signed the master's (turns on TLS)"),
            ("cert", path, "DIST_EXEC_CERT", "Client certificate (with --key)"),
            ("key", path, "DIST_EXEC_KEY", "Key of the client certificate"),
            ("client-config", path, "DIST_EXEC_CLIENT_CONFIG",
             "A client.json written by 'dist-exec up' (master address and credentials)"),
        ]
    ):  # fmt: skip
        fn = click.option(
            f"--{name}",
            type=kind,
            envvar=env,
            default=None,
            expose_value=False,
            callback=_remember,
            help=f"{help_text} (env {env}).",
        )(fn)
    return click.option(
        "--master",
        "master_address",
        type=ADDRESS,
        envvar=MASTER_ENV,
        default=DEFAULT_MASTER_ADDRESS,
        show_default=True,
        help=f"Master address (env {MASTER_ENV}). Without credentials options, those of the "
        "local cluster ('dist-exec up') serving this address are used.",
    )(fn)


def connect(address: str) -> Client:
    """A Client for ``address``: the credentials of --client-config, else those of the local
    cluster serving that address (if any), each part replaced by what the command line gives
    (so ``--token T`` on a local cluster keeps its TLS files and sends T)."""
    ctx = click.get_current_context()
    given = {k: ctx.meta.get(f"dist_exec.{k}") for k in _CREDENTIAL_KEYS}
    try:
        if given["client_config"] is not None:
            master, base = load_client_config(given["client_config"])
            if ctx.get_parameter_source("master_address") == click.core.ParameterSource.DEFAULT:
                address = master
        else:
            base = discover(address) or Credentials()
        explicit = Credentials.from_files(given["ca"], given["cert"], given["key"])
    except CredentialsError as exc:
        fail(str(exc), EXIT_USAGE)
    cert, key = (explicit.cert, explicit.key) if explicit.cert else (base.cert, base.key)
    credentials = Credentials(explicit.ca or base.ca, cert, key, given["token"] or base.token)
    if credentials.cert is not None and credentials.ca is None:
        fail("a client certificate (--cert) needs --ca to verify the master", EXIT_USAGE)
    return Client(address, credentials=credentials)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def policy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--allow-command / --block-command, the same on master and worker (both enforce them)."""
    fn = click.option(
        "--block-command",
        "blocked_commands",
        multiple=True,
        help="Refuse programs or command lines matching this glob (repeatable; env "
        "BLOCKED_COMMANDS).",
    )(fn)
    return click.option(
        "--allow-command",
        "allowed_commands",
        multiple=True,
        help="Only these programs may run (glob, repeatable; env ALLOWED_COMMANDS=ls,echo). "
        "Shell strings are the program 'sh'.",
    )(fn)


def tls_server_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--tls-cert/--tls-key/--tls-ca and the flag that allows a plain non-loopback listener."""
    fn = click.option(
        INSECURE_FLAG,
        "insecure",
        is_flag=True,
        expose_value=False,
        callback=_remember,
        help="Listen on a non-loopback address without TLS and authentication: anyone who "
        "can reach it can run commands. Never use this outside an isolated test network.",
    )(fn)
    path = click.Path(dir_okay=False, path_type=Path)
    for name, what in reversed(
        [
            ("cert", "This server's certificate (PEM)"),
            ("key", "Its private key"),
            ("ca", "The CA that signs the peers' certificates: mutual TLS"),
        ]
    ):
        fn = click.option(
            f"--tls-{name}",
            f"tls_{name}",
            type=path,
            envvar=f"DIST_EXEC_TLS_{name.upper()}",
            default=None,
            expose_value=False,
            callback=_remember,
            help=f"{what} (env DIST_EXEC_TLS_{name.upper()}).",
        )(fn)
    return fn


def server_tls(listen: str, what: str) -> TlsFiles | None:
    """The TLS files given to a master or worker; refuses a plain non-loopback listener."""
    meta = click.get_current_context().meta
    try:
        tls = TlsFiles.load(
            meta.get("dist_exec.tls_cert"), meta.get("dist_exec.tls_key"),
            meta.get("dist_exec.tls_ca"),
        )  # fmt: skip
    except TlsConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    if tls is None and not is_loopback(listen):
        if not meta.get("dist_exec.insecure"):
            fail(
                f"refusing to listen on {listen} without TLS: anyone who can reach it could run "
                f"commands. Give --tls-cert, --tls-key and --tls-ca (see 'dist-exec certs'), "
                f"listen on 127.0.0.1, or pass {INSECURE_FLAG}",
                EXIT_USAGE,
            )
        logging.getLogger("dist_exec.security").warning(
            "!!! INSECURE: this %s listens on %s WITHOUT TLS OR AUTHENTICATION: anyone who can "
            "reach it can run arbitrary commands (%s) !!!",
            what,
            listen,
            INSECURE_FLAG,
        )
    return tls


# ---- output helpers -------------------------------------------------------------------------


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"dist-exec: {message}", err=True)
    sys.exit(code)


def run_client(coro: Coroutine[Any, Any, T], exit_code: int = EXIT_ERROR) -> T:
    """Run a client coroutine; a DistExecError becomes one line on stderr and an exit code."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:  # Python's own SIGINT handler, which asyncio puts back at times
        die_of(signal.SIGINT)
    except Unauthenticated as exc:
        fail(f"not authenticated: {exc.message}", EXIT_UNAUTHENTICATED)
    except AccessDenied as exc:
        fail(f"permission denied: {exc.message}", EXIT_FORBIDDEN)
    except DistExecError as exc:
        fail(exc.message, exit_code)


def _iso(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def job_json(job: Job, command: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job.id,
        "status": job.status.value,
        "exit_code": job.exit_code,
        "output": _text(job.stdout),
        "stderr": _text(job.stderr),
        "error": job.error,
        "worker_id": job.worker_id or None,
        "priority": job.spec.priority,
        "task_type": job.spec.task_type,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "completed_at": _iso(job.completed_at),
        "retries": job.retries,
        "attempt": job.attempt,
        "selector": job.spec.selector,
        "pending_reason": job.pending_reason or None,
        "metadata": job.result_metadata,
        "stdout_bytes": job.stdout_bytes,
        "stderr_bytes": job.stderr_bytes,
        "output_truncated": job.truncated,
        "attempts": [
            {
                "attempt": a.attempt,
                "node_id": a.node_id,
                "started_at": _iso(a.started_at),
                "ended_at": _iso(a.ended_at),
                "outcome": a.outcome.value if a.outcome else None,
                "detail": a.detail,
            }
            for a in job.attempts
        ],
        "owner": job.spec.owner or None,
    }
    if job.spec.limits.any:
        body["limits"] = asdict(job.spec.limits)
    if command is not None:
        body["command"] = command
    elif job.spec.payload:
        body["command"] = describe_task(job.spec.task_type, job.spec.payload)
    return body


def node_json(node: NodeInfo) -> dict[str, Any]:
    return {
        "id": node.id,
        "address": node.address,
        "status": node.status.value,
        "capabilities": sorted(node.capabilities),
        "max_tasks": node.max_tasks,
        "active_tasks": node.active_tasks,
        "weight": node.effective_weight,
        "labels": node.labels,
        "last_seen": _iso(node.last_seen_wall),
        "task_limits": asdict(node.task_limits) if node.task_limits.any else None,
    }


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def setup_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        fail(f"invalid log level {level!r}: use DEBUG, INFO, WARNING or ERROR", EXIT_USAGE)
    logging.basicConfig(
        level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


# ---- the group ------------------------------------------------------------------------------


class _Commands(click.Group):
    """dist-exec's commands. One whose output is gone ends as a local program would: killed by
    SIGPIPE when its reader exited (``dist-exec list | head -1``), by SIGHUP when its terminal
    closed; never with click's silent exit status 1 or a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as exc:
            ending = _lost_output(exc)
            if ending is None:
                raise
            die_of(ending)


def _lost_output(exc: OSError) -> signal.Signals | None:
    """The signal that a write's ``exc`` stands for: its reader exited (EPIPE), or its terminal
    closed under a command that does not ignore SIGHUP (EIO); None for any other error."""
    if exc.errno == errno.EPIPE:
        return signal.SIGPIPE
    if exc.errno == errno.EIO and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        return signal.SIGHUP
    return None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dist-exec")
def main() -> None:
    """dist-exec: run commands across a fleet of workers."""


# ---- servers --------------------------------------------------------------------------------


def serve(start: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run a server until SIGTERM or SIGINT; a second signal stops it at once."""

    async def body() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()

        def on_signal() -> None:
            if stop.is_set() and main_task is not None:
                main_task.cancel()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await start(stop)

    tune_gc()
    try:
        run_server(body())
    except asyncio.CancelledError:
        pass
    except RuntimeError as exc:
        if "Failed to bind" in str(exc) or "bind" in str(exc).lower():
            reason = str(exc).split(";", 1)[0]  # drop gRPC's GRPC_VERBOSITY hint
            fail(f"cannot listen: {reason} (in use by another process, or not an address here?)")
        raise


def check_listen(address: str) -> None:
    try:
        check_bindable(address)
    except OSError as exc:
        fail(f"cannot listen on {address}: {exc.strerror or exc}")


def ready_line(what: str) -> Callable[[str], None]:
    def announce(address: str) -> None:
        click.echo(f"dist-exec {what} listening on {address}")
        sys.stdout.flush()

    return announce


@main.command()
@click.option(
    "--listen",
    type=ADDRESS,
    envvar="MASTER_ADDRESS",
    default=DEFAULT_MASTER_ADDRESS,
    show_default=True,
    help="Address to listen on; port 0 picks one (env MASTER_ADDRESS).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="DIST_EXEC_DATA_DIR",
    default=None,
    help="Where the job database lives (default: the user data directory).",
)
@click.option(
    "--heartbeat-interval",
    type=DURATION,
    envvar="HEARTBEAT_INTERVAL_SECONDS",
    default="5s",
    show_default=True,
    help="Interval workers are told to heartbeat at.",
)
@click.option(
    "--heartbeat-timeout",
    type=DURATION,
    envvar="HEARTBEAT_TIMEOUT_SECONDS",
    default="15s",
    show_default=True,
    help="Silence after which a worker is UNHEALTHY and its tasks are retried; "
    "it is forgotten after twice this.",
)
@click.option(
    "--max-retries",
    type=click.IntRange(0, 100),
    default=3,
    show_default=True,
    help="Default retries of a job after infrastructure failures.",
)
@click.option(
    "--retry-backoff",
    type=DURATION,
    default="1s",
    show_default=True,
    help="Wait before a job's first retry; it doubles with each retry (with jitter).",
)
@click.option(
    "--retry-backoff-max",
    type=DURATION,
    default="1m",
    show_default=True,
    help="Longest wait before a retry.",
)
@click.option(
    "--poison-after",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Fail a job instead of retrying it once its worker was lost this many times in a row "
    "(a task that kills workers).",
)
@click.option(
    "--rate-limit",
    type=click.FloatRange(min=0),
    envvar="RATE_LIMIT",
    default=1000.0,
    show_default=True,
    help="Jobs per second each client may submit (0: no limit).",
)
@click.option(
    "--rate-burst",
    type=click.IntRange(min=1),
    default=2000,
    show_default=True,
    help="Jobs a client may submit at once above the rate.",
)
@click.option(
    "--max-queued",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Jobs that may wait in the queue; more are refused (nothing accepted is dropped).",
)
@click.option(
    "--priority-aging",
    type=DURATION,
    default="60s",
    show_default=True,
    help="A waiting job gains one priority level this often, so none starves (0: off).",
)
@policy_options
@click.option(
    "--balancer",
    type=click.Choice(sorted(BALANCERS)),
    envvar="BALANCER",
    default=DEFAULT_BALANCER,
    show_default=True,
    help="How a node is picked among those that can take a task: round-robin cycles, "
    "weighted gives each node a share by its --weight, least-connections picks the least "
    "loaded relative to its capacity, random picks uniformly.",
)
@click.option(
    "--max-output",
    type=SIZE,
    default="4M",
    show_default=True,
    help="Output kept from the start of each stream of a job; beyond it only --output-tail "
    "is kept, the rest is counted.",
)
@click.option(
    "--output-tail",
    type=SIZE,
    default="1M",
    show_default=True,
    help="Output kept from the end of each stream longer than --max-output.",
)
@tls_server_options
@click.option(
    "--tokens-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="DIST_EXEC_TOKENS_FILE",
    default=None,
    help="Bearer tokens ('dist-exec tokens add'); default DATA_DIR/tokens.json. When it "
    "exists, or with TLS, every caller must authenticate.",
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append-only audit log (JSON lines); default DATA_DIR/audit.log.",
)
@scaler_options
@click.option("--log-level", envvar="LOG_LEVEL", default="INFO", show_default=True)
@click.pass_context
def master(
    ctx: click.Context,
    listen: str,
    data_dir: Path | None,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    max_retries: int,
    retry_backoff: float,
    retry_backoff_max: float,
    poison_after: int,
    rate_limit: float,
    rate_burst: int,
    max_queued: int,
    priority_aging: float,
    allowed_commands: tuple[str, ...],
    blocked_commands: tuple[str, ...],
    balancer: str,
    max_output: int,
    output_tail: int,
    tokens_file: Path | None,
    audit_log: Path | None,
    log_level: str,
) -> None:
    """Run the master: accepts jobs, tracks workers, dispatches."""
    from dist_exec.master.app import run_master

    setup_logging(log_level)
    tls = server_tls(listen, "master")
    if heartbeat_interval <= 0 or heartbeat_timeout <= heartbeat_interval:
        fail("--heartbeat-timeout must be longer than --heartbeat-interval (> 0)", EXIT_USAGE)
    data_dir = data_dir or default_data_dir()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        fail(f"cannot use --data-dir {data_dir}: {exc.strerror or exc}", EXIT_USAGE)
    try:
        autoscaler = autoscaler_config(ctx)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    config = MasterConfig(
        listen=listen,
        data_dir=data_dir,
        heartbeat_interval_s=heartbeat_interval,
        heartbeat_timeout_s=heartbeat_timeout,
        node_removal_s=2 * heartbeat_timeout,
        default_max_retries=max_retries,
        retry_backoff_s=retry_backoff,
        retry_backoff_max_s=max(retry_backoff, retry_backoff_max),
        poison_threshold=poison_after,
        rate_limit_per_s=rate_limit,
        rate_burst=rate_burst,
        max_queued=max_queued,
        priority_aging_s=priority_aging,
        allowed_commands=_rules(allowed_commands, "ALLOWED_COMMANDS"),
        blocked_commands=_rules(blocked_commands, "BLOCKED_COMMANDS"),
        balancer=balancer,
        max_output_bytes=max_output,
        output_tail_bytes=output_tail,
        tls=tls,
        tokens_file=tokens_file,
        audit_log=audit_log,
        autoscaler=autoscaler,
    )
    check_listen(listen)
    serve(lambda stop: run_master(config, stop, ready_line("master")))


def _rules(given: tuple[str, ...], env: str) -> tuple[str, ...]:
    """Command rules from the flags, else from a comma-separated environment variable."""
    if given:
        return given
    return tuple(r.strip() for r in os.environ.get(env, "").split(",") if r.strip())


def _labels_from_env() -> list[tuple[str, str]]:
    raw = os.environ.get("WORKER_LABELS", "")
    return [KEY_VALUE.convert(item.strip(), None, None) for item in raw.split(",") if item.strip()]


@main.command()
@click.option(
    "--master",
    "master_address",
    type=ADDRESS,
    envvar="MASTER_ADDRESS",
    default=DEFAULT_MASTER_ADDRESS,
    show_default=True,
    help="Master to register with (env MASTER_ADDRESS).",
)
@click.option(
    "--listen",
    type=ADDRESS,
    envvar="WORKER_ADDRESS",
    default="127.0.0.1:0",
    show_default=True,
    help="Address to listen on; port 0 picks one (env WORKER_ADDRESS).",
)
@click.option(
    "--advertise",
    type=ADDRESS,
    default=None,
    help="Address the master should dial (default: the listen host and bound port).",
)
@click.option(
    "--worker-id",
    envvar="WORKER_ID",
    default=None,
    help="Node id (env WORKER_ID; default: hostname-pid).",
)
@click.option(
    "--max-concurrent-tasks",
    type=click.IntRange(1, 10_000),
    envvar="MAX_CONCURRENT_TASKS",
    default=10,
    show_default=True,
)
@policy_options
@click.option(
    "--weight",
    type=click.IntRange(0, 1_000_000),
    envvar="WORKER_WEIGHT",
    default=0,
    help="Share of tasks under --balancer weighted (default: --max-concurrent-tasks).",
)
@click.option(
    "--label",
    "labels",
    type=KEY_VALUE,
    multiple=True,
    help="Node label, repeatable: --label zone=a (env WORKER_LABELS=zone=a,arch=x86).",
)
@click.option(
    "--heartbeat-interval",
    type=DURATION,
    envvar="HEARTBEAT_INTERVAL_SECONDS",
    default="5s",
    show_default=True,
    help="Used until the master sends its own.",
)
@click.option(
    "--drain-timeout",
    type=DURATION,
    default="30s",
    show_default=True,
    help="On SIGTERM, how long running tasks may finish before they are handed back.",
)
@click.option(
    "--inherit-env",
    is_flag=True,
    help="Pass this worker's whole environment to commands (default: PATH, HOME, "
    "LANG and a few more, plus what the job sets).",
)
@click.option(
    "--max-output",
    type=SIZE,
    default="4M",
    show_default=True,
    help="Output held in memory per task and stream; the rest is streamed, not kept.",
)
@tls_server_options
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    default="",
    help="A worker-role token, for a master that authenticates by tokens without TLS "
    f"(env {TOKEN_ENV}).",
)
@click.option(
    "--task-memory-limit",
    type=SIZE,
    default="0",
    help="Memory of each task (all its processes): the default and the most a job may ask "
    "for (0: none).",
)
@click.option(
    "--task-cpu-time-limit",
    type=DURATION,
    default="0",
    help="CPU time of each task (all its processes), default and ceiling (0: none).",
)
@click.option(
    "--task-max-procs",
    type=click.IntRange(0, MAX_PROCS),
    default=0,
    help="Processes (and threads) of each task at once, default and ceiling (0: none).",
)
@click.option(
    "--task-max-file-size",
    type=SIZE,
    default="0",
    help="Largest file a task may write, default and ceiling (0: none).",
)
@click.option(
    "--containment",
    type=click.Choice([m.value for m in Mode]),
    default=Mode.AUTO.value,
    show_default=True,
    help="How task limits are enforced: cgroups (v1 or v2, found at start-up), rlimits, or "
    "auto: cgroups when this host allows, else rlimits.",
)
@click.option(
    "--run-as",
    default=None,
    help="User that commands run as (needs root). Default: 'nobody' when the worker runs as "
    "root, else the worker's own user; '--run-as root' keeps root.",
)
@click.option("--log-level", envvar="LOG_LEVEL", default="INFO", show_default=True)
def worker(
    master_address: str,
    listen: str,
    advertise: str | None,
    worker_id: str | None,
    max_concurrent_tasks: int,
    allowed_commands: tuple[str, ...],
    blocked_commands: tuple[str, ...],
    weight: int,
    labels: tuple[tuple[str, str], ...],
    heartbeat_interval: float,
    drain_timeout: float,
    inherit_env: bool,
    max_output: int,
    token: str,
    task_memory_limit: int,
    task_cpu_time_limit: float,
    task_max_procs: int,
    task_max_file_size: int,
    containment: str,
    run_as: str | None,
    log_level: str,
) -> None:
    """Run a worker: registers with the master and runs the tasks it is sent."""
    from dist_exec.executors.containment import ContainmentError
    from dist_exec.worker.app import run_worker

    setup_logging(log_level)
    tls = server_tls(listen, "worker")
    try:
        all_labels = dict(_labels_from_env()) | dict(labels)
    except click.BadParameter as exc:
        fail(f"invalid WORKER_LABELS: {exc.message}", EXIT_USAGE)
    config = WorkerConfig(
        master=master_address,
        listen=listen,
        advertise=advertise or "",
        worker_id=worker_id or default_worker_id(),
        max_concurrent_tasks=max_concurrent_tasks,
        allowed_commands=_rules(allowed_commands, "ALLOWED_COMMANDS"),
        blocked_commands=_rules(blocked_commands, "BLOCKED_COMMANDS"),
        weight=weight,
        labels=all_labels,
        heartbeat_interval_s=heartbeat_interval,
        drain_timeout_s=drain_timeout,
        inherit_env=inherit_env,
        max_output_bytes=max_output,
        tls=tls,
        token=token,
        task_limits=TaskLimits(
            task_memory_limit, task_cpu_time_limit, task_max_procs, task_max_file_size
        ),
        containment=containment,
        run_as=run_as,
    )
    try:
        check_limits(config.task_limits)
    except InvalidTaskSpec as exc:
        fail(f"worker task limits: {exc.message}", EXIT_USAGE)
    check_listen(listen)
    try:
        serve(lambda stop: run_worker(config, stop, ready_line(f"worker {config.worker_id}")))
    except ContainmentError as exc:
        fail(str(exc))


# ---- run ------------------------------------------------------------------------------------


class RunCommand(click.Command):
    """Remembers whether the command came after '--' (argv, no shell) or not (a shell string)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv_mode"] = "--" in args
        return super().parse_args(ctx, args)


@main.command(cls=RunCommand, context_settings={"ignore_unknown_options": False})
@click.argument("command", nargs=-1)
@master_option
@click.option(
    "--type",
    "task_type",
    type=click.Choice(["command", "http"]),
    default="command",
    show_default=True,
    help="command: run COMMAND; http: request --url.",
)
@click.option("--url", default=None, help="(--type http) The URL to request.")
@click.option("--method", default="GET", show_default=True, help="(--type http)")
@click.option("--header", "headers", type=KEY_VALUE, multiple=True, help="(--type http) NAME=VALUE")
@click.option("--data", default="", help="(--type http) Request body.")
@click.option(
    "--selector",
    type=KEY_VALUE,
    multiple=True,
    help="Run only on nodes with this label, repeatable: --selector zone=a.",
)
@click.option(
    "--timeout",
    type=DURATION,
    default=None,
    help="Kill the command after this long: 500ms, 30s, 5m, 1h (default: the master's).",
)
@click.option(
    "--priority",
    type=click.IntRange(0, 10),
    default=0,
    show_default=True,
    help="0-10, higher runs first.",
)
@click.option("--env", "env", type=KEY_VALUE, multiple=True, help="KEY=VALUE for the command.")
@click.option("--cwd", default="", help="Absolute working directory on the worker.")
@click.option(
    "--stdin",
    "stdin_file",
    type=click.File("r"),
    default=None,
    help="Feed this file ('-' for standard input) to the command.",
)
@click.option(
    "--max-retries",
    type=click.IntRange(0, 100),
    default=None,
    help="Retries after a lost worker or a failed dispatch, and with --retry-on-failure after "
    "a failed command (default: the master's).",
)
@click.option(
    "--retry-on-failure",
    is_flag=True,
    help="Retry (up to --max-retries) when the command fails or times out, not only when its "
    "worker is lost.",
)
@click.option(
    "--queue-timeout",
    type=DURATION,
    default=None,
    help="Fail the job if it waits longer than this in the queue to start.",
)
@click.option(
    "--idempotency-key",
    default="",
    help="Submitting again with this key (within 24h) gives the same job instead of a new one.",
)
@click.option(
    "--all",
    "broadcast",
    is_flag=True,
    help="Run once on every healthy node that can (with --selector: every matching one); "
    "output lines are prefixed with the node id; exits 0 only if every node succeeded.",
)
@click.option("--memory", type=SIZE, default="0", help="Memory limit of the command: 512M, 2G.")
@click.option("--cpu-time", type=DURATION, default="0", help="CPU time limit: 30s, 5m.")
@click.option(
    "--max-procs", type=click.IntRange(0, MAX_PROCS), default=0, help="Process limit, e.g. 64."
)
@click.option("--max-file-size", type=SIZE, default="0", help="Largest file it may write: 100M.")
@click.option("--detach", "-d", is_flag=True, help="Print the job id and return at once.")
@json_option
@click.pass_context
def run(
    ctx: click.Context,
    command: tuple[str, ...],
    master_address: str,
    task_type: str,
    url: str | None,
    method: str,
    headers: tuple[tuple[str, str], ...],
    data: str,
    selector: tuple[tuple[str, str], ...],
    timeout: float | None,
    priority: int,
    env: tuple[tuple[str, str], ...],
    cwd: str,
    stdin_file: Any,
    max_retries: int | None,
    retry_on_failure: bool,
    queue_timeout: float | None,
    idempotency_key: str,
    broadcast: bool,
    memory: int,
    cpu_time: float,
    max_procs: int,
    max_file_size: int,
    detach: bool,
    as_json: bool,
) -> None:
    """Run a command on a worker, stream its output and exit with its exit code.

    \b
      dist-exec run "ls -la /tmp | wc -l" --timeout 30s   # a shell string (/bin/sh -c)
      dist-exec run -- ls -la /tmp                        # argv, no shell
      dist-exec run --selector zone=a "uptime"            # only on nodes labelled zone=a
      dist-exec run --type http --url http://svc:8080/health

    An HTTP job prints the response body and exits 0 for a 2xx or 3xx status, else 22 (as
    curl --fail does); the status and headers are in `status --json` under "metadata".
    """
    if timeout is not None and timeout <= 0:
        fail("--timeout must be longer than 0", EXIT_USAGE)
    if task_type == "http":
        if not url or command:
            fail("--type http takes --url URL and no command", EXIT_USAGE)
        body = HttpSpec(url, method, dict(headers), data).to_payload()
        spec = TaskSpec("http", body, timeout or 0.0, priority, max_retries=max_retries)
    else:
        if not command:
            fail("Missing argument 'COMMAND...': what to run", EXIT_USAGE)
        if url or headers or data:
            fail("--url, --header and --data go with --type http", EXIT_USAGE)
        argv_mode = bool(ctx.meta.get("argv_mode"))
        spec = command_spec(
            list(command) if argv_mode else " ".join(command),
            shell=not argv_mode,
            timeout_s=timeout or 0.0,
            priority=priority,
            env=dict(env),
            working_dir=cwd,
            stdin=stdin_file.read() if stdin_file is not None else "",
            max_retries=max_retries,
        )
    if queue_timeout is not None and queue_timeout <= 0:
        fail("--queue-timeout must be longer than 0", EXIT_USAGE)
    spec = replace(
        spec,
        selector=dict(selector),
        idempotency_key=idempotency_key,
        retry_on_failure=retry_on_failure,
        queue_timeout_s=queue_timeout or 0.0,
        limits=TaskLimits(memory, cpu_time, max_procs, max_file_size),
    )
    if broadcast:
        ending = run_client(_broadcast(master_address, spec, detach, as_json), EXIT_NOT_RUN)
    else:
        ending = run_client(_run(master_address, spec, detach, as_json), EXIT_NOT_RUN)
    if isinstance(ending, signal.Signals):  # it stopped the job: end as a local command would
        die_of(ending)
    sys.exit(ending)


class _Prefixer:
    """Writes each node's output line by line, each line prefixed with the node id."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.partial: dict[tuple[str, Stream], bytes] = {}

    def write(self, node: str, stream: Stream, data: bytes) -> None:
        text = self.partial.pop((node, stream), b"") + data
        *lines, rest = text.split(b"\n")
        if rest:
            self.partial[(node, stream)] = rest
        out = sys.stdout.buffer if stream == Stream.STDOUT else sys.stderr.buffer
        prefix = f"[{node:<{self.width}}] ".encode()
        for line in lines:
            out.write(prefix + line + b"\n")
        out.flush()

    def flush(self, node: str) -> None:
        for stream in Stream:
            rest = self.partial.pop((node, stream), b"")
            if rest:
                self.write(node, stream, rest + b"\n")


Ending = int | signal.Signals  # an exit code, or the signal to die of (it stopped the job)


async def _broadcast(address: str, spec: TaskSpec, detach: bool, as_json: bool) -> Ending:
    async with connect(address) as client:
        with Interrupts() as interrupts:
            try:
                broadcast_id, tasks = await interrupts.step(
                    client.submit_broadcast(spec), patient=True, on_hold=_hold_message
                )
            except Interrupted:
                return _gave_up(interrupts, "if it accepted the jobs, they run")
            if detach and not interrupts.received:
                click.echo(broadcast_id)
                return 0
            node_of: dict[str, str] = dict(tasks)
            finals: dict[str, Job] = {}
            stop: Ending | None = interrupts.received[0] if interrupts.received else None
            if stop is None:
                prefixer = _Prefixer(max(len(n) for n in node_of.values()))
                watch = _watch_broadcast(client, list(node_of), node_of, prefixer, finals, as_json)
                _, stop = await _follow(interrupts, watch)
            if stop is not None and len(finals) < len(node_of):
                stopped = await _stop(client, [j for j in node_of if j not in finals], interrupts)
                if stopped is None:
                    return _gave_up(interrupts, "the master goes on cancelling the jobs")
                finals |= stopped
            if not any(finals[j].status == JobStatus.CANCELLED for j in finals):
                stop = None  # every job had ended by itself
        try:
            failed = await _report_broadcast(client, broadcast_id, node_of, finals, as_json)
        except OSError:
            if stop is None:
                raise
            return stop  # (the signal that stopped the jobs may have closed the output too)
        if stop is not None:
            return stop
        return EXIT_ERROR if failed else 0


async def _follow(
    interrupts: Interrupts, following: Awaitable[T]
) -> tuple[T, None] | tuple[None, Ending]:
    """Await ``following`` (which prints jobs' output): its result, or, when it had to stop,
    what to end with: the signal received, or what a lost stdout or stderr means (its reader
    exited, its terminal closed)."""
    try:
        return await interrupts.step(following), None
    except Interrupted:
        return None, interrupts.received[0]
    except OSError as exc:
        lost = _lost_output(exc)
        if lost is not None:
            return None, lost
        # A full disk, or a terminal gone under a run that ignores SIGHUP (nohup): the job is
        # not the command's to stop.
        raise DistExecError(
            f"cannot write the output ({exc.strerror}); the job goes on: see 'dist-exec list'"
        ) from None


async def _stop(
    client: Client, job_ids: list[str], interrupts: Interrupts
) -> dict[str, Job] | None:
    """Cancel the jobs, all at once; each as it ended, or None when a further Ctrl-C stopped
    waiting for the master's confirmation (the master carries a cancel out all the same)."""
    cancels = asyncio.gather(*(_cancel(client, j) for j in job_ids), return_exceptions=True)
    try:
        ended = await interrupts.step(cancels, patient=True)
    except Interrupted:
        return None
    jobs: dict[str, Job] = {}
    for job_id, outcome in zip(job_ids, ended, strict=True):  # (every cancel was tried)
        if isinstance(outcome, BaseException):
            raise outcome
        jobs[job_id] = outcome
    return jobs


async def _cancel(client: Client, job_id: str) -> Job:
    """Cancel the job unless it has ended; returns it as it ended."""
    with contextlib.suppress(JobAlreadyFinished):
        await client.cancel(job_id)
    return await client.get(job_id)


def _hold_message() -> None:
    _tell("the job is cancelled once the master has accepted it (Ctrl-C again to stop waiting)")


def _gave_up(interrupts: Interrupts, what_goes_on: str) -> signal.Signals:
    _tell(f"stopped waiting for the master: {what_goes_on}; see 'dist-exec list'")
    return interrupts.received[0]


def _tell(message: str) -> None:
    """One line on stderr, when there still is one (a closed terminal's is not)."""
    with contextlib.suppress(OSError):
        click.echo(f"dist-exec: {message}", err=True)


async def _report_broadcast(
    client: Client,
    broadcast_id: str,
    node_of: dict[str, str],
    finals: dict[str, Job],
    as_json: bool,
) -> list[str]:
    """Print how each node's job ended; returns the ids of those that did not complete."""
    failed = [j for j in node_of if finals[j].status != JobStatus.COMPLETED]
    if as_json:
        jobs = [await client.get(j) for j in node_of]
        print_json(
            {
                "broadcast_id": broadcast_id,
                "nodes": len(jobs),
                "succeeded": len(jobs) - len(failed),
                "results": [{"node_id": node_of[j.id]} | job_json(j) for j in jobs],
            }
        )
    else:
        click.echo(
            f"dist-exec: broadcast {broadcast_id} on {len(node_of)} node(s): "
            f"{len(node_of) - len(failed)} succeeded, {len(failed)} failed",
            err=True,
        )
        for job_id, node in sorted(node_of.items(), key=lambda item: item[1]):
            job = finals[job_id]
            code = "-" if job.exit_code is None else str(job.exit_code)
            detail = f"  {job.error}" if job.status != JobStatus.COMPLETED and job.error else ""
            click.echo(f"  {node:<20} {job.status.value:<9} exit {code}{detail}", err=True)
    return failed


async def _watch_broadcast(
    client: Client,
    job_ids: list[str],
    node_of: dict[str, str],
    prefixer: _Prefixer,
    finals: dict[str, Job],
    quiet: bool,
) -> None:
    async for job_id, item in client.watch_many(job_ids, with_output=not quiet):
        if isinstance(item, Job):
            finals[job_id] = item
            prefixer.flush(node_of[job_id])
        else:
            prefixer.write(node_of[job_id], item[1].stream, item[1].data)


async def _run(address: str, spec: Any, detach: bool, as_json: bool) -> Ending:
    async with connect(address) as client:
        if detach:
            return await _submit_detached(client, spec)
        async with contextlib.aclosing(client.run(spec)) as events:
            with Interrupts() as interrupts:
                try:
                    # One call submits and follows; its first item is the job id, once accepted.
                    # A signal before then waits for it: the job must not run unseen.
                    accepted = await interrupts.step(
                        anext(events), patient=True, on_hold=_hold_message
                    )
                except Interrupted:
                    return _gave_up(interrupts, "if it accepted the job, it runs")
                assert isinstance(accepted, str)
                job_id = accepted
                job: Job | None = None
                stop: Ending | None = interrupts.received[0] if interrupts.received else None
                if stop is None:
                    job, stop = await _follow(interrupts, _stream(events, job_id, quiet=as_json))
                if stop is not None:
                    stopped = await _stop(client, [job_id], interrupts)
                    if stopped is None:
                        return _gave_up(interrupts, f"the master goes on cancelling job {job_id}")
                    job = stopped[job_id]
        assert job is not None
        if as_json:
            report = job_json(await client.get(job_id))
            try:
                print_json(report)
            except OSError:
                if stop is None:
                    raise
                # (the signal that stopped the job may have closed the output too)
        code = _exit_code(job, quiet=as_json)
        return stop if stop is not None and job.status == JobStatus.CANCELLED else code


async def _submit_detached(client: Client, spec: TaskSpec) -> Ending:
    with Interrupts() as interrupts:
        try:
            job_id = await interrupts.step(client.submit(spec), patient=True, on_hold=_hold_message)
        except Interrupted:
            return _gave_up(interrupts, "if it accepted the job, it runs")
        if not interrupts.received:
            click.echo(job_id)
            return 0
        # A signal while it was submitted: the job is not wanted after all.
        stopped = await _stop(client, [job_id], interrupts)
        if stopped is None:
            return _gave_up(interrupts, f"the master goes on cancelling job {job_id}")
    if stopped[job_id].status != JobStatus.CANCELLED:  # it had ended by itself
        click.echo(job_id)
        return 0
    _tell(f"job {job_id} was cancelled")
    return interrupts.received[0]


async def _stream(
    events: AsyncIterator[JobId | tuple[int, OutputChunk] | Job], job_id: str, quiet: bool
) -> Job:
    """Print the job's output as it comes; returns the ended job."""
    last_attempt = 0
    printer = _OutputPrinter()
    async for item in events:
        if isinstance(item, str):
            continue
        if isinstance(item, Job):
            return item
        attempt, chunk = item
        if last_attempt and attempt != last_attempt:
            printer = _OutputPrinter()
            if not quiet:
                click.echo(
                    f"dist-exec: job {job_id} is being retried (attempt {attempt})", err=True
                )
        last_attempt = attempt
        if not quiet:
            printer.write(chunk)
    raise AssertionError("watch() always ends with the job")


class _OutputPrinter:
    """Writes a job's output to stdout and stderr, saying where bytes were not kept (the
    middle of a stream longer than the master keeps)."""

    def __init__(self) -> None:
        self.ends = dict.fromkeys(Stream, 0)

    def write(self, chunk: OutputChunk) -> None:
        out = sys.stdout.buffer if chunk.stream == Stream.STDOUT else sys.stderr.buffer
        gap = chunk.offset - self.ends[chunk.stream]
        if gap > 0:
            out.flush()
            click.echo(
                f"dist-exec: [{gap} bytes of {chunk.stream.name.lower()} not kept]", err=True
            )
        self.ends[chunk.stream] = chunk.offset + len(chunk.data)
        out.write(chunk.data)
        out.flush()


def _exit_code(job: Job, quiet: bool) -> int:
    def say(message: str) -> None:
        if not quiet:
            _tell(message)

    if job.truncated:
        say(f"job {job.id} printed more than the master keeps; stored output is truncated")
    if job.status == JobStatus.TIMEOUT:
        say(f"job {job.id} timed out: {job.error}")
        return EXIT_TIMEOUT
    if job.status == JobStatus.CANCELLED:
        say(f"job {job.id} was cancelled")
        return EXIT_CANCELLED
    if job.exit_code is None:
        say(f"job {job.id} failed: {job.error or job.status.value}")
        return EXIT_NOT_RUN
    if job.spec.task_type == "http":
        if job.status == JobStatus.COMPLETED:
            return 0
        say(job.error or f"HTTP {job.exit_code}")
        return EXIT_HTTP_ERROR
    if job.error and (job.exit_code >= 126 or LIMIT_METADATA_KEY in job.result_metadata):
        say(job.error)
    return job.exit_code


# ---- status, list, logs, cancel, nodes ------------------------------------------------------


def _describe_job(job: Job) -> None:
    data = job_json(job)
    rows = [
        ("job", job.id),
        ("status", job.status.value),
        ("command", data.get("command", job.spec.task_type)),
        ("exit code", "-" if job.exit_code is None else str(job.exit_code)),
        ("worker", job.worker_id or "-"),
        ("priority", str(job.spec.priority)),
        ("retries", str(job.retries)),
        ("created", data["created_at"] or "-"),
        ("started", data["started_at"] or "-"),
        ("completed", data["completed_at"] or "-"),
    ]
    if job.pending_reason:
        rows.append(("pending", job.pending_reason))
    if job.spec.selector:
        rows.append(("selector", ",".join(f"{k}={v}" for k, v in job.spec.selector.items())))
    if job.spec.limits.any:
        rows.append(("limits", limits_summary(job.spec.limits)))
    if job.error:
        rows.append(("error", job.error))
    if job.truncated:
        rows.append(
            (
                "output",
                f"truncated ({job.stdout_bytes} bytes stdout, "
                f"{job.stderr_bytes} bytes stderr in all)",
            )
        )
    for key, value in rows:
        click.echo(f"{key + ':':<11}{value}")
    if len(job.attempts) > 1 or any(a.detail for a in job.attempts):
        click.echo("attempts:")
        for a in job.attempts:
            started = a.started_at.strftime("%H:%M:%S") if a.started_at else "-"
            ended = a.ended_at.strftime("%H:%M:%S") if a.ended_at else "running"
            line = f"  #{a.attempt} {a.node_id or '-'} {started}-{ended} "
            line += a.outcome.value if a.outcome else "RUNNING"
            click.echo(line + (f": {a.detail}" if a.detail else ""))


@main.command()
@click.argument("job_id")
@master_option
@json_option
def status(job_id: str, master_address: str, as_json: bool) -> None:
    """Show one job, or the per-node jobs of a broadcast."""

    async def body() -> Job | list[Job]:
        async with connect(master_address) as client:
            try:
                return await client.get(job_id)
            except JobNotFound:
                members, _ = await client.list_jobs(1000, broadcast_id=job_id)
                if not members:
                    raise
                return [await client.get(j.id) for j, _ in members]

    found = run_client(body())
    if isinstance(found, Job):
        if as_json:
            print_json(job_json(found))
        else:
            _describe_job(found)
        return
    if as_json:
        print_json({"broadcast_id": job_id, "jobs": [job_json(j) for j in found]})
        return
    done = sum(1 for j in found if j.status == JobStatus.COMPLETED)
    click.echo(f"broadcast {job_id}: {len(found)} node(s), {done} completed")
    for job in sorted(found, key=lambda j: j.spec.node_id):
        code = "-" if job.exit_code is None else str(job.exit_code)
        click.echo(f"  {job.spec.node_id:<20} {job.status.value:<9} exit {code:<4} job {job.id}")


def _status_choice(value: str | None) -> JobStatus | None:
    return JobStatus(value.upper()) if value else None


@main.command(name="list")
@click.option("--limit", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@click.option(
    "--status",
    "status_filter",
    type=click.Choice([s.value for s in JobStatus], case_sensitive=False),
    default=None,
    help="Only jobs in this state.",
)
@click.option("--broadcast", default=None, help="Only the per-node jobs of this broadcast.")
@master_option
@json_option
def list_jobs(
    limit: int,
    offset: int,
    status_filter: str | None,
    broadcast: str | None,
    master_address: str,
    as_json: bool,
) -> None:
    """List recent jobs, newest first."""

    async def body() -> tuple[list[tuple[Job, str]], list[Job], int]:
        async with connect(master_address) as client:
            jobs, total = await client.list_jobs(
                limit, offset, _status_choice(status_filter), broadcast or ""
            )
            full = [await client.get(j.id) for j, _ in jobs] if as_json else []
            return jobs, full, total

    jobs, full, total = run_client(body())
    if as_json:
        print_json([job_json(j) for j in full])
        return
    click.echo(f"{'JOB':<36}  {'STATUS':<9}  {'EXIT':>4}  {'WORKER':<20}  {'CREATED':<20}  COMMAND")
    for job, summary in jobs:
        created = job.created_at.strftime("%Y-%m-%d %H:%M:%S")
        exit_code = "-" if job.exit_code is None else str(job.exit_code)
        worker_id = (job.worker_id or "-")[:20]
        click.echo(
            f"{job.id:<36}  {job.status.value:<9}  {exit_code:>4}  {worker_id:<20}"
            f"  {created:<20}  {summary}"
            + (f"  [broadcast {job.spec.broadcast_id[:8]}]" if job.spec.broadcast_id else "")
        )
    click.echo(f"({len(jobs)} of {total} jobs)", err=True)


@main.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@master_option
@json_option
def logs(job_id: str, follow: bool, master_address: str, as_json: bool) -> None:
    """Print a job's output: stdout to stdout, stderr to stderr."""

    async def body() -> None:
        printer, last_attempt = _OutputPrinter(), 0
        async with connect(master_address) as client:
            async for attempt, chunk in client.stream_output(job_id, follow=follow):
                if attempt != last_attempt:
                    printer, last_attempt = _OutputPrinter(), attempt
                if as_json:
                    click.echo(
                        json.dumps(
                            {
                                "stream": chunk.stream.name.lower(),
                                "offset": chunk.offset,
                                "data": _text(chunk.data),
                            }
                        )
                    )
                    continue
                printer.write(chunk)

    run_client(body())


@main.command()
@click.argument("job_id")
@master_option
@json_option
def cancel(job_id: str, master_address: str, as_json: bool) -> None:
    """Cancel a queued or running job (its whole process group is killed)."""

    async def body() -> tuple[str, Job]:
        async with connect(master_address) as client:
            message = await client.cancel(job_id)
            return message, await client.get(job_id)

    message, job = run_client(body())
    if as_json:
        print_json(
            {"id": job.id, "cancelled": True, "message": message, "status": job.status.value}
        )
    else:
        click.echo(f"job {job.id}: {message}")


@main.command()
@master_option
@json_option
def nodes(master_address: str, as_json: bool) -> None:
    """List the workers registered with the master."""

    async def body() -> tuple[list[NodeInfo], ScalerStatus | None]:
        async with connect(master_address) as client:
            return await client.nodes(), await client.scaler_status()

    found, scaler = run_client(body())
    if as_json:
        print_json([node_json(n) for n in found])
        return
    click.echo(f"{'NODE':<24}  {'ADDRESS':<22}  {'STATUS':<9}  {'TASKS':>7}  {'TYPES':<12}  LABELS")
    for n in found:
        labels = ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-"
        tasks = f"{n.active_tasks}/{n.max_tasks}"
        types = ",".join(sorted(n.capabilities))
        click.echo(
            f"{n.id:<24}  {n.address:<22}  {n.status.value:<9}  {tasks:>7}  {types:<12}  {labels}"
        )
    if not found:
        click.echo("(no workers registered)", err=True)
    if scaler is not None:
        _describe_scaler(scaler)


def _describe_scaler(scaler: ScalerStatus) -> None:
    floor = f", HPA floor {scaler.floor}" if scaler.floor else ""
    click.echo(
        f"autoscaler: {scaler.backend}: {scaler.desired} desired, {scaler.ready} ready "
        f"(min {scaler.min_replicas}, max {scaler.max_replicas}{floor})"
    )
    if scaler.last_event:
        click.echo(f"  last event: {scaler.last_event} ({_iso(scaler.last_event_at)})")
    if scaler.last_decision:
        click.echo(f"  now: {scaler.last_decision}")
    if scaler.draining:
        click.echo(f"  draining: {', '.join(scaler.draining)}")
    if scaler.error:
        click.echo(f"  error: {scaler.error}")


@main.command()
@click.argument("node_id")
@master_option
def drain(node_id: str, master_address: str) -> None:
    """(admin) Stop giving NODE_ID new tasks; the ones it runs finish."""

    async def body() -> str:
        async with connect(master_address) as client:
            return await client.drain(node_id)

    click.echo(run_client(body()))


@main.command()
@master_option
@json_option
def whoami(master_address: str, as_json: bool) -> None:
    """The identity and role the master sees for these credentials."""

    async def body() -> tuple[str, str, str]:
        async with connect(master_address) as client:
            return await client.whoami()

    name, role, auth = run_client(body())
    if as_json:
        print_json({"name": name, "role": role, "auth": auth})
    else:
        click.echo(f"{name} ({role}, authenticated by {auth})")


main.add_command(certs_group)
main.add_command(tokens_group)


# ---- embedded local cluster -----------------------------------------------------------------


@main.command()
@click.option("--workers", "worker_count", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option(
    "--listen",
    type=ADDRESS,
    default=DEFAULT_MASTER_ADDRESS,
    show_default=True,
    help="Master address.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cluster state, logs and pid file (default: the user data directory).",
)
@click.option(
    "--max-concurrent-tasks",
    type=click.IntRange(1, 10_000),
    default=10,
    show_default=True,
    help="Per worker.",
)
@click.option(
    "--autoscale",
    is_flag=True,
    help="Let the master start and stop workers with the load (--min-workers..--max-workers) "
    "instead of running --workers.",
)
@click.option("--min-workers", type=click.IntRange(0, 64), default=1, show_default=True)
@click.option("--max-workers", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--detach", "-d", is_flag=True, help="Start in the background; stop with 'down'.")
def up(
    worker_count: int,
    listen: str,
    data_dir: Path | None,
    max_concurrent_tasks: int,
    autoscale: bool,
    min_workers: int,
    max_workers: int,
    detach: bool,
) -> None:
    """Start a master and N workers on this machine (127.0.0.1 only by default)."""
    from dist_exec import cluster

    if autoscale and min_workers > max_workers:
        fail(f"--min-workers ({min_workers}) is above --max-workers ({max_workers})", EXIT_USAGE)
    directory = data_dir or default_data_dir()
    options = cluster.ClusterOptions(
        directory,
        listen,
        worker_count,
        max_concurrent_tasks,
        (min_workers, max_workers) if autoscale else None,
    )
    workers = f"{min_workers}-{max_workers} autoscaled" if autoscale else str(worker_count)
    try:
        if detach:
            address = cluster.start_background(options)
            click.echo(f"dist-exec cluster up: master at {address}, {workers} workers")
            click.echo(f"stop it with: dist-exec down --data-dir {directory}")
            return
        cluster.run_foreground(
            options,
            on_ready=lambda address: click.echo(
                f"dist-exec cluster up: master at {address}, {workers} workers (Ctrl-C stops it)",
            ),
        )
    except cluster.ClusterError as exc:
        fail(str(exc))


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def down(data_dir: Path | None) -> None:
    """Stop a cluster started with 'up -d'."""
    from dist_exec import cluster

    try:
        stopped = cluster.stop_background(data_dir or default_data_dir())
    except cluster.ClusterError as exc:
        fail(str(exc))
    click.echo("dist-exec cluster stopped" if stopped else "no cluster was running")


if __name__ == "__main__":  # pragma: no cover
    main()
