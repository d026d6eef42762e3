"""The master's RPC handlers over a real Master and SQLite store, called directly."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from dist_exec.config import MasterConfig
from dist_exec.master.request_handler import MasterServicer
from dist_exec.models import Job, JobId, JobStatus
from dist_exec.rpc.v1 import master_pb2
from tests.conftest import wait_until
from tests.unit.test_core import SPEC, HeldStore, ScriptedWorker, start_master


class HeldReads(HeldStore):
    """Reads of a job wait until the test lets them through."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.read_gate = asyncio.Event()
        self.read_gate.set()
        self.reading = asyncio.Event()

    async def get(self, job_id: JobId, with_output: bool = True) -> Job | None:
        self.reading.set()
        await self.read_gate.wait()
        return await super().get(job_id, with_output)


class Context:
    """What the handlers use of a call's context; the caller set no deadline."""

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


async def test_a_cancel_whose_caller_goes_away_while_the_owner_is_looked_up_is_carried_out(
    tmp_path: Path,
) -> None:
    """The handler reads the job (whose is it?) before it cancels. A call dropped during that
    read used to drop the cancel with it: the job went on as if never asked."""
    store = HeldReads(tmp_path / "master.db")
    master, _ = await start_master(tmp_path, ScriptedWorker(), store=store)
    runner = asyncio.create_task(master.run())
    try:
        await master.ready.wait()
        job_id = await master.submit(SPEC)  # no worker: it stays queued
        servicer = MasterServicer(master, MasterConfig(data_dir=tmp_path))
        store.read_gate.clear()
        store.reading.clear()
        context: Any = Context()  # a stand-in for grpc.aio's
        call: asyncio.Future[master_pb2.CancelResponse] = asyncio.ensure_future(
            servicer.Cancel(master_pb2.CancelRequest(job_id=job_id), context)
        )
        async with asyncio.timeout(5):
            await store.reading.wait()
        call.cancel()  # the caller is gone
        await asyncio.gather(call, return_exceptions=True)
        store.read_gate.set()

        async def cancelled() -> bool:
            job = await master.get(job_id, with_output=False)
            return job.status == JobStatus.CANCELLED

        await wait_until(cancelled, 5, "the job to end cancelled")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await store.__aexit__(None, None, None)
