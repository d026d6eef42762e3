"""Crashes and shutdowns with real processes: no accepted job is lost or left RUNNING."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from dist_exec.client import Client, JobStatus, command_spec
from dist_exec.config import split_address
from dist_exec.errors import MasterUnavailable
from dist_exec.models import Job, NodeStatus
from dist_exec.rpc.v1 import worker_pb2, worker_pb2_grpc
from tests.conftest import ClusterFactory, wait_until, worker_channel

TERMINAL = {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMEOUT}


async def wait_job(
    client: Client, job_id: str, timeout: float = 30.0, statuses: set[JobStatus] = TERMINAL
) -> Job:
    job: Job | None = None
    error: Exception | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    job, error = await client.get(job_id), None
                except MasterUnavailable as exc:  # (restarting; a timeout too)
                    error = exc
                if job is not None and job.status in statuses:
                    return job
                await asyncio.sleep(0.05)
    except TimeoutError:
        wanted = sorted(s.value for s in statuses)
        seen = job.status.value if job is not None else "nothing"
        raise AssertionError(
            f"job {job_id} not {wanted} within {timeout}s: last seen {seen}; last error {error!r}"
        ) from None


async def wait_file_lines(path: Path, count: int, timeout: float = 20.0) -> list[str]:
    async with asyncio.timeout(timeout):
        while not (path.exists() and len(path.read_text().split()) >= count):
            await asyncio.sleep(0.02)
    return path.read_text().split()


async def test_master_sigkill_loses_no_job_and_runs_none_twice(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    master = cluster.master()
    _, port = split_address(master.address)
    cluster.worker(master, worker_id="w1", max_tasks=1)
    runs = tmp_path / "runs"
    gate = tmp_path / "gate"
    async with Client(master.address) as client:
        running = await client.submit(
            command_spec(
                f"echo started >> {runs}; while [ ! -e {gate} ]; do sleep 0.05; done; echo done",
                shell=True,
            )
        )
        queued = [await client.submit(command_spec(["echo", f"q{i}"])) for i in range(3)]
        await wait_file_lines(runs, 1)
        master.kill()

        # Same address, same data directory: the worker comes back to it by itself.
        cluster.master(data_dir=master.extra["data_dir"], listen=f"127.0.0.1:{port}")
        gate.touch()
        job = await wait_job(client, running)
        assert job.status == JobStatus.COMPLETED, job.error
        assert job.stdout == b"done\n"
        assert job.retries == 0
        assert runs.read_text().split() == ["started"]  # attached again, not run twice
        for i, job_id in enumerate(queued):
            done = await wait_job(client, job_id)
            assert done.status == JobStatus.COMPLETED
            assert done.stdout == f"q{i}\n".encode()


async def test_output_stored_before_a_master_sigkill_is_kept_once(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    """The worker replays a re-attached attempt's output from what the master has stored,
    not from 0: a replay overlapping the stored rows was kept beside them (lines twice)."""
    master = cluster.master()
    _, port = split_address(master.address)
    cluster.worker(master, worker_id="w1")
    gate = tmp_path / "gate"
    script = (
        "for i in 1 2 3; do echo line$i; sleep 0.05; done; "
        f"while [ ! -e {gate} ]; do sleep 0.05; done; echo line4"
    )
    async with Client(master.address) as client:
        job_id = await client.submit(command_spec(script, shell=True))
        async with asyncio.timeout(20):  # three lines stored, as rows of their own
            while (await client.get(job_id)).stdout.count(b"\n") < 3:
                await asyncio.sleep(0.02)
        master.kill()
        cluster.master(data_dir=master.extra["data_dir"], listen=f"127.0.0.1:{port}")
        gate.touch()
        job = await wait_job(client, job_id)
        expected = b"line1\nline2\nline3\nline4\n"
        assert (job.status, job.stdout, job.stdout_bytes) == (
            JobStatus.COMPLETED,
            expected,
            len(expected),
        )
        assert (
            b"".join(c.data for _, c in [i async for i in client.stream_output(job_id)]) == expected
        )


async def test_running_job_of_a_vanished_worker_is_retried_after_master_restart(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master(heartbeat_timeout="1s", heartbeat_interval="0.2s")
    _, port = split_address(master.address)
    w1 = cluster.worker(master, worker_id="w1", max_tasks=1)
    async with Client(master.address) as client:
        job_id = await client.submit(command_spec("sleep 300", shell=True, timeout_s=600))
        await wait_job(client, job_id, statuses={JobStatus.RUNNING})
        master.kill()
        w1.kill()
        cluster.master(
            data_dir=master.extra["data_dir"],
            listen=f"127.0.0.1:{port}",
            heartbeat_timeout="1s",
            heartbeat_interval="0.2s",
        )
        job = await client.get(job_id)
        # Recovered as it was (or already requeued, if the client's reconnection backoff took
        # longer than the grace): not lost, not failed.
        assert job.status in (JobStatus.RUNNING, JobStatus.PENDING)
        # w1 never comes back: after the registration grace the job goes back to the queue.
        await wait_job(client, job_id, statuses={JobStatus.PENDING}, timeout=10)
        cluster.worker(f"127.0.0.1:{port}", worker_id="w2", max_tasks=1)
        job = await wait_job(client, job_id, statuses={JobStatus.RUNNING}, timeout=10)
        assert job.worker_id == "w2"
        assert job.retries == 1
        await client.cancel(job_id)


async def test_worker_sigkill_mid_task_retries_on_another_worker(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    master = cluster.master(heartbeat_timeout="1s", heartbeat_interval="0.2s")
    w1 = cluster.worker(master, worker_id="w1", max_tasks=1)
    runs = tmp_path / "runs"
    async with Client(master.address) as client:
        job_id = await client.submit(
            # The first run outlasts its worker whatever the machine's speed; the retry ends.
            command_spec(
                f"echo run >> {runs}; "
                f'if [ "$(wc -l < {runs})" -gt 1 ]; then echo survived; else sleep 60; fi',
                shell=True,
            )
        )
        job = await wait_job(client, job_id, statuses={JobStatus.RUNNING})
        assert job.worker_id == "w1"
        await wait_file_lines(runs, 1)
        cluster.worker(master, worker_id="w2", max_tasks=1)
        w1.kill()
        job = await wait_job(client, job_id, timeout=30)
        assert job.status == JobStatus.COMPLETED, job.error
        assert job.stdout == b"survived\n"
        assert job.worker_id == "w2"
        assert job.retries == 1
        assert runs.read_text().split() == ["run", "run"]


async def test_worker_sigterm_drains_running_work_then_exits(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    master = cluster.master()
    w1 = cluster.worker(master, worker_id="w1", max_tasks=2)
    started = tmp_path / "started"
    async with Client(master.address) as client:
        job_id = await client.submit(
            command_spec(f"echo go > {started}; sleep 1; echo finished", shell=True)
        )
        # RUNNING on the master means dispatched; wait until the command itself runs.
        await wait_file_lines(started, 1)
        w1.signal(signal.SIGTERM)
        job = await wait_job(client, job_id)
        assert job.status == JobStatus.COMPLETED
        assert job.stdout == b"finished\n"
        assert await asyncio.to_thread(w1.proc.wait, 20) == 0
        async with asyncio.timeout(10):
            while await client.nodes():
                await asyncio.sleep(0.05)


async def test_drain_deadline_hands_unfinished_work_back(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    master = cluster.master()
    w1 = cluster.worker(master, worker_id="w1", max_tasks=1, extra=["--drain-timeout", "0.5s"])
    started = tmp_path / "started"
    async with Client(master.address) as client:
        job_id = await client.submit(command_spec(f"echo go > {started}; sleep 300", shell=True))
        await wait_file_lines(started, 1)  # (running on the worker, not only placed)
        w1.signal(signal.SIGTERM)
        assert await asyncio.to_thread(w1.proc.wait, 20) == 0
        job = await wait_job(client, job_id, statuses={JobStatus.PENDING}, timeout=10)
        assert job.retries == 0  # handed back: not the job's fault, not counted
        cluster.worker(master, worker_id="w2", max_tasks=1)
        job = await wait_job(client, job_id, statuses={JobStatus.RUNNING})
        assert job.worker_id == "w2"
        await client.cancel(job_id)


async def test_a_second_sigterm_hands_running_work_back_too(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    """The second signal (stop now) used to fail the running jobs for good ("stopped")."""
    master = cluster.master()
    w1 = cluster.worker(master, worker_id="w1", max_tasks=1)
    started = tmp_path / "started"
    async with Client(master.address) as client:
        job_id = await client.submit(command_spec(f"echo go > {started}; sleep 300", shell=True))
        # (Started on the worker, not only placed: a start that came after the signal would
        # be refused, and the worker would have nothing to drain.)
        await wait_file_lines(started, 1)
        w1.signal(signal.SIGTERM)

        async def draining() -> bool:
            return [n.status for n in await client.nodes()] == [NodeStatus.DRAINING]

        await wait_until(draining, what="w1 to drain")
        w1.signal(signal.SIGTERM)
        await asyncio.to_thread(w1.proc.wait, 20)
        job = await wait_job(client, job_id, statuses={JobStatus.PENDING}, timeout=10)
        assert job.retries == 0
        cluster.worker(master, worker_id="w2", max_tasks=1)
        job = await wait_job(client, job_id, statuses={JobStatus.RUNNING})
        assert job.worker_id == "w2"
        await client.cancel(job_id)


async def test_a_worker_keeps_a_delivered_result_for_a_master_that_died_before_committing(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master()
    worker = cluster.worker(master, worker_id="w1")
    async with Client(master.address) as client:
        job_id = await client.submit(command_spec(["echo", "kept"]))
        job = await client.wait(job_id)
    assert job.status == JobStatus.COMPLETED
    # What a restarted master does for a job it never committed: attach to the attempt again.
    async with worker_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        replies = [
            reply
            async for reply in stub.ExecuteStream(
                worker_pb2.ExecuteRequest(task_id=job_id, attempt=job.attempt, attach=True)
            )
        ]
    final = replies[-1]
    assert final.type == worker_pb2.PROGRESS_COMPLETED
    assert final.final_result.output == b"kept\n"
    assert final.final_result.exit_code == 0
