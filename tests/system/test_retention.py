"""Ended jobs are deleted after --job-retention, with their output; running ones and those
whose idempotency key is still honoured stay."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

from dist_exec.client import Client, JobNotFound, JobStatus, command_spec
from tests.conftest import ClusterFactory, run_cli, wait_until
from tests.system.test_recovery import wait_job


async def gone(client: Client, job_id: str) -> bool:
    try:
        await client.get(job_id)
    except JobNotFound:
        return True
    return False


async def test_ended_jobs_are_deleted_after_the_retention(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    master = cluster.master(extra=["--job-retention", "2s"])
    cluster.worker(master, worker_id="w1")
    gate = tmp_path / "gate"
    async with Client(master.address) as client:
        ended = await client.submit(command_spec(["echo", "old"]))
        assert (await wait_job(client, ended)).stdout == b"old\n"
        keyed = await client.submit(
            replace(command_spec(["echo", "keyed"]), idempotency_key=str(uuid.uuid4()))
        )
        running = await client.submit(
            command_spec(f"while [ ! -e {gate} ]; do sleep 0.05; done; echo late", shell=True)
        )
        await wait_job(client, keyed)
        await wait_until(lambda: gone(client, ended), what="the ended job to be deleted")
        status = run_cli("status", ended, master=master.address)
        assert status.code == 1, status
        assert status.stderr.strip() == (
            f"dist-exec: job {ended} not found (ended jobs are deleted after 2s)"
        )
        listed, total = await client.list_jobs(limit=10)
        assert {j.id for j, _ in listed} == {keyed, running}
        assert total == 2
        # The running job stays however long it runs, and keeps its output once it ends.
        gate.touch()
        job = await wait_job(client, running)
        assert (job.status, job.stdout) == (JobStatus.COMPLETED, b"late\n")
        # The keyed job is kept while its key is honoured (a day), past the retention.
        assert (await client.get(keyed)).stdout == b"keyed\n"
    assert "deleted 1 jobs that ended more than 2s ago" in master.log_text()
