"""The client's end of RunSession: one long-lived stream that carries run after run.

Each run gets a tag and a route; the reader hands every event to its run's route at once, so
a caller that is slow to iterate one run never holds up another. A route that falls behind by
ROUTE_BYTES is paused: the master holds its events back (they wait there as for any slow
reader, nothing is lost) until the caller has read half of them. An older master, which cannot
pause a run, has it cut off instead, and the run resumes from its offsets as after a broken
stream (with what the master still has of its output).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from dist_exec import wire
from dist_exec.config import MAX_MESSAGE_BYTES, RUNS_PER_SESSION
from dist_exec.errors import InvalidTaskSpec
from dist_exec.rpc.v1 import master_pb2

if TYPE_CHECKING:
    from dist_exec.rpc.v1.master_pb2_grpc import MasterServiceAsyncStub

ROUTE_BYTES = 8 * 1024 * 1024  # output waiting in one run's route before it is paused
# Paused, a route still takes what was on its way (at most the master's outbox, 4 MiB, and a
# message); one that grows past ROUTE_BYTES and this much more anyway is cut off.
IN_FLIGHT_BYTES = 16 * 1024 * 1024
STATUS_WAIT_S = 5.0  # for the status of a call a write failed on (else: UNAVAILABLE)
# Requests go several to a message, up to about this much (a message may have 64 MiB).
MESSAGE_BYTES = MAX_MESSAGE_BYTES - 1024 * 1024
REAP_WAIT_S = 10.0  # a run given up before its ids were handed over: its acceptance, this long

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def rpc_error(
    code: grpc.StatusCode, details: str, trailing: grpc.aio.Metadata | None = None
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing or grpc.aio.Metadata(), details)


class _Route:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[master_pb2.RunSessionEvent | grpc.aio.AioRpcError] = (
            asyncio.Queue()
        )
        self.bytes = 0
        self.paused = False


class Handover:
    """Whether a run's caller has been handed its jobs' ids (``done``): jobs of a run given up
    before that (its task cancelled while they were being accepted) are cancelled, as nobody
    could know them."""

    def __init__(self) -> None:
        self.done = False


class RunSession:
    """One RunSession call. ``run`` yields one run's events; ``error`` is set once the stream is
    broken (a new run then needs a new session). It carries RUNS_PER_SESSION runs at once (the
    master's bound): ``full`` says when a caller should open another."""

    def __init__(
        self,
        stub: MasterServiceAsyncStub,
        cancel_jobs: Callable[[list[str]], Awaitable[None]] | None = None,
    ) -> None:
        """``cancel_jobs``: cancels jobs nobody was handed (see ``Handover``)."""
        self.call = stub.RunSession()
        self.cancel_jobs = cancel_jobs
        self.reapers: set[asyncio.Task[None]] = set()  # (see _reap)
        self.error: grpc.aio.AioRpcError | None = None
        self._routes: dict[int, _Route] = {}
        self._tags = itertools.count(1)
        self._requests: list[master_pb2.RunSessionRequest] = []
        self._pending = asyncio.Event()
        self.runs = 0  # runs on it now (see ``full``)
        self._can_pause = False  # the master said it takes pause and resume
        self._reader = asyncio.create_task(self._read())
        self._writer = asyncio.create_task(self._write())

    async def run(
        self, request: master_pb2.RunJobsRequest, handover: Handover | None = None
    ) -> AsyncGenerator[master_pb2.JobEvent, None]:
        """The events RunJobs would send for ``request``; its error status as an AioRpcError.
        Ends after the final state of every job (closing it earlier stops following them).
        Counted in ``runs`` from its first step (taken when the caller picks this session)."""
        self.runs += 1
        try:
            if self.error is not None:
                raise self.error
            if (size := request.ByteSize()) > MESSAGE_BYTES:  # (it would break the stream)
                raise InvalidTaskSpec(
                    f"these jobs take {size} bytes; one run takes at most {MESSAGE_BYTES}: "
                    "split them into several runs"
                )
            tag = next(self._tags)
            route = self._routes[tag] = _Route()
            sent = master_pb2.RunSessionRequest(tag=tag, run=request)
            self._send(sent)
            jobs: set[str] = set()
            ended = 0
            over = False  # the master is done with this run
            try:
                while not over:
                    item = await route.queue.get()
                    if isinstance(item, grpc.aio.AioRpcError):
                        raise item
                    if item.error_code:
                        over = True
                        raise rpc_error(
                            _CODES.get(item.error_code, grpc.StatusCode.UNKNOWN),
                            item.error,
                            grpc.aio.Metadata(*item.error_metadata.items()),
                        )
                    event = item.event
                    route.bytes -= len(event.output.data)
                    if route.paused and route.bytes <= ROUTE_BYTES // 2:
                        route.paused = False
                        self._send(master_pb2.RunSessionRequest(tag=tag, resume=True))
                    if event.accepted:
                        jobs.add(event.job_id)
                    elif event.HasField("result"):
                        ended += 1
                        over = ended == len(jobs)  # (a caller may stop at the last result)
                    yield event
            finally:
                if self._routes.pop(tag, None) is not None and self.error is None and not over:
                    if any(waiting is sent for waiting in self._requests):  # not written yet
                        self._requests = [r for r in self._requests if r is not sent]
                    elif handover is not None and not handover.done and self.cancel_jobs:
                        self._reap(tag, route, jobs, len(request.jobs))
                    else:
                        self._send(master_pb2.RunSessionRequest(tag=tag, stop=True))
        finally:
            self.runs -= 1

    def _reap(self, tag: int, route: _Route, seen: set[str], count: int) -> None:
        """A run given up before its caller was handed the ids: wait for its jobs' acceptance
        on its route, then stop it and cancel them."""
        self._routes[tag] = route
        self.runs += 1  # (until its stop is sent: the master still counts it)
        task = asyncio.create_task(self._reaped(tag, route, set(seen), count))
        self.reapers.add(task)
        task.add_done_callback(self.reapers.discard)

    async def _reaped(self, tag: int, route: _Route, ids: set[str], count: int) -> None:
        try:
            async with asyncio.timeout(REAP_WAIT_S):
                while len(ids) < count:
                    item = await route.queue.get()
                    if isinstance(item, grpc.aio.AioRpcError) or item.error_code:
                        break  # refused, or the stream broke: nothing more was accepted
                    if item.event.accepted:
                        ids.add(item.event.job_id)
        except TimeoutError:
            pass
        finally:
            self.runs -= 1
            if self._routes.pop(tag, None) is not None and self.error is None:
                self._send(master_pb2.RunSessionRequest(tag=tag, stop=True))
        if ids and self.cancel_jobs is not None:
            await self.cancel_jobs(sorted(ids))

    @property
    def full(self) -> bool:
        return self.runs >= RUNS_PER_SESSION

    def _send(self, request: master_pb2.RunSessionRequest) -> None:
        self._requests.append(request)
        self._pending.set()

    async def _write(self) -> None:
        try:
            # Nothing is written before the master shows it serves this method: an older
            # master answers UNIMPLEMENTED, and the runs then safely go as RunJobs calls.
            self._can_pause = wire.RUN_PAUSE[0] in list(await self.call.initial_metadata())
            while True:
                await self._pending.wait()
                self._pending.clear()
                requests, self._requests = self._requests, []
                for message in _messages(requests):
                    await self.call.write(message)
        except Exception as exc:  # the call is over: the reader gets its status and metadata
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STATUS_WAIT_S):
                    await asyncio.shield(self._reader)
            self._fail(rpc_error(grpc.StatusCode.UNAVAILABLE, f"RunSession stream: {exc}"))

    async def _read(self) -> None:
        try:
            async for message in self.call:
                for item in message.events:
                    self._route(item)
            self._fail(rpc_error(grpc.StatusCode.UNAVAILABLE, "the master ended the stream"))
        except grpc.aio.AioRpcError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug: fail the runs rather than leave them waiting
            self._fail(rpc_error(grpc.StatusCode.INTERNAL, f"RunSession stream: {exc!r}"))

    def _route(self, item: master_pb2.RunSessionEvent) -> None:
        route = self._routes.get(item.tag)
        if route is None:
            return  # a run nobody follows any more
        route.bytes += len(item.event.output.data)
        if route.bytes > ROUTE_BYTES and self._can_pause and not route.paused:
            route.paused = True
            self._send(master_pb2.RunSessionRequest(tag=item.tag, pause=True))
        if route.bytes <= ROUTE_BYTES + (IN_FLIGHT_BYTES if self._can_pause else 0):
            route.queue.put_nowait(item)
            return
        del self._routes[item.tag]
        self._send(master_pb2.RunSessionRequest(tag=item.tag, stop=True))
        route.queue.put_nowait(
            rpc_error(grpc.StatusCode.ABORTED, "this run's events were not read fast enough")
        )

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        if self.error is not None:
            return
        self.error = error
        for route in self._routes.values():
            route.queue.put_nowait(error)
        self._routes.clear()
        self.call.cancel()
        for task in (self._reader, self._writer):
            if task is not asyncio.current_task():
                task.cancel()

    async def close(self) -> None:
        self.abandon()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)

    def abandon(self) -> None:
        """End the stream (its tasks end on their own)."""
        self._fail(rpc_error(grpc.StatusCode.CANCELLED, "the client was closed"))


def _messages(
    requests: list[master_pb2.RunSessionRequest],
) -> list[master_pb2.RunSessionRequests]:
    """The requests, in order, in as few messages as their size allows (and the master's
    bound on requests in one)."""
    if len(requests) == 1:
        return [master_pb2.RunSessionRequests(requests=requests)]
    messages: list[master_pb2.RunSessionRequests] = []
    batch: list[master_pb2.RunSessionRequest] = []
    size = 0
    for request in requests:
        request_size = request.ByteSize()
        if batch and (size + request_size > MESSAGE_BYTES or len(batch) == RUNS_PER_SESSION):
            messages.append(master_pb2.RunSessionRequests(requests=batch))
            batch, size = [], 0
        batch.append(request)
        size += request_size
    messages.append(master_pb2.RunSessionRequests(requests=batch))
    return messages
