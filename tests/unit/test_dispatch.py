"""The master's end of the Dispatch stream against real gRPC servers on 127.0.0.1 that play a
worker: events routed to their attempt, refusals, a stream that breaks, acknowledgements, and a
worker that only knows ExecuteStream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from dist_exec import wire
from dist_exec.client import command_spec
from dist_exec.master import dispatcher
from dist_exec.master.dispatcher import (
    AttemptGone,
    AttemptRejected,
    GrpcWorkerClient,
    WorkerUnreachable,
)
from dist_exec.models import ExecOutcome, ExecStatus, NodeEndpoint, NodeId, OutputChunk, Stream
from dist_exec.rpc.v1 import worker_pb2, worker_pb2_grpc
from dist_exec.worker.dispatch import _coalesce

SPEC = command_spec(["echo", "hi"], timeout_s=30)
Progress = worker_pb2.ExecuteProgress
Handler = Callable[
    [AsyncIterator[worker_pb2.DispatchRequest], Any], AsyncIterator[worker_pb2.DispatchEvents]
]


def _output(task_id: str, data: bytes, offset: int = 0) -> Progress:
    return Progress(
        type=worker_pb2.PROGRESS_OUTPUT,
        task_id=task_id,
        attempt=1,
        data=data,
        output_type=Stream.STDOUT.value,  # type: ignore[arg-type]
        offset=offset,
    )


def _done(task_id: str, stdout: bytes = b"", truncated: bool = False) -> Progress:
    outcome = ExecOutcome(ExecStatus.SUCCESS, 0, stdout=stdout, stdout_bytes=len(stdout))
    result = wire.outcome_to_pb(outcome, task_id, 1)
    result.output_truncated = truncated
    return Progress(type=worker_pb2.PROGRESS_COMPLETED, task_id=task_id, attempt=1,
                    final_result=result)  # fmt: skip


class FakeWorker(worker_pb2_grpc.WorkerServiceServicer):
    """Dispatch runs ``handler``; without one, the method is not implemented (an old worker),
    and ExecuteStream answers every attempt with 'old\\n'."""

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler
        self.execute_calls = 0

    async def Dispatch(self, request_iterator: Any, context: Any) -> Any:
        if self.handler is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        assert self.handler is not None
        async for message in self.handler(request_iterator, context):
            yield message

    async def ExecuteStream(self, request: Any, context: Any) -> Any:
        self.execute_calls += 1
        yield Progress(type=worker_pb2.PROGRESS_OUTPUT, data=b"old\n", offset=0)
        yield Progress(type=worker_pb2.PROGRESS_COMPLETED,
                       final_result=_done(request.task_id).final_result)  # fmt: skip


async def _serve(servicer: FakeWorker) -> tuple[grpc.aio.Server, NodeEndpoint]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, NodeEndpoint(NodeId("w1"), f"127.0.0.1:{port}")


async def _events(
    client: GrpcWorkerClient,
    endpoint: NodeEndpoint,
    task_id: str,
    deadline_s: float = 10.0,
    into: list[OutputChunk | ExecOutcome] | None = None,
) -> list[OutputChunk | ExecOutcome]:
    got = [] if into is None else into
    async with asyncio.timeout(10):
        async for event in client.execute(endpoint, task_id, 1, SPEC, False, {}, deadline_s):
            got.append(event)
    return got


async def _with_worker(
    handler: Handler | None, body: Callable[..., Awaitable[None]], declared: bool = True
) -> FakeWorker:
    """``declared``: the worker said it serves Dispatch when it registered."""
    servicer = FakeWorker(handler)  # type: ignore[abstract]  # (the other RPCs: UNIMPLEMENTED)
    server, endpoint = await _serve(servicer)
    client = GrpcWorkerClient(rpc_timeout_s=5)
    client.dispatch_to(endpoint, declared)
    try:
        await body(client, endpoint)
    finally:
        await client.close()
        await server.stop(None)
    return servicer


async def test_events_reach_their_attempt_and_results_are_acknowledged() -> None:
    acked: list[tuple[str, int]] = []

    async def handler(requests: Any, context: Any) -> AsyncIterator[worker_pb2.DispatchEvents]:
        async for request in requests:
            acked.extend((r.task_id, r.attempt) for r in request.delivered)
            # Two attempts' events interleaved in one message, in reverse order.
            ids = [s.task_id for s in request.start]
            if ids:
                yield worker_pb2.DispatchEvents(
                    events=[e for t in reversed(ids) for e in (_output(t, t.encode()), _done(t))]
                )

    async def body(client: GrpcWorkerClient, endpoint: NodeEndpoint) -> None:
        a, b = await asyncio.gather(_events(client, endpoint, "a"), _events(client, endpoint, "b"))
        for task_id, events in (("a", a), ("b", b)):
            assert events[0] == OutputChunk(Stream.STDOUT, 0, task_id.encode())
            assert isinstance(events[1], ExecOutcome)
            assert events[1].status == ExecStatus.SUCCESS
        async with asyncio.timeout(10):  # acknowledgements ride on the next message
            while sorted(acked) != [("a", 1), ("b", 1)]:
                await _events(client, endpoint, "c")

    await _with_worker(handler, body)


def _recording(
    messages: list[tuple[list[str], list[str]]],
) -> Handler:
    """A worker that records (started, acknowledged) task ids per message and finishes each
    start at once."""

    async def handler(requests: Any, context: Any) -> AsyncIterator[worker_pb2.DispatchEvents]:
        async for request in requests:
            messages.append(
                ([s.task_id for s in request.start], [r.task_id for r in request.delivered])
            )
            for start in request.start:
                yield worker_pb2.DispatchEvents(events=[_done(start.task_id)])

    return handler


async def test_an_acknowledgement_waits_to_ride_with_the_next_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatcher, "ACK_LINGER_S", 30.0)
    messages: list[tuple[list[str], list[str]]] = []

    async def body(client: GrpcWorkerClient, endpoint: NodeEndpoint) -> None:
        await _events(client, endpoint, "a")
        await asyncio.sleep(0.05)  # time enough to send it alone, if it were sent at once
        await _events(client, endpoint, "b")
        assert messages == [(["a"], []), (["b"], ["a"])]

    await _with_worker(_recording(messages), body)


async def test_an_acknowledgement_with_no_start_to_ride_with_goes_alone() -> None:
    messages: list[tuple[list[str], list[str]]] = []

    async def body(client: GrpcWorkerClient, endpoint: NodeEndpoint) -> None:
        await _events(client, endpoint, "a")
        async with asyncio.timeout(10):
            while len(messages) < 2:
                await asyncio.sleep(0.01)
        assert messages == [(["a"], []), ([], ["a"])]

    await _with_worker(_recording(messages), body)


@pytest.mark.parametrize(
    ("code", "expected", "fatal"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, AttemptRejected, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, AttemptRejected, False),
        (grpc.StatusCode.NOT_FOUND, AttemptGone, None),
    ],
)
async def test_a_refusal_on_the_stream_is_what_the_same_status_would_be(
    code: grpc.StatusCode, expected: type[Exception], fatal: bool | None
) -> None:
    async def handler(requests: Any, context: Any) -> AsyncIterator[worker_pb2.DispatchEvents]:
        async for request in requests:
            for start in request.start:
                refusal = Progress(
                    type=worker_pb2.PROGRESS_ERROR,
                    task_id=start.task_id,
                    attempt=start.attempt,
                    data=b"no room",
                    error_code=code.value[0],
                )
                event = refusal if start.task_id == "a" else _done(start.task_id)
                yield worker_pb2.DispatchEvents(events=[event])

    async def body(client: GrpcWorkerClient, endpoint: NodeEndpoint) -> None:
        with pytest.raises(expected, match="no room") as info:
            await _events(client, endpoint, "a")
        if fatal is not None:
            assert isinstance(info.value, AttemptRejected)
            assert info.value.fatal is fatal
        events = await _events(client, endpoint, "b")  # the stream still serves others
        assert isinstance(events[-1], ExecOutcome)

    await _with_worker(handler, body)


async def test_a_broken_stream_makes_its_attempts_unreachable_and_a_new_one_is_opened() -> None:
    streams = 0

    async def handler(requests: Any, context: Any) -> AsyncIterator[worker_pb2.DispatchEvents]:
        nonlocal streams
        streams += 1
        async for request in requests:
            for start in request.start:
                if streams == 1:
                    yield worker_pb2.DispatchEvents(events=[_output(start.task_id, b"par")])
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "worker going away")
                yield worker_pb2.DispatchEvents(events=[_done(start.task_id, b"ok")])

    async def body(client: GrpcWorkerClient, endpoint: NodeEndpoint) -> None:
        got: list[OutputChunk | ExecOutcome] = []
        with pytest.raises(WorkerUnreachable, match="UNAVAILABLE"):
            await _events(client, endpoint, "a", into=got)
        assert got == [OutputChunk(Stream.STDOUT, 0, b"par")]
        events = await _events(client, endpoint, "b")
        assert isinstance(events[-1], ExecOutcome)
        assert events[-1].stdout == b"ok"
        assert streams == 2

    await _with_worker(handler, body)


async def test_no_result_by_the_deadline_is_unreachable() -> None:
    async def handler(requests: Any, context: Any) -> AsyncIterator[worker_pb2.DispatchEvents]:
        async for _ in requests:
            pass
        yield worker_pb2.DispatchEvents()

    async def body(client: GrpcWorkerClient, endpoint: NodeEndpoint) -> None:
        with pytest.raises(WorkerUnreachable, match="DEADLINE_EXCEEDED"):
            await _events(client, endpoint, "a", deadline_s=0.2)

    await _with_worker(handler, body)


@pytest.mark.parametrize(
    "declared", [False, True], ids=["registered-without-dispatch", "claims-dispatch-wrongly"]
)
async def test_a_worker_without_dispatch_gets_execute_stream_calls(declared: bool) -> None:
    async def body(client: GrpcWorkerClient, endpoint: NodeEndpoint) -> None:
        for task_id in ("a", "b"):
            events = await _events(client, endpoint, task_id)
            assert events[0] == OutputChunk(Stream.STDOUT, 0, b"old\n")
            assert isinstance(events[1], ExecOutcome)

    servicer = await _with_worker(None, body, declared=declared)
    assert servicer.execute_calls == 2


def test_coalesce_leaves_out_output_a_whole_result_carries() -> None:
    batch = [_output("a", b"x"), _output("b", b"y"), _done("a", b"x"), _output("c", b"z"),
             _done("c", b"z", truncated=True)]  # fmt: skip
    kept = _coalesce(batch)
    assert [(e.task_id, e.type) for e in kept] == [
        ("b", worker_pb2.PROGRESS_OUTPUT),
        ("a", worker_pb2.PROGRESS_COMPLETED),
        ("c", worker_pb2.PROGRESS_OUTPUT),  # its result holds only the head: keep the chunk
        ("c", worker_pb2.PROGRESS_COMPLETED),
    ]
    assert _coalesce(batch[:2]) == batch[:2]


async def test_channels_are_per_endpoint_so_no_node_changes_how_another_is_dialled() -> None:
    """node-x registering local-1's address (or local-1's channel being dropped on its behalf)
    must not touch the channel to local-1: its jobs keep running there."""
    server, local_1 = await _serve(FakeWorker())  # type: ignore[abstract]
    squatter = NodeEndpoint(NodeId("node-x"), local_1.address, "node-x")
    dialled: list[NodeEndpoint] = []

    def channel(endpoint: NodeEndpoint) -> grpc.aio.Channel:
        dialled.append(endpoint)
        return grpc.aio.insecure_channel(endpoint.address)

    client = GrpcWorkerClient(rpc_timeout_s=5, channel_factory=channel)
    try:
        await _events(client, local_1, "a")
        await _events(client, squatter, "b")
        await client.forget(squatter)
        assert isinstance((await _events(client, local_1, "c"))[-1], ExecOutcome)
        assert dialled == [local_1, squatter]  # local-1's channel was neither replaced nor closed
    finally:
        await client.close()
        await server.stop(None)
