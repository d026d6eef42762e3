"""A cancel the master has taken is carried out even when its caller goes away."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import grpc
import grpc.aio
import pytest

from dist_exec.rpc.v1 import common_pb2, master_pb2, master_pb2_grpc
from tests.conftest import SmallCluster, pid_alive, wait_until


@pytest.mark.parametrize("deadline_s", [0.05, 0.3])
async def test_a_cancel_whose_caller_gives_up_still_stops_the_job(
    small_cluster: SmallCluster, tmp_path: Path, deadline_s: float
) -> None:
    """A client with a short deadline (or one that exits) must not leave the job running,
    marked as being cancelled: the master used to give its cancel the call's remaining time."""
    pid_file = tmp_path / "pid"
    payload = {"command": "sh", "args": ["-c", f"echo $$ > {pid_file}; exec sleep 300"]}
    async with grpc.aio.insecure_channel(small_cluster.address) as channel:
        stub = master_pb2_grpc.MasterServiceStub(channel)
        request = master_pb2.SubmitRequest(
            task_type="command", payload=json.dumps(payload).encode()
        )
        job_id = (await stub.Submit(request)).job_id
        await wait_until(lambda: pid_file.exists() and pid_file.read_text(), 20, "the start")
        pid = int(pid_file.read_text())
        call = stub.Cancel(master_pb2.CancelRequest(job_id=job_id), timeout=deadline_s)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call
        assert await call.code() in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)

        async def cancelled() -> bool:
            reply = await stub.GetStatus(master_pb2.GetStatusRequest(job_id=job_id))
            return reply.status == common_pb2.JOB_STATUS_CANCELLED

        await wait_until(cancelled, 20, "the job to end cancelled")
        await wait_until(lambda: not pid_alive(pid), 20, "its command to be stopped")
