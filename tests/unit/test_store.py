"""SqliteJobStore on a real file: writes, reads, output, guards and durability."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dist_exec.errors import DistExecError, StoreFull, StoreUnavailable
from dist_exec.master.store import SqliteJobStore, omitted
from dist_exec.models import Job, JobId, JobStatus, OutputChunk, Stream, TaskLimits, TaskSpec
from tests.conftest import umask, wait_until

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


def make_job(job_id: str, priority: int = 0, created: datetime = T0) -> Job:
    return Job(
        id=JobId(job_id),
        spec=TaskSpec(
            task_type="command",
            payload=b'{"command": "echo", "args": ["\\u00e9"]}\x00\xff',
            timeout_s=12.5,
            priority=priority,
            metadata={"owner": "alice", "ticket": "OPS-1"},
            max_retries=3,
        ),
        status=JobStatus.PENDING,
        created_at=created,
    )


def out(offset: int, data: bytes) -> OutputChunk:
    return OutputChunk(Stream.STDOUT, offset, data)


def err(offset: int, data: bytes) -> OutputChunk:
    return OutputChunk(Stream.STDERR, offset, data)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "jobs.sqlite"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteJobStore]:
    async with SqliteJobStore(db_path) as opened:
        yield opened


async def get(store: SqliteJobStore, job_id: str) -> Job:
    job = await store.get(JobId(job_id))
    assert job is not None
    return job


@contextlib.asynccontextmanager
async def holding_writer(store: SqliteJobStore) -> AsyncIterator[None]:
    """The writer thread held in a write until the block ends: what is queued inside goes
    in one batch after it."""
    hold, held = threading.Event(), threading.Event()

    def wait(conn: sqlite3.Connection) -> None:
        held.set()
        hold.wait(10)

    holding = store._write(wait)
    await asyncio.to_thread(held.wait, 10)
    try:
        yield
    finally:
        hold.set()
        await holding


@contextlib.contextmanager
def locked(db_path: Path) -> Iterator[None]:
    """Another process's connection holding the file's write lock until the block ends."""
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


async def test_insert_then_get(store: SqliteJobStore, db_path: Path) -> None:
    job = make_job("a")
    seq = await store.insert(job)
    assert seq >= 1
    assert db_path.exists()
    assert await store.get(JobId("a")) == job


async def test_get_unknown_is_none(store: SqliteJobStore) -> None:
    assert await store.get(JobId("nope")) is None


async def test_sequence_numbers_increase(store: SqliteJobStore) -> None:
    seqs = [await store.insert(make_job(f"j{i}")) for i in range(5)]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 5


async def test_concurrent_inserts_all_land(store: SqliteJobStore) -> None:
    seqs = await asyncio.gather(*(store.insert(make_job(f"j{i}")) for i in range(200)))
    assert len(set(seqs)) == 200
    jobs, total = await store.list_jobs(limit=1000, offset=0, status=None)
    assert total == 200
    assert {j.id for j in jobs} == {f"j{i}" for i in range(200)}


async def test_duplicate_id_is_refused(store: SqliteJobStore) -> None:
    await store.insert(make_job("a"))
    with pytest.raises(sqlite3.IntegrityError):
        await store.insert(make_job("a", priority=5))
    assert (await get(store, "a")).spec.priority == 0
    # The store keeps working after a failed write.
    await store.insert(make_job("b"))
    assert (await get(store, "b")).id == "b"


async def test_mark_running(store: SqliteJobStore) -> None:
    await store.insert(make_job("a"))
    started = T0 + timedelta(seconds=3)
    await store.mark_running(JobId("a"), "worker-7", 2, started)

    job = await get(store, "a")
    assert job.status == JobStatus.RUNNING
    assert job.worker_id == "worker-7"
    assert job.attempt == 2
    assert job.started_at == started
    assert job.completed_at is None


async def test_output_in_order_per_stream(store: SqliteJobStore) -> None:
    await store.insert(make_job("a"))
    job_id = JobId("a")
    # Appended out of order: reads come back ordered by offset.
    for chunk in (out(6, b"world\n"), err(0, b"warn: x\n"), out(0, b"hello "), out(12, b"!")):
        store.append_output(job_id, chunk)

    chunks = await store.read_output(job_id, {})

    assert [c for c in chunks if c.stream == Stream.STDOUT] == [
        out(0, b"hello "),
        out(6, b"world\n"),
        out(12, b"!"),
    ]
    assert [c for c in chunks if c.stream == Stream.STDERR] == [err(0, b"warn: x\n")]
    job = await get(store, "a")
    assert (job.stdout, job.stderr) == (b"hello world\n!", b"warn: x\n")


async def test_read_output_from_offsets(store: SqliteJobStore) -> None:
    await store.insert(make_job("a"))
    job_id = JobId("a")
    for chunk in (out(0, b"hello "), out(6, b"world"), err(0, b"abc"), err(3, b"def")):
        store.append_output(job_id, chunk)

    async def read(stdout: int, stderr: int) -> dict[Stream, list[OutputChunk]]:
        chunks = await store.read_output(job_id, {Stream.STDOUT: stdout, Stream.STDERR: stderr})
        return {s: [c for c in chunks if c.stream == s] for s in Stream}

    # Mid-chunk offsets cut the chunk; chunk-boundary offsets skip whole chunks.
    assert await read(3, 3) == {
        Stream.STDOUT: [out(3, b"lo "), out(6, b"world")],
        Stream.STDERR: [err(3, b"def")],
    }
    assert await read(8, 5) == {Stream.STDOUT: [out(8, b"rld")], Stream.STDERR: [err(5, b"f")]}
    assert await read(11, 6) == {Stream.STDOUT: [], Stream.STDERR: []}
    assert await read(99, 0) == {Stream.STDOUT: [], Stream.STDERR: [err(0, b"abc"), err(3, b"def")]}


async def test_read_output_of_other_or_unknown_jobs(store: SqliteJobStore) -> None:
    await store.insert(make_job("a"))
    await store.insert(make_job("b"))
    store.append_output(JobId("a"), out(0, b"mine"))
    assert await store.read_output(JobId("b"), {}) == []
    assert await store.read_output(JobId("zzz"), {}) == []


async def test_append_output_same_offset_replaces(store: SqliteJobStore) -> None:
    await store.insert(make_job("a"))
    store.append_output(JobId("a"), out(0, b"first"))
    store.append_output(JobId("a"), out(0, b"again"))
    assert await store.read_output(JobId("a"), {}) == [out(0, b"again")]


def finished_job(job: Job, status: JobStatus = JobStatus.COMPLETED, exit_code: int = 0) -> Job:
    return replace(
        job,
        status=status,
        worker_id="worker-1",
        started_at=T0 + timedelta(seconds=1),
        completed_at=T0 + timedelta(seconds=2, microseconds=500),
        exit_code=exit_code,
        error="" if exit_code == 0 else f"command exited with status {exit_code}",
        stdout_bytes=5000,
        stderr_bytes=7,
        truncated=True,
        retries=1,
    )


async def test_finish_without_guard(store: SqliteJobStore) -> None:
    job = make_job("a")
    await store.insert(job)
    done = finished_job(job, JobStatus.FAILED, exit_code=2)

    assert await store.finish(done, expect_attempt=None) is True

    stored = await get(store, "a")
    # (Nothing of its 5000 + 7 bytes was stored: the output says so.)
    assert stored == replace(done, stdout=omitted(5000), stderr=omitted(7))
    assert stored.completed_at == T0 + timedelta(seconds=2, microseconds=500)


async def test_finish_keeps_exit_code_none(store: SqliteJobStore) -> None:
    job = make_job("a")
    await store.insert(job)
    cancelled = replace(job, status=JobStatus.CANCELLED, error="cancelled before it started")
    assert await store.finish(cancelled, expect_attempt=None) is True
    stored = await get(store, "a")
    assert stored.exit_code is None
    assert stored.status == JobStatus.CANCELLED


async def test_finish_only_once(store: SqliteJobStore) -> None:
    job = make_job("a")
    await store.insert(job)
    assert await store.finish(finished_job(job), expect_attempt=None) is True
    later = finished_job(job, JobStatus.FAILED, exit_code=9)
    assert await store.finish(later, expect_attempt=None) is False
    stored = await get(store, "a")
    assert (stored.status, stored.exit_code) == (JobStatus.COMPLETED, 0)


async def test_finish_with_attempt_guard(store: SqliteJobStore) -> None:
    job = make_job("a")
    await store.insert(job)
    await store.mark_running(job.id, "worker-1", 2, T0)

    # A late result of attempt 1 must not end the job that attempt 2 now runs.
    assert await store.finish(finished_job(job, JobStatus.FAILED, 1), expect_attempt=1) is False
    assert (await get(store, "a")).status == JobStatus.RUNNING

    assert await store.finish(finished_job(job), expect_attempt=2) is True
    assert (await get(store, "a")).status == JobStatus.COMPLETED


async def test_finish_of_unknown_job_is_false(store: SqliteJobStore) -> None:
    assert await store.finish(finished_job(make_job("ghost")), expect_attempt=None) is False


async def test_requeue_resets_the_job_and_deletes_its_output(store: SqliteJobStore) -> None:
    await store.insert(make_job("a"))
    await store.insert(make_job("b"))
    await store.mark_running(JobId("a"), "worker-1", 1, T0)
    store.append_output(JobId("a"), out(0, b"partial"))
    store.append_output(JobId("a"), err(0, b"partial err"))
    store.append_output(JobId("b"), out(0, b"other job"))

    await store.requeue(JobId("a"), retries=1, error="worker worker-1 was lost")

    job = await get(store, "a")
    assert job.status == JobStatus.PENDING
    assert job.retries == 1
    assert job.error == "worker worker-1 was lost"
    assert job.worker_id == ""
    assert job.started_at is None
    assert (job.stdout, job.stderr) == (b"", b"")
    assert await store.read_output(JobId("a"), {}) == []
    assert await store.read_output(JobId("b"), {}) == [out(0, b"other job")]


async def test_list_jobs_newest_first_with_paging(store: SqliteJobStore) -> None:
    for i in range(5):
        await store.insert(make_job(f"j{i}", created=T0 + timedelta(seconds=i)))

    jobs, total = await store.list_jobs(limit=2, offset=0, status=None)
    assert ([j.id for j in jobs], total) == (["j4", "j3"], 5)
    jobs, total = await store.list_jobs(limit=2, offset=2, status=None)
    assert ([j.id for j in jobs], total) == (["j2", "j1"], 5)
    jobs, total = await store.list_jobs(limit=2, offset=4, status=None)
    assert ([j.id for j in jobs], total) == (["j0"], 5)
    jobs, total = await store.list_jobs(limit=2, offset=10, status=None)
    assert (jobs, total) == ([], 5)


async def test_list_jobs_filters_by_status(store: SqliteJobStore) -> None:
    for i in range(5):
        await store.insert(make_job(f"j{i}"))
    await store.mark_running(JobId("j1"), "w", 1, T0)
    await store.mark_running(JobId("j3"), "w", 1, T0)
    await store.finish(finished_job(make_job("j4")), expect_attempt=None)

    running, total = await store.list_jobs(limit=10, offset=0, status=JobStatus.RUNNING)
    assert ([j.id for j in running], total) == (["j3", "j1"], 2)
    assert all(j.worker_id == "w" for j in running)
    pending, total = await store.list_jobs(limit=1, offset=0, status=JobStatus.PENDING)
    assert ([j.id for j in pending], total) == (["j2"], 2)
    timed_out, total = await store.list_jobs(limit=10, offset=0, status=JobStatus.TIMEOUT)
    assert (timed_out, total) == ([], 0)


async def test_list_jobs_leaves_output_out(store: SqliteJobStore) -> None:
    await store.insert(make_job("a"))
    store.append_output(JobId("a"), out(0, b"big output"))
    await store.read_output(JobId("a"), {})  # flushes the queued write
    jobs, _ = await store.list_jobs(limit=10, offset=0, status=None)
    assert jobs[0].stdout == b""


async def test_unfinished(store: SqliteJobStore) -> None:
    seqs = {f"j{i}": await store.insert(make_job(f"j{i}")) for i in range(4)}
    await store.mark_running(JobId("j1"), "w", 1, T0)
    await store.finish(finished_job(make_job("j2")), expect_attempt=None)

    unfinished = await store.unfinished()

    assert [(seq, job.id, job.status) for seq, job in unfinished] == [
        (seqs["j0"], "j0", JobStatus.PENDING),
        (seqs["j1"], "j1", JobStatus.RUNNING),
        (seqs["j3"], "j3", JobStatus.PENDING),
    ]
    assert unfinished[1][1].worker_id == "w"
    assert unfinished[1][1].attempt == 1


async def test_data_survives_reopening(db_path: Path) -> None:
    done = finished_job(make_job("done"), JobStatus.FAILED, exit_code=3)
    async with SqliteJobStore(db_path) as store:
        seq_pending = await store.insert(make_job("pending", priority=7))
        seq_running = await store.insert(make_job("running"))
        await store.insert(make_job("done"))
        await store.mark_running(JobId("running"), "worker-2", 1, T0)
        store.append_output(JobId("running"), out(0, b"so far"))
        store.append_output(JobId("done"), err(0, b"oops"))
        assert await store.finish(done, expect_attempt=None)
        # Closed right after unawaited appends: they must still be written.
        store.append_output(JobId("running"), out(6, b", more"))

    async with SqliteJobStore(db_path) as store:
        assert [(seq, job.id) for seq, job in await store.unfinished()] == [
            (seq_pending, "pending"),
            (seq_running, "running"),
        ]
        pending = await get(store, "pending")
        assert pending == make_job("pending", priority=7)
        running = await get(store, "running")
        assert (running.status, running.worker_id, running.started_at) == (
            JobStatus.RUNNING,
            "worker-2",
            T0,
        )
        assert running.stdout == b"so far, more"
        assert await store.read_output(JobId("running"), {Stream.STDOUT: 6}) == [out(6, b", more")]
        stored_done = await get(store, "done")
        assert stored_done == replace(done, stdout=omitted(5000), stderr=b"oops" + omitted(3))
        # New jobs continue the sequence.
        assert await store.insert(make_job("new")) > seq_running


async def test_limits_are_kept_and_a_file_without_the_column_gets_it(db_path: Path) -> None:
    limited = replace(make_job("a"), spec=replace(make_job("a").spec, limits=TaskLimits(1 << 20)))
    async with SqliteJobStore(db_path) as store:
        await store.insert(limited)
        await store.insert(make_job("b"))
        assert await get(store, "a") == limited
    # As a file from before limits existed. (A connection used as a context manager commits
    # but stays open: closing() closes it.)
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute("ALTER TABLE jobs DROP COLUMN limits")
    async with SqliteJobStore(db_path) as store:
        assert (await get(store, "a")).spec.limits == TaskLimits()
        assert await get(store, "b") == make_job("b")
        await store.insert(replace(limited, id=JobId("c")))
        assert (await get(store, "c")).spec.limits == TaskLimits(1 << 20)


async def test_the_database_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """Jobs' payloads and output are in the database, its WAL and shared memory: 0600, in a
    0700 directory, even under umask 0; files of an older version are tightened."""
    data = tmp_path / "data"
    db = data / "jobs.sqlite"
    files = [db, data / "jobs.sqlite-wal", data / "jobs.sqlite-shm"]
    with umask(0):
        async with SqliteJobStore(db) as store:
            await store.insert(make_job("j"))
            assert {p.name: oct(p.stat().st_mode & 0o777) for p in [data, *files]} == {
                p.name: oct(0o700 if p == data else 0o600) for p in [data, *files]
            }
        data.chmod(0o755)
        db.chmod(0o644)
        async with SqliteJobStore(db) as store:
            assert await store.get(JobId("j")) is not None
            assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o600)}
            assert data.stat().st_mode & 0o777 == 0o700


async def test_a_full_database_accepts_nothing_and_keeps_state_changes_waiting(
    store: SqliteJobStore, db_path: Path
) -> None:
    """A write that makes SQLite roll back the transaction (disk full here) takes the whole
    batch with it: a job queued after it must not commit on its own while reported failed
    (its submitter would submit it again, and it would run twice). Accepting fails at once,
    with an error that says so; a state change waits in memory (the master acted on it)."""
    await store.insert(make_job("first"))
    pages = sqlite3.connect(db_path).execute("PRAGMA page_count").fetchone()[0]
    async with holding_writer(store):  # what follows goes in one batch
        limited = store._write(lambda conn: conn.execute(f"PRAGMA max_page_count={pages + 3}"))
        store.append_output(JobId("first"), out(0, os.urandom(200_000)))  # more than 3 pages
        inserted = store.insert_many([make_job("second")])
        running = asyncio.ensure_future(store.mark_running(JobId("first"), "w1", 1, T0))
        await asyncio.sleep(0)  # (queued now)
    with contextlib.suppress(StoreFull):
        await limited  # (its batch failed, but a PRAGMA is not rolled back: the limit holds)
    with pytest.raises(StoreFull, match=r"cannot write its database .*full; free space"):
        await inserted
    await wait_until(lambda: store.trouble is not None, what="the store to report trouble")
    assert "full" in (store.trouble or "")
    assert await store.get(JobId("second")) is None
    assert (await get(store, "first")).status == JobStatus.PENDING
    assert not running.done()  # waits until the database takes it
    with pytest.raises(StoreFull):  # reads that must follow the waiting writes fail
        await store.read_output(JobId("first"), {})
    running.cancel()


async def test_state_changes_land_in_order_once_the_database_takes_writes_again(
    db_path: Path,
) -> None:
    """Another process holds the file's write lock past the busy timeout: accepting a job
    fails with UNAVAILABLE's error, state changes and output wait and land in their order when
    the lock is gone, and the store reports no trouble after that."""
    async with SqliteJobStore(db_path, busy_timeout_s=0.05) as store:
        await store.insert(make_job("j"))
        with locked(db_path):
            running = asyncio.ensure_future(store.mark_running(JobId("j"), "w1", 1, T0))
            store.append_output(JobId("j"), out(0, b"one "))
            await wait_until(lambda: store.trouble is not None, what="the store to report trouble")
            assert "locked" in (store.trouble or "")
            with pytest.raises(StoreUnavailable, match=r"cannot write its database .* later"):
                await store.insert(make_job("refused"))
            store.append_output(JobId("j"), out(4, b"two"))
            ended = replace(
                make_job("j"), status=JobStatus.COMPLETED, exit_code=0, completed_at=T0,
                attempt=1, stdout_bytes=7, worker_id="w1",
            )  # fmt: skip
            finished = asyncio.ensure_future(store.finish(ended, expect_attempt=1))
            assert not running.done()
            assert not finished.done()
        await asyncio.wait_for(running, 10)
        assert await asyncio.wait_for(finished, 10) is True
        assert store.trouble is None
        job = await get(store, "j")
        assert (job.status, job.worker_id, job.stdout) == (JobStatus.COMPLETED, "w1", b"one two")
        assert await store.get(JobId("refused")) is None
        await store.insert(make_job("later"))  # and it takes jobs again
        assert (await get(store, "later")).status == JobStatus.PENDING


async def test_a_write_that_fails_halfway_leaves_nothing_and_the_batch_goes_on(
    store: SqliteJobStore,
) -> None:
    """Each write of a batch holds whole or not at all: a finish or a requeue is several
    statements, and one failing after the first must not leave the first in the database."""
    await store.insert(make_job("a"))
    await store.insert(make_job("b"))

    def half(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE jobs SET priority = 9 WHERE id = 'a'")
        conn.execute("INSERT INTO jobs (id) VALUES ('c')")  # NOT NULL constraints: fails

    async with holding_writer(store):  # what follows goes in one batch
        failing = store._write(half)
        running = asyncio.ensure_future(store.mark_running(JobId("b"), "w1", 1, T0))
        await asyncio.sleep(0)  # (queued now)
    with pytest.raises(sqlite3.IntegrityError):
        await failing
    await running
    assert (await get(store, "a")).spec.priority == 0
    assert (await get(store, "b")).status == JobStatus.RUNNING


async def test_prune_deletes_only_jobs_ended_before_the_cutoff_with_their_output(
    store: SqliteJobStore, db_path: Path
) -> None:
    old, recent = T0 - timedelta(days=8), T0 - timedelta(hours=1)
    for name, created in (("old", old), ("recent", recent), ("keyed", old), ("running", old)):
        job = make_job(name, created=created)
        if name == "keyed":
            job = replace(job, spec=replace(job.spec, idempotency_key="k"))
        await store.insert(job)
        await store.mark_running(JobId(name), "w1", 1, created)
        store.append_output(JobId(name), out(0, b"output"))
        if name != "running":
            done = replace(job, status=JobStatus.COMPLETED, completed_at=created, attempt=1)
            assert await store.finish(done, expect_attempt=1)
    cutoff = T0 - timedelta(days=7)
    assert await store.prune(cutoff, keyed_before=cutoff - timedelta(days=30), limit=10) == 1
    assert await store.get(JobId("old")) is None
    for kept in ("recent", "keyed", "running"):  # (the key is honoured for 30 more days)
        assert (await get(store, kept)).stdout == b"output"
    assert await store.prune(cutoff, keyed_before=cutoff, limit=10) == 1
    assert await store.get(JobId("keyed")) is None
    assert await store.prune(cutoff, keyed_before=cutoff, limit=10) == 0
    db = sqlite3.connect(db_path)
    for table in ("output", "attempts"):
        left = {r[0] for r in db.execute(f"SELECT DISTINCT job_id FROM {table}")}
        assert left == {"recent", "running"}, table
    # Each kind of job is found through an index of its own: not a scan of every job, nor of
    # the keyed jobs kept longer at every slice.
    for condition, index in (("= ''", "jobs_ended"), ("!= ''", "jobs_ended_keyed")):
        plan = " ".join(
            str(row[-1])
            for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE completed_at < ?"
                f" AND idempotency_key {condition} LIMIT ?",
                (1.0, 5),
            )
        )
        assert f"USING INDEX {index} " in plan, plan


async def test_prune_takes_at_most_its_limit(store: SqliteJobStore) -> None:
    for i in range(5):
        job = make_job(f"j{i}")
        await store.insert(job)
        assert await store.finish(
            replace(job, status=JobStatus.CANCELLED, completed_at=T0), expect_attempt=None
        )
    cutoff = T0 + timedelta(seconds=1)
    assert [await store.prune(cutoff, cutoff, 2) for _ in range(4)] == [2, 2, 1, 0]


async def test_while_the_database_fails_it_is_tried_after_a_backoff_not_at_every_write(
    db_path: Path,
) -> None:
    """Output arriving every few milliseconds must not make the writer try the database (and
    redo everything that waits) at each arrival; a submit meanwhile fails at once."""
    async with SqliteJobStore(db_path, busy_timeout_s=0.01) as store:
        await store.insert(make_job("j"))
        tries = 0
        run_batch = store._run_batch

        def counting(conn: sqlite3.Connection, batch: list[Any]) -> BaseException | None:
            nonlocal tries
            tries += 1
            return run_batch(conn, batch)

        store._run_batch = counting  # type: ignore[method-assign]
        with locked(db_path):
            store.append_output(JobId("j"), out(0, b"x"))
            await wait_until(lambda: store.trouble is not None, what="the store to report trouble")
            started, offset = tries, 1
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.0
            while loop.time() < end:  # a write every 5 ms for a second
                store.append_output(JobId("j"), out(offset, b"x"))
                store._flush_output()
                offset += 1
                await asyncio.sleep(0.005)
            assert tries - started <= 6  # 50 ms, 100, 200, 400 ... (not 200 tries)
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(store.insert(make_job("refused")), 10)
        await wait_until(lambda: store.trouble is None, what="the backlog to be written")
        await store.insert(make_job("later"))
        assert (await get(store, "j")).stdout == b"x" * offset


async def test_output_beyond_the_backlog_limit_is_dropped_and_leaves_a_marked_gap(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("dist_exec.master.store.BACKLOG_OUTPUT_BYTES", 100)
    async with SqliteJobStore(db_path, busy_timeout_s=0.01) as store:
        await store.insert(make_job("j"))
        with locked(db_path):
            store.append_output(JobId("j"), out(0, b"a" * 60))
            await wait_until(lambda: store.trouble is not None, what="the store to report trouble")
            for offset, data in ((60, b"b" * 60), (120, b"c" * 30)):  # b's do not fit
                store.append_output(JobId("j"), out(offset, data))
                store._flush_output()
            finished = asyncio.ensure_future(
                store.finish(
                    replace(make_job("j"), status=JobStatus.COMPLETED, completed_at=T0),
                    expect_attempt=None,
                )
            )
            await asyncio.sleep(0)
        assert await asyncio.wait_for(finished, 10) is True  # state changes are never dropped
        job = await get(store, "j")
    assert job.stdout == b"a" * 60 + b"\n[... 60 bytes omitted ...]\n" + b"c" * 30
    assert "further output of running jobs is not kept" in caplog.text
    assert "60 bytes of output were not kept meanwhile" in caplog.text


async def test_a_database_another_process_holds_is_not_called_damaged(db_path: Path) -> None:
    """Moving the file away (the advice for a damaged one) would start without every job."""
    async with SqliteJobStore(db_path) as store:
        await store.insert(make_job("j"))
    with locked(db_path), pytest.raises(DistExecError) as info:
        async with SqliteJobStore(db_path, busy_timeout_s=0.05):
            pass
    assert info.value.message == (
        f"cannot open the job database {db_path}: database is locked (another process holding "
        "it, a full or failing disk: mend that and start again)"
    )


async def test_find_by_keys_gives_the_newest_job_of_each_key_since_a_time(
    store: SqliteJobStore,
) -> None:
    def keyed(job_id: str, key: str, created: datetime) -> Job:
        job = make_job(job_id, created=created)
        return replace(job, spec=replace(job.spec, idempotency_key=key))

    await store.insert(keyed("old", "k1", T0 - timedelta(days=2)))
    await store.insert(keyed("first", "k1", T0))
    await store.insert(keyed("second", "k1", T0))
    await store.insert(keyed("other", "k2", T0))
    many = [f"m{i}" for i in range(1200)]  # more than one query's worth
    await store.insert_many([keyed(f"job-{k}", k, T0) for k in many])
    await store.insert(
        replace(keyed("theirs", "k3", T0), spec=replace(keyed("x", "k3", T0).spec, owner="bob"))
    )
    found = await store.find_by_keys(["k1", "k2", "k3", *many], T0 - timedelta(days=1), "")
    assert {k: v[0] for k, v in found.items() if not k.startswith("m")} == {
        "k1": "second",
        "k2": "other",
    }
    assert {k: v[0] for k, v in found.items() if k.startswith("m")} == {k: f"job-{k}" for k in many}


async def test_an_ended_stream_stored_short_of_its_length_ends_with_a_marked_gap(
    store: SqliteJobStore,
) -> None:
    """Output dropped at the end (an outage of the database, a worker's own limit, no tail
    kept) was shown as if the stream had ended there."""
    job = make_job("j")
    await store.insert(job)
    store.append_output(JobId("j"), out(0, b"head"))
    done = replace(job, status=JobStatus.COMPLETED, completed_at=T0, stdout_bytes=10)
    assert await store.finish(done, expect_attempt=None)
    assert (await get(store, "j")).stdout == b"head" + omitted(6)


async def test_a_writer_thread_that_stops_fails_every_write_instead_of_hanging_them(
    store: SqliteJobStore, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(conn: sqlite3.Connection) -> None:
        raise KeyboardInterrupt  # (what no write raises: a bug)

    with pytest.raises(StoreUnavailable, match=r"writer stopped .* restart the master"):
        await asyncio.wait_for(store._write(broken), 5)
    with pytest.raises(StoreUnavailable, match="writer stopped"):
        await asyncio.wait_for(store.insert(make_job("later")), 5)
    assert "the job database's writer stopped" in caplog.text


async def test_output_piling_up_behind_a_stuck_writer_is_bounded_too(
    store: SqliteJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the writer is stuck in a try (a lock's busy timeout, a hung fsync), output waits
    in its queue, where the backlog's limit did not count it."""
    monkeypatch.setattr("dist_exec.master.store.BACKLOG_OUTPUT_BYTES", 100)
    await store.insert(make_job("j"))
    async with holding_writer(store):  # (stuck in a try)
        store.trouble = "disk I/O error"  # (what the writer says once a try has failed)
        for offset, data in ((0, b"a" * 60), (60, b"b" * 60), (120, b"c" * 30)):
            store.append_output(JobId("j"), out(offset, data))
            store._flush_output()
    done = replace(make_job("j"), status=JobStatus.COMPLETED, completed_at=T0, stdout_bytes=150)
    assert await store.finish(done, expect_attempt=None)
    assert (await get(store, "j")).stdout == b"a" * 60 + omitted(60) + b"c" * 30


async def test_attempts_keep_the_worker_instance_apart_from_the_attempts_table(
    store: SqliteJobStore, db_path: Path
) -> None:
    """The instance each running attempt was started on is read back for recovery; it lives
    in a table of its own, so a master of the version before (which inserts attempts rows by
    position) still works on this file after a roll-back."""
    placed = replace(make_job("placed"), status=JobStatus.RUNNING, worker_id="w1", attempt=1)
    await store.insert_many([placed, make_job("queued")], {JobId("placed"): "i1"})
    await store.mark_running(JobId("queued"), "w2", 1, T0, "i2")
    await store.insert(make_job("old worker"))
    await store.mark_running(JobId("old worker"), "w3", 1, T0)  # (sends no instance)
    assert await store.running_instances() == {"placed": "i1", "queued": "i2"}
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("INSERT OR REPLACE INTO attempts VALUES ('placed', 2, 'w1', 0, NULL, NULL, '')")


async def test_a_backlog_goes_in_a_batch_at_a_time_in_order(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dist_exec.master.store.MAX_BATCH", 3)
    async with SqliteJobStore(db_path, busy_timeout_s=0.01) as store:
        await store.insert(make_job("j"))
        with locked(db_path):
            for i in range(10):
                store.append_output(JobId("j"), out(i, str(i).encode()))
                store._flush_output()  # (one write each)
            await wait_until(lambda: store.trouble is not None, what="the store to report trouble")
            running = asyncio.ensure_future(store.mark_running(JobId("j"), "w1", 1, T0))
            await asyncio.sleep(0)
        await asyncio.wait_for(running, 10)
        job = await get(store, "j")
    assert (job.status, job.stdout) == (JobStatus.RUNNING, b"0123456789")


async def test_a_store_closed_while_writes_wait_tries_once_more_then_fails_them(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The master stops during an outage: what waits is tried once more, and what still
    cannot be written is reported (the next start recovers those jobs from the store)."""
    store = SqliteJobStore(db_path, busy_timeout_s=0.01)
    await store.__aenter__()
    await store.insert(make_job("j"))
    with locked(db_path):
        running = asyncio.ensure_future(store.mark_running(JobId("j"), "w1", 1, T0))
        await wait_until(lambda: store.trouble is not None, what="the store to report trouble")
        async with asyncio.timeout(10):
            await store.__aexit__(None, None, None)
        with pytest.raises(StoreUnavailable, match="database is locked"):
            await asyncio.wait_for(running, 5)
    assert "the master stops with 1 state changes not written (database is locked)" in caplog.text
    async with SqliteJobStore(db_path) as reopened:  # nothing of it was written
        assert (await get(reopened, "j")).status == JobStatus.PENDING


async def test_a_writer_stuck_without_an_error_counts_as_trouble_after_a_while(
    store: SqliteJobStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk that hangs (an fsync that does not return, a stalled network volume) gives no
    error, so ``trouble`` stayed unset: submissions waited until their callers gave up, and
    output piled up behind the writer without the backlog's limit."""
    monkeypatch.setattr("dist_exec.master.store.STALL_S", 0.2)
    monkeypatch.setattr("dist_exec.master.store.BACKLOG_OUTPUT_BYTES", 100)
    await store.insert(make_job("j"))
    async with holding_writer(store):  # (a write the disk does not answer)
        early = asyncio.ensure_future(store.insert(make_job("early")))  # not stuck yet: queued
        await wait_until(lambda: store.stalled() is not None, what="the writer to count as stuck")
        assert store.trouble is None
        with pytest.raises(StoreUnavailable, match=r"has not answered a write for \d+s"):
            await asyncio.wait_for(store.insert(make_job("refused")), 1)
        for offset, data in ((0, b"a" * 60), (60, b"b" * 60), (120, b"c" * 30)):
            store.append_output(JobId("j"), out(offset, data))
            store._flush_output()
    await asyncio.wait_for(early, 10)
    assert store.stalled() is None
    await store.insert(make_job("later"))
    done = replace(make_job("j"), status=JobStatus.COMPLETED, completed_at=T0, stdout_bytes=150)
    assert await store.finish(done, expect_attempt=None)
    assert (await get(store, "j")).stdout == b"a" * 60 + omitted(60) + b"c" * 30
    assert re.search(
        r"answered a write after \d+\.\ds; 60 bytes of output were not kept", caplog.text
    )
