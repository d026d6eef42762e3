"""RunJobs: one call submits jobs and follows them (what `dist-exec run` uses)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dist_exec.client import Client, command_spec
from dist_exec.errors import InvalidTaskSpec
from dist_exec.models import Job, JobId, JobStatus, Stream
from tests.conftest import ClusterFactory


async def test_run_gives_the_id_then_the_output_then_the_final_state(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master()
    cluster.worker(master, worker_id="w1")
    async with Client(master.address) as client, asyncio.timeout(30):
        items = [
            item
            async for item in client.run(
                command_spec("printf out; printf err >&2; exit 3", shell=True)
            )
        ]
        job_id = items[0]
        assert isinstance(job_id, str)
        final = items[-1]
        assert isinstance(final, Job)
        assert (final.id, final.status, final.exit_code) == (job_id, JobStatus.FAILED, 3)
        chunks = [item[1] for item in items[1:-1] if isinstance(item, tuple)]
        assert len(chunks) == len(items) - 2
        assert b"".join(c.data for c in chunks if c.stream == Stream.STDOUT) == b"out"
        assert b"".join(c.data for c in chunks if c.stream == Stream.STDERR) == b"err"
        stored = await client.get(job_id)  # recorded as streamed
        assert (stored.stdout, stored.stderr, stored.exit_code) == (b"out", b"err", 3)


async def test_run_many_accepts_all_then_follows_each(cluster: ClusterFactory) -> None:
    master = cluster.master()
    cluster.worker(master, worker_id="w1")
    cluster.worker(master, worker_id="w2")
    specs = [command_spec(["echo", str(i)]) for i in range(6)]
    async with Client(master.address) as client, asyncio.timeout(30):
        events = client.run_many(specs)
        job_ids = await anext(events)
        assert isinstance(job_ids, list)
        assert len(set(job_ids)) == 6
        out: dict[JobId, bytes] = dict.fromkeys(job_ids, b"")
        finals: dict[JobId, Job] = {}
        async for event in events:
            assert isinstance(event, tuple)
            job_id, item = event
            assert job_id not in finals, "nothing comes for a job after its final state"
            if isinstance(item, Job):
                finals[job_id] = item
            else:
                out[job_id] += item[1].data
        assert [out[j] for j in job_ids] == [f"{i}\n".encode() for i in range(6)]
        assert {f.status for f in finals.values()} == {JobStatus.COMPLETED}
        assert {f.worker_id for f in finals.values()} == {"w1", "w2"}


async def test_run_refuses_bad_input_before_accepting_anything(cluster: ClusterFactory) -> None:
    master = cluster.master()
    cluster.worker(master, worker_id="w1")
    async with Client(master.address) as client:
        bad = command_spec(["true"], timeout_s=-1)
        seen: list[object] = []
        with pytest.raises(InvalidTaskSpec, match="timeout"):
            await _collect(client.run(bad), seen)
        with pytest.raises(InvalidTaskSpec):  # a batch is accepted whole or not at all
            await _collect(client.run_many([command_spec(["true"]), bad]), seen)
        assert seen == []  # not even an id
        assert (await client.list_jobs())[1] == 0


async def _collect(items: AsyncIterator[object], into: list[object]) -> None:
    async for item in items:
        into.append(item)
