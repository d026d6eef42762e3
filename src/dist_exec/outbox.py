"""What waits to go out on a long-lived stream, several items to a message.

Both ends of the multiplexed streams use it: the worker for its Dispatch events, the master
for the events of a RunSession. Bounded in bytes: producers of bulk items wait for room, so a
reader that does not keep up slows them rather than growing the sender's memory.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Outbox(Generic[T]):
    """``push`` items; the sender waits for ``next()``. An item pushed as not urgent may wait up
    to ``linger_s`` for company (until ``urgent_bytes`` wait, or an urgent item comes): the
    sender is not even woken for it before then."""

    def __init__(
        self, limit_bytes: int, message_bytes: int, urgent_bytes: int = 0, linger_s: float = 0.0
    ) -> None:
        self.limit_bytes = limit_bytes
        self.message_bytes = message_bytes
        self.urgent_bytes = urgent_bytes  # this much waiting is urgent too
        self.linger_s = linger_s
        self._ready = asyncio.Event()  # items should go now, or the outbox is closed
        self._timer: asyncio.TimerHandle | None = None  # ends the linger of what waits
        self._items: list[tuple[T, int]] = []
        self._bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self.closed = False

    def push(self, item: T, size: int, urgent: bool = True) -> None:
        self._items.append((item, size))
        self._bytes += size
        if urgent or self._bytes >= self.urgent_bytes or self.linger_s <= 0:
            self._go()
        elif self._timer is None and not self._ready.is_set():
            self._timer = asyncio.get_running_loop().call_later(self.linger_s, self._go)

    def _go(self) -> None:
        self._ready.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def room(self) -> None:
        """Wait until the items waiting are below the limit."""
        while self._bytes >= self.limit_bytes:
            self._room.clear()
            await self._room.wait()

    async def next(self) -> list[T]:
        """The next message's items, once they should go; empty once closed and sent."""
        await self._ready.wait()
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
            self._ready.clear()
        if self._bytes < self.limit_bytes:
            self._room.set()
        return [item for item, _ in batch]

    def close(self) -> None:
        """Nothing more will come: the sender sends what waits, then ends."""
        self.closed = True
        self._go()
