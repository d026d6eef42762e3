"""Dispatcher I/O: the WorkerClient seam and its gRPC implementation.

One long-lived channel per worker address. Errors come back as three kinds the master acts on:
``AttemptRejected`` (the worker would not start it), ``AttemptGone`` (the worker no longer holds
it) and ``WorkerUnreachable`` (transport trouble: the attempt may still be running).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import grpc
import grpc.aio

from dist_exec import wire
from dist_exec.config import MAX_MESSAGE_BYTES
from dist_exec.models import ExecOutcome, OutputChunk, Stream, TaskSpec
from dist_exec.rpc.v1 import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from dist_exec.rpc.v1.worker_pb2_grpc import WorkerServiceAsyncStub

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
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
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
        address: str,
        task_id: str,
        attempt: int,
        spec: TaskSpec,
        attach: bool,
        offsets: Mapping[Stream, int],
        deadline_s: float,
    ) -> AsyncIterator[OutputChunk | ExecOutcome]: ...

    async def cancel(self, address: str, task_id: str, attempt: int = 0) -> bool: ...

    async def forget(self, address: str) -> None: ...

    async def close(self) -> None: ...


def _insecure(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


class GrpcWorkerClient:
    """``channel_factory`` makes the channel to a worker address (TLS: ``security.tls``)."""

    def __init__(
        self,
        rpc_timeout_s: float,
        channel_factory: Callable[[str], grpc.aio.Channel] = _insecure,
    ) -> None:
        self.rpc_timeout_s = rpc_timeout_s
        self.channel_factory = channel_factory
        self._channels: dict[str, tuple[grpc.aio.Channel, WorkerServiceAsyncStub]] = {}

    def _stub(self, address: str) -> WorkerServiceAsyncStub:
        known = self._channels.get(address)
        if known is None:
            channel = self.channel_factory(address)
            known = (channel, worker_pb2_grpc.WorkerServiceStub(channel))
            self._channels[address] = known
        return known[1]

    async def execute(
        self,
        address: str,
        task_id: str,
        attempt: int,
        spec: TaskSpec,
        attach: bool,
        offsets: Mapping[Stream, int],
        deadline_s: float,
    ) -> AsyncIterator[OutputChunk | ExecOutcome]:
        request = worker_pb2.ExecuteRequest(
            task_id=task_id,
            task_type=spec.task_type,
            payload=b"" if attach else spec.payload,
            timeout=wire.duration(spec.timeout_s),
            metadata=spec.metadata,
            attempt=attempt,
            attach=attach,
            stdout_offset=offsets.get(Stream.STDOUT, 0),
            stderr_offset=offsets.get(Stream.STDERR, 0),
            limits=wire.limits_to_pb(spec.limits),
        )
        call = self._stub(address).ExecuteStream(request, timeout=max(deadline_s, 0.001))
        position = dict(offsets)  # where the next chunk starts when a worker sends no offset
        try:
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

    async def cancel(self, address: str, task_id: str, attempt: int = 0) -> bool:
        try:
            reply = await self._stub(address).CancelTask(
                worker_pb2.CancelTaskRequest(task_id=task_id, attempt=attempt),
                timeout=self.rpc_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise _classify(exc, address) from None
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            raise WorkerUnreachable(f"worker {address}: channel closed") from None
        return reply.cancelled

    async def forget(self, address: str) -> None:
        known = self._channels.pop(address, None)
        if known is not None:
            await known[0].close()

    async def close(self) -> None:
        for address in list(self._channels):
            with contextlib.suppress(Exception):
                await self.forget(address)


def _being_cancelled() -> bool:
    """grpc.aio ends the calls of a channel closed under them (``forget``) with CancelledError.
    Unless this task itself is being cancelled, that is transport trouble, not a cancellation:
    passed on, it would kill the caller, e.g. a Cancel RPC that then never answers."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _classify(exc: grpc.aio.AioRpcError, address: str) -> Exception:
    code, details = exc.code(), exc.details() or exc.code().name
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED):
        return AttemptRejected(details, fatal=True)
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION):
        return AttemptRejected(details, fatal=False)
    if code == grpc.StatusCode.NOT_FOUND:
        return AttemptGone(details)
    return WorkerUnreachable(f"worker {address}: {code.name}: {details}")
