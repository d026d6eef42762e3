"""The master's job lifecycle: submit, place, dispatch, record, retry, cancel, recover.
(Accepting jobs is in submission.py, a job's attempts from its dispatch to its end in
attempts.py: both are parts of ``Master``.)

Every decision about a live job is made here, synchronously on the event loop, against the
in-memory ``ActiveJob`` table; the store mirrors it durably. A job is active (PENDING or RUNNING)
until its terminal state is committed. Results are accepted only from the job's current attempt
on its current node; anything else is stale and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta

from dist_exec.clock import Clock
from dist_exec.config import MAX_LIST_JOBS, MasterConfig, format_duration, node_problem
from dist_exec.errors import (
    DistExecError,
    InvalidTaskSpec,
    JobAlreadyFinished,
    JobNotFound,
    StoreUnavailable,
)
from dist_exec.executors import Executor
from dist_exec.executors.limits import summary as limits_summary
from dist_exec.master.active import ActiveJob, HeldAttempt, PayloadBudget
from dist_exec.master.admission import RateLimiter
from dist_exec.master.attempts import Attempts, clip
from dist_exec.master.dispatcher import (
    AttemptGone,
    AttemptRejected,
    WorkerClient,
    WorkerUnreachable,
)
from dist_exec.master.output import Follower, OutputHub
from dist_exec.master.registry import NodeRegistry
from dist_exec.master.scheduler import Scheduler
from dist_exec.master.store import JobStore
from dist_exec.master.submission import MAX_BATCH_JOBS, Submission
from dist_exec.models import (
    AttemptOutcome,
    Job,
    JobId,
    JobStatus,
    NodeEndpoint,
    NodeId,
    NodeInfo,
    NodeStatus,
    OutputChunk,
    Stream,
    TaskLimits,
)

log = logging.getLogger(__name__)
CANCEL_CONFIRM_S = 1.0  # resend CancelTask this often until the worker confirms the end
RESTART_GRACE_EXTRA_S = 2.0  # after a restart, beyond the heartbeat timeout, to hear from nodes
STOP_RETRY_MIN_S = 0.5  # asking an unreachable node to stop an unwanted attempt: first wait
STOP_RETRY_MAX_S = 10.0
COMMIT_WAIT_S = 5.0  # a read of an ended job waits this long for its end to be written
# A recovered attempt started less long ago than this, that its (same) worker does not hold,
# never reached it; one started earlier may have run and been forgotten (see _never_reached).
NOT_STARTED_WINDOW_S = 60.0
PRUNE_SLICE = 500  # jobs deleted per write, so that other writes are not held up for long
PRUNE_MIN_EVERY_S = 0.25  # ended jobs past the retention are looked for this often, at most
PRUNE_MAX_EVERY_S = 600.0  # and at least


class Master(Submission, Attempts):
    def __init__(
        self,
        config: MasterConfig,
        store: JobStore,
        registry: NodeRegistry,
        scheduler: Scheduler,
        workers: WorkerClient,
        executors: Mapping[str, Executor],
        clock: Clock,
    ) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.scheduler = scheduler
        self.workers = workers
        self.executors = executors
        self.clock = clock
        self.hub = OutputHub()
        self.rate_limiter = (
            RateLimiter(clock, config.rate_limit_per_s, config.rate_burst)
            if config.rate_limit_per_s > 0
            else None
        )
        self._active: dict[JobId, ActiveJob] = {}
        self._wake = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._seq = itertools.count(1)  # submission order, for FIFO within a priority
        self._keys: dict[str, tuple[JobId, str]] = {}  # idempotency keys of active jobs
        self._payloads = PayloadBudget(config.max_payload_memory)
        self._key_lock = asyncio.Lock()
        # Nodes running a job that one more lost worker would fail as poison. Two such jobs
        # never share a node: a task that kills its workers cannot take another one on its
        # last chance down with it, so only the task itself is failed as poison.
        self._isolating: dict[NodeId, JobId] = {}
        self.ready = asyncio.Event()

    # ---- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Recover unfinished jobs, then place and supervise them until cancelled."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            await self._recover()
            tg.create_task(self._schedule_forever())
            tg.create_task(self._sweep_forever())
            if self.config.job_retention_s > 0:
                tg.create_task(self._prune_forever())
            self.ready.set()

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        assert self._tg is not None, "Master.run() is not running"
        return self._tg.create_task(coro)  # type: ignore[arg-type]

    def _start_runner(self, coro: object, job_id: JobId, node_id: NodeId) -> asyncio.Task[None]:
        """Run an attempt of ``job_id``; its slot on ``node_id`` (and the node's isolation for
        it) is released when the task ends, however it ends (a task cancelled before its first
        step never runs its own finally)."""

        def release(_: asyncio.Task[None]) -> None:
            self.registry.release(node_id)
            if self._isolating.get(node_id) == job_id:
                del self._isolating[node_id]
            self._wake.set()

        task = self._spawn(coro)
        task.add_done_callback(release)
        return task

    async def _recover(self) -> None:
        # Workers notice the restart at their next heartbeat, once their channel has connected
        # again (reconnect backoff of at most about a second): then they register and report.
        grace = self.config.heartbeat_timeout_s + RESTART_GRACE_EXTRA_S
        unfinished = await self.store.unfinished()
        instances = await self.store.running_instances()
        self._seq = itertools.count(max((seq for seq, _ in unfinished), default=0) + 1)
        for seq, job in unfinished:
            queued_s = 0.0  # (a job that ran before: its time in the queue since is not kept)
            if job.attempt == 0:  # queued since it was accepted: its queue timeout counts on
                queued_s = max(0.0, (self.clock.now() - job.created_at).total_seconds())
            active = ActiveJob(
                job,
                seq,
                attempt=job.attempt,
                retries=job.retries,
                queued_mono=self.clock.monotonic() - queued_s,
                worker_losses=job.worker_losses,
            )
            self._active[job.id] = active
            self._payloads.add(job.spec)
            if job.status == JobStatus.RUNNING:
                # Its worker gets one heartbeat timeout to register again and claim it.
                active.status = JobStatus.RUNNING
                active.node_id = NodeId(job.worker_id)
                active.instance = instances.get(job.id, "")
                active.started_at = job.started_at
                # Its timeout runs from its start, not from this restart (by the wall clock);
                # once its worker is back (within ``grace``) it has the dispatch grace in any
                # case, to report a result it holds.
                ran_s = (self.clock.now() - job.started_at).total_seconds() if job.started_at else 0
                active.started_mono = self.clock.monotonic() - min(
                    max(0.0, ran_s), max(0.0, job.spec.timeout_s - grace)
                )
                active.orphan_deadline = self.clock.monotonic() + grace
                active.kept_all = False  # its output so far is in the store only
                # Re-attached, its worker replays from here: what is stored is not stored again
                # (an overlapping replay would be kept beside the rows it overlaps).
                active.seen = await self.store.output_ends(job.id)
            else:  # (aged for the time it waited before the restart too)
                self.scheduler.enqueue(job.id, seq, job.spec, active.queued_mono)
        if self._active:
            log.info("recovered %d unfinished jobs", len(self._active))
        self._wake.set()

    async def _schedule_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._place()

    def _place(self) -> list[ActiveJob]:
        """Assign queued jobs to free slots and start their attempts; returns those jobs."""
        placed = []
        for assignment in self.scheduler.plan(
            self.registry.eligible, self.registry.reserve, self._last_chance, self._isolating
        ):
            job = self._active[assignment.job_id]
            if self._last_chance(job.id):
                self._isolating[assignment.node_id] = job.id
            job.status = JobStatus.RUNNING
            job.attempt += 1
            job.node_id = assignment.node_id
            node = self.registry.get(assignment.node_id)
            job.instance = node.instance if node is not None else ""
            job.started_at = self.clock.now()
            job.started_mono = self.clock.monotonic()
            job.seen = {s: 0 for s in Stream}
            job.runner = self._start_runner(
                self._start_attempt(job, job.attempt, assignment.node_id),
                job.id,
                assignment.node_id,
            )
            placed.append(job)
        return placed

    def _last_chance(self, job_id: JobId) -> bool:
        job = self._active.get(job_id)
        return job is not None and job.worker_losses >= self.config.poison_threshold - 1 > 0

    async def _sweep_forever(self) -> None:
        period = max(0.05, min(1.0, self.config.heartbeat_interval_s / 2))
        last = self.clock.monotonic()
        while True:
            await asyncio.sleep(period)
            stalled = self.clock.monotonic() - last - period
            last = self.clock.monotonic()
            if stalled > self.config.heartbeat_interval_s:
                # The master itself did not run (SIGSTOP, a paused VM, a starved loop): the
                # silence is its own, and heartbeats sent meanwhile wait unread. Nodes get that
                # time back instead of all being declared dead at once.
                log.warning(
                    "the master did not run for %s; not counting that against any worker",
                    format_duration(round(stalled, 1)),
                )
                self.registry.excuse(stalled)
            sweep = self.registry.sweep()
            for node_id in sweep.unhealthy:
                log.warning(
                    "node %s missed heartbeats for %s; retrying its tasks",
                    node_id,
                    format_duration(self.config.heartbeat_timeout_s),
                )
                self._node_lost(node_id, f"worker {node_id} stopped responding")
            for node_id in sweep.suspect:
                log.info("node %s missed heartbeats; no new tasks until it is heard from", node_id)
            for node in sweep.removed:
                log.info(
                    "forgetting node %s after %ss of silence", node.id, self.config.node_removal_s
                )
                self._spawn(self._forget(node.endpoint))
            now = self.clock.monotonic()
            if self.scheduler.age(now):
                self._wake.set()
            for job in list(self._active.values()):
                if job.orphan_deadline is not None and now >= job.orphan_deadline:
                    job.orphan_deadline = None
                    self._spawn(
                        self._retry(
                            job,
                            f"worker {job.node_id} did not come back after a restart",
                            AttemptOutcome.WORKER_LOST,
                            attempt=job.attempt,
                        )
                    )
                elif (
                    job.status == JobStatus.PENDING
                    and job.spec.queue_timeout_s
                    and now - job.queued_mono >= job.spec.queue_timeout_s
                ):
                    self._spawn(self._queue_timed_out(job))

    async def _prune_forever(self) -> None:
        """Delete jobs that ended longer than the retention ago, a slice per write (other
        writes go between), at start and then a few times per retention period."""
        retention = self.config.job_retention_s
        period = max(PRUNE_MIN_EVERY_S, min(PRUNE_MAX_EVERY_S, retention / 4))
        while True:
            now = self.clock.now()
            ended_before = now - timedelta(seconds=retention)
            keyed_before = now - timedelta(
                seconds=max(retention, self.config.idempotency_retention_s)
            )
            pruned = 0
            try:
                while (
                    count := await self.store.prune(ended_before, keyed_before, PRUNE_SLICE)
                ) > 0:
                    pruned += count
            except DistExecError as exc:  # the database cannot be written: next time
                log.warning("cannot delete old jobs now: %s", exc.message)
            except Exception:  # (a damaged file, a bug: the master goes on without it)
                log.exception("deleting old jobs failed; trying again later")
            if pruned:
                log.info(
                    "deleted %d jobs that ended more than %s ago",
                    pruned,
                    format_duration(retention),
                )
            await asyncio.sleep(period)

    # ---- client API -------------------------------------------------------------------------

    async def watch(
        self, job_ids: Sequence[JobId], with_output: bool
    ) -> AsyncIterator[tuple[JobId, tuple[int, OutputChunk] | Job]]:
        """Output and final state of several jobs, interleaved, until all have ended."""
        unique = list(dict.fromkeys(job_ids))
        if not 0 < len(unique) <= MAX_BATCH_JOBS:
            raise InvalidTaskSpec(f"watch 1-{MAX_BATCH_JOBS} jobs, got {len(unique)}")
        for job_id in unique:
            if job_id not in self._active:
                await self.get(job_id, with_output=False)  # NOT_FOUND before anything streams
        inner = (
            self._followed(unique[0], with_output)  # nothing to interleave: a hop less
            if len(unique) == 1
            else self._interleaved(unique, with_output)
        )
        async with contextlib.aclosing(inner) as events:  # a closed watch stops following now
            async for event in events:
                yield event

    async def _followed(
        self, job_id: JobId, with_output: bool
    ) -> AsyncGenerator[tuple[JobId, tuple[int, OutputChunk] | Job], None]:
        async for item in self.stream_output(job_id, {}, follow=True, include_result=True):
            if with_output or isinstance(item, Job):
                yield job_id, item

    async def _interleaved(
        self, job_ids: Sequence[JobId], with_output: bool
    ) -> AsyncGenerator[tuple[JobId, tuple[int, OutputChunk] | Job], None]:
        events: asyncio.Queue[tuple[JobId, tuple[int, OutputChunk] | Job] | BaseException] = (
            asyncio.Queue(256)
        )

        async def pump(job_id: JobId) -> None:
            try:
                async for event in self._followed(job_id, with_output):
                    await events.put(event)
            except Exception as exc:
                await events.put(exc)

        pumps = [asyncio.create_task(pump(job_id)) for job_id in job_ids]
        try:
            ended = 0
            while ended < len(job_ids):
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event[1], Job):
                    ended += 1
                yield event
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def get(self, job_id: JobId, with_output: bool = True) -> Job:
        finishing = self._active.get(job_id)
        if finishing is not None and finishing.status.terminal:
            await self._committed(finishing)  # read the job as committed, not as it was before
        job = await self.store.get(job_id, with_output)
        if job is None:
            raise JobNotFound(self._not_found(job_id))
        active = self._active.get(job_id)
        if job.status == JobStatus.PENDING and active is not None:
            return replace(job, pending_reason=self.pending_reason(active))
        return job

    def _not_found(self, job_id: JobId) -> str:
        retention = self.config.job_retention_s
        if not retention:
            return f"job {job_id} not found"
        return f"job {job_id} not found (ended jobs are deleted after {format_duration(retention)})"

    async def _committed(self, job: ActiveJob) -> None:
        """Wait for an ended job's end to be written; while the database cannot take writes,
        say so instead of waiting past the caller's deadline."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(COMMIT_WAIT_S):
                await job.ended.wait()
        if not job.ended.is_set():
            raise StoreUnavailable(
                f"job {job.id} has ended ({job.status.value}), but the master cannot record that "
                f"yet: {self.store.trouble or 'its database is slow to write'}; ask again later"
            )

    def pending_reason(self, job: ActiveJob) -> str:
        """Why a queued job has not started, in words a person can act on."""
        spec = job.spec
        if job.status == JobStatus.RUNNING:  # placed, its start not written yet
            trouble = self.store.trouble
            return f"starting on {job.node_id}" + (
                f"; the master cannot record that yet: {trouble}" if trouble else ""
            )
        if job.retry_at is not None:
            wait = max(0.0, job.retry_at - self.clock.monotonic())
            return (
                f"retrying in {format_duration(round(wait, 1))} (attempt {job.attempt} ended: "
                f"{clip(job.record.error or 'lost', 200)})"
            )
        if job.id not in self.scheduler:
            return "waiting to be queued again after a failed attempt"
        matching = self.registry.matching(spec)
        if not matching:
            wanted = f"task type {spec.task_type!r}"
            if spec.node_id:
                wanted += f" as node {spec.node_id}"
            if spec.selector:
                labels = ",".join(f"{k}={v}" for k, v in sorted(spec.selector.items()))
                wanted += f" with labels {labels}"
            if spec.limits.any:
                wanted += f" allowing {limits_summary(spec.limits)}"
            idle = [n for n in self.registry.nodes() if n.matches(spec)]
            if idle:  # (drained, degraded, not heard from lately)
                states = ", ".join(f"{n.id} {n.status.value}" for n in idle[:5])
                more = f" and {len(idle) - 5} more" if len(idle) > 5 else ""
                return (
                    f"no matching node takes work now: the workers that run {wanted} are "
                    f"{states}{more}"
                )
            return f"no matching node: no healthy worker runs {wanted}"
        ahead = self.scheduler.ahead_of(job.id)
        if not any(n.free_slots for n in matching):
            busy = f"all {len(matching)} matching node(s) are busy"
            return busy + (f"; {ahead} job(s) ahead of it in the queue" if ahead else "")
        if ahead:
            return f"{ahead} job(s) ahead of it in the queue"
        return "being placed"

    async def list_jobs(
        self,
        limit: int,
        offset: int,
        status: JobStatus | None,
        broadcast_id: str = "",
        owner: str | None = None,
    ) -> tuple[list[Job], int]:
        """Newest first; with ``owner``, only the jobs that identity submitted."""
        if limit < 0 or offset < 0:
            raise InvalidTaskSpec("limit and offset must not be negative")
        return await self.store.list_jobs(
            min(limit or 100, MAX_LIST_JOBS), offset, status, broadcast_id, owner
        )

    async def cancel(self, job_id: JobId, wait_s: float, sig: signal.Signals | None = None) -> str:
        """Cancel a job; waits up to ``wait_s`` for a running one to be confirmed dead (and
        for the end to be written). ``sig``: what its command is stopped with (None: TERM); a
        further cancel with another one sends that one too."""
        job = self._active.get(job_id)
        if job is None or job.status.terminal:
            stored = await self.store.get(job_id)
            if stored is None:
                raise JobNotFound(self._not_found(job_id))
            status = job.status if job is not None else stored.status
            raise JobAlreadyFinished(f"job {job_id} has already ended ({status.value})")
        # The work runs apart from this call: a caller that goes away (a short deadline, a
        # client that exits) must not leave it half done, the job running or out of the queue
        # but not ended. (Spawned first: a master that is stopping changes nothing.)
        # A second call while one is at work waits for the same work.
        done = "cancelled"
        if job.stopping is None:
            if job.status == JobStatus.PENDING:
                done = "cancelled before it started"
                job.stopping = self._spawn(
                    self._complete(job, JobStatus.CANCELLED, error="cancelled before it started")
                )
                job.cancel_requested = True
                self.scheduler.remove(job.id)
                self._cancel_backoff(job)
            else:
                job.stop_signal = sig
                job.stopping = self._spawn(self._cancel_running(job))
                job.cancel_requested = True
        elif sig is not None and sig != job.stop_signal and job.status == JobStatus.RUNNING:
            job.stop_signal = sig  # (sent again with every resend of the cancel, below)
            self._spawn(self._signal(job, sig))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await asyncio.shield(job.stopping)
        if job.ended.is_set():
            return done
        decided = job.status  # (changed while this call waited: no narrowing from above)
        if decided.terminal:  # decided, but not written yet
            trouble = self.store.trouble
            return f"{done}; the master cannot record it yet: {trouble}" if trouble else done
        return "cancel requested; the worker has not confirmed yet"

    async def _cancel_running(self, job: ActiveJob) -> None:
        while not job.ended.is_set():
            node = self.registry.get(job.node_id) if job.node_id else None
            if node is None or job.runner is None:
                # No worker to ask (it is gone, or the job is not dispatched yet).
                await self._force_cancel(job, "cancelled")
                return
            try:
                await self.workers.cancel(node.endpoint, job.id, job.attempt, job.stop_signal)
            except (WorkerUnreachable, AttemptGone, AttemptRejected) as exc:
                log.warning("cannot reach worker %s to cancel %s: %s", node.id, job.id, exc)
                attempt = job.attempt
                await self._force_cancel(job, f"cancelled (worker {node.id} unreachable)")
                if isinstance(exc, WorkerUnreachable):  # it may still run there: keep asking
                    self._spawn(self._stop_stale(node.id, job.id, attempt, job.stop_signal))
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CANCEL_CONFIRM_S):
                    await job.ended.wait()

    async def _signal(self, job: ActiveJob, sig: signal.Signals) -> None:
        """A further cancel's signal, sent at once (the cancel at work resends it too)."""
        node = self.registry.get(job.node_id) if job.node_id else None
        if node is None or job.runner is None or job.ended.is_set():
            return
        try:
            await self.workers.cancel(node.endpoint, job.id, job.attempt, sig)
        except (WorkerUnreachable, AttemptGone, AttemptRejected, DistExecError) as exc:
            # (the cancel at work resends it, and handles a worker out of reach)
            log.info("cannot send %s to job %s on %s yet: %s", sig.name, job.id, node.id, exc)

    async def _force_cancel(self, job: ActiveJob, reason: str) -> None:
        if job.status.terminal:
            await job.ended.wait()
            return
        if job.runner is not None:
            job.runner.cancel()
        await self._complete(job, JobStatus.CANCELLED, error=reason)

    async def stream_output(
        self,
        job_id: JobId,
        offsets: Mapping[Stream, int],
        follow: bool,
        include_result: bool,
        of_attempt: int = 0,
    ) -> AsyncIterator[tuple[int, OutputChunk] | Job]:
        """Stored output from ``offsets`` (of attempt ``of_attempt``, if not 0: another
        attempt's output starts from 0), then (when following) live output until the end, then
        (with ``include_result``, once the job has ended) the job itself, without output."""
        job = self._active.get(job_id)
        if job is not None and job.status.terminal:
            # Finishing: its followers were already told; read it as committed instead.
            await self._committed(job)
            job = None
        follower = self.hub.follow(job_id) if job is not None and follow else None
        try:
            attempt, stored, final, sent = await self._stored_output(
                job_id, job, offsets, of_attempt
            )
            for chunk in stored:
                sent[chunk.stream] = chunk.offset + len(chunk.data)
                yield attempt, chunk
            if follower is not None:
                async for item in _live(follower, attempt, sent):
                    yield item
                final = follower.final
        finally:
            if follower is not None:
                self.hub.unfollow(job_id, follower)
        if include_result and final is not None:
            yield final

    async def _stored_output(
        self, job_id: JobId, job: ActiveJob | None, offsets: Mapping[Stream, int], of_attempt: int
    ) -> tuple[int, list[OutputChunk], Job | None, dict[Stream, int]]:
        """What a follower starts from: (attempt, stored output, the job if it has ended, the
        offsets it starts at)."""
        if job is None:
            final = await self.get(job_id, with_output=False)  # or NOT_FOUND
            start = _start(offsets, of_attempt, final.attempt)
            # (Its end committed, all its output is: read as committed, even while writes wait.
            # An end that could not be written, at a stop, is read behind the queued writes.)
            settled = final.status.terminal
            stored = await self.store.read_output(job_id, start, settled=settled)
            return final.attempt, stored, final, start
        attempt = job.attempt
        start = _start(offsets, of_attempt, attempt)
        if job.kept_all:
            # Taken in the same step of the loop as the subscription: nothing falls between.
            stored = [c for c in (_tail(k, start[k.stream]) for k in job.kept) if c]
        else:
            stored = await self.store.read_output(job_id, start)
            if job.attempt != attempt:  # a retry replaced the output meanwhile: follow that
                return attempt, [], None, start
        # Past the kept head, the end so far is in memory (stored with the job's end): a late
        # follower gets it too, after the gap, not the head alone.
        for stream, tail in job.tails.items():
            data = tail.value()
            end = next((c for c in reversed(stored) if c.stream == stream), None)
            after = max(start[stream], end.offset + len(end.data) if end else 0)
            recent = _tail(OutputChunk(stream, job.seen[stream] - len(data), data), after)
            if recent is not None:
                stored.append(recent)
        return attempt, stored, None, start

    def nodes(self) -> list[NodeInfo]:
        return self.registry.nodes()

    def scaling_demand(self) -> int:
        """Queued jobs that a new worker could take: not pinned to one node, not waiting out a
        retry backoff, and of a kind the known workers run (a new one starts like them: a job
        whose labels or task type none of them has would not run on it either). With no
        worker known yet, every such job."""
        nodes = self.registry.nodes()
        runnable: dict[tuple[str, frozenset[tuple[str, str]], TaskLimits], bool] = {}
        demand = 0
        for job in self._active.values():
            if job.status != JobStatus.PENDING or job.spec.node_id or job.retry_at is not None:
                continue
            kind = (job.spec.task_type, frozenset(job.spec.selector.items()), job.spec.limits)
            if kind not in runnable:
                runnable[kind] = not nodes or any(n.matches(job.spec) for n in nodes)
            demand += runnable[kind]
        return demand

    def request_drain(self, node_id: NodeId) -> bool:
        """Place nothing more on the node; its next heartbeat reply tells it to drain."""
        if not self.registry.request_drain(node_id):
            return False
        log.info("node %s: drain requested (scale-in)", node_id)
        return True

    def drain_requested(self, node_id: NodeId) -> bool:
        node = self.registry.get(node_id)
        return node is not None and node.drain_requested

    # ---- node API ---------------------------------------------------------------------------

    def register(
        self,
        node_id: NodeId,
        address: str,
        capabilities: Sequence[str],
        max_tasks: int,
        labels: Mapping[str, str],
        held: Sequence[HeldAttempt],
        weight: int = 0,
        task_limits: TaskLimits | None = None,
        tls_name: str = "",
        instance: str = "",
    ) -> NodeInfo:
        """Raises AddressInUse when another live node holds ``address`` (see registry)."""
        if problem := node_problem(node_id, address, capabilities, labels, max_tasks, weight):
            raise InvalidTaskSpec(f"cannot register this worker: {problem}")
        previous = self.registry.get(node_id)
        node = self.registry.register(
            node_id, address, capabilities, max_tasks, labels, weight, task_limits, tls_name,
            instance,
        )  # fmt: skip
        if previous is not None and previous.endpoint != node.endpoint:
            self._spawn(self._forget(previous.endpoint))
        held_keys = {(h.task_id, h.attempt) for h in held}
        unfinished = {(h.task_id, h.attempt) for h in held if not h.finished}
        for job in list(self._active.values()):
            if job.node_id != node_id or job.status != JobStatus.RUNNING:
                continue
            if (job.id, job.attempt) in held_keys:
                held_keys.discard((job.id, job.attempt))
                if job.runner is None:  # recovered after a master restart: attach to it
                    job.orphan_deadline = None
                    self.registry.reserve(node_id, force=True)
                    job.runner = self._start_runner(
                        self._run_attempt(job, job.attempt, node_id, True), job.id, node_id
                    )
            elif self._never_reached(job, instance):
                self._spawn(
                    self._retry(
                        job,
                        f"attempt {job.attempt} never reached worker {node_id} (the master "
                        "stopped before the start was sent)",
                        AttemptOutcome.NOT_STARTED,
                        attempt=job.attempt,
                    )
                )
            else:
                self._spawn(
                    self._retry(
                        job,
                        f"worker {node_id} restarted and lost the task",
                        AttemptOutcome.WORKER_LOST,
                        attempt=job.attempt,
                    )
                )
        for task_id, attempt in held_keys:
            # Superseded attempts (the store ignores attempts that are the job's current one:
            # results held for delivery after a master restart). Finished ones expire by
            # themselves; running ones are stopped.
            if (task_id, attempt) in unfinished:
                log.info(
                    "node %s holds stale attempt %d of %s; stopping it", node_id, attempt, task_id
                )
                self._spawn(self._stop_stale(node_id, task_id, attempt))
                note = f"still running on {node_id} after it was superseded; told to stop"
            else:
                note = f"finished on {node_id} after it was superseded; its result was not accepted"
            self.store.note_attempt(JobId(task_id), attempt, note)
        self._wake.set()
        log.info("node %s registered at %s (%d slots)", node_id, address, max_tasks)
        return node

    def _never_reached(self, job: ActiveJob, instance: str) -> bool:
        """Whether a recovered RUNNING job its node does not hold, now that the node registers
        as ``instance``, never got its start: the same worker process (it did not restart),
        and a start recent enough that the worker would still hold its result had it run
        (it keeps a delivered result at least RECENT_RESULTS_S)."""
        if not instance or job.instance != instance or job.runner is not None:
            return False
        started = job.started_at
        return started is not None and (self.clock.now() - started).total_seconds() < (
            NOT_STARTED_WINDOW_S
        )

    def heartbeat(self, node_id: NodeId, draining: bool, unwell: bool = False) -> bool:
        """False: the node is unknown or was declared dead, so it must register again.
        ``unwell``: the worker says it is DEGRADED or UNHEALTHY (no new tasks meanwhile)."""
        node = self.registry.get(node_id)
        if node is None or node.status == NodeStatus.UNHEALTHY:
            return False
        before = node.status
        self.registry.heartbeat(node_id, draining, unwell)
        if node.status == NodeStatus.DEGRADED and before != NodeStatus.DEGRADED:
            log.warning("node %s says it is unwell: no new tasks until it says it is well", node_id)
        elif before == NodeStatus.DEGRADED and node.status != NodeStatus.DEGRADED:
            log.info("node %s says it is well again", node_id)
        if node.status == NodeStatus.HEALTHY and before != NodeStatus.HEALTHY:
            self._wake.set()  # it takes tasks again
        return True

    def deregister(self, node_id: NodeId) -> None:
        """The node leaves: no new tasks. Results still on their way over its streams are taken
        (a draining worker deregisters right after sending them); then its channel closes."""
        node = self.registry.deregister(node_id)
        if node is None:
            return
        for job in list(self._active.values()):
            if job.node_id == node_id and job.status == JobStatus.RUNNING and job.runner is None:
                self._spawn(
                    self._retry(
                        job, f"worker {node_id} left", AttemptOutcome.LOST, attempt=job.attempt
                    )
                )
        self._spawn(self._forget_when_idle(node))
        log.info("node %s deregistered", node_id)

    async def _forget_when_idle(self, node: NodeInfo) -> None:
        runners = [
            j.runner for j in self._active.values() if j.node_id == node.id and j.runner is not None
        ]
        if runners:
            await asyncio.wait(runners, timeout=self.config.rpc_timeout_s)
        await self._forget(node.endpoint)

    async def _forget(self, endpoint: NodeEndpoint) -> None:
        """Close the channel to ``endpoint`` unless its node registered there again meanwhile."""
        node = self.registry.get(endpoint.node_id)
        if node is None or node.endpoint != endpoint:
            await self.workers.forget(endpoint)

    def _node_lost(self, node_id: NodeId, reason: str) -> None:
        for job in list(self._active.values()):
            if job.node_id == node_id and job.status == JobStatus.RUNNING:
                self._spawn(
                    self._retry(job, reason, AttemptOutcome.WORKER_LOST, attempt=job.attempt)
                )

    async def _stop_stale(
        self, node_id: NodeId, task_id: str, attempt: int, sig: signal.Signals | None = None
    ) -> None:
        """Ask a node to stop an attempt that is no longer wanted (superseded, or cancelled
        while the node could not be reached; with the cancel's signal) until it confirms or
        reports it gone. A node that is forgotten meanwhile must register again, and is told
        then."""
        delay = STOP_RETRY_MIN_S
        while (node := self.registry.get(node_id)) is not None:
            try:
                await self.workers.cancel(node.endpoint, task_id, attempt, sig)
                return
            except (AttemptGone, AttemptRejected):
                return
            except WorkerUnreachable as exc:
                log.info("cannot reach %s yet to stop attempt %d of %s: %s", node_id, attempt,
                         task_id, exc)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, STOP_RETRY_MAX_S)


async def _live(
    follower: Follower, attempt: int, sent: dict[Stream, int]
) -> AsyncIterator[tuple[int, OutputChunk]]:
    """A follower's live chunks not sent yet; a newer attempt starts its output over."""
    async for live in follower:
        if live.attempt < attempt:
            continue
        if live.attempt > attempt:
            attempt = live.attempt
            sent.update(dict.fromkeys(Stream, 0))
        fresh = _tail(live.chunk, sent[live.chunk.stream])
        if fresh is not None:
            sent[fresh.stream] = fresh.offset + len(fresh.data)
            yield attempt, fresh


def _start(offsets: Mapping[Stream, int], of_attempt: int, attempt: int) -> dict[Stream, int]:
    """Where a follower starts in ``attempt``'s output: at ``offsets`` if they are of it."""
    same = not of_attempt or of_attempt == attempt
    return {s: offsets.get(s, 0) if same else 0 for s in Stream}


def _tail(chunk: OutputChunk, start: int) -> OutputChunk | None:
    """The part of a chunk from byte ``start`` of its stream on, if any."""
    end = chunk.offset + len(chunk.data)
    if end <= start:
        return None
    if chunk.offset < start:
        return OutputChunk(chunk.stream, start, chunk.data[start - chunk.offset :])
    return chunk
