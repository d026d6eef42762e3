"""Retries: backoff with jitter, retry on failure, poison tasks, queue timeouts, and the attempt
history that records each of them. A scripted worker, a real SQLite store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from dist_exec.config import MasterConfig
from dist_exec.errors import InvalidTaskSpec, ResourceExhausted
from dist_exec.master.active import HeldAttempt
from dist_exec.master.attempts import backoff
from dist_exec.master.core import Master
from dist_exec.master.dispatcher import AttemptGone
from dist_exec.models import (
    AttemptOutcome,
    ExecOutcome,
    ExecStatus,
    Job,
    JobId,
    JobStatus,
    NodeEndpoint,
    NodeId,
    OutputChunk,
    Stream,
    TaskSpec,
)
from tests.unit.test_core import SPEC, HeldStore, ScriptedWorker, start_master

Script = Callable[[int], ExecOutcome]


class OutcomeWorker(ScriptedWorker):
    """Each attempt ends as ``script(attempt)`` says; a script may raise to lose the attempt."""

    def __init__(self, script: Callable[[int], ExecOutcome]) -> None:
        super().__init__()
        self.script = script
        self.started: list[tuple[int, float]] = []  # (attempt, monotonic time)

    async def execute(
        self,
        endpoint: NodeEndpoint,
        task_id: str,
        attempt: int,
        spec: TaskSpec,
        attach: bool,
        offsets: Mapping[Stream, int],
        deadline_s: float,
    ) -> AsyncIterator[OutputChunk | ExecOutcome]:
        self.started.append((attempt, time.monotonic()))
        await self.release.wait()
        yield self.script(attempt)


def config(tmp_path: Path, **overrides: object) -> MasterConfig:
    base = MasterConfig(data_dir=tmp_path, retry_backoff_s=0.01, heartbeat_interval_s=0.1)
    return replace(base, **overrides)  # type: ignore[arg-type]


async def with_master(
    tmp_path: Path,
    worker: ScriptedWorker,
    cfg: MasterConfig,
    body: Callable[[Master, HeldStore], Awaitable[None]],
) -> None:
    master, store = await start_master(tmp_path, worker, cfg)
    runner = asyncio.create_task(master.run())
    try:
        await master.ready.wait()
        await body(master, store)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await store.__aexit__(None, None, None)


async def wait_end(master: Master, job_id: JobId, within: float = 10.0) -> Job:
    async with asyncio.timeout(within):
        while not (job := await master.get(job_id)).status.terminal:
            await asyncio.sleep(0.01)
    return job


def failing(exit_code: int = 1) -> ExecOutcome:
    return ExecOutcome(ExecStatus.FAILURE, exit_code, stderr=b"boom\n", stderr_bytes=5)


def succeeding() -> ExecOutcome:
    return ExecOutcome(ExecStatus.SUCCESS, 0)


def outcomes(job: Job) -> list[AttemptOutcome | None]:
    return [a.outcome for a in job.attempts]


async def test_a_failed_command_is_a_result_not_a_retry_by_default(tmp_path: Path) -> None:
    worker = OutcomeWorker(lambda attempt: failing())

    async def body(master: Master, store: HeldStore) -> None:
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])
        job = await wait_end(master, await master.submit(replace(SPEC, max_retries=3)))
        assert job.status == JobStatus.FAILED
        assert job.exit_code == 1
        assert job.retries == 0
        assert outcomes(job) == [AttemptOutcome.FAILED]
        assert job.attempts[0].node_id == "w1"
        assert job.attempts[0].detail == "exit code 1"

    await with_master(tmp_path, worker, config(tmp_path), body)


async def test_retry_on_failure_runs_a_failed_command_again(tmp_path: Path) -> None:
    worker = OutcomeWorker(lambda attempt: failing() if attempt == 1 else succeeding())

    async def body(master: Master, store: HeldStore) -> None:
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])
        spec = replace(SPEC, max_retries=3, retry_on_failure=True)
        job = await wait_end(master, await master.submit(spec))
        assert job.status == JobStatus.COMPLETED
        assert job.retries == 1
        assert outcomes(job) == [AttemptOutcome.RETRIED, AttemptOutcome.COMPLETED]
        assert job.attempts[0].detail == "FAILURE, exit code 1"
        assert all(a.ended_at is not None for a in job.attempts)

    await with_master(tmp_path, worker, config(tmp_path), body)


async def test_retry_on_failure_stops_at_max_retries_with_the_last_result(tmp_path: Path) -> None:
    worker = OutcomeWorker(lambda attempt: failing(attempt))

    async def body(master: Master, store: HeldStore) -> None:
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])
        spec = replace(SPEC, max_retries=2, retry_on_failure=True)
        job = await wait_end(master, await master.submit(spec))
        assert job.status == JobStatus.FAILED
        assert job.exit_code == 3  # the third attempt's own result
        assert job.retries == 2
        assert outcomes(job) == [
            AttemptOutcome.RETRIED,
            AttemptOutcome.RETRIED,
            AttemptOutcome.FAILED,
        ]

    await with_master(tmp_path, worker, config(tmp_path), body)


async def test_a_task_that_keeps_losing_its_worker_is_failed_as_poison(tmp_path: Path) -> None:
    def lose(attempt: int) -> ExecOutcome:
        raise AttemptGone(f"no attempt {attempt} here")

    async def body(master: Master, store: HeldStore) -> None:
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])
        job = await wait_end(master, await master.submit(replace(SPEC, max_retries=10)))
        assert job.status == JobStatus.FAILED
        assert "lost 3 times in a row" in job.error
        assert outcomes(job) == [AttemptOutcome.WORKER_LOST] * 3
        assert job.retries == 2  # failed instead of the third retry

    await with_master(tmp_path, OutcomeWorker(lose), config(tmp_path, poison_threshold=3), body)


async def test_worker_losses_must_be_in_a_row_to_count_as_poison(tmp_path: Path) -> None:
    def script(attempt: int) -> ExecOutcome:
        if attempt in (1, 2, 4, 5):
            raise AttemptGone("gone")
        if attempt == 3:
            return failing()  # a result in between: with retry_on_failure, retried
        return succeeding()

    async def body(master: Master, store: HeldStore) -> None:
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])
        spec = replace(SPEC, max_retries=10, retry_on_failure=True)
        job = await wait_end(master, await master.submit(spec))
        assert job.status == JobStatus.COMPLETED
        assert outcomes(job) == [
            AttemptOutcome.WORKER_LOST,
            AttemptOutcome.WORKER_LOST,
            AttemptOutcome.RETRIED,
            AttemptOutcome.WORKER_LOST,
            AttemptOutcome.WORKER_LOST,
            AttemptOutcome.COMPLETED,
        ]

    await with_master(tmp_path, OutcomeWorker(script), config(tmp_path, poison_threshold=3), body)


async def test_a_retry_waits_out_its_backoff_and_says_so(tmp_path: Path) -> None:
    worker = OutcomeWorker(lambda attempt: failing() if attempt == 1 else succeeding())

    async def body(master: Master, store: HeldStore) -> None:
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])
        spec = replace(SPEC, max_retries=1, retry_on_failure=True)
        job_id = await master.submit(spec)
        async with asyncio.timeout(10):
            while "retrying in" not in (job := await master.get(job_id)).pending_reason:
                await asyncio.sleep(0.01)
        assert job.status == JobStatus.PENDING
        assert "exit code 1" in job.pending_reason
        job = await wait_end(master, job_id)
        assert job.status == JobStatus.COMPLETED
        (_, first), (_, second) = worker.started
        assert second - first >= 0.5  # at least half the first step (1s) is fixed

    await with_master(tmp_path, worker, config(tmp_path, retry_backoff_s=1.0), body)


async def test_cancel_during_a_backoff_ends_the_job_without_running_it_again(
    tmp_path: Path,
) -> None:
    worker = OutcomeWorker(lambda attempt: failing())

    async def body(master: Master, store: HeldStore) -> None:
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])
        spec = replace(SPEC, max_retries=1, retry_on_failure=True)
        job_id = await master.submit(spec)
        async with asyncio.timeout(10):
            while "retrying in" not in (await master.get(job_id)).pending_reason:
                await asyncio.sleep(0.01)
        timer = master._active[job_id].retry_handle
        assert timer is not None
        # Two calls at once: the second waits for the first's work, and both see it done.
        answers = await asyncio.gather(master.cancel(job_id, 1.0), master.cancel(job_id, 1.0))
        assert list(answers) == ["cancelled before it started", "cancelled"]
        assert job_id not in master._active
        job = await wait_end(master, job_id)
        assert job.status == JobStatus.CANCELLED
        assert [a.outcome for a in job.attempts] == [AttemptOutcome.RETRIED]
        assert master.scheduler.ordered() == []
        assert timer.cancelled()  # its backoff timer does not fire later
        assert len(worker.started) == 1

    await with_master(tmp_path, worker, config(tmp_path, retry_backoff_s=30.0), body)


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    for retry, step in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (40, 8.0)):
        delays = [backoff(retry, 1.0, 8.0) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays), (retry, min(delays), max(delays))
        assert max(delays) - min(delays) > step / 10  # jittered, not one fixed value


async def test_a_job_that_cannot_start_in_time_fails_with_its_queue_timeout(
    tmp_path: Path,
) -> None:
    async def body(master: Master, store: HeldStore) -> None:
        # No worker at all: it can only wait.
        job_id = await master.submit(replace(SPEC, queue_timeout_s=0.2))
        other = await master.submit(SPEC)  # no queue timeout: waits on
        job = await wait_end(master, job_id)
        assert job.status == JobStatus.FAILED
        assert job.error == "did not start within its queue timeout of 200ms"
        assert job.attempts == ()
        assert (await master.get(other)).status == JobStatus.PENDING

    await with_master(tmp_path, ScriptedWorker(), config(tmp_path), body)


async def test_a_negative_queue_timeout_is_refused(tmp_path: Path) -> None:
    async def body(master: Master, store: HeldStore) -> None:
        with pytest.raises(InvalidTaskSpec, match="queue timeout must be between 0"):
            await master.submit(replace(SPEC, queue_timeout_s=-1.0))

    await with_master(tmp_path, ScriptedWorker(), config(tmp_path), body)


async def test_a_stale_attempt_reported_later_is_noted_in_the_history(tmp_path: Path) -> None:
    worker = OutcomeWorker(lambda attempt: succeeding())
    worker.release.clear()

    async def body(master: Master, store: HeldStore) -> None:
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])
        job_id = await master.submit(SPEC)
        async with asyncio.timeout(10):
            while not worker.started:
                await asyncio.sleep(0.01)
        # w1 comes back without the attempt: it is retried (attempt 2, w2 takes it) ...
        master.register(NodeId("w2"), "127.0.0.1:2", ["command"], 1, {}, [])
        master.register(NodeId("w1"), "127.0.0.1:3", ["command"], 1, {}, [])
        worker.release.set()
        job = await wait_end(master, job_id)
        assert job.status == JobStatus.COMPLETED
        assert job.attempt == 2
        # ... then reports that it did finish attempt 1 after all: noted, not accepted; twice
        # is noted once.
        for _ in range(2):
            master.register(
                NodeId("w1"), "127.0.0.1:3", ["command"], 1, {}, [HeldAttempt(job_id, 1, True)]
            )
        async with asyncio.timeout(10):
            while "superseded" not in (job := await master.get(job_id)).attempts[0].detail:
                await asyncio.sleep(0.01)
        assert job.status == JobStatus.COMPLETED
        assert job.attempts[0].outcome == AttemptOutcome.WORKER_LOST
        assert job.attempts[0].detail.count("its result was not accepted") == 1
        assert job.attempts[1].outcome == AttemptOutcome.COMPLETED
        # The accepted attempt itself, reported again (after a master restart), is no news.
        master.register(
            NodeId("w2"), "127.0.0.1:2", ["command"], 1, {}, [HeldAttempt(job_id, 2, True)]
        )
        await store.read_output(job_id, {})  # every earlier write is done
        assert (await master.get(job_id)).attempts[1].detail == "exit code 0"

    await with_master(tmp_path, worker, config(tmp_path), body)


async def test_a_restart_does_not_start_a_queued_jobs_queue_timeout_again(tmp_path: Path) -> None:
    """The time a job waited before a restart of the master counts: a recovered job's queue
    timeout started again, so restarts could keep a job queued past it for ever."""
    submitted: list[JobId] = []

    async def first(master: Master, store: HeldStore) -> None:
        submitted.append(await master.submit(replace(SPEC, queue_timeout_s=60.0)))

    await with_master(tmp_path, ScriptedWorker(), config(tmp_path), first)
    # It has waited two minutes when the master starts again (it was down meanwhile).
    with contextlib.closing(sqlite3.connect(tmp_path / "master.db")) as db:
        db.execute("UPDATE jobs SET created_at = created_at - 120")
        db.commit()

    async def second(master: Master, store: HeldStore) -> None:
        job = await wait_end(master, submitted[0])
        assert (job.status, job.error) == (
            JobStatus.FAILED,
            "did not start within its queue timeout of 60s",
        )

    await with_master(tmp_path, ScriptedWorker(), config(tmp_path), second)


async def test_what_active_jobs_hold_in_memory_is_bounded_and_shared_out(
    tmp_path: Path,
) -> None:
    """Jobs waiting keep their payloads in the master's memory: one identity submitting 2,000
    of 1 MB each, within its rate limit, took the master to 2 GB (a security review)."""
    big = json.dumps({"command": "true", "env": {"PAD": "x" * 900}}).encode()  # ~1 KB
    size = len(big)

    def job(owner: str) -> TaskSpec:  # (a payload of its own, as one from the wire is)
        return replace(SPEC, payload=bytes(bytearray(big)), owner=owner)

    async def body(master: Master, store: HeldStore) -> None:
        # No worker: every job waits. Half of the 4 jobs' worth for one identity...
        alices = [await master.submit(job("alice")) for _ in range(2)]
        with pytest.raises(ResourceExhausted, match="alice's jobs waiting or running hold"):
            await master.submit(job("alice"))
        # ...the rest for the others, then nobody.
        await master.submit(job("bob"))
        await master.submit(job("carol"))
        with pytest.raises(ResourceExhausted, match="pass the master's"):
            await master.submit(job("dave"))
        assert await master.cancel(alices[0], 1.0) == "cancelled before it started"
        await master.submit(job("alice"))  # (room again once a job has ended)

    await with_master(
        tmp_path, ScriptedWorker(), config(tmp_path, max_payload_memory=4 * size + size // 2), body
    )


async def test_a_broadcasts_payload_counts_once(tmp_path: Path) -> None:
    """Every node's job holds the one payload a broadcast was given: counted once per node,
    large stdin sent to many nodes was refused although the master held one copy."""
    big = json.dumps({"command": "true", "env": {"PAD": "x" * 900}}).encode()
    worker = OutcomeWorker(lambda attempt: succeeding())
    worker.release.clear()  # (they run until the end of the test)

    async def body(master: Master, store: HeldStore) -> None:
        for i in range(6):
            master.register(NodeId(f"w{i}"), f"127.0.0.1:{i + 1}", ["command"], 1, {}, [])
        _, jobs = await master.submit_broadcast(replace(SPEC, payload=big, owner="alice"))
        assert len(jobs) == 6
        assert master._payloads.total == len(big)

    await with_master(tmp_path, worker, config(tmp_path, max_payload_memory=3 * len(big)), body)
