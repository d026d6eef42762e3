"""The client commands about jobs and nodes: status, list, logs, cancel, nodes, drain, whoami."""

from __future__ import annotations

import asyncio
import codecs
import itertools
import json
import signal
from collections import deque
from collections.abc import AsyncIterator

import click

from dist_exec.cli.common import (
    SIGNAL,
    TEXT,
    JsonArrayPrinter,
    connect,
    iso_time,
    job_json,
    json_option,
    master_option,
    node_json,
    print_json,
    printable,
    run_client,
)
from dist_exec.cli.run import OutputPrinter
from dist_exec.client import Client
from dist_exec.config import MAX_INT32, MAX_LIST_JOBS
from dist_exec.errors import DistExecError, JobNotFound
from dist_exec.executors.limits import summary as limits_summary
from dist_exec.models import (
    Job,
    JobId,
    JobStatus,
    NodeInfo,
    OutputChunk,
    ScalerStatus,
    Stream,
)


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
        click.echo(f"{key + ':':<11}{printable(value)}")
    if len(job.attempts) > 1 or any(a.detail for a in job.attempts):
        click.echo("attempts:")
        for a in job.attempts:
            started = a.started_at.strftime("%H:%M:%S") if a.started_at else "-"
            ended = a.ended_at.strftime("%H:%M:%S") if a.ended_at else "running"
            line = f"  #{a.attempt} {a.node_id or '-'} {started}-{ended} "
            line += a.outcome.value if a.outcome else "RUNNING"
            click.echo(printable(line + (f": {a.detail}" if a.detail else "")))


@click.command()
@click.argument("job_id", type=TEXT)
@master_option
@json_option
def status(job_id: str, master_address: str, as_json: bool) -> None:
    """Show one job, or the per-node jobs of a broadcast."""

    async def body() -> Job | list[Job]:
        async with connect(master_address) as client:
            try:
                return await client.get(job_id)
            except JobNotFound:
                members, _ = await client.list_jobs(MAX_LIST_JOBS, broadcast_id=job_id)
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


@click.command(name="list")
@click.option("--limit", type=click.IntRange(1, MAX_LIST_JOBS), default=10, show_default=True)
@click.option("--offset", type=click.IntRange(0, MAX_INT32), default=0)
@click.option(
    "--status",
    "status_filter",
    type=click.Choice([s.value for s in JobStatus], case_sensitive=False),
    default=None,
    help="Only jobs in this state.",
)
@click.option(
    "--broadcast", type=TEXT, default=None, help="Only the per-node jobs of this broadcast."
)
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

    async def body() -> tuple[list[tuple[Job, str]], int]:
        async with connect(master_address) as client:
            jobs, total = await client.list_jobs(
                limit, offset, _status_choice(status_filter), broadcast or ""
            )
            if as_json:
                printer = JsonArrayPrinter()
                try:
                    async for job in _whole(client, [listed.id for listed, _ in jobs]):
                        printer.add(job_json(job))
                except DistExecError:  # stdout stays one JSON array; the error says it is cut
                    printer.end()
                    raise
                printer.end()
            return jobs, total

    jobs, total = run_client(body())
    if as_json:
        return
    click.echo(f"{'JOB':<36}  {'STATUS':<9}  {'EXIT':>4}  {'WORKER':<20}  {'CREATED':<20}  COMMAND")
    for job, summary in jobs:
        created = job.created_at.strftime("%Y-%m-%d %H:%M:%S")
        exit_code = "-" if job.exit_code is None else str(job.exit_code)
        worker_id = (job.worker_id or "-")[:20]
        click.echo(
            f"{job.id:<36}  {job.status.value:<9}  {exit_code:>4}  {printable(worker_id):<20}"
            f"  {created:<20}  {printable(summary)}"
            + (f"  [broadcast {job.spec.broadcast_id[:8]}]" if job.spec.broadcast_id else "")
        )
    click.echo(f"({len(jobs)} of {total} jobs)", err=True)


WHOLE_JOBS_IN_FLIGHT = 8


async def _whole(client: Client, job_ids: list[JobId]) -> AsyncIterator[Job]:
    """Each job whole (its output too), in order; one deleted since it was listed is left
    out. WHOLE_JOBS_IN_FLIGHT are asked for at a time: not a round trip after another for a
    thousand jobs, nor all of them (up to 10 MiB of output each) in memory at once."""

    async def get(job_id: JobId) -> Job | None:
        try:
            return await client.get(job_id)
        except JobNotFound:
            return None

    asked: deque[asyncio.Task[Job | None]] = deque()
    ids = iter(job_ids)
    try:
        while True:
            for job_id in itertools.islice(ids, WHOLE_JOBS_IN_FLIGHT - len(asked)):
                asked.append(asyncio.create_task(get(job_id)))
            if not asked:
                return
            if (job := await asked.popleft()) is not None:
                yield job
    finally:
        for task in asked:
            task.cancel()
        await asyncio.gather(*asked, return_exceptions=True)


@click.command()
@click.argument("job_id", type=TEXT)
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@master_option
@json_option
def logs(job_id: str, follow: bool, master_address: str, as_json: bool) -> None:
    """Print a job's output: stdout to stdout, stderr to stderr. With --json, one object per
    piece: stream, attempt, the byte offset its text starts at, and the text (a character cut
    between two pieces goes whole into the second)."""

    async def body() -> None:
        printer, last_attempt = OutputPrinter(), 0
        lines = _JsonLines()
        async with connect(master_address) as client:
            async for attempt, chunk in client.stream_output(job_id, follow=follow):
                if attempt != last_attempt:
                    printer.next_attempt()
                    lines.flush()
                    if last_attempt and not as_json:
                        printer.note(f"job {job_id} is being retried (attempt {attempt})")
                    last_attempt = attempt
                if as_json:
                    lines.add(attempt, chunk)
                else:
                    printer.write(chunk)
        lines.flush()

    run_client(body())


class _JsonLines:
    """``logs --json``: each stream decoded as UTF-8 across its pieces (bytes that are not
    UTF-8 become U+FFFD), one JSON line per piece."""

    def __init__(self) -> None:
        self._streams: dict[Stream, _Decoding] = {}

    def add(self, attempt: int, chunk: OutputChunk) -> None:
        decoding = self._streams.get(chunk.stream)
        if decoding is not None and chunk.offset != decoding.end:  # bytes not kept between
            decoding.flush(chunk.stream)
            decoding = None
        if decoding is None:
            decoding = self._streams[chunk.stream] = _Decoding(attempt)
        held = len(decoding.decoder.getstate()[0])
        decoding.end = chunk.offset + len(chunk.data)
        _emit(attempt, chunk.stream, chunk.offset - held, decoding.decoder.decode(chunk.data))

    def flush(self) -> None:
        """The end of an attempt's output: what a decoder still holds (a cut character)."""
        for stream, decoding in self._streams.items():
            decoding.flush(stream)
        self._streams.clear()


class _Decoding:
    def __init__(self, attempt: int) -> None:
        self.attempt = attempt
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.end = 0  # where the bytes given so far end

    def flush(self, stream: Stream) -> None:
        held = len(self.decoder.getstate()[0])
        _emit(self.attempt, stream, self.end - held, self.decoder.decode(b"", final=True))


def _emit(attempt: int, stream: Stream, offset: int, text: str) -> None:
    if text:
        line = {"stream": stream.name.lower(), "attempt": attempt, "offset": offset}
        click.echo(json.dumps({**line, "data": text}))


@click.command()
@click.argument("job_id", type=TEXT)
@click.option(
    "--signal",
    "sig",
    type=SIGNAL,
    default=None,
    help="What the command's process group gets first: TERM (default), INT, HUP, QUIT or "
    "KILL; KILL follows after the worker's grace (5s). Again with another signal while it "
    "stops sends that one too.",
)
@master_option
@json_option
def cancel(job_id: str, sig: signal.Signals | None, master_address: str, as_json: bool) -> None:
    """Cancel a queued or running job (its whole process group is stopped); given a
    broadcast's id, each of its per-node jobs that has not ended."""

    async def body() -> list[tuple[str, Job]] | tuple[str, Job]:
        async with connect(master_address) as client:
            try:
                message = await client.cancel(job_id, sig)
            except JobNotFound as exc:
                try:
                    cancelled = await client.cancel_broadcast(job_id, sig)
                except JobNotFound:
                    raise exc from None
                return [(said, await client.get(member)) for member, said in cancelled]
            return message, await client.get(job_id)

    found = run_client(body())
    cancelled = found if isinstance(found, list) else [found]
    if as_json:
        reports = [
            {"id": job.id, "cancelled": True, "message": message, "status": job.status.value}
            for message, job in cancelled
        ]
        print_json(reports if isinstance(found, list) else reports[0])
        return
    if isinstance(found, list):
        click.echo(f"broadcast {job_id}: {len(found)} node(s)")
    for message, job in cancelled:
        node = f" ({job.spec.node_id})" if job.spec.broadcast_id else ""
        click.echo(f"job {job.id}{node}: {message}")


@click.command()
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
        click.echo(f"  last event: {scaler.last_event} ({iso_time(scaler.last_event_at)})")
    if scaler.last_decision:
        click.echo(f"  now: {scaler.last_decision}")
    if scaler.draining:
        click.echo(f"  draining: {', '.join(scaler.draining)}")
    if scaler.error:
        click.echo(f"  error: {scaler.error}")


@click.command()
@click.argument("node_id", type=TEXT)
@click.option("--undo", is_flag=True, help="Take the drain back: the node takes new tasks.")
@master_option
def drain(node_id: str, undo: bool, master_address: str) -> None:
    """(admin) Stop giving NODE_ID new tasks; the ones it runs finish. With --undo it takes
    new tasks again. A drain sticks (the worker keeps it across master restarts) until then."""

    async def body() -> str:
        async with connect(master_address) as client:
            return await client.drain(node_id, undo)

    click.echo(run_client(body()))


@click.command()
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
