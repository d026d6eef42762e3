"""`list --json` fetches each listed job whole: in order, a bounded number at a time, leaving
out one deleted since it was listed (the logic, with a stand-in client; the real cluster's
`list --json` is in tests/system/test_cli.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import cast

import pytest

from dist_exec.cli.jobs import WHOLE_JOBS_IN_FLIGHT, _whole
from dist_exec.client import Client
from dist_exec.errors import JobNotFound, MasterUnavailable
from dist_exec.models import Job, JobId, JobStatus, TaskSpec


class SlowClient:
    """Answers GetStatus after a delay that makes later jobs answer first."""

    def __init__(self, gone: frozenset[str] = frozenset(), fail_at: str = "") -> None:
        self.gone = gone
        self.fail_at = fail_at
        self.in_flight = 0
        self.most_in_flight = 0
        self.asked: list[str] = []

    async def get(self, job_id: str) -> Job:
        self.asked.append(job_id)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001 * (50 - int(job_id)))
            if job_id in self.gone:
                raise JobNotFound(f"job {job_id} not found")
            if job_id == self.fail_at:
                raise MasterUnavailable("the master went away")
            return Job(JobId(job_id), TaskSpec("command", b"{}", 10.0), JobStatus.COMPLETED,
                       datetime.now(UTC))  # fmt: skip
        finally:
            self.in_flight -= 1


async def test_jobs_come_whole_in_order_a_few_at_a_time() -> None:
    client = SlowClient(gone=frozenset({"7", "30"}))
    ids = [JobId(str(n)) for n in range(40)]
    got = [job.id async for job in _whole(cast(Client, client), ids)]
    assert got == [i for i in ids if i not in ("7", "30")]
    assert client.most_in_flight == WHOLE_JOBS_IN_FLIGHT


async def test_a_failure_stops_the_list_and_leaves_nothing_running() -> None:
    client = SlowClient(fail_at="12")
    got: list[str] = []

    async def collect() -> None:
        async for job in _whole(cast(Client, client), [JobId(str(n)) for n in range(40)]):
            got.append(job.id)

    with pytest.raises(MasterUnavailable):
        await collect()
    assert got == [str(n) for n in range(12)]
    assert client.in_flight == 0  # the ones asked for ahead were cancelled
    assert len(client.asked) < 12 + WHOLE_JOBS_IN_FLIGHT
