"""A start that reaches a worker after the master stopped waiting for it is refused, not run.

In a partition, a start the master sent just before it lost the worker waits in the network and
arrives when the partition heals, after the job has run elsewhere. The master stamps each start
with a deadline on its own monotonic clock; the worker knows that clock from the master's
Register and Heartbeat answers. Master, worker and this test share one host, so the test
computes deadlines on the same clock."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from dist_exec import wire
from dist_exec.client import Client, command_spec
from dist_exec.models import JobStatus
from dist_exec.rpc.v1 import worker_pb2, worker_pb2_grpc
from tests.conftest import ClusterFactory, worker_channel


def _start(task_id: str, marker: Path, start_by: float) -> worker_pb2.ExecuteRequest:
    spec = command_spec(["touch", str(marker)], timeout_s=10)
    return worker_pb2.ExecuteRequest(
        task_id=task_id,
        task_type=spec.task_type,
        payload=spec.payload,
        timeout=wire.duration(10),
        attempt=1,
        start_by=wire.duration(start_by),
    )


async def _dispatch(address: str, request: worker_pb2.ExecuteRequest) -> worker_pb2.ExecuteProgress:
    async with worker_channel(address) as channel:
        call: Any = worker_pb2_grpc.WorkerServiceStub(channel).Dispatch()
        await call.write(worker_pb2.DispatchRequest(start=[request]))
        async with asyncio.timeout(15):
            while True:
                message = await call.read()
                assert message is not grpc.aio.EOF
                assert isinstance(message, worker_pb2.DispatchEvents)
                for event in message.events:
                    if event.type != worker_pb2.PROGRESS_OUTPUT:
                        call.cancel()
                        return event


async def test_a_start_that_arrives_too_late_is_refused(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    master = cluster.master()
    worker = cluster.worker(master, worker_id="w1")
    async with Client(master.address) as client:  # registered: the worker knows the clock
        assert (await client.wait(await client.submit(command_spec(["true"])))).exit_code == 0
    late, fresh = tmp_path / "late", tmp_path / "fresh"
    refused = await _dispatch(worker.address, _start("t-late", late, time.monotonic() - 5))
    assert refused.type == worker_pb2.PROGRESS_ERROR
    assert refused.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "after the master stopped waiting for it; not started" in refused.data.decode()
    ran = await _dispatch(worker.address, _start("t-fresh", fresh, time.monotonic() + 5))
    assert ran.type == worker_pb2.PROGRESS_COMPLETED
    assert ran.final_result.exit_code == 0
    assert fresh.exists()
    assert not late.exists(), "the late start ran"
    # ExecuteStream refuses it the same way.
    async with worker_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.ExecuteStream(_start("t-late-2", late, time.monotonic() - 5)):
                pass
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not late.exists()


async def test_jobs_run_normally_with_start_deadlines(cluster: ClusterFactory) -> None:
    """The master stamps every start; with a short heartbeat timeout the window is short."""
    master = cluster.master(heartbeat_interval="0.2s", heartbeat_timeout="1s")
    cluster.worker(master, worker_id="w1")
    async with Client(master.address) as client:
        jobs = [await client.submit(command_spec(["echo", str(i)])) for i in range(20)]
        finals = [await client.wait(j) for j in jobs]
    assert [(j.status, j.stdout, j.retries) for j in finals] == [
        (JobStatus.COMPLETED, f"{i}\n".encode(), 0) for i in range(20)
    ]
