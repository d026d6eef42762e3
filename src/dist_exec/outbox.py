"""What waits to go out on a long-lived stream, several items to a message.

Both ends of the multiplexed streams use it: the worker for its Dispatch events, the master
for the events of a RunSession. Bounded in bytes: producers of bulk items wait for room, so a
reader that does not keep up slows them rather than growing the sender's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Generic, TypeVar

T = TypeVar("T")


class Outbox(Generic[T]):
    """``push`` items; the sender waits for ``ready`` and sends ``take()``. An item pushed as
    not urgent may wait for company (``urgent`` says whether anything should go now)."""

    def __init__(self, limit_bytes: int, message_bytes: int, urgent_bytes: int = 0) -> None:
        self.limit_bytes = limit_bytes
        self.message_bytes = message_bytes
        self.urgent_bytes = urgent_bytes  # this much waiting is urgent too
        self.ready = asyncio.Event()  # items wait, or the outbox is closed
        self.urgent = asyncio.Event()
        self._items: list[tuple[T, int]] = []
        self._bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self.closed = False

    def push(self, item: T, size: int, urgent: bool = True) -> None:
        self._items.append((item, size))
        self._bytes += size
        self.ready.set()
        if urgent or self._bytes >= self.urgent_bytes:
            self.urgent.set()

    async def room(self) -> None:
        """Wait until the items waiting are below the limit."""
        while self._bytes >= self.limit_bytes:
            self._room.clear()
            await self._room.wait()

    async def next(self, linger_s: float = 0.0) -> list[T]:
        """The next message's items, once there are some; empty once closed and sent. Items
        that are not urgent wait up to ``linger_s`` for company."""
        await self.ready.wait()
        if self._items and not self.urgent.is_set() and linger_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(linger_s):
                    await self.urgent.wait()
        return self.take() if self._items else []

    def take(self) -> list[T]:
        """The next message's items: all that wait, up to ``message_bytes`` (at least one)."""
        size, count = 0, 0
        for _, item_size in self._items:
            if count and size + item_size > self.message_bytes:
                break
            size += item_size
            count += 1
        batch, self._items = self._items[:count], self._items[count:]
        self._bytes -= size
        if not self._items and not self.closed:
            self.ready.clear()
            self.urgent.clear()
        if self._bytes < self.limit_bytes:
            self._room.set()
        return [item for item, _ in batch]

    def close(self) -> None:
        """Nothing more will come: the sender sends what waits, then ends."""
        self.closed = True
        self.ready.set()
        self.urgent.set()
