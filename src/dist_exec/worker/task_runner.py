"""Runs attempts on a worker: executor, timeout, cancel, bounded output, held results.

An attempt keeps running when the master's stream to it breaks; its result is held until it is
delivered or ``result_retention_s`` passes, so a master that restarts (or a stream that is cut)
can attach to it again and lose nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from dist_exec.config import format_duration
from dist_exec.errors import (
    InvalidTaskSpec,
    PolicyDenied,
    ResourceExhausted,
    TaskNotFound,
    WorkerDraining,
    shorten,
)
from dist_exec.executors import ExecRequest, Executor, StopOrder
from dist_exec.models import ExecOutcome, ExecStatus, OutputChunk, Stream
from dist_exec.output_tail import OutputTail

log = logging.getLogger(__name__)
SUBSCRIBER_QUEUE_CHUNKS = 64  # at most this many chunks (of up to 64 KiB) wait for the master
OUTPUT_TAIL_BYTES = 1024 * 1024  # kept beyond the head, replayed to a master that re-attaches
# Delivered results kept for a master that dies before committing them (bounded three ways).
RECENT_RESULTS = 10_000
RECENT_RESULT_BYTES = 64 * 1024 * 1024
# (As long as an undelivered result is held, --result-retention's default: a master down for
# minutes, a supervisor's restart backoff, still finds the result it took but did not record.)
RECENT_RESULTS_S = 600.0


def _result_bytes(attempt: Attempt) -> int:
    outcome = attempt.outcome
    return 0 if outcome is None else len(outcome.stdout) + len(outcome.stderr)


@dataclass(slots=True)
class _Buffer:
    """The first ``limit`` bytes of a stream, its last OUTPUT_TAIL_BYTES beyond those, and
    how many bytes it had in all: bounded memory, however much a command prints."""

    limit: int
    head: bytearray = field(default_factory=bytearray)
    tail: OutputTail = field(default_factory=lambda: OutputTail(OUTPUT_TAIL_BYTES))
    total: int = 0

    def add(self, data: bytes) -> int:
        offset = self.total
        self.total += len(data)
        room = self.limit - len(self.head)
        if room > 0:
            self.head += data[:room]
        if room < len(data):
            self.tail.add(data[max(0, room) :])
        return offset

    def kept(self, start: int) -> list[tuple[int, bytes]]:
        """What is kept from byte ``start`` on: (offset, data) of the head and the tail."""
        parts = []
        if start < len(self.head):
            parts.append((start, bytes(self.head[start:])))
        if self.total > len(self.head):
            tail = self.tail.value()
            tail_start = self.total - len(tail)
            if start < self.total:
                cut = max(0, start - tail_start)
                parts.append((tail_start + cut, tail[cut:]))
        return [(offset, data) for offset, data in parts if data]


class _Subscription:
    def __init__(self, replay: list[OutputChunk]) -> None:
        self.replay = replay
        self.queue: asyncio.Queue[OutputChunk | None] = asyncio.Queue(SUBSCRIBER_QUEUE_CHUNKS)


class AttemptOutput:
    """An attempt's output: head kept for the result, live chunks to the one subscriber."""

    def __init__(self, limit: int) -> None:
        self._buffers = {s: _Buffer(limit) for s in Stream}
        self._subscriber: _Subscription | None = None
        self._closed = False

    async def write(self, stream: Stream, data: bytes) -> None:
        offset = self._buffers[stream].add(data)
        sub = self._subscriber
        if sub is not None:
            # Backpressure, as a pipe gives it: a slow master slows the command, loses nothing.
            await sub.queue.put(OutputChunk(stream, offset, data))

    def close(self) -> None:
        self._closed = True
        sub = self._subscriber
        if sub is not None and not sub.queue.full():
            sub.queue.put_nowait(None)  # wakes a follower waiting on an empty queue

    def subscribe(self, offsets: Mapping[Stream, int]) -> _Subscription:
        """Replay what is kept from ``offsets`` on, then follow live. Replaces any subscriber."""
        replay = []
        for stream, buf in self._buffers.items():
            for offset, data in buf.kept(max(0, offsets.get(stream, 0))):
                replay.append(OutputChunk(stream, offset, data))
        sub = _Subscription(replay)
        if self._subscriber is not None:
            # The stream it fed is dead or replaced: end it, and free a writer blocked on it.
            self.unsubscribe(self._subscriber)
        self._subscriber = sub
        if self._closed:
            sub.queue.put_nowait(None)
        return sub

    def unsubscribe(self, sub: _Subscription) -> None:
        if self._subscriber is sub:
            self._subscriber = None
        # Wake a writer blocked on this subscriber's full queue, and end its follower.
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(None)

    async def follow(self, sub: _Subscription) -> AsyncIterator[OutputChunk]:
        for chunk in sub.replay:
            yield chunk
        while not (self._closed and sub.queue.empty()):
            item = await sub.queue.get()
            if item is None:
                return
            yield item

    def summary(self) -> tuple[bytes, bytes, int, int, bool]:
        out, err = self._buffers[Stream.STDOUT], self._buffers[Stream.STDERR]
        truncated = out.total > len(out.head) or err.total > len(err.head)
        return bytes(out.head), bytes(err.head), out.total, err.total, truncated


@dataclass(slots=True)
class Attempt:
    task_id: str
    attempt: int
    task_type: str
    output: AttemptOutput
    started: float
    task: asyncio.Task[None] | None = None
    outcome: ExecOutcome | None = None
    finished_at: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    running: bool = False  # its task has started (cancelling it now reaches the executor)
    cancel_reason: str = ""
    retryable_on_cancel: bool = False
    stop: StopOrder = field(default_factory=StopOrder)  # its request's: how a cancel stops it

    @property
    def key(self) -> tuple[str, int]:
        return (self.task_id, self.attempt)


class TaskRunner:
    """The worker's table of attempts and the executors that run them."""

    def __init__(
        self,
        executors: Mapping[str, Executor],
        max_concurrent: int,
        max_output_bytes: int,
        result_retention_s: float,
    ) -> None:
        self.executors = dict(executors)
        self.max_concurrent = max_concurrent
        self.max_output_bytes = max_output_bytes
        self.result_retention_s = result_retention_s
        self.draining = False
        self._attempts: dict[tuple[str, int], Attempt] = {}
        self._idle = asyncio.Event()  # no attempt is running
        self._idle.set()
        self._empty = asyncio.Event()  # no attempt is held (every result was delivered)
        self._empty.set()
        # Results already sent, kept a while: the master may die before committing one, and
        # then gets it again after its restart (they are reported when registering again).
        self._recent: OrderedDict[tuple[str, int], Attempt] = OrderedDict()
        self._recent_bytes = 0

    @property
    def capabilities(self) -> list[str]:
        return sorted(self.executors)

    @property
    def active_count(self) -> int:
        return sum(1 for a in self._attempts.values() if a.outcome is None)

    def running_task_ids(self) -> list[str]:
        return [a.task_id for a in self._attempts.values() if a.outcome is None]

    def held(self) -> list[Attempt]:
        """Attempts running or finished whose results the master may still need."""
        self._expire()
        return [*self._attempts.values(), *self._recent.values()]

    def holds(self, task_id: str, attempt: int) -> bool:
        """Whether this attempt was started here already (a repeated start finds it)."""
        return (task_id, attempt) in self._attempts or (task_id, attempt) in self._recent

    def find(self, task_id: str, attempt: int) -> Attempt:
        key = (task_id, attempt)
        found = self._attempts.get(key) or self._recent.get(key)
        if found is None:
            raise TaskNotFound(f"this worker holds no attempt {attempt} of task {shorten(task_id)}")
        return found

    def start(self, request: ExecRequest, task_type: str) -> Attempt:
        """Start an attempt, or return it if it already exists (a retried Execute call), also
        once its result was delivered (the reply that carried it may be what was lost)."""
        key = (request.task_id, request.attempt)
        existing = self._attempts.get(key) or self._recent.get(key)
        if existing is not None:
            return existing
        if self.draining:
            raise WorkerDraining("worker is draining and takes no new tasks")
        executor = self.executors.get(task_type)
        if executor is None:
            raise InvalidTaskSpec(
                f"this worker cannot run task type {shorten(task_type)}; it runs: "
                f"{', '.join(self.capabilities)}"
            )
        executor.validate(request.payload)
        if self.active_count >= self.max_concurrent:
            raise ResourceExhausted(f"worker is full ({self.max_concurrent} tasks running)")
        self._expire()
        attempt = Attempt(
            request.task_id,
            request.attempt,
            task_type,
            AttemptOutput(self.max_output_bytes),
            time.monotonic(),
            stop=request.stop,
        )
        self._attempts[attempt.key] = attempt
        self._idle.clear()
        self._empty.clear()
        attempt.task = asyncio.create_task(self._run(attempt, executor, request))
        return attempt

    def cancel(
        self,
        task_id: str,
        attempt_no: int = 0,
        reason: str = "cancelled",
        retryable: bool = False,
        sig: signal.Signals | None = None,
    ) -> bool:
        """Stop the task's running attempts (only ``attempt_no`` unless it is 0), with
        ``sig`` (None: as ordered before, TERM unless a cancel said otherwise); an attempt
        already stopping gets a new signal at once."""
        found = False
        for attempt in self._attempts.values():
            if attempt_no and attempt.attempt != attempt_no:
                continue
            if attempt.task_id == task_id and attempt.outcome is None:
                if sig is not None:
                    attempt.stop.signal = sig
                attempt.cancel_reason = reason
                attempt.retryable_on_cancel = retryable
                if not attempt.cancel.is_set():
                    attempt.cancel.set()
                    if attempt.running and attempt.task is not None:
                        attempt.task.cancel()  # else _run sees the event when it starts
                found = True
        return found

    def delivered(self, attempt: Attempt) -> None:
        """The result went out to the master: keep it only among the recent results."""
        if attempt.outcome is None or self._attempts.pop(attempt.key, None) is None:
            return
        if not self._attempts:
            self._empty.set()
        self._recent[attempt.key] = attempt
        self._recent_bytes += _result_bytes(attempt)
        while self._recent and (
            len(self._recent) > RECENT_RESULTS or self._recent_bytes > RECENT_RESULT_BYTES
        ):
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= _result_bytes(old)

    async def wait_delivered(self) -> None:
        """Until every held result has been delivered."""
        await self._empty.wait()

    async def drain(self, timeout_s: float) -> None:
        """Take no new tasks; wait for running ones, then stop what is left (retryable)."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        for attempt in list(self._attempts.values()):
            if attempt.outcome is None:
                self.cancel(
                    attempt.task_id,
                    attempt.attempt,
                    "worker shut down before the task finished",
                    retryable=True,
                )
        await self._idle.wait()

    async def close(self) -> None:
        """Stop everything now (tasks are killed), e.g. on a second signal. What was running
        is given back to the master (run again elsewhere, not failed), as by a drain."""
        for attempt in list(self._attempts.values()):
            if not attempt.cancel.is_set():  # (a cancel asked for before stays a cancel)
                reason = "the worker was stopped before the task finished"
                self.cancel(attempt.task_id, attempt.attempt, reason, retryable=True)
            if attempt.task is not None and not attempt.task.cancelling():
                attempt.task.cancel()  # (also one not running yet, and one already stopping)
        await asyncio.gather(
            *(a.task for a in self._attempts.values() if a.task is not None),
            return_exceptions=True,
        )
        for attempt in list(self._attempts.values()):
            if attempt.outcome is None:  # its task was cancelled before it ever ran
                self._finish(attempt, _cancelled(attempt))

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.result_retention_s
        for key, attempt in list(self._attempts.items()):
            if attempt.outcome is not None and attempt.finished_at < cutoff:
                log.warning("dropping undelivered result of %s attempt %d", *key)
                del self._attempts[key]
        if not self._attempts:
            self._empty.set()
        recent_cutoff = time.monotonic() - RECENT_RESULTS_S
        while self._recent:
            key, oldest = next(iter(self._recent.items()))
            if oldest.finished_at >= recent_cutoff:
                break
            del self._recent[key]
            self._recent_bytes -= _result_bytes(oldest)

    async def _run(self, attempt: Attempt, executor: Executor, request: ExecRequest) -> None:
        """Run the executor in this task: a timeout or ``cancel`` cancels it here, and the
        executor stops its work (kills the command) before the outcome is set."""
        outcome: ExecOutcome | None = None
        limit = asyncio.timeout(request.timeout_s if request.timeout_s > 0 else None)
        attempt.running = True
        try:
            if attempt.cancel.is_set():  # cancelled before this task ever ran
                raise asyncio.CancelledError
            async with limit:
                outcome = await executor.execute(request, attempt.output)
        except TimeoutError as exc:
            if limit.expired():
                outcome = ExecOutcome(
                    ExecStatus.TIMEOUT,
                    error=f"timed out after {format_duration(request.timeout_s)}",
                )
            else:  # the executor's own
                outcome = _failed(executor, request, exc)
        except asyncio.CancelledError:
            if not attempt.cancel.is_set():
                raise  # the worker is stopping (close): _finish still runs below
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.uncancel()
            outcome = _cancelled(attempt)
        except Exception as exc:
            # An executor that fails while stopping for a cancel was still cancelled.
            outcome = (
                _cancelled(attempt) if attempt.cancel.is_set() else _failed(executor, request, exc)
            )
        finally:
            self._finish(attempt, outcome or ExecOutcome(ExecStatus.FAILURE, error="stopped"))

    def _finish(self, attempt: Attempt, outcome: ExecOutcome) -> None:
        stdout, stderr, out_n, err_n, truncated = attempt.output.summary()
        attempt.outcome = ExecOutcome(
            outcome.status,
            outcome.exit_code,
            outcome.error,
            stdout,
            stderr,
            out_n,
            err_n,
            truncated,
            outcome.duration_s or time.monotonic() - attempt.started,
            outcome.retryable,
            outcome.metadata,
        )
        attempt.finished_at = time.monotonic()
        attempt.output.close()
        attempt.done.set()
        if self.active_count == 0:
            self._idle.set()


def _cancelled(attempt: Attempt) -> ExecOutcome:
    return ExecOutcome(
        ExecStatus.FAILURE if attempt.retryable_on_cancel else ExecStatus.CANCELLED,
        error=attempt.cancel_reason,
        retryable=attempt.retryable_on_cancel,
    )


def _failed(executor: Executor, request: ExecRequest, exc: Exception) -> ExecOutcome:
    if isinstance(exc, InvalidTaskSpec | PolicyDenied):
        return ExecOutcome(ExecStatus.FAILURE, error=exc.message)
    log.error("executor %s failed on %s", executor.name, request.task_id, exc_info=exc)
    return ExecOutcome(ExecStatus.FAILURE, error=f"executor {executor.name} failed: {exc}")
