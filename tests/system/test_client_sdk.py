"""The Python client as a script uses it, against a real master and workers on 127.0.0.1:
followers left early or closed under, and slow readers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from dist_exec.client import Client, command_spec
from dist_exec.errors import DistExecError
from tests.conftest import SmallCluster, wait_until

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
    started: list[object] = []

    async def follow(items: AsyncIterator[object]) -> None:
        try:
            async for item in items:
                started.append(item)
        except BaseException as exc:
            outcomes.append(exc)

    async with Client(small_cluster.address) as client:
        job = await client.submit(command_spec("echo started; sleep 60", shell=True))
        followers = [
            asyncio.create_task(follow(client.watch(job))),
            asyncio.create_task(follow(client.stream_output(job))),
            asyncio.create_task(follow(client.watch_many([job]))),
        ]
        await wait_until(lambda: len(started) == len(followers), 10, "each to get output")
    await asyncio.wait_for(asyncio.gather(*followers), 10)
    assert [type(exc) for exc in outcomes] == [DistExecError] * 3, outcomes
    assert all("the client was closed" in str(exc) for exc in outcomes)
    async with Client(small_cluster.address) as client:
        await client.cancel(job)
