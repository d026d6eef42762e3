"""A job the master tracks in memory while it has not ended, and an attempt a worker holds."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from dist_exec.models import Job, JobId, JobStatus, NodeId, OutputChunk, Stream, TaskSpec
from dist_exec.output_tail import OutputTail


@dataclass(frozen=True, slots=True)
class HeldAttempt:
    task_id: str
    attempt: int
    finished: bool = False


@dataclass(slots=True)
class ActiveJob:
    """A job that has not ended, as the master tracks it in memory."""

    record: Job  # as last persisted (spec, created_at, ...)
    seq: int
    status: JobStatus = JobStatus.PENDING
    attempt: int = 0
    retries: int = 0
    node_id: NodeId | None = None
    started_at: datetime | None = None
    started_mono: float = 0.0
    runner: asyncio.Task[None] | None = None
    seen: dict[Stream, int] = field(default_factory=lambda: {s: 0 for s in Stream})
    cancel_requested: bool = False
    stopping: asyncio.Task[None] | None = None  # the cancel at work (one, however many calls)
    stop_signal: signal.Signals | None = None  # what the cancel sends (None: the worker's TERM)
    orphan_deadline: float | None = None  # recovered RUNNING job waiting for its worker
    accepted: asyncio.Future[list[int]] | None = None  # the store's commit of the job
    recorded_attempt: int = 0  # the attempt whose start the store already has
    # The stored output of the current attempt, while it is small: followers read it from here
    # instead of the store. ``kept_all`` turns False once it outgrows the cache.
    kept: list[OutputChunk] = field(default_factory=list)
    kept_bytes: int = 0
    kept_all: bool = True
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    # The last bytes of each stream beyond the stored head, kept until the job ends.
    tails: dict[Stream, OutputTail] = field(default_factory=dict)
    queued_mono: float = 0.0  # when it last entered the queue (for its queue timeout)
    retry_at: float | None = None  # waiting out its retry backoff until then
    retry_handle: asyncio.TimerHandle | None = None
    worker_losses: int = 0  # attempts in a row whose worker was lost (poison detection)
    instance: str = ""  # the process of its node its current attempt was started on

    @property
    def id(self) -> JobId:
        return self.record.id

    @property
    def spec(self) -> TaskSpec:
        return self.record.spec


OWNER_SEP = "\0"  # (no identity name holds it)


def owned_key(spec: TaskSpec) -> str:
    """The job's idempotency key as the master keeps it (empty: none): each owner's keys
    apart, so that another identity's use of a key neither takes it nor names its job."""
    return f"{spec.owner}{OWNER_SEP}{spec.idempotency_key}" if spec.idempotency_key else ""


class PayloadBudget:
    """What the payloads of the active jobs (waiting or running: the master holds them in
    memory) come to, in all and for each owner; the master refuses jobs beyond ``limit`` in
    all, or half of it for one owner (who cannot then take it all). A payload that several
    jobs share (a broadcast's, one per node) counts once, as it is held once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.by_owner: dict[str, int] = {}
        self._held: dict[int, _Held] = {}  # by id(payload): alive while a job holds it

    def cost(self, specs: Sequence[TaskSpec]) -> int:
        """The bytes ``specs`` would add."""
        new = {id(s.payload): len(s.payload) for s in specs if id(s.payload) not in self._held}
        return sum(new.values())

    def refusal(self, owner: str, size: int) -> str | None:
        """Why ``size`` more bytes of ``owner``'s may not be taken, if they may not."""
        if self.total + size > self.limit:
            return (
                f"the jobs waiting or running hold {self.total} bytes of payload, and "
                f"{size} more would pass the master's {self.limit} (--max-payload-memory)"
            )
        mine = self.by_owner.get(owner, 0)
        if mine + size > self.limit // 2:
            return (
                f"{owner or 'this caller'}'s jobs waiting or running hold {mine} bytes of "
                f"payload, and {size} more would pass the half of --max-payload-memory "
                f"({self.limit // 2}) one identity may hold"
            )
        return None

    def add(self, spec: TaskSpec) -> None:
        held = self._held.get(id(spec.payload))
        if held is not None:
            held.jobs += 1
            return
        size = len(spec.payload)
        self._held[id(spec.payload)] = _Held(size, spec.owner)
        self.total += size
        self.by_owner[spec.owner] = self.by_owner.get(spec.owner, 0) + size

    def remove(self, spec: TaskSpec) -> None:
        held = self._held.get(id(spec.payload))
        if held is None:
            return
        held.jobs -= 1
        if held.jobs > 0:
            return
        del self._held[id(spec.payload)]
        self.total -= held.size
        left = self.by_owner.get(held.owner, 0) - held.size
        if left > 0:
            self.by_owner[held.owner] = left
        else:
            self.by_owner.pop(held.owner, None)


@dataclass(slots=True)
class _Held:
    """A payload the budget counts: its size, its owner, and how many jobs hold it."""

    size: int
    owner: str
    jobs: int = 1
