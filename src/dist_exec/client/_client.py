from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from dist_exec import wire
from dist_exec.client._session import REAP_WAIT_S, Handover, RunSession
from dist_exec.config import (
    DEFAULT_MASTER_ADDRESS,
    MASTER_ENV,
    MAX_INT32,
    MAX_LIST_JOBS,
    dial_address,
)
from dist_exec.errors import (
    STORE_KEY,
    DistExecError,
    InvalidTaskSpec,
    JobAlreadyFinished,
    JobNotFound,
    MasterTimeout,
    MasterUnavailable,
    Unauthenticated,
    from_rpc_error,
)
from dist_exec.executors.command import CommandSpec
from dist_exec.master.dispatcher import CHANNEL_OPTIONS
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
from dist_exec.rpc.v1 import master_pb2, master_pb2_grpc
from dist_exec.security.credentials import Credentials, discover

if TYPE_CHECKING:
    from dist_exec.rpc.v1.master_pb2_grpc import MasterServiceAsyncStub

# How long a broken output stream is tried again before giving up: a master restarted by a
# supervisor, or rescheduled in Kubernetes, can take minutes to be back.
STREAM_RETRY_S = 300.0
UNSEEN_CANCEL_S = 30.0  # (see _cancel_unseen)
_RESUMABLE = {
    grpc.StatusCode.UNAVAILABLE,  # master restarting
    grpc.StatusCode.ABORTED,  # this follower fell behind
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


def command_spec(
    command: str | Sequence[str],
    *,
    shell: bool = False,
    timeout_s: float = 0.0,
    priority: int = 0,
    env: Mapping[str, str] | None = None,
    working_dir: str = "",
    stdin: str | bytes = b"",
    max_retries: int | None = None,
    metadata: Mapping[str, str] | None = None,
    limits: TaskLimits | None = None,
) -> TaskSpec:
    """A TaskSpec for the command executor: a shell string, or argv when ``shell`` is False.
    ``stdin``: the bytes the command reads (text: its UTF-8)."""
    if not isinstance(stdin, str | bytes):
        raise InvalidTaskSpec(f"stdin must be str or bytes, not {type(stdin).__name__}")
    if not isinstance(command, str) and (
        not isinstance(command, Sequence) or not all(isinstance(a, str) for a in command)
    ):
        raise InvalidTaskSpec("the command must be a shell string or a list of strings (argv)")
    if shell and not isinstance(command, str):
        raise InvalidTaskSpec(
            "shell=True runs a command string through /bin/sh; a list is argv, run without one"
        )
    if not command:
        raise InvalidTaskSpec("the command is empty: give a shell string or argv")
    data = stdin.encode() if isinstance(stdin, str) else stdin
    if isinstance(command, str):
        spec = CommandSpec(command, [], shell, dict(env or {}), working_dir, data)
    else:
        spec = CommandSpec(command[0], list(command[1:]), False, dict(env or {}), working_dir, data)
    return TaskSpec(
        "command",
        spec.to_payload(),
        timeout_s,
        priority,
        dict(metadata or {}),
        max_retries,
        limits=limits or TaskLimits(),
    )


class Client:
    """A connection to one master. Every call has a deadline (``timeout_s``).

    ``address``: the master's (default: DIST_EXEC_MASTER, else 127.0.0.1:50051).
    ``credentials``: TLS (the CA that signed the master's certificate, optionally a client
    certificate) and/or a bearer token; by default those of the local cluster (``dist-exec
    up``) serving ``address``, as the CLI finds them, else none (a master without
    authentication).
    ``on_reconnect``: told (a line for a person) when a followed stream broke and is being
    tried again, once per outage."""

    def __init__(
        self,
        address: str | None = None,
        timeout_s: float = 30.0,
        credentials: Credentials | None = None,
        on_reconnect: Callable[[str], None] | None = None,
    ) -> None:
        self.address = dial_address(address or os.environ.get(MASTER_ENV) or DEFAULT_MASTER_ADDRESS)
        self.timeout_s = timeout_s
        if credentials is None:
            credentials = discover(self.address) or Credentials()
        self.credentials = credentials
        self.on_reconnect = on_reconnect
        self._channel: grpc.aio.Channel | None = None
        self._stub: MasterServiceAsyncStub | None = None
        self._sessions: list[RunSession] = []  # another opens when they are full
        self._use_session = True  # until the master says it has no RunSession
        self._closed = False
        self._closing = False

    async def __aenter__(self) -> Client:
        self._channel = self.credentials.channel(self.address, CHANNEL_OPTIONS)
        self._stub = master_pb2_grpc.MasterServiceStub(self._channel)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True
        reapers = [task for session in self._sessions for task in session.reapers]
        if reapers:  # (runs given up before their ids came: their jobs are being cancelled)
            await asyncio.wait(reapers, timeout=REAP_WAIT_S)
        for session in self._sessions:
            await session.close()
        if self._channel is not None:
            await self._channel.close()
        self._stub, self._sessions, self._closed = None, [], True

    @property
    def stub(self) -> MasterServiceAsyncStub:
        if self._stub is None:
            if self._closed:
                raise RuntimeError("this Client is closed: its 'async with' block has ended")
            raise RuntimeError("use the Client as 'async with Client(...) as client'")
        return self._stub

    def _error(self, exc: grpc.aio.AioRpcError) -> DistExecError:
        if self._closing and exc.code() == grpc.StatusCode.CANCELLED:
            return DistExecError("the client was closed")
        details = (exc.details() or "").lower()
        if exc.code() == grpc.StatusCode.UNAVAILABLE and re.search(
            r"handshake read failed \(.*endpoint (closing|shutdown)", details
        ):
            # This client gave up on a handshake the master never answered (stopped, hung,
            # overloaded): not a refusal of its credentials (that closes the socket, or fails
            # the handshake).
            return MasterUnavailable(
                f"the master at {self.address} took the connection but did not answer (it may "
                "be stopped or overloaded); try again later"
            )
        # A master that requires TLS closes a plain connection before any call gets through
        # ("failed to connect ...: Socket closed"); one that stops during a call ends its
        # stream ("Stream removed (Socket closed)"): that is not about credentials.
        refused = exc.code() == grpc.StatusCode.UNAVAILABLE and (
            "handshake" in details
            or ("socket closed" in details and "failed to connect" in details)
        )
        if refused and self.credentials.ca is not None:
            # gRPC can only refuse a client certificate by closing the TLS connection.
            return Unauthenticated(
                f"the master at {self.address} refused the TLS connection: this client's "
                "certificate is missing, expired or not signed by the master's CA, or the "
                "master's certificate is not signed by --ca"
            )
        if refused:
            return Unauthenticated(
                f"the master at {self.address} closed the connection: it requires TLS; pass "
                "--ca and --cert/--key (a local cluster's are found for the user who started it)"
            )
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED and details == "method not found!":
            # (gRPC's own answer for a service the server does not have: a worker, say)
            return DistExecError(
                f"{self.address} does not serve this call: it is not a dist-exec master (point "
                "to the master with --master or DIST_EXEC_MASTER), or an older one than this "
                "client"
            )
        return from_rpc_error(exc, self.address)

    async def submit(self, spec: TaskSpec) -> JobId:
        try:
            reply = await self.stub.Submit(wire.submit_request(spec), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return JobId(reply.job_id)

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[JobId]:
        """Submit several jobs in one call: all are accepted, or none (an error says which)."""
        request = master_pb2.SubmitBatchRequest(jobs=[wire.submit_request(s) for s in specs])
        try:
            reply = await self.stub.SubmitBatch(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return [JobId(j) for j in reply.job_ids]

    async def submit_broadcast(self, spec: TaskSpec) -> tuple[str, list[tuple[JobId, str]]]:
        """Run ``spec`` once on every healthy matching node; returns the broadcast id and the
        (job id, node id) of each per-node job."""
        request = master_pb2.SubmitBroadcastRequest(job=wire.submit_request(spec))
        try:
            reply = await self.stub.SubmitBroadcast(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return reply.broadcast_id, [(JobId(t.job_id), t.node_id) for t in reply.tasks]

    async def watch_many(
        self, job_ids: Sequence[str], with_output: bool = True
    ) -> AsyncIterator[tuple[JobId, tuple[int, OutputChunk] | Job]]:
        """Output of several jobs as (job id, (attempt, chunk)), interleaved, and each job's
        final state (without output) as (job id, Job) when it ends. Stops when all have ended.
        A dropped stream is resumed as ``stream_output``'s is, without repeats."""
        if isinstance(job_ids, str):
            raise InvalidTaskSpec("watch_many takes a list of job ids, not one id")
        async for event in self._watch_many([_job_id(j) for j in job_ids], with_output, {}):
            yield event

    async def _watch_many(
        self,
        job_ids: list[JobId],
        with_output: bool,
        positions: dict[JobId, tuple[int, dict[Stream, int]]],
        reached: bool = False,
    ) -> AsyncIterator[tuple[JobId, tuple[int, OutputChunk] | Job]]:
        """``positions``: how far each job's output was received (attempt, offsets), updated;
        ``reached``: a master took these jobs before (a run's), so a first failure resumes."""
        pending = list(dict.fromkeys(job_ids))
        outage = _Outage(reached)
        while True:  # (even for no jobs: the master says what is wrong with that)
            request = master_pb2.WatchJobsRequest(job_ids=pending, no_output=not with_output)
            call = self.stub.WatchJobs(request)
            try:
                async for event in call:
                    outage.over()
                    if (followed := _followed(event, positions)) is not None:
                        if isinstance(followed[1], Job):
                            pending.remove(followed[0])
                        yield followed
                return
            except grpc.aio.AioRpcError as exc:
                await self._after_break(outage, exc, f"{len(pending)} jobs", "the jobs run on")
            except asyncio.CancelledError:
                self._check_closed()
                raise
            finally:
                call.cancel()  # (left early: the master stops sending; a no-op once it is over)

    async def get(self, job_id: str) -> Job:
        try:
            reply = await self.stub.GetStatus(
                master_pb2.GetStatusRequest(job_id=_job_id(job_id)), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return wire.job_from_status_pb(reply)

    async def cancel(self, job_id: str, sig: signal.Signals | None = None) -> str:
        """Cancel the job: its command's process group gets ``sig`` (TERM by default; also
        INT, HUP, QUIT or KILL), then KILL after the worker's grace. Cancelling a job that is
        being cancelled with another signal sends that one too. Returns the master's word."""
        if sig is not None and sig not in wire.STOP_SIGNAL_TO_PB:
            names = ", ".join(s.name for s in wire.STOP_SIGNAL_TO_PB)
            raise InvalidTaskSpec(f"a cancel cannot send {sig.name}; it may send {names}")
        try:
            reply = await self.stub.Cancel(
                master_pb2.CancelRequest(
                    job_id=_job_id(job_id), signal=wire.stop_signal_to_pb(sig)
                ),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return reply.message

    async def cancel_broadcast(
        self, broadcast_id: str, sig: signal.Signals | None = None
    ) -> list[tuple[JobId, str]]:
        """Cancel each per-node job of a broadcast (``submit_broadcast``'s id), as ``cancel``:
        (job id, what the master said) of each; one that had ended already says so."""
        members, _ = await self.list_jobs(MAX_LIST_JOBS, broadcast_id=broadcast_id)
        if not members:
            raise JobNotFound(f"broadcast {broadcast_id} not found")

        async def one(job_id: JobId) -> tuple[JobId, str]:
            try:
                return job_id, await self.cancel(job_id, sig)
            except JobAlreadyFinished as exc:
                return job_id, exc.message

        return list(await asyncio.gather(*(one(job.id) for job, _ in members)))

    async def _cancel_unseen(self, job_ids: list[str]) -> None:
        """Cancel jobs of a run given up before its caller was handed their ids (with time to
        spare: a master slow to accept may be slow to cancel too)."""
        for job_id in job_ids:
            with contextlib.suppress(grpc.aio.AioRpcError):  # (ended meanwhile, or out of reach)
                await self.stub.Cancel(
                    master_pb2.CancelRequest(job_id=job_id),
                    timeout=max(self.timeout_s, UNSEEN_CANCEL_S),
                )

    async def list_jobs(
        self,
        limit: int = 10,
        offset: int = 0,
        status: JobStatus | None = None,
        broadcast_id: str = "",
        owner: str = "",
    ) -> tuple[list[tuple[Job, str]], int]:
        if (
            not isinstance(limit, int)
            or not isinstance(offset, int)
            or not 1 <= limit <= MAX_LIST_JOBS
            or not 0 <= offset <= MAX_INT32
        ):
            raise InvalidTaskSpec(
                f"limit must be 1-{MAX_LIST_JOBS} and offset 0-{MAX_INT32}; got {limit}, {offset}"
            )
        request = master_pb2.ListJobsRequest(
            limit=limit,
            offset=offset,
            status_filter=wire.JOB_STATUS_TO_PB[status] if status else 0,  # type: ignore[arg-type]
            broadcast_id=broadcast_id,
            owner=owner,
        )
        try:
            reply = await self.stub.ListJobs(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return [wire.job_from_summary_pb(j) for j in reply.jobs], reply.total

    async def drain(self, node_id: str, undo: bool = False) -> str:
        """(admin) The node takes no new tasks; the ones it runs finish. ``undo``: it takes new
        tasks again (not one the auto scaler drains to remove it)."""
        try:
            reply = await self.stub.AuthDrainNode(
                master_pb2.AuthDrainNodeRequest(node_id=node_id, undo=undo),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return reply.message

    async def whoami(self) -> tuple[str, str, str]:
        """(name, role, how authenticated) as the master sees this client."""
        try:
            reply = await self.stub.AuthWhoAmI(
                master_pb2.AuthWhoAmIRequest(), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return reply.name, reply.role, reply.auth

    async def nodes(self) -> list[NodeInfo]:
        try:
            reply = await self.stub.ListNodes(master_pb2.ListNodesRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return [wire.node_from_pb(n) for n in reply.nodes]

    async def scaler_status(self) -> ScalerStatus | None:
        """What the master's auto scaler is doing; None when it has none."""
        try:
            reply = await self.stub.ListNodes(master_pb2.ListNodesRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return wire.scaler_status_from_pb(reply.scaler) if reply.HasField("scaler") else None

    async def stream_output(
        self, job_id: str, follow: bool = True
    ) -> AsyncIterator[tuple[int, OutputChunk]]:
        """Output of the job as (attempt, chunk); when following, until the job ends.

        A dropped stream (say, the master restarted) is resumed from the last byte received, so
        nothing is missed or repeated. A chunk with a higher attempt number than before means
        the job was retried and its output started again.
        """
        async for item in self._stream(job_id, follow, include_result=False):
            if not isinstance(item, Job):
                yield item

    async def run(
        self, spec: TaskSpec
    ) -> AsyncGenerator[JobId | tuple[int, OutputChunk] | Job, None]:
        """Submit a job and follow it: first its id, once the job is accepted (durable), then
        what ``watch`` yields. A stream that breaks after the id resumes with StreamOutput from
        where it was. Runs share one stream to the master (RunSession)."""
        handover = Handover()
        events = self._run_events(
            master_pb2.RunJobsRequest(jobs=[wire.submit_request(spec)]), handover
        )
        job_id: JobId | None = None
        offsets = {Stream.STDOUT: 0, Stream.STDERR: 0}
        attempt = 0
        try:
            try:
                async with asyncio.timeout(self.timeout_s):  # to be accepted, as for Submit
                    event = await anext(events, None)
            except TimeoutError:
                raise _not_accepted_in_time(self.timeout_s) from None
            while event is not None:
                if event.accepted:
                    job_id = JobId(event.job_id)
                    handover.done = True
                    yield job_id
                elif event.HasField("result"):
                    yield wire.job_from_status_pb(event.result)
                    return
                else:
                    attempt, chunk = _track(offsets, attempt, event.output)
                    yield attempt, chunk
                event = await anext(events, None)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and job_id is None:  # an older master
                job_id = await self.submit(spec)
                yield job_id
            elif job_id is None or exc.code() not in _RESUMABLE:
                raise self._error(exc) from None
        finally:
            await events.aclose()
        if job_id is None:
            raise DistExecError("the master ended the call without accepting the job")
        async for item in self._watch(job_id, offsets, attempt, reached=True):  # (it accepted)
            yield item

    async def run_many(
        self, specs: Sequence[TaskSpec], with_output: bool = True
    ) -> AsyncGenerator[list[JobId] | tuple[JobId, tuple[int, OutputChunk] | Job], None]:
        """Submit several jobs (all are accepted, or none) and follow them: first their ids, in
        order, then what ``watch_many`` yields, until all have ended."""
        request = master_pb2.RunJobsRequest(
            jobs=[wire.submit_request(s) for s in specs], no_output=not with_output
        )
        handover = Handover()
        events = self._run_events(request, handover)
        accepted: list[JobId] = []
        ended: set[JobId] = set()
        positions: dict[JobId, tuple[int, dict[Stream, int]]] = {}
        try:
            try:
                async with asyncio.timeout(self.timeout_s):  # to be accepted, as for SubmitBatch
                    for _ in specs:
                        event = await anext(events, None)
                        if event is None or not event.accepted:
                            raise DistExecError(
                                "the master ended the call without accepting the jobs"
                            )
                        accepted.append(JobId(event.job_id))
            except TimeoutError:
                raise _not_accepted_in_time(self.timeout_s) from None
            handover.done = True
            yield accepted
            async for event in events:
                if (followed := _followed(event, positions)) is not None:
                    if isinstance(followed[1], Job):
                        ended.add(followed[0])
                    yield followed
            return
        except grpc.aio.AioRpcError as exc:
            if not accepted or exc.code() not in _RESUMABLE:
                raise self._error(exc) from None
        finally:
            await events.aclose()
        # The stream broke after the jobs were accepted: follow the rest from where they were.
        rest = [job_id for job_id in accepted if job_id not in ended]
        async for followed in self._watch_many(rest, with_output, positions, reached=True):
            yield followed

    def _streams_in_use(self) -> list[RunSession]:
        """The RunSession streams worth keeping: the first, and any other a run still uses (a
        burst of runs opened them); the rest are closed. Broken ones are closed already."""
        kept: list[RunSession] = []
        for session in self._sessions:
            if session.error is not None:
                continue
            if kept and session.runs == 0:
                session.abandon()
            else:
                kept.append(session)
        return kept

    async def _run_events(
        self, request: master_pb2.RunJobsRequest, handover: Handover
    ) -> AsyncGenerator[master_pb2.JobEvent, None]:
        """What RunJobs sends for ``request``: on the shared RunSession stream when the master
        serves it, else on a RunJobs call of its own. Errors come as AioRpcError."""
        if self._use_session:
            self._sessions = self._streams_in_use()
            session = next((s for s in self._sessions if not s.full), None)
            if session is None:
                session = RunSession(self.stub, self._cancel_unseen)
                self._sessions.append(session)
            try:
                async with contextlib.aclosing(session.run(request, handover)) as events:
                    async for event in events:
                        yield event
                return
            except grpc.aio.AioRpcError as exc:
                # An older master: nothing was sent on the stream (see RunSession._write).
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED or exc is not session.error:
                    raise
                self._use_session = False
        call = self.stub.RunJobs(request)
        try:
            async for event in call:
                yield event
        finally:
            if not call.done():
                call.cancel()

    async def watch(self, job_id: str) -> AsyncIterator[tuple[int, OutputChunk] | Job]:
        """Like ``stream_output`` (following), then the ended Job itself (without its output,
        which was streamed) as the last item."""
        async for item in self._watch(job_id):
            yield item

    async def _watch(
        self,
        job_id: str,
        offsets: dict[Stream, int] | None = None,
        attempt: int = 0,
        reached: bool = False,
    ) -> AsyncIterator[tuple[int, OutputChunk] | Job]:
        async for item in self._stream(job_id, True, True, offsets, attempt, reached):
            yield item
            if isinstance(item, Job):
                return
        yield await self.get(job_id)  # a master that does not send the result

    async def wait(self, job_id: str) -> Job:
        """Wait for the job to end; returns it with its output."""
        async for _ in self._stream(job_id, follow=True, include_result=False):
            pass
        return await self.get(job_id)

    async def _stream(
        self,
        job_id: str,
        follow: bool,
        include_result: bool,
        offsets: dict[Stream, int] | None = None,
        attempt: int = 0,
        reached: bool = False,
    ) -> AsyncIterator[tuple[int, OutputChunk] | Job]:
        """Output from ``offsets`` of ``attempt`` on (the start: none), resuming after a
        broken stream; then the job when ``include_result``. A stream is resumed once a master
        took one (``reached``: one took the job before, as for a run)."""
        offsets = offsets or {Stream.STDOUT: 0, Stream.STDERR: 0}
        outage = _Outage(reached)
        while True:
            request = master_pb2.StreamOutputRequest(
                job_id=_job_id(job_id),
                no_follow=not follow,
                stdout_offset=offsets[Stream.STDOUT],
                stderr_offset=offsets[Stream.STDERR],
                include_result=include_result,
                attempt=attempt,  # (a retry since: its output comes from its start)
            )
            call = self.stub.StreamOutput(request)
            try:
                if wire.STREAM_OPEN[0] in list(await call.initial_metadata()):
                    # A master follows the job again: an outage is over, even if the job
                    # says nothing for a long while (the next one gets its own time).
                    outage.over()
                async for msg in call:
                    outage.over()
                    if msg.HasField("result"):
                        yield wire.job_from_status_pb(msg.result)
                        continue
                    attempt, chunk = _track(offsets, attempt, msg)
                    yield attempt, chunk
                return
            except grpc.aio.AioRpcError as exc:
                # (A master that cannot record the job's end yet: a follower waits for it, a
                # one-time read is told so.)
                unrecorded = STORE_KEY in dict(exc.trailing_metadata() or ())
                await self._after_break(
                    outage, exc, f"job {job_id}", "the job runs on",
                    give_up=unrecorded and not follow, quiet=unrecorded,
                )  # fmt: skip
            except asyncio.CancelledError:
                self._check_closed()
                raise
            finally:
                call.cancel()  # (left early: the master stops sending; a no-op once it is over)

    async def _after_break(
        self,
        outage: _Outage,
        exc: grpc.aio.AioRpcError,
        following: str,
        runs_on: str,
        give_up: bool = False,
        quiet: bool = False,
    ) -> None:
        """Wait before a followed stream that broke is tried again, or raise its error (see
        _Outage); the first break of an outage is told to ``on_reconnect`` (unless ``quiet``)."""
        delay = None if give_up else outage.retry_in(exc)
        if delay is None:
            raise self._error(exc) from None
        if outage.failures == 1 and self.on_reconnect is not None and not quiet:
            if exc.code() == grpc.StatusCode.ABORTED:  # (the master is there: a slow reader)
                self.on_reconnect(
                    f"this reader of {following} fell too far behind it; following it again "
                    "from where it was"
                )
            else:
                self.on_reconnect(
                    f"lost the master while following {following} ({self._error(exc).message}); "
                    f"trying again for up to {STREAM_RETRY_S:.0f}s ({runs_on})"
                )
        await asyncio.sleep(delay)

    def _check_closed(self) -> None:
        """For a follower whose call raised CancelledError: grpc.aio cancels the calls of a
        channel being closed, raising it in whoever reads them, a task nobody cancelled. That
        is the client closed under it (unless this task is being cancelled too)."""
        task = asyncio.current_task()
        if self._closing and (task is None or not task.cancelling()):
            raise DistExecError("the client was closed") from None


class _Outage:
    """The breaks of a followed stream. One is tried again when a master had taken the stream
    (``reached``: it answered, now or before), the error is transient, and the outage began
    less than STREAM_RETRY_S ago; a master answering again ends the outage (``over``)."""

    def __init__(self, reached: bool) -> None:
        self.reached = reached
        self.failures = 0
        self.since = 0.0

    def over(self) -> None:
        self.failures, self.since, self.reached = 0, 0.0, True

    def retry_in(self, exc: grpc.aio.AioRpcError) -> float | None:
        """Seconds to wait before trying again (growing); None: give up."""
        self.failures += 1
        now = time.monotonic()
        self.since = self.since or now
        if not self.reached or exc.code() not in _RESUMABLE or now - self.since > STREAM_RETRY_S:
            return None
        return min(0.1 * 2.0**self.failures, 2.0)


def _not_accepted_in_time(timeout_s: float) -> MasterTimeout:
    """A run not accepted within the client's timeout: its jobs are cancelled if the master
    accepts them later (nobody was handed their ids; see RunSession's Handover)."""
    return MasterTimeout(
        f"the master did not accept the job(s) within {timeout_s:g}s; if it does later, "
        "they are cancelled"
    )


def _job_id(value: object) -> JobId:
    if not isinstance(value, str):
        raise InvalidTaskSpec(f"a job id is a string, not {type(value).__name__}")
    return JobId(value)


def _followed(
    event: master_pb2.JobEvent, positions: dict[JobId, tuple[int, dict[Stream, int]]]
) -> tuple[JobId, tuple[int, OutputChunk] | Job] | None:
    """An event of several jobs followed: (job id, its final state, or its output less what
    was received before); None when all of it was."""
    job_id = JobId(event.job_id)
    if event.HasField("result"):
        return job_id, wire.job_from_status_pb(event.result)
    item = _fresh(positions, job_id, event.output)
    return None if item is None else (job_id, item)


def _fresh(
    positions: dict[JobId, tuple[int, dict[Stream, int]]],
    job_id: JobId,
    msg: master_pb2.OutputChunk,
) -> tuple[int, OutputChunk] | None:
    """A job's received chunk less what was received of it before (a resumed stream starts
    each job from its start), noting how far it now is (``positions``); None: all a repeat."""
    attempt, offsets = positions.get(job_id, (0, {Stream.STDOUT: 0, Stream.STDERR: 0}))
    if msg.attempt < attempt:
        return None
    stream, data, offset = Stream(msg.type), msg.data, msg.offset
    if msg.attempt > attempt and attempt:  # a retry: its output starts again
        offsets = {Stream.STDOUT: 0, Stream.STDERR: 0}
    elif offset < offsets[stream]:
        if offset + len(data) <= offsets[stream]:
            return None
        data, offset = data[offsets[stream] - offset :], offsets[stream]
    offsets[stream] = offset + len(data)
    positions[job_id] = (max(attempt, msg.attempt), offsets)
    return max(attempt, msg.attempt), OutputChunk(stream, offset, data)


def _track(
    offsets: dict[Stream, int], attempt: int, msg: master_pb2.OutputChunk
) -> tuple[int, OutputChunk]:
    """Note where a received chunk ends (``offsets``, updated) and which attempt it is of: a
    later attempt's output starts again at 0."""
    if msg.attempt > attempt and attempt:
        offsets.update(dict.fromkeys(Stream, 0))
    chunk = OutputChunk(Stream(msg.type), msg.offset, msg.data)
    offsets[chunk.stream] = chunk.offset + len(chunk.data)
    return max(attempt, msg.attempt), chunk
