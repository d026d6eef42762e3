"""Dispatcher I/O: the WorkerClient seam and its gRPC implementation.

One long-lived channel per node endpoint (node id, address, the name its TLS certificate must
carry), so one node's registration never changes how another is dialled. Errors come back as
three kinds the master acts on: ``AttemptRejected`` (the worker would not start it),
``AttemptGone`` (the worker no longer holds it) and ``WorkerUnreachable`` (transport trouble:
the attempt may still be running).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import grpc.aio

from dist_exec import wire
from dist_exec.config import MAX_MESSAGE_BYTES
from dist_exec.models import ExecOutcome, NodeEndpoint, OutputChunk, Stream, TaskSpec
from dist_exec.rpc.v1 import worker_pb2, worker_pb2_grpc
from dist_exec.security.call_proof import CallProof, Metadata

if TYPE_CHECKING:
    from dist_exec.rpc.v1.worker_pb2_grpc import WorkerServiceAsyncStub

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_MS = 5_000
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect within a second after an outage (gRPC's default backoff grows to 120 s): a
    # worker must register again with a restarted master within its grace period.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # gRPC takes this as the least time a connection attempt gets, too (TCP, TLS and HTTP/2
    # handshakes): at 200 ms, a master or worker a few round trips of 70 ms away could not be
    # reached at the first attempt, and one slower than a second not at all.
    ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
]


class AttemptRejected(Exception):
    """The worker refused to start the attempt. ``fatal``: no worker would run it."""

    def __init__(self, message: str, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal


class AttemptGone(Exception):
    """The worker does not hold the attempt (it restarted, or already delivered it)."""


class WorkerUnreachable(Exception):
    """The call failed in transport; the attempt may still be running there."""


class WorkerClient(Protocol):
    """``execute`` yields output chunks, then the outcome. Resuming it once more after the
    outcome completes the call, which tells the worker the result was taken (it then forgets
    it): do that only once the result is recorded. Closing it instead cancels the call."""

    def execute(
        self,
        endpoint: NodeEndpoint,
        task_id: str,
        attempt: int,
        spec: TaskSpec,
        attach: bool,
        offsets: Mapping[Stream, int],
        deadline_s: float,
    ) -> AsyncIterator[OutputChunk | ExecOutcome]: ...

    async def cancel(
        self,
        endpoint: NodeEndpoint,
        task_id: str,
        attempt: int = 0,
        sig: signal.Signals | None = None,
    ) -> bool: ...

    async def forget(self, endpoint: NodeEndpoint) -> None: ...

    async def close(self) -> None: ...


ROUTE_EVENTS = 64  # events queued for one attempt before the stream waits (backpressure)
# An acknowledgement waits this long for a start to ride with: the worker holds a result until
# it is acknowledged, so a late one costs nothing, while a message of its own costs a write
# here and a wake-up there, just as the next job needs both processes.
ACK_LINGER_S = 0.05
STATUS_WAIT_S = 5.0  # for the status of a Dispatch call a write failed on

Route = asyncio.Queue[worker_pb2.ExecuteProgress | Exception]


class _NoDispatch(Exception):
    """The worker does not know the Dispatch stream (built before it): use ExecuteStream."""


@dataclass(frozen=True)
class _Expected:
    """The answer a worker that proves its call token owes the master on a call: nothing of a
    job goes out on the call, and nothing read from it counts, before it came (``call_proof``)."""

    proof: CallProof
    nonce: str
    address: str
    timeout_s: float

    async def wait(self, call: Any) -> None:
        """Raises WorkerUnreachable unless the call's initial metadata holds the answer."""
        try:
            async with asyncio.timeout(self.timeout_s):
                metadata = await call.initial_metadata()
        except TimeoutError:
            raise WorkerUnreachable(
                f"worker {self.address}: no answer to the master's proof in {self.timeout_s:g}s"
            ) from None
        if not self.proof.answered(self.nonce, metadata):
            said = (await call.code(), await call.details()) if call.done() else None
            raise self.unproven(said)

    def unproven(self, said: tuple[grpc.StatusCode, str] | None) -> WorkerUnreachable:
        """What the master makes of a call the worker did not prove (``said``: the status it
        ended with, from whatever answered). Nothing there to answer (UNAVAILABLE) is the
        common case, a dead worker, and is said as such."""
        if said is not None and said[0] == grpc.StatusCode.UNAVAILABLE:
            return WorkerUnreachable(f"worker {self.address}: UNAVAILABLE: {said[1]}")
        said_text = f" (it said {said[0].name}: {said[1]})" if said is not None else ""
        return WorkerUnreachable(
            f"worker {self.address}: what answers there did not prove it is the worker that "
            f"registered at this address; nothing of a job was sent to it{said_text}"
        )


class _Session:
    """The Dispatch stream to one worker: starts and acknowledgements go out several to a
    message (acknowledgements wait up to ACK_LINGER_S for a start); events come back and are
    routed to the attempt they are about. When the stream breaks, every attempt on it gets
    ``WorkerUnreachable`` (and re-attaches)."""

    def __init__(
        self,
        stub: WorkerServiceAsyncStub,
        address: str,
        metadata: Metadata,
        expected: _Expected | None,
    ) -> None:
        self.address = address
        self.call = stub.Dispatch(metadata=metadata)
        self.routes: dict[tuple[str, int], Route] = {}
        self.error: Exception | None = None
        self._expected = expected
        self._proved = asyncio.Event()  # (the reader waits for the answer, the writer for this)
        self._starts: list[worker_pb2.ExecuteRequest] = []
        self._acks: list[worker_pb2.AttemptRef] = []
        self._pending = asyncio.Event()
        self._ack_timer: asyncio.TimerHandle | None = None
        self._tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    def start(self, request: worker_pb2.ExecuteRequest, route: Route) -> None:
        self.routes[(request.task_id, request.attempt)] = route
        self._starts.append(request)
        self._pending.set()

    def ack(self, task_id: str, attempt: int) -> None:
        self._acks.append(worker_pb2.AttemptRef(task_id=task_id, attempt=attempt))
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_LINGER_S, self._pending.set)

    async def _write(self) -> None:
        try:
            await self._proved.wait()
            while True:
                await self._pending.wait()
                self._pending.clear()
                self._cancel_ack_timer()
                request = worker_pb2.DispatchRequest(start=self._starts, delivered=self._acks)
                self._starts, self._acks = [], []
                await self.call.write(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(await self._write_error(exc))

    async def _write_error(self, exc: Exception) -> Exception:
        """Why a write failed, as the call's own status says: a write to a call the worker
        refused outright (UNIMPLEMENTED: it has no Dispatch) fails as INTERNAL, or as an
        InvalidStateError once the call is over."""
        try:
            async with asyncio.timeout(STATUS_WAIT_S):
                code, details = await self.call.code(), await self.call.details()
        except Exception:  # no status in time: the transport is in trouble
            return WorkerUnreachable(f"worker {self.address}: Dispatch stream: {exc}")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return _NoDispatch()
        return WorkerUnreachable(f"worker {self.address}: {code.name}: {details}")

    async def _read(self) -> None:
        try:
            if self._expected is not None:
                await self._expected.wait(self.call)
            self._proved.set()
            async for message in self.call:
                for event in message.events:
                    route = self.routes.get((event.task_id, event.attempt))
                    if route is not None:  # else an attempt nobody follows any more
                        await route.put(event)
            self._fail(WorkerUnreachable(f"worker {self.address} ended the Dispatch stream"))
        except (grpc.aio.AioRpcError, WorkerUnreachable) as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            self._fail(WorkerUnreachable(f"worker {self.address}: channel closed"))
        except Exception as exc:  # a bug: its attempts must not wait on a dead reader
            log.error(
                "reading the Dispatch stream of worker %s failed", self.address, exc_info=True
            )
            self._fail(WorkerUnreachable(f"worker {self.address}: Dispatch stream: {exc!r}"))

    def _fail(self, exc: Exception) -> None:
        if self.error is not None:
            return
        if self._expected is not None and not self._proved.is_set():
            # Whatever it said, it is not the worker: not even UNIMPLEMENTED counts (that would
            # send the jobs in ExecuteStream calls, each with its payload).
            said = (
                (exc.code(), exc.details() or "") if isinstance(exc, grpc.aio.AioRpcError) else None
            )
            exc = exc if isinstance(exc, WorkerUnreachable) else self._expected.unproven(said)
        elif isinstance(exc, grpc.aio.AioRpcError):
            exc = (
                _NoDispatch()
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED
                else _classify(exc, self.address)
            )
            if isinstance(exc, AttemptGone | AttemptRejected):  # about the stream, not a task
                exc = WorkerUnreachable(f"worker {self.address}: Dispatch stream: {exc}")
        self.error = exc
        self._cancel_ack_timer()
        for route in self.routes.values():
            _deliver(route, exc)
        self.routes.clear()
        self.call.cancel()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def _cancel_ack_timer(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    def close(self) -> None:
        self._fail(WorkerUnreachable(f"worker {self.address}: channel closed"))


def _deliver(route: Route, item: Exception) -> None:
    """Put ``item`` on a route now, dropping queued events (a re-attach replays them)."""
    while route.full():
        route.get_nowait()
    route.put_nowait(item)


def _insecure(endpoint: NodeEndpoint) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(endpoint.address, options=CHANNEL_OPTIONS)


class GrpcWorkerClient:
    """``channel_factory`` makes the channel to a node endpoint (TLS: ``security.tls``)."""

    def __init__(
        self,
        rpc_timeout_s: float,
        channel_factory: Callable[[NodeEndpoint], grpc.aio.Channel] = _insecure,
        start_window_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``start_window_s``: a new attempt that reaches its worker later than this after it
        was sent is refused there (0: never); ``clock`` is the master's monotonic clock, the one
        its Register and Heartbeat answers report."""
        self.rpc_timeout_s = rpc_timeout_s
        self.channel_factory = channel_factory
        self.start_window_s = start_window_s
        self.clock = clock
        self._channels: dict[NodeEndpoint, tuple[grpc.aio.Channel, WorkerServiceAsyncStub]] = {}
        self._sessions: dict[NodeEndpoint, _Session] = {}
        self._dispatch: set[NodeEndpoint] = set()  # workers that serve the Dispatch stream
        # What each worker wants its callers to prove (or send: a bearer token).
        self._callers: dict[NodeEndpoint, str | CallProof] = {}

    def _stub(self, endpoint: NodeEndpoint) -> WorkerServiceAsyncStub:
        known = self._channels.get(endpoint)
        if known is None:
            channel = self.channel_factory(endpoint)
            known = (channel, worker_pb2_grpc.WorkerServiceStub(channel))
            self._channels[endpoint] = known
        return known[1]

    async def execute(
        self,
        endpoint: NodeEndpoint,
        task_id: str,
        attempt: int,
        spec: TaskSpec,
        attach: bool,
        offsets: Mapping[Stream, int],
        deadline_s: float,
    ) -> AsyncIterator[OutputChunk | ExecOutcome]:
        if not attach and endpoint in self._dispatch:
            try:
                async for event in self._on_stream(endpoint, task_id, attempt, spec, deadline_s):
                    yield event
                return
            except _NoDispatch:
                self._dispatch.discard(endpoint)
        async for event in self._execute_call(
            endpoint, task_id, attempt, spec, attach, offsets, deadline_s
        ):
            yield event

    def dispatch_to(
        self, endpoint: NodeEndpoint, supported: bool, caller: str | CallProof = ""
    ) -> None:
        """Whether the worker at ``endpoint`` serves the Dispatch stream (it says so when it
        registers; else each attempt is an ExecuteStream call), and the token it wants its
        callers to prove, or to send as a bearer token (a worker without TLS serves only the
        master it gave it to). A worker that proves its token gets jobs on Dispatch only: an
        ExecuteStream call carries the job before the worker can answer."""
        if supported or isinstance(caller, CallProof):
            self._dispatch.add(endpoint)
        else:
            self._dispatch.discard(endpoint)
        if caller:
            self._callers[endpoint] = caller
        else:
            self._callers.pop(endpoint, None)

    def _credentials(self, endpoint: NodeEndpoint) -> tuple[Metadata, _Expected | None]:
        """A call's metadata, and the answer it must get (a fresh proof each call)."""
        caller = self._callers.get(endpoint)
        if isinstance(caller, CallProof):
            metadata, nonce = caller.request()
            return metadata, _Expected(caller, nonce, endpoint.address, self.rpc_timeout_s)
        return ((("authorization", f"Bearer {caller}"),) if caller else ()), None

    async def _on_stream(
        self, endpoint: NodeEndpoint, task_id: str, attempt: int, spec: TaskSpec, deadline_s: float
    ) -> AsyncIterator[OutputChunk | ExecOutcome]:
        """One attempt on the worker's Dispatch stream (opened on first use)."""
        address = endpoint.address
        session = self._sessions.get(endpoint)
        if session is None or session.error is not None:
            session = self._sessions[endpoint] = _Session(
                self._stub(endpoint), address, *self._credentials(endpoint)
            )
        route: Route = asyncio.Queue(ROUTE_EVENTS)
        session.start(self._request(task_id, attempt, spec, False, {}), route)
        timer = asyncio.get_running_loop().call_later(
            max(deadline_s, 0.001),
            _deliver,
            route,
            WorkerUnreachable(f"worker {address}: DEADLINE_EXCEEDED: no result in time"),
        )
        key = (task_id, attempt)
        position = {Stream.STDOUT: 0, Stream.STDERR: 0}
        try:
            while True:
                event = await route.get()
                if isinstance(event, Exception):
                    raise event
                if event.type == worker_pb2.PROGRESS_OUTPUT:
                    stream = Stream(event.output_type)
                    start = event.offset if event.HasField("offset") else position[stream]
                    position[stream] = start + len(event.data)
                    yield OutputChunk(stream, start, event.data)
                elif event.type == worker_pb2.PROGRESS_COMPLETED:
                    yield wire.outcome_from_pb(event.final_result)
                    # Resumed: the result is recorded; the worker may forget it.
                    session.ack(task_id, attempt)
                    return
                elif event.type == worker_pb2.PROGRESS_ERROR:
                    raise _refusal(event, address)
        except ValueError as exc:  # e.g. an output type this master does not know
            raise AttemptGone(f"worker {address} sent a malformed message: {exc}") from None
        finally:
            timer.cancel()
            if session.routes.get(key) is route:
                del session.routes[key]
            while not route.empty():  # frees the reader if it waits to put on this route
                route.get_nowait()

    async def _execute_call(
        self,
        endpoint: NodeEndpoint,
        task_id: str,
        attempt: int,
        spec: TaskSpec,
        attach: bool,
        offsets: Mapping[Stream, int],
        deadline_s: float,
    ) -> AsyncIterator[OutputChunk | ExecOutcome]:
        """One attempt through its own ExecuteStream call: to attach to it again, or on a
        worker without the Dispatch stream."""
        address = endpoint.address
        request = self._request(task_id, attempt, spec, attach, offsets)
        metadata, expected = self._credentials(endpoint)
        call = self._stub(endpoint).ExecuteStream(
            request, timeout=max(deadline_s, 0.001), metadata=metadata
        )
        position = dict(offsets)  # where the next chunk starts when a worker sends no offset
        try:
            if expected is not None:
                await expected.wait(call)
            async for msg in call:
                if msg.type == worker_pb2.PROGRESS_OUTPUT:
                    stream = Stream(msg.output_type)
                    start = msg.offset if msg.HasField("offset") else position.get(stream, 0)
                    position[stream] = start + len(msg.data)
                    yield OutputChunk(stream, start, msg.data)
                elif msg.type == worker_pb2.PROGRESS_COMPLETED:
                    yield wire.outcome_from_pb(msg.final_result)
                    # Resumed: the result is recorded. Read the call to its end (not cancel
                    # it), so the worker knows it was delivered and forgets it.
                    async for _ in call:
                        pass
                    return
                elif msg.type == worker_pb2.PROGRESS_ERROR:
                    raise AttemptRejected(msg.data.decode(errors="replace"), fatal=True)
        except grpc.aio.AioRpcError as exc:
            raise _classify(exc, address) from None
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            raise WorkerUnreachable(f"worker {address}: channel closed") from None
        except ValueError as exc:  # e.g. an output type this master does not know
            raise AttemptGone(f"worker {address} sent a malformed message: {exc}") from None
        finally:
            if not call.done():
                call.cancel()
        raise WorkerUnreachable(f"worker {address} ended the stream without a result")

    def _request(
        self,
        task_id: str,
        attempt: int,
        spec: TaskSpec,
        attach: bool,
        offsets: Mapping[Stream, int],
    ) -> worker_pb2.ExecuteRequest:
        if attach:  # (only which attempt, and where its output resumes: nothing of the job)
            return worker_pb2.ExecuteRequest(
                task_id=task_id,
                attempt=attempt,
                attach=True,
                stdout_offset=offsets.get(Stream.STDOUT, 0),
                stderr_offset=offsets.get(Stream.STDERR, 0),
            )
        start_by = self.clock() + self.start_window_s if self.start_window_s else 0
        return worker_pb2.ExecuteRequest(
            task_id=task_id,
            task_type=spec.task_type,
            payload=spec.payload,
            timeout=wire.duration(spec.timeout_s),
            metadata=spec.metadata,
            attempt=attempt,
            limits=wire.limits_to_pb(spec.limits),
            start_by=wire.duration(start_by) if start_by else None,
        )

    async def cancel(
        self,
        endpoint: NodeEndpoint,
        task_id: str,
        attempt: int = 0,
        sig: signal.Signals | None = None,
    ) -> bool:
        metadata, expected = self._credentials(endpoint)
        call = self._stub(endpoint).CancelTask(
            worker_pb2.CancelTaskRequest(
                task_id=task_id, attempt=attempt, signal=wire.stop_signal_to_pb(sig)
            ),
            timeout=self.rpc_timeout_s,
            metadata=metadata,
        )
        try:
            reply = await call
            if expected is not None:
                await expected.wait(call)
        except grpc.aio.AioRpcError as exc:
            if expected is not None and not expected.proof.answered(
                expected.nonce, exc.initial_metadata()
            ):
                raise expected.unproven((exc.code(), exc.details() or "")) from None
            raise _classify(exc, endpoint.address) from None
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            raise WorkerUnreachable(f"worker {endpoint.address}: channel closed") from None
        return reply.cancelled

    async def forget(self, endpoint: NodeEndpoint) -> None:
        self._dispatch.discard(endpoint)
        self._callers.pop(endpoint, None)
        session = self._sessions.pop(endpoint, None)
        if session is not None:
            session.close()
        known = self._channels.pop(endpoint, None)
        if known is not None:
            await known[0].close()

    async def close(self) -> None:
        for endpoint in list(self._channels):
            with contextlib.suppress(Exception):
                await self.forget(endpoint)


def _being_cancelled() -> bool:
    """grpc.aio ends the calls of a channel closed under them (``forget``) with CancelledError.
    Unless this task itself is being cancelled, that is transport trouble, not a cancellation:
    passed on, it would kill the caller, e.g. a Cancel RPC that then never answers."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _refusal(event: worker_pb2.ExecuteProgress, address: str) -> Exception:
    """The error a PROGRESS_ERROR stands for, as the same status would be from ExecuteStream."""
    message = event.data.decode(errors="replace")
    code = _CODES.get(event.error_code)
    if code is None:  # no code (an old worker): it would not run the task at all
        return AttemptRejected(message, fatal=True)
    return _by_code(code, message, address)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _classify(exc: grpc.aio.AioRpcError, address: str) -> Exception:
    return _by_code(exc.code(), exc.details() or exc.code().name, address)


def _by_code(code: grpc.StatusCode, details: str, address: str) -> Exception:
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED):
        return AttemptRejected(details, fatal=True)
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION):
        return AttemptRejected(details, fatal=False)
    if code == grpc.StatusCode.NOT_FOUND:
        return AttemptGone(details)
    return WorkerUnreachable(f"worker {address}: {code.name}: {details}")
