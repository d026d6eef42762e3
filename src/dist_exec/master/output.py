"""Live output of running jobs, fanned out to the clients that follow them.

A follower that cannot keep up is cut off (its stream ends with an error telling it to resume
from its offsets) rather than slowing the job or growing the master's memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dist_exec.errors import FollowerTooSlow
from dist_exec.models import Job, JobId, OutputChunk

FOLLOWER_BUFFER_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LiveChunk:
    attempt: int
    chunk: OutputChunk


class Follower:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[LiveChunk | None] = asyncio.Queue()
        self._bytes = 0
        self.lagged = False
        self.final: Job | None = None  # the job's terminal state, once it has ended

    def put(self, item: LiveChunk | None) -> None:
        if self.lagged:
            return
        if item is not None:
            self._bytes += len(item.chunk.data)
            if self._bytes > FOLLOWER_BUFFER_BYTES:
                self.lagged = True
                item = None
        self._queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[LiveChunk]:
        while (item := await self._queue.get()) is not None:
            self._bytes -= len(item.chunk.data)
            yield item
        if self.lagged:
            raise FollowerTooSlow(
                "this output stream fell too far behind the job; resume from your offsets"
            )


class OutputHub:
    def __init__(self) -> None:
        self._followers: dict[JobId, set[Follower]] = {}

    def follow(self, job_id: JobId) -> Follower:
        follower = Follower()
        self._followers.setdefault(job_id, set()).add(follower)
        return follower

    def unfollow(self, job_id: JobId, follower: Follower) -> None:
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
