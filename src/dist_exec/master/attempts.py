"""A job's attempts, as the master drives them: start once the job is durable, follow the
worker's output and result (re-attaching after transport errors), then complete the job or
queue it again after a backoff.

``Attempts`` is a part of ``Master`` (core.py), split out by concern: it uses the master's
store, registry, scheduler, worker client, clock, output hub and table of active jobs, declared
below and set by ``Master.__init__``. Every decision is made on the event loop against the
in-memory ``ActiveJob``; the store mirrors it durably.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from dist_exec.clock import Clock
from dist_exec.config import MasterConfig, format_duration
from dist_exec.master.active import ActiveJob, PayloadBudget, owned_key
from dist_exec.master.dispatcher import (
    AttemptGone,
    AttemptRejected,
    WorkerClient,
    WorkerUnreachable,
)
from dist_exec.master.output import OutputHub
from dist_exec.master.registry import NodeRegistry
from dist_exec.master.scheduler import Scheduler
from dist_exec.master.store import JobStore
from dist_exec.models import (
    AttemptOutcome,
    AttemptRecord,
    ExecOutcome,
    ExecStatus,
    JobId,
    JobStatus,
    NodeId,
    NodeInfo,
    OutputChunk,
    Stream,
)
from dist_exec.output_tail import OutputTail

log = logging.getLogger(__name__)
REATTACH_BACKOFF_MAX_S = 2.0
OUTPUT_CACHE_BYTES = 256 * 1024  # stored output of a running job also kept in memory, up to this

_EXEC_TO_JOB = {
    ExecStatus.SUCCESS: JobStatus.COMPLETED,
    ExecStatus.FAILURE: JobStatus.FAILED,
    ExecStatus.TIMEOUT: JobStatus.TIMEOUT,
    ExecStatus.CANCELLED: JobStatus.CANCELLED,
}


class Attempts:
    """The attempts part of ``Master``; its attributes are the master's."""

    config: MasterConfig
    store: JobStore
    registry: NodeRegistry
    scheduler: Scheduler
    workers: WorkerClient
    clock: Clock
    hub: OutputHub
    _active: dict[JobId, ActiveJob]
    _payloads: PayloadBudget
    _wake: asyncio.Event
    _keys: dict[str, tuple[JobId, str]]  # idempotency keys of active jobs

    def _forget_key(self, job: ActiveJob) -> None:
        """Once a job has ended (or was never accepted) the store answers for its key."""
        key = owned_key(job.spec)
        if key and self._keys.get(key, (None, ""))[0] == job.id:
            del self._keys[key]

    def _current(self, job: ActiveJob, attempt: int) -> bool:
        return (
            self._active.get(job.id) is job
            and job.status == JobStatus.RUNNING
            and job.attempt == attempt
        )

    async def _start_attempt(self, job: ActiveJob, attempt: int, node_id: NodeId) -> None:
        if job.accepted is not None:
            try:
                # Shielded: the future is shared by the whole batch; cancelling this runner
                # must not cancel it for the others.
                await asyncio.shield(job.accepted)
            except Exception:
                return  # never accepted: submit_many reports it and withdraws the job
            job.accepted = None
        assert job.started_at is not None
        if job.recorded_attempt != attempt:
            await self.store.mark_running(job.id, node_id, attempt, job.started_at, job.instance)
        if not self._current(job, attempt) or job.cancel_requested:
            if self._current(job, attempt):
                await self._complete(job, JobStatus.CANCELLED, error="cancelled before it started")
            return
        await self._run_attempt(job, attempt, node_id, attach=False)

    async def _run_attempt(
        self, job: ActiveJob, attempt: int, node_id: NodeId, attach: bool
    ) -> None:
        """Drive one attempt to its outcome, re-attaching after transport errors."""
        backoff = 0.1
        try:
            while self._current(job, attempt):
                node = self.registry.get(node_id)
                if node is None:
                    await self._retry(
                        job,
                        f"worker {node_id} left before reporting the result",
                        AttemptOutcome.LOST,
                    )
                    return
                deadline = self._time_left(job)
                if deadline <= 0:
                    await self._complete(
                        job,
                        JobStatus.TIMEOUT,
                        error=f"worker {node_id} did not report within the timeout "
                        f"plus {format_duration(self.config.dispatch_grace_s)}",
                    )
                    return
                events = self.workers.execute(
                    node.endpoint, job.id, attempt, job.spec, attach, job.seen, deadline
                )
                try:
                    outcome = await self._follow_attempt(job, attempt, node, events)
                except WorkerUnreachable as exc:
                    if not node.instance and self._time_left(job) > 0:  # (else: TIMEOUT)
                        await self._abandon(job, attempt, node, exc)
                        return
                    log.info("attempt %d of %s: %s; re-attaching", attempt, job.id, exc)
                    attach = True
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, REATTACH_BACKOFF_MAX_S)
                    continue
                except AttemptGone as exc:
                    await self._retry(
                        job, f"worker {node_id} lost the task: {exc}", AttemptOutcome.WORKER_LOST
                    )
                    return
                except AttemptRejected as exc:
                    if exc.fatal:
                        await self._complete(job, JobStatus.FAILED, error=str(exc))
                    else:
                        pause = self.registry.refused(node_id)
                        asyncio.get_running_loop().call_later(pause, self._wake.set)
                        await self._retry(
                            job, f"worker {node_id} refused: {exc}", AttemptOutcome.RETURNED
                        )
                    return
                except Exception as exc:  # a bug or a broken worker must not stop the master
                    log.exception("attempt %d of %s on %s failed", attempt, job.id, node_id)
                    await self._retry(
                        job, f"worker {node_id}: {exc}", AttemptOutcome.LOST, attempt=attempt
                    )
                    return
                await self._on_outcome(job, attempt, node_id, outcome)
                with contextlib.suppress(Exception):
                    await anext(events, None)  # complete the call
                return
        finally:
            self._wake.set()

    def _time_left(self, job: ActiveJob) -> float:
        """Until the master stops waiting for the attempt's result: its timeout, and a grace."""
        end = job.started_mono + job.spec.timeout_s + self.config.dispatch_grace_s
        return end - self.clock.monotonic()

    async def _abandon(
        self, job: ActiveJob, attempt: int, node: NodeInfo, exc: WorkerUnreachable
    ) -> None:
        """The call to a worker that cannot be re-attached to broke: one that registered
        without an instance (the protocol's first version, or a worker built from it) takes
        an attach for an empty task. Stop the attempt there if it still runs (so it cannot
        stop the next one of the same task), then run the job again."""
        with contextlib.suppress(Exception):
            await self.workers.cancel(node.endpoint, job.id, attempt)
        await self._retry(
            job,
            f"lost the call to worker {node.id} ({exc}), which cannot be re-attached to",
            AttemptOutcome.LOST,
            attempt=attempt,
        )

    async def _follow_attempt(
        self,
        job: ActiveJob,
        attempt: int,
        node: NodeInfo,
        events: AsyncIterator[OutputChunk | ExecOutcome],
    ) -> ExecOutcome:
        async for event in events:
            if isinstance(event, ExecOutcome):
                return event
            if self._current(job, attempt):
                self._on_output(job, attempt, event)
        raise WorkerUnreachable(f"worker {node.id} sent no result")

    def _on_output(self, job: ActiveJob, attempt: int, chunk: OutputChunk) -> None:
        seen = job.seen[chunk.stream]
        end = chunk.offset + len(chunk.data)
        if end <= seen:
            return  # replayed after a re-attach: already have it
        if chunk.offset < seen:
            chunk = OutputChunk(chunk.stream, seen, chunk.data[seen - chunk.offset :])
        job.seen[chunk.stream] = end
        keep = self.config.max_output_bytes - chunk.offset
        if keep > 0:
            stored = chunk if keep >= len(chunk.data) else replace(chunk, data=chunk.data[:keep])
            self.store.append_output(job.id, stored)
            if job.kept_all and job.kept_bytes + len(stored.data) <= OUTPUT_CACHE_BYTES:
                job.kept.append(stored)
                job.kept_bytes += len(stored.data)
            elif job.kept_all:
                job.kept_all, job.kept, job.kept_bytes = False, [], 0
        if keep < len(chunk.data) and self.config.output_tail_bytes > 0:
            tail = job.tails.get(chunk.stream)
            if tail is None:
                tail = job.tails[chunk.stream] = OutputTail(self.config.output_tail_bytes)
            tail.add(chunk.data[max(0, keep) :])
        self.hub.publish(job.id, attempt, chunk)

    async def _on_outcome(
        self, job: ActiveJob, attempt: int, node_id: NodeId, outcome: ExecOutcome
    ) -> None:
        if not self._current(job, attempt):
            log.info("ignoring result of superseded attempt %d of %s", attempt, job.id)
            self.store.note_attempt(job.id, attempt, f"late result ignored: {_describe(outcome)}")
            return
        # A worker may carry output in its result only (the original contract allows it), or
        # hold more of it than it streamed: keep what was not seen yet.
        for stream, data in ((Stream.STDOUT, outcome.stdout), (Stream.STDERR, outcome.stderr)):
            seen = job.seen[stream]
            if len(data) > seen:
                self._on_output(job, attempt, OutputChunk(stream, seen, data[seen:]))
        if outcome.retryable:
            reason = outcome.error or f"worker {node_id} gave the task back"
            await self._retry(job, reason, AttemptOutcome.RETURNED)
            return
        status = _EXEC_TO_JOB[outcome.status]
        if job.cancel_requested and status == JobStatus.FAILED and outcome.exit_code is None:
            status = JobStatus.CANCELLED
        if (
            status in (JobStatus.FAILED, JobStatus.TIMEOUT)
            and job.spec.retry_on_failure
            and not job.cancel_requested
            and job.retries < (job.spec.max_retries or 0)
        ):
            await self._retry(job, _describe(outcome), AttemptOutcome.RETRIED)
            return
        await self._complete(job, status, outcome)

    async def _retry(
        self, job: ActiveJob, reason: str, kind: AttemptOutcome, attempt: int | None = None
    ) -> None:
        """The attempt ended without a result to keep (``kind`` says how): queue the job again
        after a backoff, or give up. A RETURNED attempt is not counted as a retry.

        ``attempt``: act only if that attempt is still the job's running one (a decision taken
        earlier must not hit a newer attempt, or count the same loss twice)."""
        if self._active.get(job.id) is not job or job.status.terminal:
            return
        if attempt is not None and (job.status != JobStatus.RUNNING or job.attempt != attempt):
            return
        if job.runner is not None and job.runner is not asyncio.current_task():
            job.runner.cancel()
        job.runner = None
        job.orphan_deadline = None
        if job.cancel_requested:
            await self._complete(job, JobStatus.CANCELLED, error=f"cancelled ({reason})")
            return
        counted = kind not in (AttemptOutcome.RETURNED, AttemptOutcome.NOT_STARTED)
        retries = job.retries + (1 if counted else 0)
        losses = _losses(job.worker_losses, kind)
        give_up = ""
        if job.spec.node_id:  # pinned (broadcast): no other node may run it instead
            give_up = f"{reason}; not retried elsewhere"
        elif losses >= self.config.poison_threshold:
            give_up = (
                f"{reason}; its worker was lost {losses} times in a row while running it, so it "
                "is not retried (the task may be what kills its workers)"
            )
        elif retries > (job.spec.max_retries or 0):
            give_up = f"{reason}; gave up after {job.attempt} attempts"
        if give_up:
            await self._complete(job, JobStatus.FAILED, error=give_up, attempt_outcome=kind)
            return
        delay = (
            backoff(retries, self.config.retry_backoff_s, self.config.retry_backoff_max_s)
            if counted
            else 0.0
        )
        log.warning("job %s attempt %d: %s; retrying in %.1fs", job.id, job.attempt, reason, delay)
        ended = AttemptRecord(
            job.attempt, job.node_id or "", job.started_at, self.clock.now(), kind, reason
        )
        job.status = JobStatus.PENDING
        job.retries = retries
        job.worker_losses = losses
        job.node_id = None
        job.record = replace(job.record, error=reason)
        job.kept_all, job.kept, job.kept_bytes = True, [], 0  # the store drops it too
        job.tails = {}
        job.queued_mono = self.clock.monotonic()
        if delay > 0:
            job.retry_at = job.queued_mono + delay
        await self.store.requeue(job.id, retries, reason, ended if job.attempt else None, losses)
        if self._active.get(job.id) is not job or job.status != JobStatus.PENDING:
            return  # cancelled while the requeue was written
        if job.retry_at is None:
            self._enqueue(job)
        else:
            job.retry_handle = asyncio.get_running_loop().call_later(delay, self._enqueue, job)

    def _enqueue(self, job: ActiveJob) -> None:
        job.retry_at = job.retry_handle = None
        if self._active.get(job.id) is not job or job.status != JobStatus.PENDING:
            return
        self.scheduler.enqueue(job.id, job.seq, job.spec, self.clock.monotonic())
        self._wake.set()

    def _cancel_backoff(self, job: ActiveJob) -> None:
        if job.retry_handle is not None:
            job.retry_handle.cancel()
        job.retry_at = job.retry_handle = None

    async def _queue_timed_out(self, job: ActiveJob) -> None:
        if self._active.get(job.id) is not job or job.status != JobStatus.PENDING:
            return
        self.scheduler.remove(job.id)
        self._cancel_backoff(job)
        limit = format_duration(job.spec.queue_timeout_s)
        await self._complete(
            job,
            JobStatus.FAILED,
            error=f"did not start within its queue timeout of {limit}"
            + (f" (last attempt: {job.record.error})" if job.attempt else ""),
        )

    async def _complete(
        self,
        job: ActiveJob,
        status: JobStatus,
        outcome: ExecOutcome | None = None,
        error: str = "",
        attempt_outcome: AttemptOutcome | None = None,
    ) -> None:
        """Record the terminal state durably, then end followers and forget the job.
        ``attempt_outcome``: how its last attempt ended, when not as the job did."""
        if job.status.terminal:
            return
        job.status = status
        runner = job.runner
        if runner is not None and runner is not asyncio.current_task():
            runner.cancel()
        record = replace(
            job.record,
            status=status,
            started_at=job.started_at,
            completed_at=self.clock.now(),
            worker_id=job.node_id or "",
            attempt=job.attempt,
            retries=job.retries,
            exit_code=outcome.exit_code if outcome else None,
            error=(outcome.error if outcome else "") or error,
            stdout_bytes=outcome.stdout_bytes if outcome else job.seen[Stream.STDOUT],
            stderr_bytes=outcome.stderr_bytes if outcome else job.seen[Stream.STDERR],
            truncated=_truncated(
                job, outcome, self.config.max_output_bytes, self.config.output_tail_bytes
            ),
            result_metadata=outcome.metadata if outcome else {},
        )
        for stream, tail in job.tails.items():  # committed with the final state
            data = tail.value()
            self.store.append_output(
                job.id, OutputChunk(stream, job.seen[stream] - len(data), data)
            )
        job.tails = {}
        # Followers hear the end before the commit: a worker's result is only released once it is
        # committed (_run_attempt), and get() of a finishing job waits for the commit.
        self.hub.close(job.id, record)
        writing = asyncio.ensure_future(
            self.store.finish(record, expect_attempt=None, attempt_outcome=attempt_outcome)
        )
        # (Its error, if any, is this call's; a master stopping meanwhile does not report it.)
        writing.add_done_callback(_retrieved)
        try:
            await asyncio.shield(writing)
        finally:
            if self._active.pop(job.id, None) is not None:
                self._payloads.remove(job.spec)
            self._forget_key(job)
            job.ended.set()


def _losses(before: int, kind: AttemptOutcome) -> int:
    """Attempts in a row whose worker was lost, after an attempt that ended as ``kind``."""
    if kind == AttemptOutcome.WORKER_LOST:
        return before + 1
    if kind == AttemptOutcome.NOT_STARTED:  # it did not run: the streak is as it was
        return before
    return 0


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def backoff(retry: int, first_s: float, max_s: float) -> float:
    """Exponential backoff with jitter before retry number ``retry`` (from 1): the step doubles
    from ``first_s`` up to ``max_s``; half of it is fixed, half random, so the retries of many
    jobs lost together spread out."""
    step = min(max_s, first_s * 2.0 ** min(retry - 1, 30))
    return step / 2 + random.uniform(0, step / 2)


def _describe(outcome: ExecOutcome) -> str:
    """A result in a few words: "FAILURE: command exited with status 2"."""
    if outcome.error:
        return f"{outcome.status.value}: {clip(outcome.error, 200)}"
    if outcome.exit_code is not None:
        return f"{outcome.status.value}, exit code {outcome.exit_code}"
    return outcome.status.value


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _truncated(job: ActiveJob, outcome: ExecOutcome | None, head: int, tail: int) -> bool:
    """Whether the master keeps less of a stream than was printed: it keeps the first
    ``head`` bytes and the last ``tail`` of what reached it (``job.seen``); a worker may have
    counted more than it sent (its own memory bound, output sent only in its result)."""
    for stream in Stream:
        seen = job.seen[stream]
        printed = seen
        if outcome is not None:
            printed = max(
                seen, outcome.stdout_bytes if stream == Stream.STDOUT else outcome.stderr_bytes
            )
        if printed > min(seen, head) + min(max(0, seen - head), tail):
            return True
    return False
