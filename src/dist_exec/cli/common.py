"""What the commands share: exit codes, parameter types, the --master and credentials options,
the connection to the master, and output helpers."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import select
import signal
import sys
import textwrap
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from dist_exec.client import Client
from dist_exec.config import (
    DEFAULT_MASTER_ADDRESS,
    MASTER_ENV,
    MIN_TIMEOUT_S,
    format_duration,
    parse_duration,
    parse_size,
    split_address,
)
from dist_exec.errors import (
    AccessDenied,
    DistExecError,
    Unauthenticated,
)
from dist_exec.executors import describe_task
from dist_exec.executors.limits import MAX_BYTES, format_size
from dist_exec.interrupts import die_of
from dist_exec.models import (
    Job,
    NodeInfo,
)
from dist_exec.security.credentials import (
    TOKEN_ENV,
    Credentials,
    CredentialsError,
    discover,
    load_client_config,
)
from dist_exec.security.tls import INSECURE_FLAG, TlsConfigError, TlsFiles, is_loopback
from dist_exec.wire import STOP_SIGNAL_TO_PB

T = TypeVar("T")
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAUTHENTICATED = 3
EXIT_FORBIDDEN = 4
EXIT_TIMEOUT = 124
EXIT_NOT_RUN = 125
EXIT_CANCELLED = 130
EXIT_HTTP_ERROR = 22  # an HTTP job answered with a 4xx or 5xx status (curl --fail's code)
EXIT_HTTP_TRUNCATED = 63  # an HTTP job's response body was cut at the worker's limit (curl's)
JSON_PIECE = 65536  # characters of JSON output per write (a pipe's capacity)


# ---- parameter types ------------------------------------------------------------------------
# Every value a client command sends is checked here, as a usage error: protobuf refuses an
# integer out of its field's range and text that is not UTF-8 (an argument that is not arrives
# with lone surrogates), and gRPC a header value that is not visible ASCII.

MAX_DURATION_S = 315_576_000_000.0  # the most a protobuf Duration holds (10000 years)


def _text(value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
    text = str(value)
    try:
        text.encode()
    except UnicodeEncodeError:
        raise click.BadParameter("not valid UTF-8 text", ctx, param) from None
    return text


class TextType(click.ParamType):  # type: ignore[type-arg]
    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return _text(value, param, ctx)


class TokenType(click.ParamType):  # type: ignore[type-arg]
    name = "token"

    def __init__(self, empty_ok: bool = True) -> None:
        self.empty_ok = empty_ok  # (a client's must not be: see CLIENT_TOKEN)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        token = str(value)
        if not token and not self.empty_ok:
            self.fail("the token is empty", param, ctx)
        if not all("!" <= c <= "~" for c in token):  # it goes in a header
            self.fail("a token is visible ASCII, without spaces or control characters", param, ctx)
        return token


class DurationType(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def __init__(self, minimum_s: float = 0.0) -> None:
        self.minimum_s = minimum_s

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if seconds < self.minimum_s:
            self.fail(f"{value!r} is shorter than {format_duration(self.minimum_s)}", param, ctx)
        if seconds > MAX_DURATION_S:
            self.fail(f"{value!r} is longer than 10000 years", param, ctx)
        return seconds


class SizeType(click.ParamType):  # type: ignore[type-arg]
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if size > MAX_BYTES:
            self.fail(f"{value!r} is more than {format_size(MAX_BYTES)}", param, ctx)
        return size


class SignalType(click.ParamType):  # type: ignore[type-arg]
    """A signal a cancel may send: TERM, INT, HUP, QUIT or KILL (SIGINT, int and 2 too)."""

    name = "signal"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> signal.Signals:
        if isinstance(value, signal.Signals):
            return value
        text = _text(value, param, ctx).strip().upper()
        text = text.removeprefix("SIG")
        for sig in STOP_SIGNAL_TO_PB:
            if text in (sig.name.removeprefix("SIG"), str(int(sig))):
                return sig
        names = ", ".join(sig.name.removeprefix("SIG") for sig in STOP_SIGNAL_TO_PB)
        self.fail(f"{value!r} is not a signal a cancel can send: {names}", param, ctx)


class AddressType(click.ParamType):  # type: ignore[type-arg]
    name = "host:port"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        address = _text(value, param, ctx)
        try:
            split_address(address)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return address


class KeyValueType(click.ParamType):  # type: ignore[type-arg]
    name = "key=value"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        key, sep, val = _text(value, param, ctx).partition("=")
        if not sep or not key:
            self.fail(f"expected KEY=VALUE, got {value!r}", param, ctx)
        return key, val


TEXT = TextType()
TOKEN = TokenType()
# An unset variable in `--token "$X"` must not fall back to other credentials (a local
# cluster's admin token): a client's token is never empty.
CLIENT_TOKEN = TokenType(empty_ok=False)
DURATION = DurationType()
TIMEOUT = DurationType(minimum_s=MIN_TIMEOUT_S)  # the least a master accepts
SIZE = SizeType()
SIGNAL = SignalType()
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
            ("token", CLIENT_TOKEN, TOKEN_ENV, "Bearer token"),
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
    try:
        credentials.check_target(address)
    except CredentialsError as exc:
        fail(str(exc), EXIT_USAGE)
    return Client(
        address,
        credentials=credentials,
        on_reconnect=lambda message: click.echo(f"dist-exec: {message}", err=True),
    )


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def policy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--allow-command / --block-command / --allow-env, the same on master and worker (both
    enforce them)."""
    fn = click.option(
        "--allow-env",
        "allowed_env",
        type=TEXT,
        multiple=True,
        help="Under --allow-command, environment variables a job may set besides LANG, LC_*, "
        "TZ, TERM, COLUMNS, LINES and NO_COLOR (glob, repeatable; env ALLOWED_ENV); never "
        "those known to run code (LD_*, PATH, ...).",
    )(fn)
    fn = click.option(
        "--block-command",
        "blocked_commands",
        type=TEXT,
        multiple=True,
        help="Refuse programs or command lines matching this glob (repeatable; env "
        "BLOCKED_COMMANDS).",
    )(fn)
    return click.option(
        "--allow-command",
        "allowed_commands",
        type=TEXT,
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
    click.echo(f"dist-exec: {printable(message)}", err=True)
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


def iso_time(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def as_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def job_json(job: Job, command: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job.id,
        "status": job.status.value,
        "exit_code": job.exit_code,
        "output": as_text(job.stdout),
        "stderr": as_text(job.stderr),
        "error": job.error,
        "worker_id": job.worker_id or None,
        "priority": job.spec.priority,
        "task_type": job.spec.task_type,
        "created_at": iso_time(job.created_at),
        "started_at": iso_time(job.started_at),
        "completed_at": iso_time(job.completed_at),
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
                "started_at": iso_time(a.started_at),
                "ended_at": iso_time(a.ended_at),
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
        "last_seen": iso_time(node.last_seen_wall),
        "task_limits": asdict(node.task_limits) if node.task_limits.any else None,
    }


def printable(text: str) -> str:
    """Text for a terminal, control characters escaped: it may be another user's, and a
    newline in it must not make a row of its own, nor an escape sequence reach the terminal.
    (JSON output escapes them itself and keeps the text as it is.)"""
    return _CONTROL.sub(_escape, text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode()


def print_json(value: Any) -> None:
    _echo_in_pieces(json.dumps(value, indent=2) + "\n")


class JsonArrayPrinter:
    """Prints a JSON array an element at a time (as print_json prints the whole list): the
    elements need not all be held at once."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, value: Any) -> None:
        element = textwrap.indent(json.dumps(value, indent=2), "  ")
        _echo_in_pieces(("[\n" if self.count == 0 else ",\n") + element)
        self.count += 1

    def end(self) -> None:
        _echo_in_pieces("[]\n" if self.count == 0 else "\n]\n")


def _echo_in_pieces(text: str) -> None:
    """CPython 3.11 drops the rest of one large write once a part of it is written, so a
    reader that exits early (| head -c 10) would go unnoticed; the next piece fails."""
    for start in range(0, len(text), JSON_PIECE):
        click.echo(text[start : start + JSON_PIECE], nl=False)


def setup_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        fail(f"invalid log level {level!r}: use DEBUG, INFO, WARNING or ERROR", EXIT_USAGE)
    logging.basicConfig(
        level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def lost_output(exc: OSError) -> signal.Signals | None:
    """The signal that ``exc`` stands for when stdout or stderr is gone: its reader exited
    (EPIPE), or its terminal closed under a command that does not ignore SIGHUP (EIO). None for
    any other error, and for the same errors elsewhere (a socket, a failing disk)."""
    if exc.errno not in (errno.EPIPE, errno.EIO) or exc.filename is not None:
        return None
    if not any(_broken(fd) for fd in (1, 2)):
        return None
    if exc.errno == errno.EPIPE:
        return signal.SIGPIPE
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        return signal.SIGHUP
    return None


def _broken(fd: int) -> bool:
    """Whether ``fd`` is a pipe without a reader or a terminal that hung up."""
    poller = select.poll()
    try:
        poller.register(fd, select.POLLOUT)
    except (OSError, ValueError):  # closed
        return False
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
