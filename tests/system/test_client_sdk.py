"""The Python client as a script uses it, against a real master and workers on 127.0.0.1:
followers left early or closed under, and slow readers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from dist_exec.client import Client, command_spec
from dist_exec.errors import DistExecError, InvalidTaskSpec, MasterTimeout, RateLimited
from dist_exec.models import JobStatus
from tests.conftest import ClusterFactory, SmallCluster, wait_until

pytestmark = pytest.mark.system


async def _first(items: AsyncIterator[object]) -> object:
    async with contextlib.aclosing(items) as closing:  # type: ignore[type-var]
        return await anext(closing)


async def test_followers_left_early_end_their_calls(small_cluster: SmallCluster) -> None:
    """Leaving watch(), stream_output() or watch_many() after their first item left the gRPC
    call open for good: a task per call, the master still sending, until the client ran out of
    memory (6,000 tasks and 852 MB after 8,000 of them)."""
    async with Client(small_cluster.address) as client:
        job = await client.submit(command_spec("echo started; sleep 60", shell=True))
        await _first(client.watch(job))
        baseline = len(asyncio.all_tasks())
        for _ in range(30):
            await _first(client.watch(job))
            await _first(client.stream_output(job))
            await _first(client.watch_many([job]))
        await wait_until(
            lambda: len(asyncio.all_tasks()) <= baseline + 3, 10, "the calls left to end"
        )
        await client.cancel(job)


async def test_a_follower_of_a_client_closed_under_it_is_told_so(
    small_cluster: SmallCluster,
) -> None:
    """It got a bare CancelledError (in a task nobody cancelled), which `except Exception`
    does not catch."""
    outcomes: list[BaseException] = []
    started: set[int] = set()

    async def follow(items: AsyncIterator[object]) -> None:
        try:
            async for _ in items:
                started.add(id(items))
        except BaseException as exc:
            outcomes.append(exc)

    async with Client(small_cluster.address) as client:
        job = await client.submit(command_spec("echo started; sleep 60", shell=True))
        spec = command_spec("echo started; sleep 60", shell=True)
        followers = [
            asyncio.create_task(follow(client.watch(job))),
            asyncio.create_task(follow(client.stream_output(job))),
            asyncio.create_task(follow(client.watch_many([job]))),
            asyncio.create_task(follow(client.run(spec))),
            asyncio.create_task(follow(client.run_many([spec]))),
        ]
        await wait_until(lambda: len(started) == len(followers), 10, "each to get output")
    await asyncio.wait_for(asyncio.gather(*followers), 10)
    assert [type(exc) for exc in outcomes] == [DistExecError] * len(followers), outcomes
    assert all("the client was closed" in str(exc) for exc in outcomes)
    async with Client(small_cluster.address) as client:
        for running, _ in (await client.list_jobs(status=JobStatus.RUNNING))[0]:
            await client.cancel(running.id)


async def test_runs_at_once_larger_together_than_a_message_all_run(
    small_cluster: SmallCluster,
) -> None:
    """Each run is well within the job size limit, but the client wrote all the runs waiting
    to go in one message: past 64 MiB the stream broke, and every run failed with 'Internal
    error from Core'. A single run too large to go at all is refused alone, clearly."""
    stdin = b"x" * (720 * 1024)
    spec = command_spec(["wc", "-c"], stdin=stdin)

    async def run() -> bytes:
        out = b""
        async for item in client.run(spec):
            if isinstance(item, tuple):
                out += item[1].data
        return out

    async with Client(small_cluster.address, timeout_s=60) as client:
        outs = await asyncio.wait_for(asyncio.gather(*(run() for _ in range(96))), 120)
        assert set(outs) == {b"%d\n" % len(stdin)}
        with pytest.raises(InvalidTaskSpec, match="split them into several runs"):
            async for _ in client.run_many([spec] * 100):
                pass
        assert await run() == b"%d\n" % len(stdin)  # (the stream goes on)


async def test_more_runs_at_once_than_one_stream_carries_all_run(
    small_cluster: SmallCluster,
) -> None:
    """A stream carries 1,024 runs at once; the 1,025th waited for a slot inside the time it
    had to be accepted, and failed with 'the master did not answer in time'. Another stream
    opens instead."""

    async with Client(small_cluster.address, timeout_s=5) as client:
        runs = [client.run(command_spec(["sleep", "60"])) for _ in range(1040)]
        ids = await asyncio.wait_for(asyncio.gather(*(anext(run) for run in runs)), 60)
        assert len(set(ids)) == 1040  # each accepted in time, though most have to wait
        assert len(client._sessions) == 2
        for run in runs:
            await run.aclose()
        # Once the burst is over, the next run closes the extra stream.
        next_run = client.run(command_spec(["true"]))
        await anext(next_run)
        await next_run.aclose()
        assert len(client._sessions) == 1
    # (Cancelling 1,040 jobs at once may take a loaded master longer than 5 s.)
    async with Client(small_cluster.address, timeout_s=60) as client:
        await asyncio.gather(*(client.cancel(str(job)) for job in ids))


async def test_a_client_over_its_rate_limit_is_told_when_to_try_again(
    cluster: ClusterFactory,
) -> None:
    """The master sends how long to wait (retry-after-ms); the client threw it away."""
    master = cluster.master(extra=["--rate-limit", "0.5", "--rate-burst", "1"])
    async with Client(master.address) as client:
        await client.submit(command_spec(["true"]))
        with pytest.raises(RateLimited) as info:
            await client.submit(command_spec(["true"]))
    assert 0 < info.value.retry_after_s <= 2.0


async def test_a_run_given_up_before_its_id_came_leaves_no_job_behind(
    small_cluster: SmallCluster,
) -> None:
    """A run whose task was cancelled (a timeout, a TaskGroup failing) before it handed over
    the job's id left the job running, and nobody knew its id; one cancelled before its request
    was even written went out anyway. Jobs whose ids were handed over go on running."""
    handed: list[str] = []
    got_id = asyncio.Event()

    async def run() -> None:
        async for item in client.run(command_spec(["sleep", "30"])):
            if isinstance(item, str):
                handed.append(item)
                got_id.set()

    async def give_up(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async with Client(small_cluster.address) as client:
        for delay in (0, 0, 0.001, 0.002, 0.004, 0.008, 0.016, 0.05):
            task = asyncio.create_task(run())
            await asyncio.sleep(delay)  # (how far each one got depends on the machine)
            await give_up(task)
        got_id.clear()  # and one given up once its id came, whatever the machine's speed
        task = asyncio.create_task(run())
        await asyncio.wait_for(got_id.wait(), 20)
        await give_up(task)
    assert handed
    # Not accepted within the client's own timeout (an accepted event waits 5 ms for company):
    # the error says what becomes of the job.
    async with Client(small_cluster.address, timeout_s=0.001) as hasty:
        with pytest.raises(MasterTimeout, match="if it does later, they are cancelled"):
            await anext(hasty.run(command_spec(["sleep", "30"])))
    async with Client(small_cluster.address) as client:

        async def unhanded_all_cancelled() -> bool:
            jobs, _ = await client.list_jobs(limit=100)
            return all(job.status == JobStatus.CANCELLED for job, _ in jobs if job.id not in handed)

        await wait_until(unhanded_all_cancelled, 20, "the jobs nobody was told of to be cancelled")
        jobs, _ = await client.list_jobs(limit=100)
        assert {job.id for job, _ in jobs if job.status != JobStatus.CANCELLED} == set(handed)
        for job_id in handed:
            await client.cancel(job_id)
