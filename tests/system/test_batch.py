"""SubmitBatch and WatchJobs through the SDK against a real cluster."""

from __future__ import annotations

import uuid

import pytest

from dist_exec.client import (
    Client,
    InvalidTaskSpec,
    Job,
    JobNotFound,
    JobStatus,
    command_spec,
)
from tests.conftest import SmallCluster


async def test_batch_runs_every_job_and_watch_interleaves_them(
    small_cluster: SmallCluster,
) -> None:
    async with Client(small_cluster.address) as client:
        specs = [
            command_spec(f"echo job{i}; echo e{i} >&2; exit {i % 3}", shell=True) for i in range(12)
        ]
        job_ids = await client.submit_many(specs)
        assert len(set(job_ids)) == 12
        out: dict[str, bytes] = dict.fromkeys(job_ids, b"")
        err: dict[str, bytes] = dict.fromkeys(job_ids, b"")
        final: dict[str, Job] = {}
        async for job_id, item in client.watch_many(job_ids):
            assert job_id not in final, "output after the final state"
            if isinstance(item, Job):
                final[job_id] = item
            else:
                _, chunk = item
                (out if chunk.stream.name == "STDOUT" else err)[job_id] += chunk.data
        assert set(final) == set(job_ids)
        for i, job_id in enumerate(job_ids):
            assert out[job_id] == f"job{i}\n".encode()
            assert err[job_id] == f"e{i}\n".encode()
            assert final[job_id].exit_code == i % 3
            assert final[job_id].status == (JobStatus.COMPLETED if i % 3 == 0 else JobStatus.FAILED)
        # Watching jobs that have ended gives their final states at once.
        again = [item async for _, item in client.watch_many(job_ids[:3], with_output=False)]
        assert all(isinstance(item, Job) for item in again)
        assert len(again) == 3


async def test_a_bad_job_rejects_the_whole_batch(small_cluster: SmallCluster) -> None:
    async with Client(small_cluster.address) as client:
        _, before = await client.list_jobs()
        specs = [command_spec(["true"]) for _ in range(3)]
        specs.insert(2, command_spec(["true"], priority=42))
        with pytest.raises(InvalidTaskSpec, match="job 2 of the batch: priority must be 0-10"):
            await client.submit_many(specs)
        with pytest.raises(InvalidTaskSpec, match="a batch holds 1-1000 jobs, got 0"):
            await client.submit_many([])
        with pytest.raises(InvalidTaskSpec, match="got 1001"):
            await client.submit_many([command_spec(["true"])] * 1001)
        _, after = await client.list_jobs()
        assert after == before


async def test_watch_rejects_unknown_and_bad_ids(small_cluster: SmallCluster) -> None:
    async with Client(small_cluster.address) as client:
        real = await client.submit(command_spec(["true"]))
        missing = str(uuid.uuid4())
        with pytest.raises(JobNotFound, match=f"job {missing} not found"):
            async for _ in client.watch_many([real, missing]):
                pass
        with pytest.raises(InvalidTaskSpec, match="expected a UUID"):
            async for _ in client.watch_many(["nope"]):
                pass
        with pytest.raises(InvalidTaskSpec, match="a list of job ids, not one id"):
            async for _ in client.watch_many(real):
                pass
        with pytest.raises(InvalidTaskSpec, match="watch 1-1000 jobs, got 0"):
            async for _ in client.watch_many([]):
                pass
