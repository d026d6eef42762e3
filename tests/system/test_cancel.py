"""A cancel the master has taken is carried out even when its caller goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from dist_exec.rpc.v1 import common_pb2, master_pb2, master_pb2_grpc
from tests.conftest import SmallCluster, pid_alive, wait_until

if TYPE_CHECKING:
    from dist_exec.rpc.v1.master_pb2_grpc import MasterServiceAsyncStub


async def start(stub: MasterServiceAsyncStub, tmp_path: Path, script: str) -> tuple[str, int]:
    """A job running ``script`` under sh (after it wrote its pid): its id and the shell's pid."""
    pid_file = tmp_path / "pid"
    payload = {"command": "sh", "args": ["-c", f"echo $$ > {pid_file}; {script}"]}
    request = master_pb2.SubmitRequest(task_type="command", payload=json.dumps(payload).encode())
    job_id = (await stub.Submit(request)).job_id
    await wait_until(lambda: pid_file.exists() and pid_file.read_text(), 20, "the command to start")
    return job_id, int(pid_file.read_text())


async def ends_cancelled(stub: MasterServiceAsyncStub, job_id: str, pid: int) -> None:
    async def cancelled() -> bool:
        reply = await stub.GetStatus(master_pb2.GetStatusRequest(job_id=job_id))
        return reply.status == common_pb2.JOB_STATUS_CANCELLED

    await wait_until(cancelled, 20, "the job to end cancelled")
    await wait_until(lambda: not pid_alive(pid), 20, "its command to be stopped")


async def test_a_cancel_whose_deadline_leaves_no_time_still_stops_the_job(
    small_cluster: SmallCluster, tmp_path: Path
) -> None:
    """The master used to give its cancel the call's remaining time less 0.5 s: none here, so
    the worker was never asked and the job ran on, marked as being cancelled."""
    async with grpc.aio.insecure_channel(small_cluster.address) as channel:
        stub: MasterServiceAsyncStub = master_pb2_grpc.MasterServiceStub(channel)
        job_id, pid = await start(stub, tmp_path, "exec sleep 300")
        call = stub.Cancel(master_pb2.CancelRequest(job_id=job_id), timeout=0.3)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call
        assert await call.code() in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
        await ends_cancelled(stub, job_id, pid)


async def test_a_cancel_call_dropped_while_the_worker_stops_the_job_still_ends_it(
    small_cluster: SmallCluster, tmp_path: Path
) -> None:
    """The command holds out against SIGTERM (the worker kills it after its grace period);
    the client drops the call meanwhile. The master's cancel goes on, and so does the master."""
    termed, armed = tmp_path / "termed", tmp_path / "armed"
    async with grpc.aio.insecure_channel(small_cluster.address) as channel:
        stub: MasterServiceAsyncStub = master_pb2_grpc.MasterServiceStub(channel)
        script = f"trap 'touch {termed}' TERM; touch {armed}; while :; do sleep 0.1; done"
        job_id, pid = await start(stub, tmp_path, script)
        await wait_until(armed.exists, 20, "the command to trap SIGTERM")  # (else it dies)
        call = stub.Cancel(master_pb2.CancelRequest(job_id=job_id))
        await wait_until(termed.exists, 20, "the command to get SIGTERM")
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await call
        await ends_cancelled(stub, job_id, pid)
        listed = await stub.ListJobs(master_pb2.ListJobsRequest(limit=1))  # it still serves
        assert [j.job_id for j in listed.jobs] == [job_id]
