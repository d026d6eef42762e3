"""The end of an output stream, kept in bounded memory whatever the stream's length."""

from __future__ import annotations

import collections


class OutputTail:
    """The last ``limit`` bytes of a stream, in bounded memory whatever its length."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._parts: collections.deque[bytes] = collections.deque()
        self._size = 0

    def add(self, data: bytes) -> None:
        if len(data) >= self.limit:
            self._parts.clear()
            data = data[-self.limit :]
            self._size = 0
        self._parts.append(data)
        self._size += len(data)
        while self._size - len(self._parts[0]) >= self.limit:
            self._size -= len(self._parts.popleft())

    def value(self) -> bytes:
        return b"".join(self._parts)[-self.limit :]
