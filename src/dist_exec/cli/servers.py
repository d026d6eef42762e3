"""The servers: ``dist-exec master``, ``dist-exec worker``, and the embedded local cluster
(``up``, ``down``)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click

from dist_exec.autoscaler.options import autoscaler_config, scaler_options
from dist_exec.cli.common import (
    ADDRESS,
    DURATION,
    EXIT_USAGE,
    KEY_VALUE,
    SIZE,
    TEXT,
    TIMEOUT,
    TOKEN,
    fail,
    policy_options,
    server_tls,
    setup_logging,
    tls_server_options,
)
from dist_exec.config import (
    DEFAULT_MASTER_ADDRESS,
    MAX_KEPT_OUTPUT,
    MIN_TIMEOUT_S,
    MasterConfig,
    WorkerConfig,
    check_bindable,
    default_data_dir,
    default_worker_id,
    format_duration,
    node_problem,
    parse_duration,
    parse_size,
)
from dist_exec.errors import DistExecError, InvalidTaskSpec
from dist_exec.executors.containment import Mode
from dist_exec.executors.limits import MAX_PROCS
from dist_exec.executors.limits import check as check_limits
from dist_exec.master.balancer import BALANCERS, DEFAULT_BALANCER
from dist_exec.models import (
    TaskLimits,
)
from dist_exec.security.credentials import (
    TOKEN_ENV,
    Credentials,
    CredentialsError,
)
from dist_exec.tuning import run_server, tune_gc

MIN_AUDIT_SIZE = 64 * 1024  # (a rotation every record or two would be an fsync storm)


def _caught(signum: int, frame: object) -> None:
    """Does nothing: see where it is installed."""


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
    except DistExecError as exc:  # it cannot start (its database, say): one line
        fail(exc.message)
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


@click.command()
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
    "--max-payload-memory",
    type=SIZE,
    default="1G",
    show_default=True,
    help="What the payloads (command, environment, stdin) of the jobs waiting or running may "
    "hold in the master's memory; more jobs are refused. One identity's: half of it.",
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
@click.option(
    "--default-timeout",
    type=TIMEOUT,
    envvar="DEFAULT_TIMEOUT",
    default="1h",
    show_default=True,
    help="A job that sets no --timeout is killed after this long (at most 7d).",
)
@click.option(
    "--job-retention",
    type=DURATION,
    envvar="JOB_RETENTION",
    default="7d",
    show_default=True,
    help="Ended jobs, with their output, are deleted this long after they end (0: never; a "
    "job with an idempotency key is kept at least a day, while its key is honoured).",
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
@click.option(
    "--audit-max-size",
    type=SIZE,
    default="100M",
    show_default=True,
    help="The audit log is rotated (to audit.log.1, .2, ...) before it grows past this (0: "
    "never, e.g. for logrotate's copytruncate).",
)
@click.option(
    "--audit-keep",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Rotated audit logs kept; the oldest beyond this is deleted.",
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
    max_payload_memory: int,
    priority_aging: float,
    allowed_commands: tuple[str, ...],
    blocked_commands: tuple[str, ...],
    allowed_env: tuple[str, ...],
    balancer: str,
    max_output: int,
    output_tail: int,
    default_timeout: float,
    job_retention: float,
    tokens_file: Path | None,
    audit_log: Path | None,
    audit_max_size: int,
    audit_keep: int,
    log_level: str,
) -> None:
    """Run the master: accepts jobs, tracks workers, dispatches."""
    from dist_exec.master.app import run_master
    from dist_exec.security.private_files import private_dir

    setup_logging(log_level)
    tls = server_tls(listen, "master")
    if heartbeat_interval <= 0 or heartbeat_timeout <= heartbeat_interval:
        fail("--heartbeat-timeout must be longer than --heartbeat-interval (> 0)", EXIT_USAGE)
    data_dir = data_dir or default_data_dir()
    try:
        private_dir(data_dir)  # the job database: payloads, environments, output
        probe = data_dir / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        fail(f"cannot use --data-dir {data_dir}: {exc.strerror or exc}", EXIT_USAGE)
    try:
        autoscaler = autoscaler_config(ctx)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    longest = MasterConfig(data_dir=data_dir).max_timeout_s
    if default_timeout > longest:
        fail(f"--default-timeout may be at most {format_duration(longest)}", EXIT_USAGE)
    if 0 < audit_max_size < MIN_AUDIT_SIZE:
        fail(
            f"--audit-max-size must be 0 (never rotate) or at least {MIN_AUDIT_SIZE >> 10}K",
            EXIT_USAGE,
        )
    if max_output + output_tail > MAX_KEPT_OUTPUT:
        fail(
            f"--max-output plus --output-tail may be at most {MAX_KEPT_OUTPUT >> 20}M (a "
            "job's status carries what is kept of its stdout and stderr in one gRPC message of "
            f"at most 64 MiB); got {(max_output + output_tail) / (1 << 20):g}M",
            EXIT_USAGE,
        )
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
        max_payload_memory=max_payload_memory,
        priority_aging_s=priority_aging,
        allowed_commands=_rules(allowed_commands, "ALLOWED_COMMANDS"),
        blocked_commands=_rules(blocked_commands, "BLOCKED_COMMANDS"),
        allowed_env=_rules(allowed_env, "ALLOWED_ENV"),
        balancer=balancer,
        max_output_bytes=max_output,
        output_tail_bytes=output_tail,
        default_timeout_s=default_timeout,
        job_retention_s=job_retention,
        tls=tls,
        tokens_file=tokens_file,
        audit_log=audit_log,
        audit_max_bytes=audit_max_size,
        audit_keep=audit_keep,
        autoscaler=autoscaler,
    )
    check_listen(listen)
    serve(lambda stop: run_master(config, stop, ready_line("master")))


def _rules(given: tuple[str, ...], env: str) -> tuple[str, ...]:
    """Command rules from the flags, else from a comma-separated environment variable."""
    if given:
        return given
    return tuple(r.strip() for r in os.environ.get(env, "").split(",") if r.strip())


def _one_user_option(run_as: str | None, run_as_pool: str | None) -> None:
    if run_as_pool is not None and run_as is not None:
        fail("--run-as-pool replaces --run-as: give one of them", EXIT_USAGE)


def worker_task_types(
    given: tuple[str, ...], allowed_commands: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """--task-type, else WORKER_TASK_TYPES; each an installed executor (else one line, exit 2).
    Empty: every installed one; but under an allow-list of commands, only commands: the list
    says what a job may do, and an HTTP request from the worker (its network, its loopback
    services) is not in it unless --task-type says so."""
    from dist_exec.executors import installed_executors

    names = _rules(given, "WORKER_TASK_TYPES")
    if not names and allowed_commands:
        names = ("command",)
    installed = installed_executors()
    unknown = [n for n in names if n not in installed]
    if unknown:
        fail(
            f"unknown task type {unknown[0]!r}; installed: {', '.join(sorted(installed))}",
            EXIT_USAGE,
        )
    return tuple(dict.fromkeys(names))


def _labels_from_env() -> list[tuple[str, str]]:
    raw = os.environ.get("WORKER_LABELS", "")
    return [KEY_VALUE.convert(item.strip(), None, None) for item in raw.split(",") if item.strip()]


def task_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """How a worker runs its tasks: labels, environment, limits, containment and user.
    ``worker`` takes them, and ``up`` passes them on to its workers (task_args)."""
    for option in reversed(_TASK_OPTIONS):
        fn = option(fn)
    return fn


HTTP_TIMEOUT, HTTP_MAX_BODY = "30s", "4M"  # (the HTTP executor's defaults)
_TASK_OPTIONS = [
    click.option(
        "--task-type",
        "task_types",
        type=TEXT,
        multiple=True,
        help="Task types this worker runs, repeatable: --task-type command (env "
        "WORKER_TASK_TYPES=command,http; default: every installed executor). Leave out http to "
        "refuse HTTP jobs, which the command policy does not cover.",
    ),
    click.option(
        "--label",
        "labels",
        type=KEY_VALUE,
        multiple=True,
        help="Node label, repeatable: --label zone=a (env WORKER_LABELS=zone=a,arch=x86).",
    ),
    click.option(
        "--inherit-env",
        is_flag=True,
        help="Pass this worker's whole environment to commands (default: PATH, HOME, "
        "LANG and a few more, plus what the job sets).",
    ),
    click.option(
        "--task-memory-limit",
        type=SIZE,
        default="0",
        help="Memory of each task (all its processes): the default and the most a job may ask "
        "for (0: none).",
    ),
    click.option(
        "--task-cpu-time-limit",
        type=DURATION,
        default="0",
        help="CPU time of each task (all its processes), default and ceiling (0: none).",
    ),
    click.option(
        "--task-max-procs",
        type=click.IntRange(0, MAX_PROCS),
        default=0,
        help="Processes (and threads) of each task at once, default and ceiling (0: none).",
    ),
    click.option(
        "--task-max-file-size",
        type=SIZE,
        default="0",
        help="Largest file a task may write, default and ceiling (0: none).",
    ),
    click.option(
        "--containment",
        type=click.Choice([m.value for m in Mode]),
        default=Mode.AUTO.value,
        show_default=True,
        help="How task limits are enforced: cgroups (v1 or v2, found at start-up), rlimits, or "
        "auto: cgroups when this host allows, else rlimits.",
    ),
    click.option(
        "--run-as-pool",
        type=TEXT,
        default=None,
        help="FIRST-LAST: run each task as a uid of its own from this range (root; uids no "
        "user has), so that jobs cannot read or signal each other; a task's processes are "
        "killed by uid when it ends. Instead of --run-as.",
    ),
    click.option(
        "--run-as",
        type=TEXT,
        default=None,
        help="User that commands run as (needs root). Default: 'nobody' when the worker runs as "
        "root, else the worker's own user; '--run-as root' keeps root.",
    ),
    click.option(
        "--http-timeout",
        type=DURATION,
        default=HTTP_TIMEOUT,
        show_default=True,
        help="How long an HTTP job's request may take unless the job sets its own "
        "(run --type http --timeout); the job's timeout applies too.",
    ),
    click.option(
        "--http-max-body",
        type=SIZE,
        default=HTTP_MAX_BODY,
        show_default=True,
        help="Most of an HTTP job's response body read; a longer one is cut (the job's "
        "error and metadata say so, and run exits 63).",
    ),
]


def task_args(
    task_types: tuple[str, ...],
    labels: tuple[tuple[str, str], ...],
    inherit_env: bool,
    task_memory_limit: int,
    task_cpu_time_limit: float,
    task_max_procs: int,
    task_max_file_size: int,
    containment: str,
    run_as_pool: str | None,
    run_as: str | None,
    http_timeout: float,
    http_max_body: int,
) -> list[str]:
    """The task options as command-line arguments (those that differ from the defaults)."""
    args = [a for name in task_types for a in ("--task-type", name)]
    args += [a for key, value in labels for a in ("--label", f"{key}={value}")]
    if inherit_env:
        args.append("--inherit-env")
    for flag, limit in (
        ("--task-memory-limit", task_memory_limit),
        ("--task-cpu-time-limit", task_cpu_time_limit),
        ("--task-max-procs", task_max_procs),
        ("--task-max-file-size", task_max_file_size),
    ):
        if limit:
            args += [flag, f"{limit:.9f}".rstrip("0").rstrip(".")]  # (no exponent)
    if containment != Mode.AUTO.value:
        args += ["--containment", containment]
    if run_as is not None:
        args += ["--run-as", run_as]
    if run_as_pool is not None:
        args += ["--run-as-pool", run_as_pool]
    if http_timeout != parse_duration(HTTP_TIMEOUT):
        args += ["--http-timeout", f"{http_timeout:.9f}".rstrip("0").rstrip(".") + "s"]
    if http_max_body != parse_size(HTTP_MAX_BODY):
        args += ["--http-max-body", str(http_max_body)]
    return args


def check_http_options(timeout_s: float, max_body_bytes: int) -> None:
    """--http-timeout and --http-max-body as the HTTP executor takes them, else one line."""
    from dist_exec.executors.http import MAX_TIMEOUT_S

    if not MIN_TIMEOUT_S <= timeout_s <= MAX_TIMEOUT_S:
        fail(f"--http-timeout must be at least 1ms and at most {format_duration(MAX_TIMEOUT_S)}",
             EXIT_USAGE)  # fmt: skip
    if max_body_bytes <= 0:
        fail("--http-max-body must be more than 0", EXIT_USAGE)


def task_limits(memory: int, cpu_time: float, max_procs: int, max_file_size: int) -> TaskLimits:
    """The --task-* limits, as a worker takes them; bad ones end the command in one line."""
    limits = TaskLimits(memory, cpu_time, max_procs, max_file_size)
    try:
        check_limits(limits)
    except InvalidTaskSpec as exc:
        fail(f"worker task limits: {exc.message}", EXIT_USAGE)
    return limits


def policy_args(
    allowed_commands: tuple[str, ...],
    blocked_commands: tuple[str, ...],
    allowed_env: tuple[str, ...] = (),
) -> list[str]:
    """--allow-command, --block-command and --allow-env as command-line arguments."""
    return [
        *(a for rule in allowed_commands for a in ("--allow-command", rule)),
        *(a for rule in blocked_commands for a in ("--block-command", rule)),
        *(a for rule in allowed_env for a in ("--allow-env", rule)),
    ]


@click.command()
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
    type=TEXT,
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
@tls_server_options
@click.option(
    "--token",
    type=TOKEN,
    envvar=TOKEN_ENV,
    default="",
    help="A worker-role token, for a master that authenticates by tokens without TLS "
    f"(env {TOKEN_ENV}).",
)
@click.option(
    "--call-token",
    type=TOKEN,
    envvar="DIST_EXEC_CALL_TOKEN",
    default="",
    help="What a caller of this worker must send as its bearer token when the worker has no "
    "TLS; the worker gives it to the master when it registers (default: a new random one at "
    "each start). Only for calling a worker directly (env DIST_EXEC_CALL_TOKEN).",
)
@click.option(
    "--max-output",
    type=SIZE,
    default="4M",
    show_default=True,
    help="Output held in memory per task and stream; the rest is streamed, not kept.",
)
@task_options
@click.option("--log-level", envvar="LOG_LEVEL", default="INFO", show_default=True)
def worker(
    master_address: str,
    listen: str,
    advertise: str | None,
    worker_id: str | None,
    max_concurrent_tasks: int,
    allowed_commands: tuple[str, ...],
    blocked_commands: tuple[str, ...],
    allowed_env: tuple[str, ...],
    weight: int,
    task_types: tuple[str, ...],
    labels: tuple[tuple[str, str], ...],
    heartbeat_interval: float,
    drain_timeout: float,
    inherit_env: bool,
    max_output: int,
    token: str,
    call_token: str,
    task_memory_limit: int,
    task_cpu_time_limit: float,
    task_max_procs: int,
    task_max_file_size: int,
    containment: str,
    run_as_pool: str | None,
    run_as: str | None,
    http_timeout: float,
    http_max_body: int,
    log_level: str,
) -> None:
    """Run a worker: registers with the master and runs the tasks it is sent."""
    from dist_exec.executors.containment import ContainmentError
    from dist_exec.worker.app import WorkerReplaced, run_worker

    setup_logging(log_level)
    _one_user_option(run_as, run_as_pool)
    check_http_options(http_timeout, http_max_body)
    tls = server_tls(listen, "worker")
    allowed = _rules(allowed_commands, "ALLOWED_COMMANDS")
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
        allowed_commands=allowed,
        blocked_commands=_rules(blocked_commands, "BLOCKED_COMMANDS"),
        allowed_env=_rules(allowed_env, "ALLOWED_ENV"),
        weight=weight,
        task_types=worker_task_types(task_types, allowed),
        labels=all_labels,
        heartbeat_interval_s=heartbeat_interval,
        drain_timeout_s=drain_timeout,
        inherit_env=inherit_env,
        max_output_bytes=max_output,
        tls=tls,
        token=token,
        call_token=call_token,
        task_limits=task_limits(
            task_memory_limit, task_cpu_time_limit, task_max_procs, task_max_file_size
        ),
        containment=containment,
        run_as=run_as,
        run_as_pool=run_as_pool or "",
        http_timeout_s=http_timeout,
        http_max_body_bytes=http_max_body,
    )
    check_listen(listen)
    if problem := node_problem(
        config.worker_id,
        advertise or "127.0.0.1:1",  # (else the address is known once it listens)
        config.task_types,
        config.labels,
        config.max_concurrent_tasks,
        config.weight,
    ):
        fail(f"the master would refuse this worker: {problem}", EXIT_USAGE)
    if config.allowed_commands and not _rules(task_types, "WORKER_TASK_TYPES"):
        logging.getLogger("dist_exec.worker").warning(
            "an allow-list of commands is set: this worker runs command jobs only, not HTTP "
            "requests (--task-type command --task-type http to run both)"
        )
    try:
        Credentials(tls.ca if tls else None, token=token).check_target(master_address)
    except CredentialsError as exc:
        fail(f"--token: {exc}", EXIT_USAGE)
    # A worker started ignoring SIGHUP or SIGQUIT (nohup, a background job of a script) goes
    # on doing so, but catches them instead: an ignored signal stays ignored in what a process
    # starts, and its commands are to start as from a terminal; a caught one is reset at exec.
    for sig in (signal.SIGHUP, signal.SIGQUIT):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, _caught)
    try:
        serve(lambda stop: run_worker(config, stop, ready_line(f"worker {config.worker_id}")))
    except (ContainmentError, WorkerReplaced) as exc:
        fail(str(exc))


# ---- embedded local cluster -----------------------------------------------------------------


@click.command()
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
@policy_options
@task_options
def up(
    worker_count: int,
    listen: str,
    data_dir: Path | None,
    max_concurrent_tasks: int,
    autoscale: bool,
    min_workers: int,
    max_workers: int,
    detach: bool,
    allowed_commands: tuple[str, ...],
    blocked_commands: tuple[str, ...],
    allowed_env: tuple[str, ...],
    **task: Any,
) -> None:
    """Start a master and N workers on this machine (127.0.0.1 only by default). The command
    policy goes to the master and the workers, the task options to every worker."""
    from dist_exec import cluster
    from dist_exec.executors.containment import ContainmentError, parse_uid_pool, resolve_run_as

    if autoscale and min_workers > max_workers:
        fail(f"--min-workers ({min_workers}) is above --max-workers ({max_workers})", EXIT_USAGE)
    # What a worker would refuse at start-up, refused here in one line.
    task_limits(
        task["task_memory_limit"],
        task["task_cpu_time_limit"],
        task["task_max_procs"],
        task["task_max_file_size"],
    )
    worker_task_types(task["task_types"])  # an unknown one refused here, in one line
    check_http_options(task["http_timeout"], task["http_max_body"])
    try:
        _one_user_option(task["run_as"], task["run_as_pool"])
        if task["run_as_pool"] is not None:
            pool = parse_uid_pool(task["run_as_pool"])
            if autoscale:
                raise ContainmentError(
                    "--run-as-pool does not go with --autoscale: each worker needs a range of "
                    "its own; start workers yourself, each with its own --run-as-pool"
                )
            # (at least 2 each: a pool of one uid is run as --run-as is, and the workers'
            # tasks would not be kept from each other)
            share = max(max_concurrent_tasks, 2)
            if len(pool) // worker_count < share:
                raise ContainmentError(
                    f"--run-as-pool {task['run_as_pool']}: {len(pool)} uids for {worker_count} "
                    f"workers of {max_concurrent_tasks} tasks; each worker gets a range of its "
                    f"own (at least 2), so it needs at least {worker_count * share}"
                )
        run_as = resolve_run_as(task["run_as"])
    except ContainmentError as exc:
        fail(str(exc), EXIT_USAGE)
    directory = data_dir or default_data_dir()
    options = cluster.ClusterOptions(
        directory,
        listen,
        worker_count,
        max_concurrent_tasks,
        (min_workers, max_workers) if autoscale else None,
        tuple(policy_args(allowed_commands, blocked_commands, allowed_env)),
        tuple(task_args(**{**task, "run_as_pool": None})),  # (shared out: pool_args)
        task["run_as_pool"] or "",
    )
    workers = f"{min_workers}-{max_workers} autoscaled" if autoscale else str(worker_count)
    workers += " workers"
    if task["run_as_pool"] is not None:
        workers += f" (each task as a uid of its own, {task['run_as_pool']})"
    elif run_as is not None and task["run_as"] is None:  # a root 'up' runs commands as nobody
        workers += f" (commands run as {run_as.name}; --run-as USER to change)"
    try:
        if detach:
            address = cluster.start_background(options)
            click.echo(f"dist-exec cluster up: master at {address}, {workers}")
            click.echo(f"stop it with: dist-exec down --data-dir {directory}")
            return
        cluster.run_foreground(
            options,
            on_ready=lambda address: click.echo(
                f"dist-exec cluster up: master at {address}, {workers}; Ctrl-C stops it",
            ),
        )
    except cluster.ClusterError as exc:
        fail(str(exc))


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def down(data_dir: Path | None) -> None:
    """Stop a cluster started with 'up -d'."""
    from dist_exec import cluster

    try:
        stopped = cluster.stop_background(data_dir or default_data_dir())
    except cluster.ClusterError as exc:
        fail(str(exc))
    click.echo("dist-exec cluster stopped" if stopped else "no cluster was running")
