"""The client's end of RunSession against a scripted server (real gRPC on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from dist_exec.client import _session as session_module
from dist_exec.client._session import RunSession
from dist_exec.rpc.v1 import master_pb2, master_pb2_grpc


async def test_a_run_waiting_for_a_slot_fails_when_the_stream_breaks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One run at a time: the second waits for the first's slot; the stream breaks meanwhile.
    The waiting run must fail too, not wait on a stream nobody reads any more."""
    monkeypatch.setattr(session_module, "RUNS_PER_SESSION", 1)
    cut = asyncio.Event()

    async def serve(
        requests: AsyncIterator[master_pb2.RunSessionRequests],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[master_pb2.RunSessionEvents]:
        await context.send_initial_metadata(())
        first = (await anext(aiter(requests))).requests[0]
        accepted = master_pb2.JobEvent(job_id="j1", accepted=True)
        yield master_pb2.RunSessionEvents(
            events=[master_pb2.RunSessionEvent(tag=first.tag, event=accepted)]
        )
        await cut.wait()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the master went away")

    handler = grpc.stream_stream_rpc_method_handler(
        serve,
        request_deserializer=master_pb2.RunSessionRequests.FromString,
        response_serializer=master_pb2.RunSessionEvents.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "distexec.v1.MasterService", {"RunSession": handler}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            session = RunSession(master_pb2_grpc.MasterServiceStub(channel))
            request = master_pb2.RunJobsRequest(jobs=[master_pb2.SubmitRequest(task_type="x")])
            async with asyncio.timeout(10):
                first = session.run(request)
                assert (await anext(first)).accepted
                second = asyncio.create_task(anext(session.run(request)))
                cut.set()
                with pytest.raises(grpc.aio.AioRpcError) as broke:
                    await anext(first)
                assert broke.value.code() == grpc.StatusCode.UNAVAILABLE
                await first.aclose()  # its slot is free: the second run gets it
                with pytest.raises(grpc.aio.AioRpcError) as too:
                    await second
                assert too.value is broke.value
            await session.close()
    finally:
        await server.stop(None)
