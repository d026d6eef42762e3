"""Following a job's output survives dropped connections: the client resumes from the last byte
it got, with no gap and no repeat, and the last line arrives before the final status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest

from dist_exec.client import Client, command_spec
from dist_exec.config import split_address
from dist_exec.models import Job, JobId, JobStatus, OutputChunk, Stream
from tests.conftest import ClusterFactory
from tests.faults.proxy import CuttableProxy

LINES = 400


async def _one_of_many(items: AsyncIterator[Any]) -> AsyncIterator[tuple[int, OutputChunk] | Job]:
    """(job id, item) pairs of one job: its items."""
    async for pair in items:
        assert isinstance(pair, tuple)
        yield pair[1]


@pytest.mark.parametrize("how", ["watch", "run", "watch_many", "run_many"])
async def test_a_follower_resumes_after_dropped_connections_without_gaps_or_repeats(
    cluster: ClusterFactory, how: str
) -> None:
    """``watch``: a job submitted before, followed with StreamOutput. ``run``: one RunJobs call
    submits and follows it; after a drop the client goes on with StreamOutput. ``watch_many``
    and ``run_many`` (which used to fail at the first drop): WatchJobs again, for the jobs not
    ended, each from where it was."""
    master = cluster.master()
    cluster.worker(master, worker_id="w1")
    proxy = CuttableProxy(*split_address(master.address)).start()
    expected = "".join(f"line-{i}\n" for i in range(1, LINES + 1)).encode()
    spec = command_spec(
        f"i=1; while [ $i -le {LINES} ]; do echo line-$i; i=$((i+1)); sleep 0.005; done",
        shell=True,
    )
    try:
        received = bytearray()
        drops_at = [len(expected) // 4, len(expected) // 2]  # drop the stream twice mid-job
        final: Job | None = None
        async with Client(proxy.address) as client:
            items: AsyncIterator[JobId | tuple[int, OutputChunk] | Job]
            if how.startswith("watch"):
                async with Client(master.address) as direct:
                    job_id = await direct.submit(spec)
                items = (
                    client.watch(job_id)
                    if how == "watch"
                    else _one_of_many(client.watch_many([job_id]))
                )
            elif how == "run":
                items = client.run(spec)
                job_id = JobId(str(await anext(items)))
            else:
                many = client.run_many([spec])
                ids = await anext(many)
                assert isinstance(ids, list)
                [job_id] = ids
                items = _one_of_many(many)
            async with asyncio.timeout(60):
                async for item in items:
                    assert not isinstance(item, str), "the job id comes once, first"
                    if isinstance(item, Job):
                        final = item
                        break
                    _, chunk = item
                    assert chunk.stream == Stream.STDOUT
                    assert chunk.offset == len(received), "a gap or a repeat"
                    received += chunk.data
                    if drops_at and len(received) >= drops_at[0]:
                        drops_at.pop(0)
                        await asyncio.to_thread(proxy.drop)
        assert drops_at == [], "the job ended before both drops"
        assert proxy.accepted >= 3  # it really connected again after each drop
        assert final is not None
        assert (final.id, final.status) == (job_id, JobStatus.COMPLETED)
        assert bytes(received) == expected  # every line, once, the last before the status
    finally:
        proxy.close()


async def test_a_stream_that_carried_nothing_yet_is_resumed_once_a_master_took_it(
    cluster: ClusterFactory,
) -> None:
    """Following a queued job: the stream breaks before any output. A master had taken it
    (its initial metadata says so), so the client resumes rather than failing; a stream that
    never reached a master fails at once (test_cli's unreachable master)."""
    master = cluster.master()
    proxy = CuttableProxy(*split_address(master.address)).start()
    try:
        async with Client(master.address) as direct:
            job_id = await direct.submit(command_spec(["echo", "at-last"]))
        async with Client(proxy.address) as client:
            calls: list[grpc.aio.UnaryStreamCall[Any, Any]] = []
            open_stream = client.stub.StreamOutput

            def recorded(request: Any, **options: Any) -> Any:
                calls.append(open_stream(request, **options))
                return calls[-1]

            client.stub.StreamOutput = recorded  # type: ignore[assignment]
            follower = asyncio.create_task(client.wait(job_id))
            async with asyncio.timeout(30):
                while not calls:
                    await asyncio.sleep(0.01)
                await calls[0].initial_metadata()  # taken by the master, nothing sent yet
                await asyncio.to_thread(proxy.drop)
                while len(calls) < 2:  # resumed
                    await asyncio.sleep(0.01)
                cluster.worker(master, worker_id="w1")
                job = await follower
        assert (job.status, job.stdout) == (JobStatus.COMPLETED, b"at-last\n")
    finally:
        proxy.close()


async def test_a_run_resumes_when_the_master_is_still_away_at_first(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    """The run's stream breaks and the master cannot be reached for a while (restarting): the
    run keeps trying, since that master had accepted the job, and ends with it."""
    master = cluster.master()
    cluster.worker(master, worker_id="w1")
    proxy = CuttableProxy(*split_address(master.address)).start()
    gate = tmp_path / "gate"
    spec = command_spec(
        f"echo before; while [ ! -e {gate} ]; do sleep 0.05; done; echo after", shell=True
    )
    told: list[str] = []
    try:
        async with Client(proxy.address) as client:
            client.on_reconnect = told.append
            items = client.run(spec)
            async with asyncio.timeout(60):
                job_id = await anext(items)
                assert await anext(items) == (1, OutputChunk(Stream.STDOUT, 0, b"before\n"))
                rest = asyncio.create_task(_all(items))
                proxy.refuse()
                tried = proxy.accepted
                await asyncio.to_thread(proxy.drop)
                while proxy.accepted < tried + 2:  # turned away twice
                    await asyncio.sleep(0.01)
                gate.touch()
                proxy.heal()
                *chunks, final = await rest
        assert isinstance(final, Job)
        assert (final.id, final.status) == (job_id, JobStatus.COMPLETED)
        assert chunks == [(1, OutputChunk(Stream.STDOUT, 7, b"after\n"))]  # from where it was
        # Said once (the CLI prints it): not silent for minutes, nor once a retry.
        assert len(told) == 1
        assert told[0].startswith(f"lost the master while following job {job_id} (")
        assert told[0].endswith("; trying again for up to 300s (the job runs on)")
    finally:
        proxy.close()


async def test_a_second_outage_gets_its_own_time_after_a_quiet_while(
    cluster: ClusterFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The time a broken stream is tried again counted from the first outage until output
    came: after a restart and a quiet while longer than that time, a second restart ended
    the follow at once (a review of the change that made it a time)."""
    monkeypatch.setattr("dist_exec.client._client.STREAM_RETRY_S", 1.0)
    master = cluster.master()
    cluster.worker(master, worker_id="w1")
    proxy = CuttableProxy(*split_address(master.address)).start()
    gate = tmp_path / "gate"
    spec = command_spec(f"echo before; while [ ! -e {gate} ]; do sleep 0.05; done", shell=True)
    told: list[str] = []

    async def outage(following: asyncio.Task[list[object]]) -> None:
        proxy.refuse()
        tried = proxy.accepted
        await asyncio.to_thread(proxy.drop)
        while proxy.accepted < tried + 2 and not following.done():  # turned away twice
            await asyncio.sleep(0.01)
        proxy.heal()

    try:
        async with Client(proxy.address) as client:
            client.on_reconnect = told.append
            items = client.run(spec)
            async with asyncio.timeout(60):
                await anext(items)  # (the id)
                await anext(items)  # (before)
                rest = asyncio.create_task(_all(items))
                await outage(rest)
                quiet_since = asyncio.get_running_loop().time()
                while asyncio.get_running_loop().time() - quiet_since < 1.5:
                    await asyncio.sleep(0.05)  # (the job says nothing: what is tested)
                await outage(rest)
                gate.touch()
                *_, final = await rest
        assert isinstance(final, Job)
        assert final.status == JobStatus.COMPLETED
        assert len(told) == 2  # (each outage said once)
    finally:
        proxy.close()


async def _all(items: AsyncIterator[object]) -> list[object]:
    return [item async for item in items]
