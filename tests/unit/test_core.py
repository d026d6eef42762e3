"""Master core with a scripted worker and a real SQLite store whose commits a test can hold."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from dist_exec.clock import SystemClock
from dist_exec.config import MasterConfig
from dist_exec.errors import AlreadyExists
from dist_exec.executors.command import CommandExecutor
from dist_exec.master import registry as registry_module
from dist_exec.master.active import HeldAttempt
from dist_exec.master.balancer import RoundRobinBalancer
from dist_exec.master.core import NOT_STARTED_WINDOW_S, RESTART_GRACE_EXTRA_S, Master
from dist_exec.master.dispatcher import AttemptRejected, WorkerUnreachable
from dist_exec.master.registry import REFUSED_PAUSE_S, NodeRegistry
from dist_exec.master.scheduler import Scheduler
from dist_exec.master.store import SqliteJobStore
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

SPEC = TaskSpec("command", b'{"command": "echo", "args": ["hi"]}', 30.0)


class ScriptedWorker:
    """A WorkerClient whose every attempt prints 'hi' and succeeds; records deliveries and
    each call's deadline."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, int]] = []
        self.deadlines: list[float] = []
        self.release = asyncio.Event()
        self.release.set()

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
        self.deadlines.append(deadline_s)
        await self.starting(endpoint, attempt, deadline_s)
        await self.release.wait()
        for event in self.events(attempt):
            yield event
        self.delivered.append((task_id, attempt))

    async def starting(self, endpoint: NodeEndpoint, attempt: int, deadline_s: float) -> None:
        """Before the attempt runs: raise to end its call as a real worker client would."""

    def events(self, attempt: int) -> list[OutputChunk | ExecOutcome]:
        return [
            OutputChunk(Stream.STDOUT, 0, b"hi\n"),
            ExecOutcome(ExecStatus.SUCCESS, 0, stdout=b"hi\n", stdout_bytes=3),
        ]

    async def cancel(
        self,
        endpoint: NodeEndpoint,
        task_id: str,
        attempt: int = 0,
        sig: signal.Signals | None = None,
    ) -> bool:
        return False

    async def forget(self, endpoint: NodeEndpoint) -> None:
        return None

    async def close(self) -> None:
        return None


class HeldStore(SqliteJobStore):
    """Commits of final states wait until the test lets them through."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.finish_gate = asyncio.Event()
        self.finish_gate.set()
        self.finishing = asyncio.Event()

    async def finish(
        self,
        job: Job,
        expect_attempt: int | None,
        attempt_outcome: AttemptOutcome | None = None,
    ) -> bool:
        self.finishing.set()
        await self.finish_gate.wait()
        return await super().finish(job, expect_attempt, attempt_outcome)


async def ended(master: Master, job_id: JobId, timeout_s: float) -> Job:
    """The job once it has ended (polled: a core test has no follower to wait on)."""
    async with asyncio.timeout(timeout_s):
        while not (job := await master.get(job_id)).status.terminal:
            await asyncio.sleep(0.01)
    return job


async def start_master(
    tmp_path: Path,
    worker: ScriptedWorker,
    config: MasterConfig | None = None,
    store: HeldStore | None = None,
) -> tuple[Master, HeldStore]:
    store = store or HeldStore(tmp_path / "master.db")
    await store.__aenter__()
    clock = SystemClock()
    master = Master(
        config or MasterConfig(data_dir=tmp_path, retry_backoff_s=0.01),
        store,
        NodeRegistry(clock, 15.0, 30.0),
        Scheduler(RoundRobinBalancer()),
        worker,
        {"command": CommandExecutor()},
        clock,
    )
    return master, store


@contextlib.asynccontextmanager
async def running_master(
    tmp_path: Path,
    worker: ScriptedWorker,
    config: MasterConfig | None = None,
    store: HeldStore | None = None,
) -> AsyncIterator[tuple[Master, HeldStore]]:
    """A master (see start_master) running and ready; stopped and its store closed after."""
    master, opened = await start_master(tmp_path, worker, config, store)
    runner = asyncio.create_task(master.run())
    try:
        await master.ready.wait()
        yield master, opened
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await opened.__aexit__(None, None, None)


async def test_a_follower_arriving_while_the_result_commits_still_gets_the_end(
    tmp_path: Path,
) -> None:
    worker = ScriptedWorker()
    async with running_master(tmp_path, worker) as (master, store):
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 2, {}, [])
        store.finish_gate.clear()
        job_id = await master.submit(SPEC)
        async with asyncio.timeout(5):
            await store.finishing.wait()  # the result is in, its commit is held
            assert worker.delivered == []  # the worker keeps it until the commit
            items = []

            async def follow() -> None:
                async for item in master.stream_output(
                    job_id, {}, follow=True, include_result=True
                ):
                    items.append(item)

            follower = asyncio.create_task(follow())
            await asyncio.sleep(0)  # let it subscribe while the commit is held
            store.finish_gate.set()
            await follower
        final = items[-1]
        assert isinstance(final, Job)
        assert final.status == JobStatus.COMPLETED
        assert [i for i in items if not isinstance(i, Job)] == [
            (1, OutputChunk(Stream.STDOUT, 0, b"hi\n"))
        ]
        async with asyncio.timeout(5):
            while worker.delivered != [(job_id, 1)]:
                await asyncio.sleep(0.01)
        job = await master.get(job_id)
        assert job.status == JobStatus.COMPLETED
        assert job.stdout == b"hi\n"


async def test_a_restarted_worker_that_lost_an_attempt_gets_it_retried(tmp_path: Path) -> None:
    worker = ScriptedWorker()
    worker.release.clear()  # attempts hang until released
    async with running_master(tmp_path, worker) as (master, _):
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])
        job_id = await master.submit(SPEC)
        async with asyncio.timeout(5):
            while (await master.get(job_id)).status != JobStatus.RUNNING:
                await asyncio.sleep(0.01)
            # The node comes back (same id) holding nothing: attempt 1 is lost.
            master.register(NodeId("w1"), "127.0.0.1:2", ["command"], 1, {}, [])
            worker.release.set()
            while (job := await master.get(job_id)).status != JobStatus.COMPLETED:
                await asyncio.sleep(0.01)
        assert job.retries == 1
        assert job.attempt == 2
        # A node that reports an attempt the master does not know gets no job for it.
        master.register(NodeId("w2"), "127.0.0.1:3", ["command"], 1, {}, [HeldAttempt("x", 1)])


class BrokenOnceWorker(ScriptedWorker):
    """The first attempt fails in a way no one planned for (a bug, a malformed message)."""

    async def starting(self, endpoint: NodeEndpoint, attempt: int, deadline_s: float) -> None:
        if attempt == 1:
            raise ValueError("7 is not a valid Stream")


async def test_an_unexpected_error_in_an_attempt_retries_instead_of_stopping_the_master(
    tmp_path: Path,
) -> None:
    master, store = await start_master(tmp_path, BrokenOnceWorker())
    runner = asyncio.create_task(master.run())
    try:
        await master.ready.wait()
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])
        job_id = await master.submit(SPEC)
        async with asyncio.timeout(5):
            while (job := await master.get(job_id)).status != JobStatus.COMPLETED:
                assert not runner.done(), "the master stopped"
                await asyncio.sleep(0.01)
        assert job.retries == 1
        assert master.registry.get(NodeId("w1")).active_tasks == 0  # type: ignore[union-attr]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await store.__aexit__(None, None, None)


class RetriedWorker(ScriptedWorker):
    """Attempt 1 prints 'first\n' and hands the task back; attempt 2 prints 'two\n'."""

    def events(self, attempt: int) -> list[OutputChunk | ExecOutcome]:
        if attempt == 1:
            return [
                OutputChunk(Stream.STDOUT, 0, b"first\n"),
                ExecOutcome(ExecStatus.FAILURE, error="worker shut down", retryable=True),
            ]
        return [
            OutputChunk(Stream.STDOUT, 0, b"two\n"),
            ExecOutcome(ExecStatus.SUCCESS, 0, stdout=b"two\n", stdout_bytes=4),
        ]


class FullWorker(ScriptedWorker):
    """Refuses its first starts as full (it still runs an attempt the master no longer
    counts, e.g. one superseded while it was cut off and not yet killed)."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals = refusals
        self.starts: list[tuple[str, float]] = []

    async def starting(self, endpoint: NodeEndpoint, attempt: int, deadline_s: float) -> None:
        self.starts.append((endpoint.node_id, asyncio.get_running_loop().time()))
        if len(self.starts) <= self.refusals:
            raise AttemptRejected("worker is full (1 tasks running)", fatal=False)


async def test_a_node_that_refuses_a_start_is_not_sent_it_again_in_a_loop(
    tmp_path: Path,
) -> None:
    """A job refused as 'full' was placed on the same node again at once: thousands of
    attempts a second, each one written."""
    worker = FullWorker(refusals=2)
    async with running_master(tmp_path, worker) as (master, _):
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])
        job_id = await master.submit(SPEC)
        job = await ended(master, job_id, 10)
    assert (job.status, job.attempt, job.retries) == (JobStatus.COMPLETED, 3, 0)
    times = [at for _, at in worker.starts]
    assert [b - a >= REFUSED_PAUSE_S * 0.9 for a, b in itertools.pairwise(times)] == [True] * 2


async def test_a_refused_job_goes_to_another_node_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not after the refusing node's pause (made far longer than the test's deadline)."""
    monkeypatch.setattr(registry_module, "REFUSED_PAUSE_S", 300.0)
    worker = FullWorker(refusals=1)
    async with running_master(tmp_path, worker) as (master, _):
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])
        master.register(NodeId("w2"), "127.0.0.1:2", ["command"], 1, {}, [])
        job_id = await master.submit(SPEC)
        job = await ended(master, job_id, 20)
    assert job.status == JobStatus.COMPLETED
    (first, _), (second, _) = worker.starts
    assert first != second


class SilentForeignWorker(ScriptedWorker):
    """A worker of the contract's first version that reports nothing: each call ends at its
    deadline."""

    async def starting(self, endpoint: NodeEndpoint, attempt: int, deadline_s: float) -> None:
        await asyncio.sleep(max(deadline_s, 0.001))
        raise WorkerUnreachable("worker w1: DEADLINE_EXCEEDED: Deadline Exceeded")


async def test_a_foreign_worker_past_the_deadline_times_the_job_out_not_retries_it(
    tmp_path: Path,
) -> None:
    """A broken call to a worker that cannot be re-attached to runs the job again, but one
    that ended at the master's deadline is the job's timeout."""
    worker = SilentForeignWorker()
    config = MasterConfig(data_dir=tmp_path, retry_backoff_s=0.01, dispatch_grace_s=0.3)
    async with running_master(tmp_path, worker, config) as (master, _):
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])  # (no instance)
        job_id = await master.submit(replace(SPEC, timeout_s=0.3, max_retries=3))
        job = await ended(master, job_id, 20)
    assert (job.status, job.attempt, len(worker.deadlines)) == (JobStatus.TIMEOUT, 1, 1)


async def test_a_resumed_stream_of_an_attempt_retried_since_starts_the_new_one_over(
    tmp_path: Path,
) -> None:
    """Offsets of attempt 1 mean nothing in attempt 2's output: a follower that lost its stream
    during attempt 1 must get attempt 2 whole, not from byte 6 of it."""
    async with running_master(tmp_path, RetriedWorker()) as (master, _):
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 2, {}, [])
        job_id = await master.submit(SPEC)
        job = await ended(master, job_id, 5)
        assert (job.status, job.attempt) == (JobStatus.COMPLETED, 2)

        async def resumed(offset: int, of_attempt: int) -> list[object]:
            offsets = {Stream.STDOUT: offset}
            return [
                item
                async for item in master.stream_output(job_id, offsets, False, False, of_attempt)
            ]

        assert await resumed(6, 1) == [(2, OutputChunk(Stream.STDOUT, 0, b"two\n"))]
        assert await resumed(2, 2) == [(2, OutputChunk(Stream.STDOUT, 2, b"o\n"))]
        assert await resumed(2, 0) == [(2, OutputChunk(Stream.STDOUT, 2, b"o\n"))]  # (as before)


async def test_the_scalers_demand_counts_only_jobs_a_new_worker_could_run(
    tmp_path: Path,
) -> None:
    """A job whose labels (or task type) no worker has would not run on a new worker of the
    same kind either: counting it scaled the group up to its maximum, and never down again."""
    worker = ScriptedWorker()
    worker.release.clear()  # attempts hang: the node stays busy
    async with running_master(tmp_path, worker) as (master, _):
        assert master.scaling_demand() == 0
        unplaceable = [
            replace(SPEC, selector={"gpu": "true"}),
            replace(SPEC, selector={"zone": "b"}),
        ]
        for spec in unplaceable:
            await master.submit(spec)
        assert master.scaling_demand() == 2  # no worker known yet: they may be for the first
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {"zone": "a"}, [])
        assert master.scaling_demand() == 0
        await master.submit(SPEC)  # runs on w1, which is then full
        await master.submit(SPEC)  # waits for a slot: a new worker could take it
        assert master.scaling_demand() == 1


class SlowKeyStore(HeldStore):
    """The answer to the first store lookup of the key "slow" is held until the test lets
    it go."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.lookup_gate = asyncio.Event()
        self.looking_up = asyncio.Event()

    async def find_by_keys(
        self, keys: Collection[str], since: datetime, owner: str
    ) -> dict[str, tuple[JobId, str]]:
        found = await super().find_by_keys(keys, since, owner)
        if "slow" in keys and not self.looking_up.is_set():
            self.looking_up.set()
            await self.lookup_gate.wait()
        return found


async def test_a_key_whose_job_ends_during_a_batchs_lookups_still_gives_that_job(
    tmp_path: Path,
) -> None:
    """A batch skips the store for keys of active jobs. One such job ending while the batch
    looked up another key was neither active nor known at the batch's check: a second job
    was created for its key, and the command ran twice."""
    worker = ScriptedWorker()
    worker.release.clear()
    store = SlowKeyStore(tmp_path / "master.db")
    async with running_master(tmp_path, worker, store=store) as (master, _):
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 2, {}, [])
        first = await master.submit(replace(SPEC, idempotency_key="a"))
        batch = asyncio.create_task(
            master.submit_many(
                [replace(SPEC, idempotency_key="a"), replace(SPEC, idempotency_key="slow")]
            )
        )
        async with asyncio.timeout(5):
            await store.looking_up.wait()
            worker.release.set()  # the first job ends while the batch looks up "slow"
            while (await master.get(first)).status != JobStatus.COMPLETED:
                await asyncio.sleep(0.01)
            store.lookup_gate.set()
            ids = await batch
        assert ids[0] == first
        _, total = await master.list_jobs(10, 0, None)
        assert total == 2  # the first job and the batch's "slow" one


async def test_a_batch_refused_for_a_key_used_twice_leaves_the_key_free(
    tmp_path: Path,
) -> None:
    """The first of two different requests with one key took it before the second was
    refused: every later submit with the key was refused, naming a job that never existed."""
    async with running_master(tmp_path, ScriptedWorker()) as (master, _):
        other = replace(SPEC, idempotency_key="k", priority=5)
        with pytest.raises(AlreadyExists, match="already used for a different request"):
            await master.submit_many([replace(SPEC, idempotency_key="k"), other])
        job_id = await master.submit(other)
        assert await master.submit(other) == job_id
        _, total = await master.list_jobs(10, 0, None)
        assert total == 1


async def test_a_keyed_submit_waits_for_another_batch_looking_up_the_same_key(
    tmp_path: Path,
) -> None:
    """A batch found no job for its key in the store and is slow to go on; meanwhile another
    submit with that key must not create a job (which could even end before the batch goes
    on, and the batch would create a second one)."""
    worker = ScriptedWorker()
    store = SlowKeyStore(tmp_path / "master.db")
    async with running_master(tmp_path, worker, store=store) as (master, _):
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 2, {}, [])
        batch = asyncio.create_task(master.submit_many([replace(SPEC, idempotency_key="slow")]))
        async with asyncio.timeout(5):
            await store.looking_up.wait()  # it found nothing for "slow"
            other = asyncio.create_task(master.submit(replace(SPEC, idempotency_key="slow")))
            # It waits for the batch (queued on the lock), or else runs its job to the end.
            while not (other.done() or getattr(master._key_lock, "_waiters", None)):
                await asyncio.sleep(0.01)
            if other.done():
                while (await master.get(await other)).status != JobStatus.COMPLETED:
                    await asyncio.sleep(0.01)
            store.lookup_gate.set()
            (created,) = await batch
            assert await other == created
            while (await master.get(created)).status != JobStatus.COMPLETED:
                await asyncio.sleep(0.01)
        _, total = await master.list_jobs(10, 0, None)
        assert total == 1


async def test_a_job_recovered_running_keeps_the_time_it_has_run(tmp_path: Path) -> None:
    """After a master restart, a running job's deadline counts from its start, not from the
    restart (a 1 h job 50 min in had another 1 h); its worker, back within the restart grace,
    always gets the dispatch grace to report."""
    store = HeldStore(tmp_path / "master.db")
    await store.__aenter__()
    now = SystemClock().now()
    jobs = {"fresh": (600.0, 60.0), "late": (600.0, 3600.0)}  # timeout, ran for
    for name, (timeout, ran) in jobs.items():
        job = Job(
            JobId(name), replace(SPEC, timeout_s=timeout, max_retries=3), JobStatus.PENDING, now
        )
        await store.insert(job)
        await store.mark_running(JobId(name), "w1", 1, now - timedelta(seconds=ran))
    await store.__aexit__(None, None, None)
    worker = ScriptedWorker()
    worker.release.clear()
    grace = 30.0
    config = MasterConfig(data_dir=tmp_path, dispatch_grace_s=grace)
    async with running_master(tmp_path, worker, config, HeldStore(tmp_path / "master.db")) as (
        master,
        store,
    ):
        held = [HeldAttempt(name, 1) for name in jobs]
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 2, {}, held)
        async with asyncio.timeout(5):
            while len(worker.deadlines) < 2:
                await asyncio.sleep(0.01)
        fresh, late = sorted(worker.deadlines, reverse=True)
        assert 600 - 60 + grace - 5 < fresh <= 600 - 60 + grace
        # Its worker had until the restart grace to come back, and then the dispatch grace.
        window = config.heartbeat_timeout_s + RESTART_GRACE_EXTRA_S
        assert grace + window - 5 < late <= grace + window


async def test_a_recovered_job_keeps_the_priority_it_gained_waiting(tmp_path: Path) -> None:
    """Recovered jobs were queued as if they had just arrived: a priority-0 job that had
    waited past its aging fell behind every newer priority-10 one."""
    store = HeldStore(tmp_path / "master.db")
    await store.__aenter__()
    now = SystemClock().now()
    waited = replace(SPEC, priority=0, max_retries=3)
    await store.insert(Job(JobId("waited"), waited, JobStatus.PENDING, now - timedelta(seconds=30)))
    await store.insert(Job(JobId("new"), replace(waited, priority=10), JobStatus.PENDING, now))
    await store.__aexit__(None, None, None)
    async with running_master(
        tmp_path, ScriptedWorker(), store=HeldStore(tmp_path / "master.db")
    ) as (master, _):
        master.scheduler.aging_s = 2.0  # (the store's jobs are queued by now)
        master.scheduler.age(master.clock.monotonic())
        assert master.scheduler.ordered() == ["waited", "new"]


class GatedKeysStore(HeldStore):
    """Lookups of chosen keys are held after the store answered, until the test lets them go."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gates: dict[str, asyncio.Event] = {}
        self.arrived: dict[str, asyncio.Event] = {}

    def hold(self, *keys: str) -> None:
        for key in keys:
            self.gates[key], self.arrived[key] = asyncio.Event(), asyncio.Event()

    async def find_by_keys(
        self, keys: Collection[str], since: datetime, owner: str
    ) -> dict[str, tuple[JobId, str]]:
        found = await super().find_by_keys(keys, since, owner)
        for key in set(keys) & set(self.gates):
            self.arrived[key].set()
            await self.gates[key].wait()
        return found


async def test_a_key_that_ends_during_a_later_round_of_lookups_still_gives_its_job(
    tmp_path: Path,
) -> None:
    """Key b is active through the batch's first round of lookups and ends during the second
    (which looks up key a, ended during the first): b must be looked up too."""
    store = GatedKeysStore(tmp_path / "master.db")
    async with running_master(tmp_path, ScriptedWorker(), store=store) as (
        master,
        _,
    ):  # (no worker: the jobs wait, and a cancel ends them at once)
        a = await master.submit(replace(SPEC, idempotency_key="a"))
        b = await master.submit(replace(SPEC, idempotency_key="b"))
        store.hold("slow", "a")
        batch = asyncio.create_task(
            master.submit_many([replace(SPEC, idempotency_key=k) for k in ("a", "b", "slow")])
        )
        async with asyncio.timeout(10):
            await store.arrived["slow"].wait()
            await master.cancel(a, 2.0)  # a ends during the first round
            store.gates["slow"].set()
            await store.arrived["a"].wait()
            await master.cancel(b, 2.0)  # b ends during the second
            store.gates["a"].set()
            ids = await batch
        assert ids[:2] == [a, b]


class HeldStartStore(HeldStore):
    """Writes of an attempt's start wait until the test lets them through."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.start_gate = asyncio.Event()

    async def mark_running(
        self,
        job_id: JobId,
        worker_id: str,
        attempt: int,
        started_at: datetime,
        instance: str = "",
    ) -> None:
        await self.start_gate.wait()
        await super().mark_running(job_id, worker_id, attempt, started_at, instance)


async def test_a_job_placed_whose_start_is_not_written_yet_says_so(tmp_path: Path) -> None:
    """Its row still says PENDING; the reason was "waiting to be queued again after a failed
    attempt", which it never had."""
    store = HeldStartStore(tmp_path / "master.db")
    async with running_master(tmp_path, ScriptedWorker(), store=store) as (master, _):
        job_id = await master.submit(SPEC)  # no node yet: queued
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 1, {}, [])
        async with asyncio.timeout(5):
            while master._active[job_id].status != JobStatus.RUNNING:
                await asyncio.sleep(0.01)
            job = await master.get(job_id)
            assert (job.status, job.pending_reason) == (JobStatus.PENDING, "starting on w1")
            store.start_gate.set()
            while (await master.get(job_id)).status != JobStatus.COMPLETED:
                await asyncio.sleep(0.01)


async def test_a_start_that_never_reached_a_worker_is_not_counted_as_its_loss(
    tmp_path: Path,
) -> None:
    """After a master restart, a worker registers without an attempt the store says it runs.
    The same process (same instance): the start never reached it, so the job runs again
    without a retry counted or a step toward poison. Another process: it restarted and lost
    the attempt (WORKER_LOST)."""
    store = HeldStore(tmp_path / "master.db")
    await store.__aenter__()
    now = SystemClock().now()
    jobs_started = {  # instance, started ago
        "same": ("i1", 0.0),
        "other": ("i0", 0.0),
        # (long enough ago that the worker may have run it and forgotten its result)
        "same, long ago": ("i1", NOT_STARTED_WINDOW_S + 1),
    }
    for name, (instance, ago) in jobs_started.items():
        job = Job(JobId(name), replace(SPEC, max_retries=3), JobStatus.PENDING, now)
        await store.insert(job)
        await store.mark_running(JobId(name), "w1", 1, now - timedelta(seconds=ago), instance)
    await store.__aexit__(None, None, None)
    worker = ScriptedWorker()
    worker.release.clear()  # (the runs again stay running: the retry is what is looked at)
    async with running_master(tmp_path, worker, store=HeldStore(tmp_path / "master.db")) as (
        master,
        store,
    ):
        master.register(NodeId("w1"), "127.0.0.1:1", ["command"], 3, {}, [], instance="i1")
        async with asyncio.timeout(5):
            while {j.attempt for j in master._active.values()} != {2}:
                await asyncio.sleep(0.01)
            jobs = {name: await master.get(JobId(name)) for name in jobs_started}
        assert (jobs["same"].retries, jobs["same"].worker_losses) == (0, 0)
        assert jobs["same"].attempts[0].outcome == AttemptOutcome.NOT_STARTED
        assert "never reached worker w1" in jobs["same"].attempts[0].detail
        for lost in ("other", "same, long ago"):
            assert (jobs[lost].retries, jobs[lost].worker_losses) == (1, 1), lost
            assert jobs[lost].attempts[0].outcome == AttemptOutcome.WORKER_LOST
