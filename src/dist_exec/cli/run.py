"""``dist-exec run``: submit a job (or one per node), stream its output, and end as the command
did; signals and a lost output stop the job first (see interrupts.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import Any, BinaryIO

import click
import grpc

from dist_exec.cli.common import (
    DURATION,
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_HTTP_ERROR,
    EXIT_HTTP_TRUNCATED,
    EXIT_NOT_RUN,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    KEY_VALUE,
    SIZE,
    TEXT,
    TIMEOUT,
    T,
    connect,
    fail,
    job_json,
    json_option,
    lost_output,
    master_option,
    print_json,
    printable,
    run_client,
)
from dist_exec.client import Client, command_spec
from dist_exec.client._client import STREAM_RETRY_S
from dist_exec.config import MAX_PAYLOAD_BYTES
from dist_exec.errors import (
    DistExecError,
    InvalidTaskSpec,
    JobAlreadyFinished,
)
from dist_exec.executors.http import MAX_TIMEOUT_S as HTTP_MAX_TIMEOUT_S
from dist_exec.executors.http import HttpSpec
from dist_exec.executors.limits import LIMIT_METADATA_KEY, MAX_PROCS, format_size
from dist_exec.interrupts import Interrupted, Interrupts, die_of
from dist_exec.models import (
    Job,
    JobId,
    JobStatus,
    OutputChunk,
    Stream,
    TaskLimits,
    TaskSpec,
)
from dist_exec.wire import STOP_SIGNAL_TO_PB

_END = "\0--"  # '--' in a trial parse, told apart from the real one (no argument holds NUL)


class RunCommand(click.Command):
    """Remembers whether the command came after '--' (argv, no shell) or not (a shell string).
    Only a '--' that ends the options counts, not an option's value (--idempotency-key --)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        words_before = self._ends_options(ctx, args)
        ctx.meta["argv_mode"] = words_before is not None
        rest = super().parse_args(ctx, args)
        if words_before:  # (`run ls -- -d /`: that '--' is the command's own, as run locally)
            command = ctx.params["command"]
            ctx.params["command"] = (*command[:words_before], "--", *command[words_before:])
        return rest

    def _ends_options(self, ctx: click.Context, args: list[str]) -> int | None:
        """How many of COMMAND's words come before the '--' in ``args`` that click's own
        parser takes as the end of the options (None: there is none): parsed up to each in
        turn, it is one of COMMAND's words, not an option's value."""
        marked = [_END if arg == "--" else arg for arg in args]
        for end, arg in enumerate(args):
            if arg != "--":
                continue
            try:
                values, _, _ = self.make_parser(ctx).parse_args(marked[: end + 1])
            except click.UsageError:
                return None  # (the real parse says what is wrong)
            command = values.get("command")  # (click's sentinel when there is none)
            if isinstance(command, tuple | list) and _END in command:
                return list(command).index(_END)
        return None


class InputFile(click.File):
    """A file to read; '-' is standard input, which must be open (`<&-` closes it)."""

    def __init__(self) -> None:
        super().__init__("rb")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "-" and sys.stdin is None:
            self.fail("standard input is closed: there is nothing to read", param, ctx)
        return super().convert(value, param, ctx)


@click.command(cls=RunCommand, context_settings={"ignore_unknown_options": False})
@click.argument("command", nargs=-1, type=TEXT)
@master_option
@click.option(
    "--type",
    "task_type",
    type=click.Choice(["command", "http"]),
    default="command",
    show_default=True,
    help="command: run COMMAND; http: request --url.",
)
@click.option("--url", type=TEXT, default=None, help="(--type http) The URL to request.")
@click.option("--method", type=TEXT, default="GET", show_default=True, help="(--type http)")
@click.option("--header", "headers", type=KEY_VALUE, multiple=True, help="(--type http) NAME=VALUE")
@click.option("--data", type=TEXT, default="", help="(--type http) Request body.")
@click.option(
    "--selector",
    type=KEY_VALUE,
    multiple=True,
    help="Run only on nodes with this label, repeatable: --selector zone=a.",
)
@click.option(
    "--timeout",
    type=TIMEOUT,
    default=None,
    help="Kill the command after this long: 500ms, 30s, 5m, 1h (default: the master's "
    "--default-timeout, 1h unless set).",
)
@click.option(
    "--priority",
    type=click.IntRange(0, 10),
    default=0,
    show_default=True,
    help="0-10, higher runs first.",
)
@click.option("--env", "env", type=KEY_VALUE, multiple=True, help="KEY=VALUE for the command.")
@click.option(
    "--cwd",
    type=TEXT,
    default="",
    help="Absolute working directory on the worker (default: the home of the user commands run "
    "as, or the worker's own directory when it runs them as itself).",
)
@click.option(
    "--stdin",
    "stdin_file",
    type=InputFile(),
    default=None,
    help=f"Feed this file ('-' for standard input) to the command, byte for byte (at most "
    f"{format_size(MAX_PAYLOAD_BYTES)} with the rest of the job).",
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
    type=TIMEOUT,
    default=None,
    help="Fail the job if it waits longer than this in the queue to start.",
)
@click.option(
    "--idempotency-key",
    type=TEXT,
    default="",
    help="Submitting again with this key (within 24h) gives the same job instead of a new one "
    "(not with --all).",
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
@click.option(
    "--detach",
    "-d",
    is_flag=True,
    help="Print the job id (with --json: the job, as 'status --json' does) and return at once.",
)
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
    stdin_file: BinaryIO | None,
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
    if broadcast and idempotency_key:
        fail(
            "--idempotency-key does not go with --all: a broadcast's jobs (one per node) cannot "
            "share a key; look for them (dist-exec list) before sending it again",
            EXIT_USAGE,
        )
    if task_type == "http":
        if not url or command:
            fail("--type http takes --url URL and no command", EXIT_USAGE)
        names = [name.lower() for name, _ in headers]
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            fail(f"--header {twice} is given twice (header names ignore case)", EXIT_USAGE)
        # --timeout bounds the request itself too (else the worker's --http-timeout does).
        request_s = None if timeout is None else min(timeout, HTTP_MAX_TIMEOUT_S)
        body = HttpSpec(url, method, dict(headers), data, request_s).to_payload()
        spec = TaskSpec("http", body, timeout or 0.0, priority, max_retries=max_retries)
    else:
        if not command:
            fail("Missing argument 'COMMAND...': what to run", EXIT_USAGE)
        if url or headers or data:
            fail("--url, --header and --data go with --type http", EXIT_USAGE)
        argv_mode = bool(ctx.meta.get("argv_mode"))
        try:
            spec = command_spec(
                list(command) if argv_mode else " ".join(command),
                shell=not argv_mode,
                timeout_s=timeout or 0.0,
                priority=priority,
                env=dict(env),
                working_dir=cwd,
                stdin=_read_stdin(stdin_file) if stdin_file is not None else b"",
                max_retries=max_retries,
            )
        except InvalidTaskSpec as exc:  # (`run ""`)
            fail(exc.message, EXIT_USAGE)
    if len(spec.payload) > MAX_PAYLOAD_BYTES:
        fail(
            f"the job is {len(spec.payload)} bytes as sent (its command, environment and input; "
            "--stdin in base64, 4/3 of its size, when that is smaller than as text), over the "
            f"{format_size(MAX_PAYLOAD_BYTES)} a master accepts",
            EXIT_NOT_RUN,
        )
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


def _read_stdin(source: BinaryIO) -> bytes:
    """What --stdin gives, refused before the job is sent (or all of it read) when larger
    than a job can be."""
    data = source.read(MAX_PAYLOAD_BYTES + 1)
    if len(data) > MAX_PAYLOAD_BYTES:
        fail(
            f"--stdin is more than {format_size(MAX_PAYLOAD_BYTES)}, the most a master accepts "
            "for a whole job (its command, environment and stdin)",
            EXIT_NOT_RUN,
        )
    return data


class _Prefixer:
    """Writes each node's output line by line, each line prefixed with the node id. A line
    is held until it ends (the nodes' lines do not mix), up to MAX_LINE: longer, it is
    written in pieces of that size, each on a prefixed line of its own."""

    MAX_LINE = 1024 * 1024

    def __init__(self, width: int) -> None:
        self.width = width
        self.partial: dict[tuple[str, Stream], bytearray] = {}

    def write(self, node: str, stream: Stream, data: bytes) -> None:
        # The unfinished line grows in place (joined to each chunk, it was copied again each
        # time: a long line without a newline took quadratic time).
        *lines, rest = data.split(b"\n")
        key = (node, stream)
        held = self.partial.pop(key, None)
        if held is not None and lines:
            held += lines[0]
            lines[0] = bytes(held)
            held = None
        if rest:
            if held is None:
                held = bytearray()
            held += rest
        if held is not None:
            while len(held) > self.MAX_LINE:
                lines.append(bytes(held[: self.MAX_LINE]))
                del held[: self.MAX_LINE]
            self.partial[key] = held
        if not lines:
            return
        out = sys.stdout.buffer if stream == Stream.STDOUT else sys.stderr.buffer
        prefix = f"[{node:<{self.width}}] ".encode()
        for line in lines:
            out.write(prefix + line + b"\n")
        out.flush()

    def flush(self, node: str) -> None:
        for stream in Stream:
            rest = self.partial.pop((node, stream), None)
            if rest:
                self.write(node, stream, bytes(rest) + b"\n")


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
                await _print_broadcast(client, broadcast_id, [j for j, _ in tasks], as_json)
                return 0
            node_of: dict[str, str] = dict(tasks)
            finals: dict[str, Job] = {}
            stop: Ending | None = interrupts.received[0] if interrupts.received else None
            watch: asyncio.Future[None] | None = None
            if stop is None:
                prefixer = _Prefixer(max(len(n) for n in node_of.values()))
                # (as for one job: a signal stops the waiting, not the following)
                watch = asyncio.ensure_future(
                    _watch_broadcast(client, list(node_of), node_of, prefixer, finals, as_json)
                )
                _, stop = await _follow(interrupts, asyncio.shield(watch))
            try:
                if stop is not None and len(finals) < len(node_of):
                    stopped = await _stop(
                        client, [j for j in node_of if j not in finals], interrupts, stop
                    )
                    if stopped is None:
                        return _gave_up(interrupts, "the master goes on cancelling the jobs")
                    if watch is not None:
                        await _trailing_output(watch, interrupts)
                    finals |= {j: job for j, job in stopped.items() if j not in finals}
            finally:
                if watch is not None:
                    watch.cancel()
                    await asyncio.gather(watch, return_exceptions=True)
            if not any(finals[j].status == JobStatus.CANCELLED for j in finals):
                stop = None  # every job had ended by itself
        try:
            failed = await _report_broadcast(client, broadcast_id, node_of, finals, as_json)
        except OSError:
            if stop is None:
                raise  # (the command group ends by the lost output's signal, or says what)
            return stop  # (the signal that stopped the jobs may have closed the output too)
        if stop is not None:
            return stop
        return EXIT_ERROR if failed else 0


async def _print_broadcast(
    client: Client, broadcast_id: str, job_ids: list[str], as_json: bool
) -> None:
    """A detached broadcast's id, or with --json its jobs as 'status --json' shows them."""
    if as_json:
        jobs = [job_json(await client.get(job_id)) for job_id in job_ids]
        print_json({"broadcast_id": broadcast_id, "jobs": jobs})
    else:
        click.echo(broadcast_id)


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
        lost = lost_output(exc)
        if lost is not None:
            return None, lost
        # A full disk, or a terminal gone under a run that ignores SIGHUP (nohup): the job is
        # not the command's to stop.
        raise DistExecError(
            f"cannot write the output ({exc.strerror}); the job goes on: see 'dist-exec list'"
        ) from None


async def _stop(
    client: Client, job_ids: list[str], interrupts: Interrupts, why: Ending
) -> dict[str, Job] | None:
    """Cancel the jobs, all at once; each as it ended, or None when a further Ctrl-C stopped
    waiting for the master's confirmation (the master carries a cancel out all the same).
    The commands get the signal that stopped ``run`` (``why``), as a terminal gives its
    foreground commands Ctrl-C's INT; TERM for a lost reader's PIPE."""
    sig = why if isinstance(why, signal.Signals) and why in STOP_SIGNAL_TO_PB else None
    cancels = asyncio.gather(*(_cancel(client, j, sig) for j in job_ids), return_exceptions=True)
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


async def _cancel(client: Client, job_id: str, sig: signal.Signals | None) -> Job:
    """Cancel the job unless it has ended; returns it as it ended. The master answers once the
    worker confirmed the end, or after a while without that (a stuck worker): then this waits
    for the end the master goes on working towards."""
    told, since = False, time.monotonic()
    while True:
        try:
            with contextlib.suppress(JobAlreadyFinished):
                await client.cancel(job_id, sig)
            break
        except DistExecError as exc:
            if exc.code not in _TRY_CANCEL_AGAIN:
                raise
            if time.monotonic() - since > CANCEL_RETRY_LIMIT_S:  # (gone for good, it seems)
                exc.message += f"; job {job_id} may still run: see 'dist-exec status {job_id}'"
                raise
            if not told:
                _tell(
                    f"cannot cancel job {job_id} yet: {exc.message}; trying again until the "
                    f"master answers, for up to {CANCEL_RETRY_LIMIT_S:.0f}s (Ctrl-C again to "
                    "stop waiting: the job may then still run)"
                )
                told = True
            await asyncio.sleep(CANCEL_RETRY_S)
    job = await client.get(job_id)
    if not job.status.terminal:
        _tell(
            f"job {job_id} is still {job.status.value}: its worker has not confirmed the cancel "
            "yet; waiting for its end (Ctrl-C again to stop waiting)"
        )
        job = await client.wait(job_id)
    return job


# A master restarting, stalled, or unable to write its database for now: the cancel is tried
# again (every CANCEL_RETRY_S) until it answers, or a further Ctrl-C stops waiting.
_TRY_CANCEL_AGAIN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
CANCEL_RETRY_S = 1.0
# As long as a follow waits out an outage (one stopped by SIGTERM or a closed pipe has nobody
# to press Ctrl-C).
CANCEL_RETRY_LIMIT_S = STREAM_RETRY_S


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
        cancelled = sum(finals[j].status == JobStatus.CANCELLED for j in failed)
        click.echo(
            f"dist-exec: broadcast {broadcast_id} on {len(node_of)} node(s): "
            f"{len(node_of) - len(failed)} succeeded, {len(failed) - cancelled} failed"
            + (f", {cancelled} cancelled" if cancelled else ""),
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
            return await _submit_detached(client, spec, as_json)
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
                printer = OutputPrinter(threaded=True)
                stop: Ending | None = interrupts.received[0] if interrupts.received else None
                following: asyncio.Future[Job] | None = None
                if stop is None:
                    # A signal stops the waiting, not the following: what the command prints
                    # while it stops (a trap's cleanup) is printed, as it would be locally.
                    following = asyncio.ensure_future(_stream(events, job_id, as_json, printer))
                    waiting = asyncio.create_task(_say_if_waiting(client, job_id, printer))
                    try:
                        job, stop = await _follow(interrupts, asyncio.shield(following))
                    except DistExecError as exc:  # (not the job's fault: it was accepted)
                        exc.message += (
                            f"; job {job_id} was accepted and may still run: see "
                            f"'dist-exec status {job_id}'"
                        )
                        raise
                    finally:
                        waiting.cancel()
                if stop is not None:
                    try:
                        stopped = await _stop(client, [job_id], interrupts, stop)
                        if stopped is None:
                            return _gave_up(
                                interrupts,
                                f"job {job_id} is cancelled if the cancel reached the master",
                            )
                        job = stopped[job_id]
                        if following is not None:
                            await _trailing_output(following, interrupts)
                    finally:
                        if following is not None:  # (ended before the stream is closed)
                            following.cancel()
                            await asyncio.gather(following, return_exceptions=True)
        assert job is not None
        if as_json:
            report = job_json(await client.get(job_id))
            try:
                print_json(report)
            except OSError:
                if stop is None or job.status != JobStatus.CANCELLED:
                    raise  # (the command group ends by the lost output's signal, or says what)
                return stop  # (the signal that stopped the job may have closed its output)
        code = _exit_code(job, as_json, printer)
        await _last_words(printer, stop is None)
        return stop if stop is not None and job.status == JobStatus.CANCELLED else code


async def _trailing_output(following: asyncio.Future[Any], interrupts: Interrupts) -> None:
    """Once the cancelled job has ended, the rest of what it printed, which the follow gets
    before the job's end: for at most LAST_WORDS_S (a reader that does not read, a master
    gone), or until a further Ctrl-C. Its failures are not the run's: the job has ended."""
    with contextlib.suppress(Interrupted, TimeoutError, DistExecError, OSError):
        async with asyncio.timeout(LAST_WORDS_S):
            await interrupts.step(asyncio.shield(following), patient=True)
    if following.done() and not following.cancelled():
        following.exception()  # (retrieved: it is not the run's to report)


async def _last_words(printer: OutputPrinter, whole: bool) -> None:
    """What waits to be written is written before the command ends; after a signal (``not
    whole``), a reader that does not read gets a moment, not more."""
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(None if whole else LAST_WORDS_S):
            await printer.flush()


PENDING_NOTICE_S = 3.0  # a run whose job has not started by then says why it waits
LAST_WORDS_S = 1.0  # what a stopped run still prints: its job's last output, its buffers


async def _say_if_waiting(client: Client, job_id: str, printer: OutputPrinter) -> None:
    """One line on stderr when the job is still waiting after PENDING_NOTICE_S, with the
    master's reason (no worker with its labels, all full, ...): a run stayed silent."""
    await asyncio.sleep(PENDING_NOTICE_S)
    with contextlib.suppress(DistExecError):
        job = await client.get(job_id)
        if job.status == JobStatus.PENDING and not printer.mid_line:
            reason = job.pending_reason or "no worker has taken it yet"
            _tell(f"job {job_id} is waiting: {reason} (Ctrl-C cancels it)")


async def _submit_detached(client: Client, spec: TaskSpec, as_json: bool) -> Ending:
    with Interrupts() as interrupts:
        try:
            job_id = await interrupts.step(client.submit(spec), patient=True, on_hold=_hold_message)
        except Interrupted:
            return _gave_up(interrupts, "if it accepted the job, it runs")
        if not interrupts.received:
            await _print_submitted(client, job_id, as_json)
            return 0
        # A signal while it was submitted: the job is not wanted after all.
        stopped = await _stop(client, [job_id], interrupts, interrupts.received[0])
        if stopped is None:
            return _gave_up(
                interrupts, f"job {job_id} is cancelled if the cancel reached the master"
            )
    if stopped[job_id].status != JobStatus.CANCELLED:  # it had ended by itself
        await _print_submitted(client, job_id, as_json)
        return 0
    _tell(f"job {job_id} was cancelled")
    return interrupts.received[0]


async def _print_submitted(client: Client, job_id: str, as_json: bool) -> None:
    """The job id, or with --json the job as 'status --json' shows it."""
    if as_json:
        print_json(job_json(await client.get(job_id)))
    else:
        click.echo(job_id)


async def _stream(
    events: AsyncIterator[JobId | tuple[int, OutputChunk] | Job],
    job_id: str,
    quiet: bool,
    printer: OutputPrinter,
) -> Job:
    """Print the job's output as it comes; returns the ended job."""
    last_attempt = 0
    async for item in events:
        if isinstance(item, str):
            continue
        if isinstance(item, Job):
            await printer.flush()  # (its errors are the following's, as a write's)
            return item
        attempt, chunk = item
        if last_attempt and attempt != last_attempt:
            printer.next_attempt()
            if not quiet:
                printer.note(f"job {job_id} is being retried (attempt {attempt})")
        last_attempt = attempt
        if not quiet:
            await printer.send(chunk)
    raise AssertionError("watch() always ends with the job")


class _Output:
    """Writes to stdout or stderr (``out``) in a thread of its own: a reader that stops
    reading (a full pipe, a terminal paused with Ctrl-S) blocks that thread, not the event
    loop, which must go on taking signals (Ctrl-C cancels the job), nor the other stream (the
    notes on stderr). At most QUEUED_BYTES wait for it: beyond, ``put`` waits (and the master
    holds the job's output back)."""

    QUEUED_BYTES = 1024 * 1024

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._queued = 0
        self._room = asyncio.Event()
        self._room.set()
        self._empty = asyncio.Event()
        self._empty.set()
        self._error: OSError | None = None
        # A daemon: one blocked in a write for good must not keep the process from exiting.
        threading.Thread(target=self._serve, name="dist-exec-output", daemon=True).start()

    def put_nowait(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self.out.flush()  # (anything of this process's own written before it goes first)
        self._queued += len(data)
        self._empty.clear()
        if self._queued > self.QUEUED_BYTES:
            self._room.clear()
        self._queue.put(data)

    async def put(self, data: bytes) -> None:
        self.put_nowait(data)
        await self._room.wait()
        if self._error is not None:
            raise self._error

    async def flush(self) -> None:
        """Until what was put is written (or its writing failed: raises why)."""
        await self._empty.wait()
        if self._error is not None:
            raise self._error

    def _serve(self) -> None:
        fd = self.out.fileno()
        while True:
            data = self._queue.get()
            error = None
            if self._error is None:
                try:
                    # To the file descriptor: a write blocked for good then holds no lock of
                    # the Python file's, which the exit flushes (die_of), and would wait for.
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                except OSError as exc:
                    error = exc
            try:
                self._loop.call_soon_threadsafe(self._written, len(data), error)
            except RuntimeError:  # the loop has closed: the command is ending, nobody waits
                return

    def _written(self, size: int, error: OSError | None) -> None:
        if error is not None and self._error is None:
            self._error = error
        self._queued -= size
        if self._queued <= self.QUEUED_BYTES or self._error is not None:
            self._room.set()
        if not self._queued:
            self._empty.set()


class OutputPrinter:
    """Writes a job's output to stdout and stderr, saying where bytes were not kept (the
    middle of a stream longer than the master keeps). Its notes on stderr start on a line of
    their own, also after a command's stderr that does not end with a newline. ``output``:
    written through it (``send``, and notes), not in the caller's thread (``write``)."""

    def __init__(self, threaded: bool = False) -> None:
        self.ends = dict.fromkeys(Stream, 0)
        self.mid_line = False  # the stderr printed last does not end with a newline
        self.lost = 0  # bytes of this attempt's output that were not printed
        self.outputs = (
            {Stream.STDOUT: _Output(sys.stdout.buffer), Stream.STDERR: _Output(sys.stderr.buffer)}
            if threaded
            else None
        )

    def next_attempt(self) -> None:
        """The output of a retry follows: its offsets start again."""
        self.ends = dict.fromkeys(Stream, 0)
        self.lost = 0

    def write(self, chunk: OutputChunk) -> None:
        out = self._place(chunk)
        out.write(chunk.data)
        out.flush()

    async def send(self, chunk: OutputChunk) -> None:
        """``write`` through ``outputs``."""
        assert self.outputs is not None
        self._place(chunk)
        await self.outputs[chunk.stream].put(chunk.data)

    async def flush(self) -> None:
        """Until what was sent is written (or its writing failed: raises why)."""
        if self.outputs is not None:
            for output in self.outputs.values():
                await output.flush()

    def _place(self, chunk: OutputChunk) -> BinaryIO:
        """Where the chunk goes, after the note of a gap before it, if any."""
        out = sys.stdout.buffer if chunk.stream == Stream.STDOUT else sys.stderr.buffer
        gap = chunk.offset - self.ends[chunk.stream]
        if gap > 0:
            if self.outputs is None:
                out.flush()
            self.lost += gap
            self.note(f"[{gap} bytes of {chunk.stream.name.lower()} not kept]")
        self.ends[chunk.stream] = chunk.offset + len(chunk.data)
        if chunk.stream == Stream.STDERR and chunk.data:
            self.mid_line = not chunk.data.endswith(b"\n")
        return out

    def note(self, message: str) -> None:
        """One line of dist-exec's own on stderr."""
        start = "\n" if self.mid_line else ""
        line = f"{start}dist-exec: {printable(message)}"
        self.mid_line = False
        if self.outputs is None:
            click.echo(line, err=True)
        else:  # (after the stderr that waits to be written before it)
            self.outputs[Stream.STDERR].put_nowait(f"{line}\n".encode(errors="replace"))


def _exit_code(job: Job, quiet: bool, printer: OutputPrinter) -> int:
    def say(message: str) -> None:
        if not quiet:
            with contextlib.suppress(OSError):  # (as _tell)
                printer.note(message)

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
            if job.result_metadata.get("truncated") == "true":  # (not all of it was printed)
                say(job.error)
                return EXIT_HTTP_TRUNCATED
            return 0
        say(job.error or f"HTTP {job.exit_code}")
        return EXIT_HTTP_ERROR
    # Why it did not start, or what killed it: a local shell would say so too. An exit code
    # of the command's own (exit 255) is as quiet as it is locally.
    own_exit = job.error == f"command exited with status {job.exit_code}"
    if job.error and (
        (job.exit_code >= 126 and not own_exit) or LIMIT_METADATA_KEY in job.result_metadata
    ):
        say(job.error)
    lost = printer.lost + sum(
        max(0, total - printer.ends[stream])
        for stream, total in ((Stream.STDOUT, job.stdout_bytes), (Stream.STDERR, job.stderr_bytes))
    )
    if lost and job.exit_code == 0 and not quiet:
        # Not as if run locally: a script must not take part of the output for all of it.
        say(
            f"{lost} bytes of job {job.id}'s output did not reach this terminal (the master "
            "keeps only the start and the end of a stream: what it could not pass on live, to "
            "a reader too far behind or across a restart of the master, is gone); the command "
            f"exited 0, run exits {EXIT_NOT_RUN}"
        )
        return EXIT_NOT_RUN
    return job.exit_code
