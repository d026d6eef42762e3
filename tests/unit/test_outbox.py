"""The outbox of the long-lived streams: batching, its byte bound, lingering, closing."""

from __future__ import annotations

import asyncio

from dist_exec.outbox import Outbox


async def test_items_go_several_to_a_message_up_to_its_size() -> None:
    outbox: Outbox[str] = Outbox(limit_bytes=100, message_bytes=10)
    for item in "abcde":
        outbox.push(item, 4)
    assert await outbox.next() == ["a", "b"]
    assert await outbox.next() == ["c", "d"]
    outbox.push("big", 50)  # larger than a message: it goes alone
    assert await outbox.next() == ["e"]
    assert await outbox.next() == ["big"]


async def test_a_producer_waits_for_room() -> None:
    outbox: Outbox[int] = Outbox(limit_bytes=10, message_bytes=4)
    outbox.push(1, 6)
    outbox.push(2, 6)
    waiting = asyncio.create_task(outbox.room())
    await asyncio.sleep(0)
    assert not waiting.done()
    assert await outbox.next() == [1]  # 6 bytes left: below the limit
    async with asyncio.timeout(5):
        await waiting


async def test_what_is_not_urgent_waits_for_company_up_to_the_linger() -> None:
    outbox: Outbox[str] = Outbox(1000, 1000, urgent_bytes=100, linger_s=30)
    outbox.push("output", 10, urgent=False)
    taken = asyncio.create_task(outbox.next())
    await asyncio.sleep(0)
    assert not taken.done()  # lingering: the sender is not woken
    outbox.push("result", 10)  # urgent: both go now, together
    async with asyncio.timeout(5):
        assert await taken == ["output", "result"]
    outbox.push("a lot of output", 100, urgent=False)  # urgent_bytes reached: no lingering
    async with asyncio.timeout(5):
        assert await outbox.next() == ["a lot of output"]


async def test_what_is_not_urgent_goes_alone_once_the_linger_is_over() -> None:
    outbox: Outbox[str] = Outbox(1000, 1000, urgent_bytes=100, linger_s=0.01)
    outbox.push("output", 10, urgent=False)
    outbox.push("more output", 10, urgent=False)  # does not extend the linger
    async with asyncio.timeout(5):
        assert await outbox.next() == ["output", "more output"]
    outbox.push("later output", 10, urgent=False)  # lingers afresh
    async with asyncio.timeout(5):
        assert await outbox.next() == ["later output"]


async def test_closing_sends_what_waits_then_ends() -> None:
    outbox: Outbox[str] = Outbox(100, 100, urgent_bytes=100, linger_s=30)
    outbox.push("last", 4, urgent=False)
    outbox.close()
    async with asyncio.timeout(5):
        assert await outbox.next() == ["last"]
        assert await outbox.next() == []
