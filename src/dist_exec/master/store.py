"""Durable job store: one SQLite file (WAL) in the master's data directory.

All writes go through one writer thread that commits them in batches (group commit), so a burst
of submissions costs one fsync, not one each. A batch that accepts a job is committed with
synchronous=FULL: when ``insert`` returns, the job is on disk and survives a power loss. Other
batches (state changes, output) use synchronous=NORMAL: they survive a crash of the master
process, and the next FULL commit syncs them too; only an OS crash in between can lose them,
after which such a job runs again. Reads that must see every earlier write (output replay) run
on the writer thread too; other reads use their own connection and see what is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from dist_exec.models import (
    NO_LIMITS,
    AttemptOutcome,
    AttemptRecord,
    Job,
    JobId,
    JobStatus,
    OutputChunk,
    Stream,
    TaskLimits,
    TaskSpec,
)
from dist_exec.security.private_files import open_private, private_dir, private_file

T = TypeVar("T")
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
SCHEMA_VERSION = 1
MAX_BATCH = 2000
OUTPUT_FLUSH_S = 0.02  # output waits at most this long for the next write to go out with

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    task_type TEXT NOT NULL,
    payload BLOB NOT NULL,
    timeout_s REAL NOT NULL,
    priority INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    max_retries INTEGER NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    worker_id TEXT NOT NULL DEFAULT '',
    attempt INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    error TEXT NOT NULL DEFAULT '',
    stdout_bytes INTEGER NOT NULL DEFAULT 0,
    stderr_bytes INTEGER NOT NULL DEFAULT 0,
    truncated INTEGER NOT NULL DEFAULT 0,
    selector TEXT NOT NULL DEFAULT '{}',
    result_metadata TEXT NOT NULL DEFAULT '{}',
    node_pin TEXT NOT NULL DEFAULT '',
    broadcast_id TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT NOT NULL DEFAULT '',
    request_hash TEXT NOT NULL DEFAULT '',
    retry_on_failure INTEGER NOT NULL DEFAULT 0,
    queue_timeout_s REAL NOT NULL DEFAULT 0,
    worker_losses INTEGER NOT NULL DEFAULT 0,
    owner TEXT NOT NULL DEFAULT '',
    limits TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS output (
    job_id TEXT NOT NULL,
    stream INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, stream, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    started_at REAL,
    ended_at REAL,
    outcome TEXT,
    detail TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, attempt)
) WITHOUT ROWID;
"""
_JOB_COLUMNS = (
    "seq, id, task_type, payload, timeout_s, priority, metadata, max_retries, status, created_at,"
    " started_at, completed_at, worker_id, attempt, retries, exit_code, error, stdout_bytes,"
    " stderr_bytes, truncated, selector, result_metadata, node_pin, broadcast_id,"
    " retry_on_failure, queue_timeout_s, worker_losses, owner, limits"
)
# Columns added after the first release; older files get them on open.
_ADDED_COLUMNS = {
    "selector": "TEXT NOT NULL DEFAULT '{}'",
    "result_metadata": "TEXT NOT NULL DEFAULT '{}'",
    "node_pin": "TEXT NOT NULL DEFAULT ''",
    "broadcast_id": "TEXT NOT NULL DEFAULT ''",
    "idempotency_key": "TEXT NOT NULL DEFAULT ''",
    "request_hash": "TEXT NOT NULL DEFAULT ''",
    "retry_on_failure": "INTEGER NOT NULL DEFAULT 0",
    "queue_timeout_s": "REAL NOT NULL DEFAULT 0",
    "worker_losses": "INTEGER NOT NULL DEFAULT 0",
    "owner": "TEXT NOT NULL DEFAULT ''",
    "limits": "TEXT NOT NULL DEFAULT '{}'",
}


class JobStore(Protocol):
    """What the master needs from durable storage."""

    async def insert(self, job: Job) -> int: ...
    def insert_many(self, jobs: Sequence[Job]) -> asyncio.Future[list[int]]: ...
    async def mark_running(
        self, job_id: JobId, worker_id: str, attempt: int, started_at: datetime
    ) -> None: ...
    def append_output(self, job_id: JobId, chunk: OutputChunk) -> None: ...
    async def finish(
        self,
        job: Job,
        expect_attempt: int | None,
        attempt_outcome: AttemptOutcome | None = None,
    ) -> bool: ...
    async def requeue(
        self,
        job_id: JobId,
        retries: int,
        error: str,
        ended: AttemptRecord | None = None,
        worker_losses: int = 0,
    ) -> None: ...
    def note_attempt(self, job_id: JobId, attempt: int, detail: str) -> None: ...
    async def get(self, job_id: JobId, with_output: bool = True) -> Job | None: ...
    async def list_jobs(
        self,
        limit: int,
        offset: int,
        status: JobStatus | None,
        broadcast_id: str = "",
        owner: str | None = None,
    ) -> tuple[list[Job], int]: ...
    async def unfinished(self) -> list[tuple[int, Job]]: ...
    async def find_by_key(self, key: str, since: datetime) -> tuple[JobId, str] | None: ...
    async def read_output(
        self, job_id: JobId, offsets: Mapping[Stream, int]
    ) -> list[OutputChunk]: ...
    async def output_ends(self, job_id: JobId) -> dict[Stream, int]: ...


NO_LIMITS_JSON = json.dumps(asdict(NO_LIMITS))


def _json_map(value: Mapping[str, str]) -> str:
    return json.dumps(value) if value else "{}"


def request_hash(spec: TaskSpec) -> str:
    """What makes two submissions with one idempotency key the same request."""
    fields: list[object] = [
        spec.task_type, spec.payload.hex(), spec.timeout_s, spec.priority, spec.metadata,
        spec.max_retries, spec.selector, spec.node_id,
    ]  # fmt: skip
    if spec.retry_on_failure or spec.queue_timeout_s:  # later additions, only when set
        fields += [spec.retry_on_failure, spec.queue_timeout_s]
    if spec.owner:  # one owner's key never returns another's job
        fields.append(spec.owner)
    if spec.limits.any:
        fields.append(asdict(spec.limits))
    body = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def omitted(count: int) -> bytes:
    """What stands for the bytes of a long stream that were not kept."""
    return f"\n[... {count} bytes omitted ...]\n".encode()


def _ts(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _job_from_row(
    row: tuple[Any, ...],
    stdout: bytes = b"",
    stderr: bytes = b"",
    attempts: tuple[AttemptRecord, ...] = (),
) -> Job:
    (_seq, id_, task_type, payload, timeout_s, priority, metadata, max_retries, status, created,
     started, completed, worker_id, attempt, retries, exit_code, error, out_n, err_n,
     truncated, selector, result_metadata, node_pin, broadcast_id, retry_on_failure,
     queue_timeout_s, worker_losses, owner, limits) = row  # fmt: skip
    return Job(
        id=JobId(id_),
        spec=TaskSpec(
            task_type,
            payload,
            timeout_s,
            priority,
            json.loads(metadata),
            max_retries,
            json.loads(selector),
            node_pin,
            broadcast_id,
            retry_on_failure=bool(retry_on_failure),
            queue_timeout_s=queue_timeout_s,
            owner=owner,
            limits=TaskLimits(**json.loads(limits)),
        ),
        status=JobStatus(status),
        created_at=_dt(created) or datetime.fromtimestamp(0, UTC),
        started_at=_dt(started),
        completed_at=_dt(completed),
        worker_id=worker_id,
        attempt=attempt,
        retries=retries,
        exit_code=exit_code,
        error=error,
        stdout=stdout,
        stderr=stderr,
        stdout_bytes=out_n,
        stderr_bytes=err_n,
        truncated=bool(truncated),
        result_metadata=json.loads(result_metadata),
        attempts=attempts,
        worker_losses=worker_losses,
    )


def _attempt_from_row(row: tuple[Any, ...]) -> AttemptRecord:
    attempt, node_id, started, ended, outcome, detail = row
    return AttemptRecord(
        attempt, node_id, _dt(started), _dt(ended), AttemptOutcome(outcome) if outcome else None,
        detail,
    )  # fmt: skip


_START_ATTEMPT = "INSERT OR REPLACE INTO attempts VALUES (?, ?, ?, ?, NULL, NULL, '')"
_END_ATTEMPT = (
    "UPDATE attempts SET ended_at = ?, outcome = ?, detail = ?"
    " WHERE job_id = ? AND attempt = ? AND outcome IS NULL"
)


class SqliteJobStore:
    """The default JobStore. Use as ``async with SqliteJobStore(path) as store``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # (operation, future or None, must be fsynced before the future resolves)
        self._queue: queue.SimpleQueue[
            tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any] | None, bool] | None
        ] = queue.SimpleQueue()
        self._synchronous = "FULL"
        self._output: list[tuple[str, int, int, bytes]] = []  # appended, not yet queued
        self._flush_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_pool = ThreadPoolExecutor(1, thread_name_prefix="store-read")

    async def __aenter__(self) -> SqliteJobStore:
        private_dir(self.path.parent)
        # SQLite creates its -wal, -shm and -journal files with the database file's mode.
        os.close(open_private(self.path, os.O_RDWR))
        for suffix in SQLITE_SIDE_FILES:
            private_file(self.path.with_name(self.path.name + suffix))
        self._loop = asyncio.get_running_loop()
        write_conn = self._connect(check_same_thread=False)  # used only by the writer thread
        write_conn.executescript(_SCHEMA)
        have = {row[1] for row in write_conn.execute("PRAGMA table_info(jobs)")}
        for column, definition in _ADDED_COLUMNS.items():
            if column not in have:
                write_conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {definition}")
        write_conn.execute(
            "CREATE INDEX IF NOT EXISTS jobs_by_broadcast ON jobs (broadcast_id) "
            "WHERE broadcast_id != ''"
        )
        write_conn.execute(
            "CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs (idempotency_key, seq) "
            "WHERE idempotency_key != ''"
        )
        write_conn.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        self._writer = threading.Thread(
            target=self._write_loop, args=(write_conn,), name="store-write", daemon=True
        )
        self._writer.start()
        self._reader = self._connect(check_same_thread=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._flush_output()
        self._queue.put(None)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join)
        self._read_pool.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()

    def _connect(self, check_same_thread: bool = True) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=check_same_thread, timeout=30
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._run_batch(conn, batch)
        conn.close()

    def _run_batch(
        self,
        conn: sqlite3.Connection,
        batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any] | None, bool]],
    ) -> None:
        results: list[tuple[asyncio.Future[Any] | None, Any, BaseException | None]] = []
        synchronous = "FULL" if any(durable for _, _, durable in batch) else "NORMAL"
        try:
            if synchronous != self._synchronous:
                conn.execute(f"PRAGMA synchronous={synchronous}")
                self._synchronous = synchronous
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut, _ in batch:
                try:
                    results.append((fut, fn(conn), None))
                except Exception as exc:
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back (disk full, an I/O error):
                        # nothing of the batch holds, and what follows must not run outside it.
                        raise _BatchLost() from exc
                    results.append((fut, None, exc))
            conn.execute("COMMIT")
        except (sqlite3.Error, _BatchLost) as exc:
            failure: BaseException = exc.__cause__ or exc
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # (the writer must go on either way)
                    conn.execute("ROLLBACK")
            results = [(fut, None, failure) for _, fut, _ in batch]
        assert self._loop is not None
        for fut, value, error in results:
            if fut is not None:
                self._loop.call_soon_threadsafe(_resolve, fut, value, error)

    def _write(
        self, fn: Callable[[sqlite3.Connection], T], durable: bool = False
    ) -> asyncio.Future[T]:
        assert self._loop is not None
        self._flush_output()  # buffered output keeps its place before any later write
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((fn, fut, durable))
        return fut

    def _flush_output(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._output:
            return
        rows, self._output = self._output, []
        self._queue.put(
            (
                lambda conn: conn.executemany(
                    "INSERT OR REPLACE INTO output VALUES (?, ?, ?, ?)", rows
                ),
                None,
                False,
            )
        )

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._reader is not None
        reader = self._reader
        return await asyncio.get_running_loop().run_in_executor(self._read_pool, lambda: fn(reader))

    async def insert(self, job: Job) -> int:
        return (await self.insert_many([job]))[0]

    def insert_many(self, jobs: Sequence[Job]) -> asyncio.Future[list[int]]:
        """Accept jobs durably, all or none. Queued at once, before any later write; the future
        gives their sequence numbers once they are on disk. A job may arrive already RUNNING
        (placed at once): its node, attempt and start time are recorded with it."""
        rows = [
            (
                job.id,
                job.spec.task_type,
                job.spec.payload,
                job.spec.timeout_s,
                job.spec.priority,
                _json_map(job.spec.metadata),
                job.spec.max_retries,
                job.status.value,
                _ts(job.created_at),
                _ts(job.started_at),
                job.worker_id,
                job.attempt,
                _json_map(job.spec.selector),
                job.spec.node_id,
                job.spec.broadcast_id,
                job.spec.idempotency_key,
                request_hash(job.spec) if job.spec.idempotency_key else "",
                int(job.spec.retry_on_failure),
                job.spec.queue_timeout_s,
                job.spec.owner,
                json.dumps(asdict(job.spec.limits)) if job.spec.limits.any else NO_LIMITS_JSON,
            )
            for job in jobs
        ]
        started = [
            (job.id, job.attempt, job.worker_id, _ts(job.started_at))
            for job in jobs
            if job.status == JobStatus.RUNNING
        ]

        def op(conn: sqlite3.Connection) -> list[int]:
            conn.execute("SAVEPOINT insert_many")
            seqs = []
            try:
                for row in rows:
                    cur = conn.execute(
                        "INSERT INTO jobs (id, task_type, payload, timeout_s, priority, metadata,"
                        " max_retries, status, created_at, started_at, worker_id, attempt,"
                        " selector, node_pin, broadcast_id, idempotency_key, request_hash,"
                        " retry_on_failure, queue_timeout_s, owner, limits)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        row,
                    )
                    assert cur.lastrowid is not None
                    seqs.append(cur.lastrowid)
                conn.executemany(_START_ATTEMPT, started)
            except BaseException:
                conn.execute("ROLLBACK TO insert_many")
                raise
            finally:
                conn.execute("RELEASE insert_many")
            return seqs

        return self._write(op, durable=True)

    async def mark_running(
        self, job_id: JobId, worker_id: str, attempt: int, started_at: datetime
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE jobs SET status = 'RUNNING', worker_id = ?, attempt = ?, started_at = ?"
                " WHERE id = ?",
                (worker_id, attempt, _ts(started_at), job_id),
            )
            conn.execute(_START_ATTEMPT, (job_id, attempt, worker_id, _ts(started_at)))

        await self._write(op)

    def append_output(self, job_id: JobId, chunk: OutputChunk) -> None:
        """Not awaited. Buffered until the next write (or OUTPUT_FLUSH_S), so a short job's
        output goes to disk with its final state, in one commit; always ordered before any
        later write. A master crash loses only what its workers can send again."""
        self._output.append((job_id, chunk.stream.value, chunk.offset, chunk.data))
        if self._flush_timer is None:
            assert self._loop is not None
            self._flush_timer = self._loop.call_later(OUTPUT_FLUSH_S, self._flush_output)

    async def finish(
        self,
        job: Job,
        expect_attempt: int | None,
        attempt_outcome: AttemptOutcome | None = None,
    ) -> bool:
        """Record a terminal state; with ``expect_attempt``, only if that attempt is current.
        The last attempt ends as the job did, or as ``attempt_outcome`` says."""
        ended_as = (attempt_outcome or AttemptOutcome(job.status.value)).value
        values = (
            job.status.value, job.worker_id, _ts(job.started_at), _ts(job.completed_at),
            job.exit_code, job.error, job.stdout_bytes, job.stderr_bytes, int(job.truncated),
            job.retries, _json_map(job.result_metadata), job.id,
        )  # fmt: skip
        guard = "" if expect_attempt is None else f" AND attempt = {int(expect_attempt)}"

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE jobs SET status = ?, worker_id = ?, started_at = ?, completed_at = ?,"
                " exit_code = ?, error = ?, stdout_bytes = ?, stderr_bytes = ?, truncated = ?,"
                " retries = ?, result_metadata = ? WHERE id = ?"
                " AND status IN ('PENDING', 'RUNNING')" + guard,
                values,
            )
            if cur.rowcount == 1 and job.attempt > 0:
                detail = job.error or (
                    f"exit code {job.exit_code}" if job.exit_code is not None else ""
                )
                conn.execute(
                    _END_ATTEMPT,
                    (_ts(job.completed_at), ended_as, detail, job.id, job.attempt),
                )
            return cur.rowcount == 1

        return await self._write(op)

    async def requeue(
        self,
        job_id: JobId,
        retries: int,
        error: str,
        ended: AttemptRecord | None = None,
        worker_losses: int = 0,
    ) -> None:
        """Queue the job again; ``ended`` is how its last attempt ended."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE jobs SET status = 'PENDING', retries = ?, error = ?, worker_id = '',"
                " started_at = NULL, worker_losses = ? WHERE id = ?",
                (retries, error, worker_losses, job_id),
            )
            conn.execute("DELETE FROM output WHERE job_id = ?", (job_id,))
            if ended is not None and ended.outcome is not None:
                conn.execute(
                    _END_ATTEMPT,
                    (_ts(ended.ended_at), ended.outcome.value, ended.detail, job_id, ended.attempt),
                )

        await self._write(op)

    def note_attempt(self, job_id: JobId, attempt: int, detail: str) -> None:
        """Add to the history of a superseded attempt (one that is not the job's current
        one), once: a late result, a stale process. Not awaited."""
        self._flush_output()
        self._queue.put(
            (
                lambda conn: conn.execute(
                    "UPDATE attempts SET detail ="
                    " CASE detail WHEN '' THEN ? ELSE detail || '; ' || ? END"
                    " WHERE job_id = ? AND attempt = ? AND instr(detail, ?) = 0"
                    " AND attempt < (SELECT attempt FROM jobs WHERE id = ?)",
                    (detail, detail, job_id, attempt, detail, job_id),
                ),
                None,
                False,
            )
        )

    async def get(self, job_id: JobId, with_output: bool = True) -> Job | None:
        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                return None
            attempts = tuple(
                _attempt_from_row(r)
                for r in conn.execute(
                    "SELECT attempt, node_id, started_at, ended_at, outcome, detail FROM attempts"
                    " WHERE job_id = ? ORDER BY attempt",
                    (job_id,),
                )
            )
            if not with_output:
                return _job_from_row(row, attempts=attempts)
            parts: dict[int, list[bytes]] = {0: [], 1: []}
            ends = {0: 0, 1: 0}
            for stream, offset, data in conn.execute(
                "SELECT stream, offset, data FROM output WHERE job_id = ? ORDER BY stream, offset",
                (job_id,),
            ):
                if offset > ends[stream]:  # between the kept head and tail
                    parts[stream].append(omitted(offset - ends[stream]))
                parts[stream].append(data)
                ends[stream] = offset + len(data)
            return _job_from_row(row, b"".join(parts[0]), b"".join(parts[1]), attempts)

        return await self._read(op)

    async def list_jobs(
        self,
        limit: int,
        offset: int,
        status: JobStatus | None,
        broadcast_id: str = "",
        owner: str | None = None,
    ) -> tuple[list[Job], int]:
        clauses, params = [], []
        if owner is not None:
            clauses.append("owner = ?")
            params.append(owner)
        if status:
            clauses.append("status = ?")
            params.append(status.value)
        if broadcast_id:
            clauses.append("broadcast_id = ?")
            params.append(broadcast_id)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        args = tuple(params)

        def op(conn: sqlite3.Connection) -> tuple[list[Job], int]:
            total = conn.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            return [_job_from_row(r) for r in rows], total

        return await self._read(op)

    async def find_by_key(self, key: str, since: datetime) -> tuple[JobId, str] | None:
        """The newest job created with this idempotency key since ``since``: (id, hash)."""

        def op(conn: sqlite3.Connection) -> tuple[JobId, str] | None:
            row = conn.execute(
                "SELECT id, request_hash FROM jobs WHERE idempotency_key = ? AND created_at >= ?"
                " ORDER BY seq DESC LIMIT 1",
                (key, _ts(since)),
            ).fetchone()
            return None if row is None else (JobId(row[0]), row[1])

        return await self._read(op)

    async def unfinished(self) -> list[tuple[int, Job]]:
        def op(conn: sqlite3.Connection) -> list[tuple[int, Job]]:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN ('PENDING', 'RUNNING')"
                " ORDER BY seq"
            ).fetchall()
            return [(r[0], _job_from_row(r)) for r in rows]

        return await self._read(op)

    async def output_ends(self, job_id: JobId) -> dict[Stream, int]:
        """Where each stream's stored output ends (0: nothing stored)."""

        def op(conn: sqlite3.Connection) -> dict[Stream, int]:
            ends = dict.fromkeys(Stream, 0)
            for stream, end in conn.execute(
                "SELECT stream, MAX(offset + length(data)) FROM output WHERE job_id = ?"
                " GROUP BY stream",
                (job_id,),
            ):
                ends[Stream(stream)] = end
            return ends

        return await self._read(op)

    async def read_output(self, job_id: JobId, offsets: Mapping[Stream, int]) -> list[OutputChunk]:
        """Stored output from ``offsets`` on, after every write queued before this call."""

        def op(conn: sqlite3.Connection) -> list[OutputChunk]:
            chunks = []
            for stream, offset, data in conn.execute(
                "SELECT stream, offset, data FROM output WHERE job_id = ? ORDER BY offset",
                (job_id,),
            ):
                s = Stream(stream)
                start = offsets.get(s, 0)
                if offset + len(data) > start:
                    cut = max(0, start - offset)
                    chunks.append(OutputChunk(s, offset + cut, data[cut:]))
            return chunks

        return await self._write(op)


class _BatchLost(Exception):
    """A write of the batch failed and SQLite rolled back the batch's transaction with it."""


def _resolve(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
