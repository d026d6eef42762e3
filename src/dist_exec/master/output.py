"""Live output of running jobs, fanned out to the clients that follow them.

A follower that falls behind does not slow the job: what it has not read yet waits in memory
up to FOLLOWER_BUFFER_BYTES, and beyond that in a temporary file (unlinked, private to the
master) up to FOLLOWER_SPILL_BYTES, so a slow reader (``dist-exec run CMD | slow``) still gets
every byte, in order. Only a follower further behind than both is cut off: its stream ends with
an error telling it to resume from its offsets (from the stored output, which keeps the start
and the end of a long output). All followers together hold at most TOTAL_SPILL_BYTES on disk
and about TOTAL_MEMORY_BYTES in memory (at most twice: once it is taken, a follower may still
hold its fair share of it, so the slow ones cannot crowd out one that keeps up): many slow
followers cannot exhaust the master's memory or disk. One that finds no room is cut off the
same way.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO

from dist_exec.errors import FollowerTooSlow
from dist_exec.models import Job, JobId, OutputChunk, Stream

log = logging.getLogger(__name__)
FOLLOWER_BUFFER_BYTES = 8 * 1024 * 1024
FOLLOWER_SPILL_BYTES = 1024 * 1024 * 1024
TOTAL_MEMORY_BYTES = 256 * 1024 * 1024  # of all followers together
TOTAL_SPILL_BYTES = 8 * 1024 * 1024 * 1024
COPY_BYTES = 1024 * 1024
_RECORD = struct.Struct(">iBqI")  # attempt, stream, offset, length; then the data


@dataclass(slots=True)
class Budget:
    """What all followers may hold together, and what they hold now."""

    memory_limit: int = TOTAL_MEMORY_BYTES
    spill_limit: int = TOTAL_SPILL_BYTES
    memory: int = 0
    # Bytes in the followers' spill files, read or not: a file shrinks only once read to its
    # end, or compacted.
    spill: int = 0
    followers: int = 0

    def memory_for(self, held: int, more: int) -> bool:
        """Whether a follower holding ``held`` bytes may hold ``more`` in memory."""
        if self.memory + more <= self.memory_limit:
            return True
        return held + more <= self.memory_limit // max(1, self.followers)


@dataclass(frozen=True, slots=True)
class LiveChunk:
    attempt: int
    chunk: OutputChunk


class Follower:
    """One client's view of a job's live output: what it has not read yet, in order."""

    def __init__(
        self,
        memory_bytes: int = FOLLOWER_BUFFER_BYTES,
        spill_bytes: int = FOLLOWER_SPILL_BYTES,
        budget: Budget | None = None,
    ) -> None:
        self.memory_bytes = memory_bytes
        self.spill_bytes = spill_bytes
        self.budget = budget or Budget()
        self.budget.followers += 1
        self._counted = True  # in budget.followers, until closed
        self._memory: deque[LiveChunk] = deque()
        self._bytes = 0  # data waiting in memory
        # Newer than everything in memory; while it holds unread records, new chunks go there.
        self._spill: IO[bytes] | None = None
        self._spill_read = self._spill_end = 0
        self._ended = False
        self._wake = asyncio.Event()
        self.lagged = False
        self.final: Job | None = None  # the job's terminal state, once it has ended

    def put(self, item: LiveChunk | None) -> None:
        if self._ended:
            return
        if item is None:
            self._ended = True
        elif (
            self._spill_read < self._spill_end
            or self._bytes + len(item.chunk.data) > self.memory_bytes
            or not self.budget.memory_for(self._bytes, len(item.chunk.data))
        ):
            self._to_spill(item)
        else:
            self._memory.append(item)
            self._bytes += len(item.chunk.data)
            self.budget.memory += len(item.chunk.data)
        self._wake.set()

    def _to_spill(self, item: LiveChunk) -> None:
        data = item.chunk.data
        size = _RECORD.size + len(data)
        chunk = item.chunk
        try:
            if self._spill is not None and self._spill_read >= max(
                self.memory_bytes, self._spill_end - self._spill_read
            ):
                self._compact()  # (the file stays under twice what is unread; and first:
                # what it frees counts before the limits do)
            if (
                self._spill_end - self._spill_read + size > self.spill_bytes
                or self.budget.spill + size > self.budget.spill_limit
            ):
                self._cut_off()
                return
            if self._spill is None:
                # Closed when the follower is done with (no context manager spans its life).
                self._spill = tempfile.TemporaryFile(prefix="dist-exec-follower-")  # noqa: SIM115
            self._spill.seek(self._spill_end)
            self._spill.write(
                _RECORD.pack(item.attempt, chunk.stream.value, chunk.offset, len(data))
            )
            self._spill.write(data)
        except OSError as exc:  # a full disk must not fail the job: only this follower
            log.warning("cannot keep a slow follower's output on disk (%s); it is cut off", exc)
            self._cut_off()
            return
        self._spill_end += size
        self.budget.spill += size

    def _compact(self) -> None:
        """Move what is unread to the start of a new file."""
        assert self._spill is not None
        old, self._spill = self._spill, None
        try:
            new = tempfile.TemporaryFile(prefix="dist-exec-follower-")  # noqa: SIM115
            old.seek(self._spill_read)
            left = self._spill_end - self._spill_read
            while left > 0:
                block = old.read(min(left, COPY_BYTES))
                new.write(block)
                left -= len(block)
        except OSError:
            self.budget.spill -= self._spill_end  # (the old file is gone: none left)
            self._spill_read = self._spill_end = 0
            raise
        finally:
            old.close()
        self._spill = new
        self.budget.spill -= self._spill_read
        self._spill_read, self._spill_end = 0, self._spill_end - self._spill_read

    def _cut_off(self) -> None:
        """Too far behind (or no room): it gets what it holds in memory (a prefix without
        gaps), then resumes from the stored output."""
        self.lagged = self._ended = True
        self.close_spill()

    def _from_spill(self) -> LiveChunk:
        assert self._spill is not None
        self._spill.seek(self._spill_read)
        attempt, stream, offset, length = _RECORD.unpack(self._spill.read(_RECORD.size))
        data = self._spill.read(length)
        self._spill_read += _RECORD.size + length
        if self._spill_read == self._spill_end:  # all read: memory again, the file emptied
            self._spill.truncate(0)
            self.budget.spill -= self._spill_end
            self._spill_read = self._spill_end = 0
        return LiveChunk(attempt, OutputChunk(Stream(stream), offset, data))

    def close_spill(self) -> None:
        """Drop what waits on disk (the follower is done with, or cut off)."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        self.budget.spill -= self._spill_end
        self._spill_read = self._spill_end = 0

    def _drop_memory(self) -> None:
        self.budget.memory -= self._bytes
        self._memory.clear()
        self._bytes = 0

    def close(self) -> None:
        """The follower is done with: what it holds is given back, and it ends."""
        self._ended = True
        self.close_spill()
        self._drop_memory()
        if self._counted:
            self._counted = False
            self.budget.followers -= 1
        self._wake.set()

    async def __aiter__(self) -> AsyncIterator[LiveChunk]:
        try:
            while True:
                if self._memory:
                    item = self._memory.popleft()
                    self._bytes -= len(item.chunk.data)
                    self.budget.memory -= len(item.chunk.data)
                    yield item
                elif self._spill_read < self._spill_end:
                    yield self._from_spill()
                elif self._ended:
                    break
                else:
                    self._wake.clear()
                    await self._wake.wait()
        finally:
            self.close()
        if self.lagged:
            raise FollowerTooSlow(
                "this output stream fell too far behind the job; resume from your offsets"
            )


class OutputHub:
    def __init__(
        self,
        memory_bytes: int = FOLLOWER_BUFFER_BYTES,
        spill_bytes: int = FOLLOWER_SPILL_BYTES,
        budget: Budget | None = None,
    ) -> None:
        self._followers: dict[JobId, set[Follower]] = {}
        self.memory_bytes = memory_bytes
        self.spill_bytes = spill_bytes
        self.budget = budget or Budget()

    def follow(self, job_id: JobId) -> Follower:
        follower = Follower(self.memory_bytes, self.spill_bytes, self.budget)
        self._followers.setdefault(job_id, set()).add(follower)
        return follower

    def unfollow(self, job_id: JobId, follower: Follower) -> None:
        follower.close()
        followers = self._followers.get(job_id)
        if followers is not None:
            followers.discard(follower)
            if not followers:
                del self._followers[job_id]

    def publish(self, job_id: JobId, attempt: int, chunk: OutputChunk) -> None:
        for follower in self._followers.get(job_id, ()):
            follower.put(LiveChunk(attempt, chunk))

    def close(self, job_id: JobId, final: Job | None) -> None:
        """The job has ended and everything it printed was published: end every follower."""
        for follower in self._followers.pop(job_id, ()):
            follower.final = final
            follower.put(None)
