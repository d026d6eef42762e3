"""OutputHub: live output fan-out, and cutting off followers that fall behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator
from typing import cast

import pytest

from dist_exec.errors import FollowerTooSlow
from dist_exec.master.output import FOLLOWER_BUFFER_BYTES, Budget, Follower, LiveChunk, OutputHub
from dist_exec.models import JobId, OutputChunk, Stream

JOB = JobId("job-1")
OTHER = JobId("job-2")
MIB = 1024 * 1024


def chunk(offset: int, data: bytes, stream: Stream = Stream.STDOUT) -> OutputChunk:
    return OutputChunk(stream, offset, data)


def reading(follower: Follower) -> contextlib.aclosing[AsyncGenerator[LiveChunk, None]]:
    """Step through a follower by hand; its generator is closed on exit."""
    return contextlib.aclosing(cast("AsyncGenerator[LiveChunk, None]", aiter(follower)))


async def collect(follower: Follower) -> list[LiveChunk]:
    async with asyncio.timeout(5):
        return [item async for item in follower]


async def test_follower_gets_chunks_in_order_and_ends_on_close() -> None:
    hub = OutputHub()
    follower = hub.follow(JOB)
    chunks = [chunk(0, b"hello "), chunk(0, b"oops", Stream.STDERR), chunk(6, b"world")]
    for c in chunks:
        hub.publish(JOB, 1, c)
    hub.close(JOB, None)

    assert await collect(follower) == [LiveChunk(1, c) for c in chunks]


async def test_attempt_number_travels_with_each_chunk() -> None:
    hub = OutputHub()
    follower = hub.follow(JOB)
    hub.publish(JOB, 1, chunk(0, b"first try"))
    hub.publish(JOB, 2, chunk(0, b"second try"))
    hub.close(JOB, None)

    assert [item.attempt for item in await collect(follower)] == [1, 2]


async def test_every_follower_gets_everything() -> None:
    hub = OutputHub()
    followers = [hub.follow(JOB) for _ in range(3)]
    hub.publish(JOB, 1, chunk(0, b"a"))
    hub.publish(JOB, 1, chunk(1, b"b"))
    hub.close(JOB, None)

    for follower in followers:
        assert [item.chunk.data for item in await collect(follower)] == [b"a", b"b"]


async def test_followers_only_see_their_own_job() -> None:
    hub = OutputHub()
    mine, theirs = hub.follow(JOB), hub.follow(OTHER)
    hub.publish(JOB, 1, chunk(0, b"mine"))
    hub.publish(OTHER, 1, chunk(0, b"theirs"))
    hub.close(JOB, None)
    hub.close(OTHER, None)

    assert [item.chunk.data for item in await collect(mine)] == [b"mine"]
    assert [item.chunk.data for item in await collect(theirs)] == [b"theirs"]


async def test_close_ends_only_that_job() -> None:
    hub = OutputHub()
    mine, theirs = hub.follow(JOB), hub.follow(OTHER)
    hub.close(JOB, None)
    assert await collect(mine) == []

    hub.publish(OTHER, 1, chunk(0, b"still live"))
    hub.close(OTHER, None)
    assert [item.chunk.data for item in await collect(theirs)] == [b"still live"]


async def test_follower_waits_for_live_output() -> None:
    hub = OutputHub()
    follower = hub.follow(JOB)
    reader = asyncio.create_task(collect(follower))
    hub.publish(JOB, 1, chunk(0, b"late"))
    hub.close(JOB, None)
    assert [item.chunk.data for item in await reader] == [b"late"]


def test_publish_and_close_without_followers_are_no_ops() -> None:
    hub = OutputHub()
    hub.publish(JOB, 1, chunk(0, b"nobody listens"))
    hub.close(JOB, None)
    hub.close(JOB, None)


async def test_unfollow_stops_delivery() -> None:
    hub = OutputHub()
    gone, staying = hub.follow(JOB), hub.follow(JOB)
    hub.publish(JOB, 1, chunk(0, b"both"))
    hub.unfollow(JOB, gone)
    hub.unfollow(JOB, gone)  # twice is harmless
    hub.publish(JOB, 1, chunk(4, b"one"))
    hub.close(JOB, None)

    assert [item.chunk.data for item in await collect(staying)] == [b"both", b"one"]
    # The one that left gets nothing more, and what it held is given back.
    assert await collect(gone) == []
    assert not gone._memory
    assert hub.budget.memory == 0


async def test_unfollow_of_last_follower_forgets_the_job() -> None:
    hub = OutputHub()
    follower = hub.follow(JOB)
    hub.unfollow(JOB, follower)
    hub.unfollow(OTHER, follower)  # unknown job: no-op
    assert hub._followers == {}


async def test_a_follower_that_keeps_up_is_never_cut_off() -> None:
    hub = OutputHub()
    follower = hub.follow(JOB)
    data = b"x" * MIB
    rounds = 3 * FOLLOWER_BUFFER_BYTES // MIB
    async with reading(follower) as items:
        for i in range(rounds):
            hub.publish(JOB, 1, chunk(i * MIB, data))
            got = await anext(items)
            assert got.chunk.offset == i * MIB
    assert not follower.lagged


async def test_exactly_the_buffer_is_not_too_slow() -> None:
    hub = OutputHub()
    follower = hub.follow(JOB)
    data = b"x" * MIB
    count = FOLLOWER_BUFFER_BYTES // MIB
    for i in range(count):
        hub.publish(JOB, 1, chunk(i * MIB, data))
    hub.close(JOB, None)

    assert len(await collect(follower)) == count
    assert not follower.lagged


async def test_follower_that_falls_behind_ends_with_follower_too_slow() -> None:
    hub = OutputHub(spill_bytes=0)  # (memory only)
    slow, fresh = hub.follow(JOB), hub.follow(JOB)
    data = b"x" * MIB
    count = FOLLOWER_BUFFER_BYTES // MIB
    for i in range(count + 1):
        hub.publish(JOB, 1, chunk(i * MIB, data))
    assert slow.lagged

    # Later output and even the job's end change nothing: it already ends in an error.
    hub.publish(JOB, 1, chunk((count + 1) * MIB, data))
    hub.close(JOB, None)

    received: list[LiveChunk] = []

    async def read_all() -> None:
        async with asyncio.timeout(5):
            async for item in slow:
                received.append(item)

    with pytest.raises(FollowerTooSlow, match="fell too far behind"):
        await read_all()
    # Everything it got is a gap-free prefix, so it can resume from its offsets.
    assert [item.chunk.offset for item in received] == [i * MIB for i in range(count)]

    # A follower that was not read either is cut off on its own, independently.
    assert fresh.lagged
    with pytest.raises(FollowerTooSlow):
        await collect(fresh)


async def test_lag_is_per_follower() -> None:
    hub = OutputHub(spill_bytes=0)  # (memory only)
    slow, reader = hub.follow(JOB), hub.follow(JOB)
    data = b"x" * MIB
    count = FOLLOWER_BUFFER_BYTES // MIB + 1
    async with reading(reader) as items:
        for i in range(count):
            hub.publish(JOB, 1, chunk(i * MIB, data))
            assert (await anext(items)).chunk.offset == i * MIB
    assert slow.lagged
    assert not reader.lagged


async def test_a_slow_follower_gets_every_byte_through_the_spill_file() -> None:
    """Far more than the memory buffer, not read until the job ends: everything arrives, in
    order, the overflow through a temporary file; then reading in step goes back to memory."""
    hub = OutputHub(memory_bytes=3 * MIB)
    follower = hub.follow(JOB)
    data = [bytes([i]) * MIB for i in range(10)]
    for i, d in enumerate(data):
        hub.publish(JOB, 1, chunk(i * MIB, d, Stream(i % 2)))
    assert follower._spill is not None  # 3 MiB in memory, the rest on disk
    async with reading(follower) as items:
        for i in range(4):  # part of it, then more output: it queues behind the spilled
            assert (await anext(items)).chunk.data == data[i]
        hub.publish(JOB, 2, chunk(0, b"late"))
        got = [await anext(items) for _ in range(7)]
        assert [g.chunk.data for g in got] == [*data[4:], b"late"]
        assert [(g.attempt, g.chunk.stream) for g in got[:2]] == [(1, Stream(0)), (1, Stream(1))]
        assert follower._spill_end == 0  # all read: new output goes to memory again
        hub.publish(JOB, 2, chunk(4, b"more"))
        assert not follower._spill_end
        assert (await anext(items)).chunk.data == b"more"
    assert not follower.lagged


async def test_a_follower_behind_memory_and_spill_is_cut_off_with_a_prefix() -> None:
    hub = OutputHub(memory_bytes=2 * MIB, spill_bytes=3 * MIB)
    follower = hub.follow(JOB)
    for i in range(10):
        hub.publish(JOB, 1, chunk(i * MIB, b"x" * MIB))
    assert follower.lagged
    assert follower._spill is None  # dropped at once
    hub.close(JOB, None)
    received: list[LiveChunk] = []

    async def read_all() -> None:
        async with asyncio.timeout(5):
            async for item in follower:
                received.append(item)

    with pytest.raises(FollowerTooSlow):
        await read_all()
    assert [item.chunk.offset for item in received] == [0, MIB]  # what was in memory


async def test_unfollowing_drops_the_spill_file() -> None:
    hub = OutputHub(memory_bytes=MIB)
    follower = hub.follow(JOB)
    for i in range(3):
        hub.publish(JOB, 1, chunk(i * MIB, b"x" * MIB))
    spill = follower._spill
    assert spill is not None
    hub.unfollow(JOB, follower)
    assert spill.closed


async def test_a_reader_a_little_behind_is_never_cut_off_however_long_the_output() -> None:
    """The spill limit is on what is unread, not on all that went through the file; the file
    is compacted, so it stays small too."""
    hub = OutputHub(memory_bytes=1000, spill_bytes=5000)
    follower = hub.follow(JOB)
    data = b"x" * 400
    largest = 0
    async with reading(follower) as items:
        for i in range(5):  # 2000 bytes ahead: memory full, the rest spilled
            hub.publish(JOB, 1, chunk(i * 400, data))
        for i in range(5, 200):  # 80 kB through the file, always ~2 kB behind
            hub.publish(JOB, 1, chunk(i * 400, data))
            assert (await anext(items)).chunk.offset == (i - 5) * 400
            assert follower._spill is not None
            largest = max(largest, follower._spill.seek(0, 2))
    assert not follower.lagged
    assert largest < 4 * 5000


async def test_a_disk_that_fails_cuts_off_the_follower_not_the_job(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_room(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("dist_exec.master.output.tempfile.TemporaryFile", no_room)
    hub = OutputHub(memory_bytes=MIB)
    follower = hub.follow(JOB)
    for i in range(3):
        hub.publish(JOB, 1, chunk(i * MIB, b"x" * MIB))  # no exception reaches the job
    assert follower.lagged
    assert "cannot keep a slow follower's output on disk" in caplog.text
    hub.close(JOB, None)
    with pytest.raises(FollowerTooSlow):
        await collect(follower)


async def test_followers_together_hold_no_more_than_the_budget() -> None:
    """Many slow followers of a loud job could each hold their own allowance (8 MiB in memory,
    1 GiB on disk): together they are bounded, and one that finds no room is cut off; one
    that keeps up always has its fair share."""
    budget = Budget(memory_limit=2 * MIB, spill_limit=0)
    hub = OutputHub(budget=budget)
    reader, slow = hub.follow(JOB), hub.follow(JOB)
    data = b"x" * MIB
    async with reading(reader) as items:
        for i in range(5):
            hub.publish(JOB, 1, chunk(i * MIB, data))
            assert budget.memory <= 2 * budget.memory_limit
            assert (await anext(items)).chunk.offset == i * MIB
        assert slow.lagged
        assert not reader.lagged
        hub.close(JOB, None)
        assert [item async for item in items] == []
    received: list[int] = []

    async def read_slow() -> None:
        async for item in slow:
            received.append(item.chunk.offset)

    with pytest.raises(FollowerTooSlow):
        await read_slow()
    assert received == list(range(0, len(received) * MIB, MIB))  # a prefix, then the cut
    assert (budget.memory, budget.spill, budget.followers) == (0, 0, 0)


async def test_the_disk_budget_is_shared_and_given_back() -> None:
    budget = Budget(memory_limit=MIB, spill_limit=3 * MIB)
    hub = OutputHub(budget=budget)
    first, second = hub.follow(JOB), hub.follow(JOB)
    data = b"x" * MIB
    hub.publish(JOB, 1, chunk(0, data))  # memory for one, the disk for the other
    hub.publish(JOB, 1, chunk(MIB, data))  # the disk for both: 3 MiB and more is too much
    assert budget.memory == MIB
    assert budget.spill <= 3 * MIB
    assert first.lagged != second.lagged  # one of them did not fit
    kept = second if first.lagged else first
    hub.unfollow(JOB, first if first.lagged else second)
    hub.close(JOB, None)
    assert [item.chunk.offset for item in await collect(kept)] == [0, MIB]
    assert (budget.memory, budget.spill) == (0, 0)


async def test_a_spill_file_read_to_its_end_is_emptied_and_its_bytes_given_back() -> None:
    """The budget counts what the files hold, not what is unread: a follower that caught up
    kept its file at its largest until it closed, which the budget did not count."""
    budget = Budget(memory_limit=MIB, spill_limit=8 * MIB)
    hub = OutputHub(memory_bytes=MIB, budget=budget)
    follower = hub.follow(JOB)
    data = b"x" * MIB
    async with reading(follower) as items:
        for i in range(3):  # one in memory, two in the file
            hub.publish(JOB, 1, chunk(i * MIB, data))
        assert follower._spill is not None
        in_file = os.fstat(follower._spill.fileno()).st_size
        assert budget.spill == in_file > 2 * MIB
        assert (await anext(items)).chunk.offset == 0
        assert (await anext(items)).chunk.offset == MIB
        assert budget.spill == in_file  # (half read: the file is as big)
        assert (await anext(items)).chunk.offset == 2 * MIB
        assert budget.spill == 0
        assert os.fstat(follower._spill.fileno()).st_size == 0
        hub.close(JOB, None)
    assert (budget.memory, budget.spill, budget.followers) == (0, 0, 0)


async def test_what_compaction_frees_counts_before_the_disk_limit() -> None:
    """A follower that had mostly caught up was cut off on read bytes that compacting its file
    (due at that very write) would have freed."""
    budget = Budget(memory_limit=MIB, spill_limit=int(3.5 * MIB))
    hub = OutputHub(memory_bytes=MIB, budget=budget)
    follower = hub.follow(JOB)
    data = b"x" * MIB
    async with reading(follower) as items:
        for i in range(4):  # one in memory, three in the file
            hub.publish(JOB, 1, chunk(i * MIB, data))
        for i in range(3):  # the one in memory and two from the file
            assert (await anext(items)).chunk.offset == i * MIB
        hub.publish(JOB, 1, chunk(4 * MIB, data))
        assert not follower.lagged
        hub.close(JOB, None)
        assert [item.chunk.offset async for item in items] == [3 * MIB, 4 * MIB]
    assert (budget.memory, budget.spill) == (0, 0)
