"""Accepting jobs: a submission's validation, the client's rate limit, the bound on queued
jobs, idempotency keys, broadcasts, and the commit that makes accepted jobs durable.

``Submission`` is a part of ``Master`` (core.py), split out by concern, as ``Attempts`` is: it
uses the master's attributes declared below, set by ``Master.__init__``, and its placement
(``_place``).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta

from dist_exec.clock import Clock
from dist_exec.config import MAX_METADATA_BYTES, MIN_TIMEOUT_S, MasterConfig, format_duration
from dist_exec.errors import (
    AlreadyExists,
    InvalidTaskSpec,
    NoMatchingNode,
    PolicyDenied,
    ResourceExhausted,
    shorten,
)
from dist_exec.executors import Executor
from dist_exec.executors.limits import check as check_limits
from dist_exec.master.active import OWNER_SEP, ActiveJob, PayloadBudget, owned_key
from dist_exec.master.admission import RateLimiter
from dist_exec.master.output import OutputHub
from dist_exec.master.registry import NodeRegistry
from dist_exec.master.scheduler import Scheduler
from dist_exec.master.store import JobStore, request_hash
from dist_exec.models import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    Job,
    JobId,
    JobStatus,
    NodeId,
    TaskSpec,
)

MAX_RETRIES_LIMIT = 100
MAX_BATCH_JOBS = 1000  # per SubmitBatch, and per WatchJobs
MAX_KEY_CHARS = 256


class Submission:
    """The submission part of ``Master``; its attributes are the master's."""

    config: MasterConfig
    store: JobStore
    registry: NodeRegistry
    scheduler: Scheduler
    executors: Mapping[str, Executor]
    clock: Clock
    hub: OutputHub
    rate_limiter: RateLimiter | None
    _active: dict[JobId, ActiveJob]
    _payloads: PayloadBudget
    _seq: itertools.count[int]
    _keys: dict[str, tuple[JobId, str]]  # idempotency keys of active jobs
    _key_lock: asyncio.Lock  # held by a keyed batch from its key lookups to taking its keys
    _place: Callable[[], list[ActiveJob]]  # queued jobs that fit now, placed (Master's)
    _forget_key: Callable[[ActiveJob], None]  # (Attempts')

    def validate(self, spec: TaskSpec) -> TaskSpec:
        """Check a submission; returns it with defaults filled in."""
        executor = self.executors.get(spec.task_type)
        if executor is None:
            known = ", ".join(sorted(self.executors)) or "none"
            raise InvalidTaskSpec(
                f"unknown task type {shorten(spec.task_type)}; known types: {known}"
            )
        if len(spec.payload) > self.config.max_payload_bytes:
            raise InvalidTaskSpec(
                f"payload is {len(spec.payload)} bytes; the limit is "
                f"{self.config.max_payload_bytes}"
            )
        executor.validate(spec.payload)
        timeout_s = spec.timeout_s or self.config.default_timeout_s
        if not MIN_TIMEOUT_S <= timeout_s <= self.config.max_timeout_s:
            raise InvalidTaskSpec(
                f"timeout must be between 1ms and {format_duration(self.config.max_timeout_s)}"
            )
        if not MIN_PRIORITY <= spec.priority <= MAX_PRIORITY:
            raise InvalidTaskSpec(
                f"priority must be {MIN_PRIORITY}-{MAX_PRIORITY}, got {spec.priority}"
            )
        max_retries = (
            self.config.default_max_retries if spec.max_retries is None else spec.max_retries
        )
        if not 0 <= max_retries <= MAX_RETRIES_LIMIT:
            raise InvalidTaskSpec(f"max_retries must be 0-{MAX_RETRIES_LIMIT}, got {max_retries}")
        if sum(len(k) + len(v) for k, v in spec.metadata.items()) > MAX_METADATA_BYTES:
            raise InvalidTaskSpec(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
        if any(not k for k in spec.metadata):
            raise InvalidTaskSpec("metadata keys must not be empty")
        if any(not k or not v for k, v in spec.selector.items()):
            raise InvalidTaskSpec("selector labels need a key and a value: --selector zone=a")
        if sum(len(k) + len(v) for k, v in spec.selector.items()) > MAX_METADATA_BYTES:
            raise InvalidTaskSpec(f"selector is larger than {MAX_METADATA_BYTES} bytes")
        if not 0 <= spec.queue_timeout_s <= self.config.max_timeout_s:
            raise InvalidTaskSpec(
                "queue timeout must be between 0 (none) and "
                f"{format_duration(self.config.max_timeout_s)}"
            )
        if spec.limits.any and spec.task_type != "command":
            raise InvalidTaskSpec("resource limits apply to command jobs only")
        check_limits(spec.limits)
        return replace(spec, timeout_s=timeout_s, max_retries=max_retries)

    async def submit(self, spec: TaskSpec) -> JobId:
        return (await self.submit_many([spec]))[0]

    async def submit_many(self, specs: Sequence[TaskSpec], client: str = "") -> list[JobId]:
        """Accept jobs, all or none; their ids come back once they are durable.

        Admission, in order: shape of the batch, each job's validation (executor and command
        policy), idempotency keys (a known key with the same request gives its existing job),
        the bound on queued jobs, the client's rate limit."""
        checked = self._validate_batch(specs)
        if any(spec.idempotency_key for spec in checked):
            # One keyed batch at a time from its lookups until it has taken its keys: no other
            # can create a job for a key between this one's lookup and its taking the key.
            async with self._key_lock:
                ids, jobs = self._claim(checked, client, await self._known_keys(checked))
        else:
            ids, jobs = self._claim(checked, client, {})
        if not jobs:
            return [j for j in ids if j is not None]
        now_mono = self.clock.monotonic()
        actives = [ActiveJob(job, next(self._seq)) for job in jobs]
        for active in actives:
            active.queued_mono = now_mono
            self._active[active.id] = active
            self._payloads.add(active.spec)
            self.scheduler.enqueue(active.id, active.seq, active.spec, now_mono)
        # Place what fits now, and write those jobs already RUNNING: one commit accepts a job
        # and records where it runs. Dispatch waits for that commit (_start_attempt); the ids
        # go back only once the jobs are on disk.
        mine = {a.id for a in actives}
        for active in self._place():
            if active.id in mine:  # (older queued jobs may be placed too; theirs is not recorded)
                active.recorded_attempt = active.attempt
        accepted = self.store.insert_many(
            [
                replace(
                    a.record,
                    status=a.status,
                    started_at=a.started_at,
                    worker_id=a.node_id or "",
                    attempt=a.attempt,
                )
                for a in actives
            ],
            {a.id: a.instance for a in actives if a.instance},
        )
        for active in actives:
            active.accepted = accepted
        try:
            # Let the runners of the jobs placed now wait for the commit first, and once it is
            # done yield again: their starts are handed to the Dispatch streams' writers, which
            # then write before this reply goes out (a command takes longer than the reply).
            await asyncio.sleep(0)
            await asyncio.shield(accepted)
            await asyncio.sleep(0)
        except Exception:
            for job in jobs:
                self._withdraw(job.id)
            raise
        return [j for j in ids if j is not None]

    def _claim(
        self, checked: Sequence[TaskSpec], client: str, known: Mapping[str, tuple[JobId, str]]
    ) -> tuple[list[JobId | None], list[Job]]:
        """The batch's ids, and the new jobs to accept: a key of an active job or of a job
        ``known`` from the store gives that job (if the request is the same); no await."""
        ids: list[JobId | None] = [None] * len(checked)
        fresh = []
        for i, spec in enumerate(checked):
            key = owned_key(spec)
            hit = self._keys.get(key) or known.get(key) if key else None
            if hit is not None:
                ids[i] = _same_request(spec, hit)
            else:
                fresh.append((i, spec))
        if not fresh:
            return ids, []
        self._admit([spec for _, spec in fresh], client)
        return ids, self._take_keys(fresh, ids)

    def _admit(self, specs: Sequence[TaskSpec], client: str) -> None:
        """The bound on what active jobs hold in memory, the bound on queued jobs and the
        client's rate limit (last: a request refused otherwise uses none of it). A broadcast
        (one request, a job per node) costs at most the burst: it cannot be made smaller."""
        count = len(specs)
        refusal = self._payloads.refusal(specs[0].owner, self._payloads.cost(specs))
        if refusal is not None:
            raise ResourceExhausted(f"{refusal}; try again once some have ended")
        if len(self.scheduler) + count > self.config.max_queued:
            raise ResourceExhausted(
                f"the queue is full ({len(self.scheduler)} jobs waiting, limit "
                f"{self.config.max_queued}); try again later"
            )
        if self.rate_limiter is not None:
            cost = min(count, int(self.rate_limiter.burst)) if specs[0].broadcast_id else count
            self.rate_limiter.admit(client or "anonymous", cost)

    def _take_keys(
        self, fresh: Sequence[tuple[int, TaskSpec]], ids: list[JobId | None]
    ) -> list[Job]:
        """New jobs for ``fresh`` (filling ``ids``); each takes its idempotency key. The keys
        are taken once the whole batch is known good: a batch refused (the same key for two
        different requests) leaves none taken by a job that does not exist."""
        now = self.clock.now()
        jobs = []
        taken: dict[str, tuple[JobId, str]] = {}
        for i, spec in fresh:
            key = owned_key(spec)
            if key and key in taken:  # the same key twice in one batch
                ids[i] = _same_request(spec, taken[key])
                continue
            job = Job(JobId(str(uuid.uuid4())), spec, JobStatus.PENDING, now)
            if key:
                taken[key] = (job.id, request_hash(spec))
            ids[i] = job.id
            jobs.append(job)
        self._keys.update(taken)
        return jobs

    async def _known_keys(self, specs: Sequence[TaskSpec]) -> dict[str, tuple[JobId, str]]:
        """Jobs already created for the batch's idempotency keys, from the store (keys of
        active jobs are answered by ``_keys``)."""
        since = self.clock.now() - timedelta(seconds=self.config.idempotency_retention_s)
        keyed = [spec for spec in specs if spec.idempotency_key]
        if too_long := next(
            (s.idempotency_key for s in keyed if len(s.idempotency_key) > MAX_KEY_CHARS), None
        ):
            raise InvalidTaskSpec(
                f"idempotency key longer than {MAX_KEY_CHARS} chars: {shorten(too_long)}"
            )
        owners = {spec.owner for spec in keyed}
        assert len(owners) <= 1  # (a batch is one caller's)
        owner = next(iter(owners), "")
        keys = {owned_key(spec) for spec in keyed}
        known: dict[str, tuple[JobId, str]] = {}
        looked: set[str] = set()
        # Until every key is either active or was looked up: a key active before may have
        # ended during any of the lookups (its job is in the store by then). Ends, since
        # ``looked`` only grows; no other batch takes a key meanwhile (the caller's lock).
        while todo := {key for key in keys if key not in self._keys and key not in looked}:
            raw = [key.partition(OWNER_SEP)[2] for key in todo]
            found = await self.store.find_by_keys(raw, since, owner)
            known.update({f"{owner}{OWNER_SEP}{key}": hit for key, hit in found.items()})
            looked |= todo
        return known

    async def submit_broadcast(
        self, spec: TaskSpec, client: str = ""
    ) -> tuple[str, list[tuple[JobId, NodeId]]]:
        """Run ``spec`` once on every healthy node that matches it: one job per node, pinned
        to it, all sharing a broadcast id. Returns that id and the (job, node) pairs."""
        if spec.node_id or spec.broadcast_id:
            raise InvalidTaskSpec("a broadcast job cannot be pinned to a node")
        if spec.idempotency_key:
            # (Its jobs, one per node, cannot share the key, and a retry could find other
            # nodes: the broadcast's id is what to look at before sending it again.)
            raise InvalidTaskSpec(
                "a broadcast takes no idempotency key; after a failed send, look for its jobs "
                "(dist-exec list) before sending it again"
            )
        self.validate(spec)  # (a bad job is INVALID_ARGUMENT, whichever nodes there are)
        nodes = self.registry.matching(spec)
        if not nodes:
            labels = ",".join(f"{k}={v}" for k, v in sorted(spec.selector.items()))
            raise NoMatchingNode(
                f"no healthy worker runs task type {shorten(spec.task_type)}"
                + (f" with labels {labels}" if labels else "")
                + ": nothing to broadcast to"
            )
        broadcast_id = str(uuid.uuid4())
        specs = [replace(spec, node_id=n.id, broadcast_id=broadcast_id) for n in nodes]
        job_ids = await self.submit_many(specs, client)
        return broadcast_id, list(zip(job_ids, [n.id for n in nodes], strict=True))

    def _validate_batch(self, specs: Sequence[TaskSpec]) -> list[TaskSpec]:
        if not 0 < len(specs) <= MAX_BATCH_JOBS:
            raise InvalidTaskSpec(f"a batch holds 1-{MAX_BATCH_JOBS} jobs, got {len(specs)}")
        checked = []
        for i, spec in enumerate(specs):
            try:
                checked.append(self.validate(spec))
            except (InvalidTaskSpec, PolicyDenied) as exc:
                if len(specs) == 1:
                    raise
                raise type(exc)(f"job {i} of the batch: {exc.message}") from None
        return checked

    def _withdraw(self, job_id: JobId) -> None:
        """Forget a job whose acceptance could not be recorded."""
        self.scheduler.remove(job_id)
        job = self._active.pop(job_id, None)
        if job is not None:
            self._payloads.remove(job.spec)
            self._forget_key(job)
        self.hub.close(job_id, None)


def _same_request(spec: TaskSpec, known: tuple[JobId, str]) -> JobId:
    """The job already created for the spec's key, if the request is the same one."""
    job_id, digest = known
    if digest != request_hash(spec):
        raise AlreadyExists(
            f"idempotency key {shorten(spec.idempotency_key)} was already used for a different "
            f"request (job {job_id}); use a new key for a new job"
        )
    return job_id
