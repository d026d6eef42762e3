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
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

from dist_exec.errors import DistExecError, StoreFull, StoreUnavailable
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
log = logging.getLogger(__name__)
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
SCHEMA_VERSION = 1
MAX_BATCH = 2000
KEYS_PER_QUERY = 500  # (SQLite allows 32,766 parameters a statement)
RETRY_MIN_S = 0.05  # writes the database failed are tried again after this, doubling to
RETRY_MAX_S = 1.0
REPORT_EVERY_S = 60.0  # while writes fail, the log says so again this often
BACKLOG_OUTPUT_BYTES = 256 * 1024 * 1024  # output that may wait for the database (see _Backlog)
# How long a write waits for a lock another process holds on the file (the master is its only
# writer: someone's sqlite3 shell, say) before it counts as a failure of the database.
BUSY_TIMEOUT_S = 5.0
# A batch that has run longer than this without an answer from the disk (a hung fsync, a
# stalled network volume: no error comes) counts as trouble too: see ``stalled``.
STALL_S = 15.0  # (longer than BUSY_TIMEOUT_S: a lock held elsewhere is a failure before)
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
-- The worker process each attempt was started on (see NodeInfo.instance). A table of its own:
-- an earlier version, rolled back to, inserts attempts rows by position.
CREATE TABLE IF NOT EXISTS attempt_instances (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    instance TEXT NOT NULL,
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

    trouble: str | None  # why writes fail now, while they do (then state changes wait)

    async def insert(self, job: Job) -> int: ...
    def insert_many(
        self, jobs: Sequence[Job], instances: Mapping[JobId, str] | None = None
    ) -> asyncio.Future[list[int]]: ...
    async def mark_running(
        self,
        job_id: JobId,
        worker_id: str,
        attempt: int,
        started_at: datetime,
        instance: str = "",
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
    async def prune(self, ended_before: datetime, keyed_before: datetime, limit: int) -> int: ...
    async def find_by_keys(
        self, keys: Collection[str], since: datetime, owner: str
    ) -> dict[str, tuple[JobId, str]]: ...
    async def read_output(
        self, job_id: JobId, offsets: Mapping[Stream, int], settled: bool = False
    ) -> list[OutputChunk]: ...
    async def output_ends(self, job_id: JobId) -> dict[Stream, int]: ...
    async def running_instances(self) -> dict[JobId, str]: ...


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


_START_ATTEMPT = (
    "INSERT OR REPLACE INTO attempts (job_id, attempt, node_id, started_at) VALUES (?, ?, ?, ?)"
)
_ATTEMPT_INSTANCE = "INSERT OR REPLACE INTO attempt_instances VALUES (?, ?, ?)"
_END_ATTEMPT = (
    "UPDATE attempts SET ended_at = ?, outcome = ?, detail = ?"
    " WHERE job_id = ? AND attempt = ? AND outcome IS NULL"
)


class SqliteJobStore:
    """The default JobStore. Use as ``async with SqliteJobStore(path) as store``."""

    def __init__(self, path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        # (operation, future or None, must be fsynced before the future resolves)
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        # Why the database cannot be written now, while it cannot (set by the writer thread).
        self.trouble: str | None = None
        self._synchronous = "FULL"
        self._output: list[tuple[str, int, int, bytes]] = []  # appended, not yet queued
        self._flush_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_pool = ThreadPoolExecutor(1, thread_name_prefix="store-read")
        self._backlog = _Backlog(path)  # (the writer thread's; read for its output bytes)
        self._queued_output = 0  # bytes of output queued for the writer, not taken yet
        self._queued_lock = threading.Lock()
        self._broken: BaseException | None = None  # why the writer thread stopped, if it did
        self._inflight: list[_Op] = []  # the batch the writer thread is running
        self._batch_since = 0.0  # monotonic time the running batch began (0: none runs)

    async def __aenter__(self) -> SqliteJobStore:
        private_dir(self.path.parent)
        # SQLite creates its -wal, -shm and -journal files with the database file's mode.
        os.close(open_private(self.path, os.O_RDWR))
        for suffix in SQLITE_SIDE_FILES:
            private_file(self.path.with_name(self.path.name + suffix))
        self._loop = asyncio.get_running_loop()
        write_conn: sqlite3.Connection | None = None
        try:
            write_conn = self._connect(check_same_thread=False)  # only the writer thread's
            self._prepare(write_conn)
            self._reader = self._connect(check_same_thread=False)
        except sqlite3.Error as exc:
            if write_conn is not None:
                write_conn.close()
            raise DistExecError(_open_error(self.path, exc)) from None
        self._writer = threading.Thread(
            target=self._write_loop, args=(write_conn,), name="store-write", daemon=True
        )
        self._writer.start()
        return self

    @staticmethod
    def _prepare(write_conn: sqlite3.Connection) -> None:
        """The schema in place, as this version has it."""
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
        # Ended jobs, for pruning: those with an idempotency key apart (they are kept longer,
        # and must not be scanned again at every slice meanwhile).
        write_conn.execute("DROP INDEX IF EXISTS jobs_by_end")  # (one for both, before)
        write_conn.execute(
            "CREATE INDEX IF NOT EXISTS jobs_ended ON jobs (completed_at) "
            "WHERE completed_at IS NOT NULL AND idempotency_key = ''"
        )
        write_conn.execute(
            "CREATE INDEX IF NOT EXISTS jobs_ended_keyed ON jobs (completed_at) "
            "WHERE completed_at IS NOT NULL AND idempotency_key != ''"
        )
        write_conn.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )

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
            self.path,
            isolation_level=None,
            check_same_thread=check_same_thread,
            timeout=self.busy_timeout_s,
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        """Run queued writes in batches, one transaction each. While the database cannot be
        written, the writes that mirror the master's state wait (``_Backlog``) and are tried
        again in order, a batch at a time, after a backoff; the others fail at once (see
        ``_Op.keep``)."""
        backlog = self._backlog
        try:
            self._serve(conn, backlog)
        except BaseException as exc:  # a bug: every write from now on fails, and says why
            log.critical("the job database's writer stopped", exc_info=True)
            self._broken = exc
            self._fail_all([*self._inflight, *backlog.ops])
            backlog.ops = []
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection, backlog: _Backlog) -> None:
        stopping = False
        while not stopping:
            if not backlog.ops:
                batch, stopping = self._collect()
                if not batch:
                    break  # closing
                failure = self._run_batch(conn, batch)
                if failure is not None:
                    self.trouble = _describe(failure)
                    backlog.began(self._fail_others(batch, failure), failure)
                continue
            stopping = self._gather(backlog)
            if stopping:
                break  # (one last try, below)
            while backlog.ops:  # in order, a batch at a time: each one that goes in stays in
                failure = self._run_batch(conn, backlog.ops[:MAX_BATCH])
                if failure is not None:
                    self.trouble = _describe(failure)
                    backlog.failed(failure)
                    break
                backlog.written(MAX_BATCH)
        if backlog.ops:
            self._last_try(conn, backlog.ops)

    def _stopped(self) -> StoreUnavailable:
        """What every write gets once the writer thread has stopped (a bug)."""
        return StoreUnavailable(
            f"the job database's writer stopped ({self._broken!r}); restart the master"
        )

    def _fail_all(self, ops: list[_Op]) -> None:
        """Fail these writes and every one queued, now and later (see ``_write``)."""
        error = self._stopped()
        pending: list[_Op | None] = list(ops)
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        assert self._loop is not None
        for op in pending:
            if op is not None and op.fut is not None:
                with contextlib.suppress(RuntimeError):  # (a loop already closed)
                    self._loop.call_soon_threadsafe(_resolve, op.fut, None, error)

    def _collect(self) -> tuple[list[_Op], bool]:
        """The next batch (waits for its first write); and whether the store is closing."""
        item = self._queue.get()
        if item is None:
            return [], True
        batch = [item]
        while len(batch) < MAX_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._taken(batch)
                return batch, True
            batch.append(item)
        self._taken(batch)
        return batch, False

    def _taken(self, ops: list[_Op]) -> None:
        """These writes are off the queue (their output no longer counts as queued)."""
        taken = sum(op.output_bytes for op in ops)
        if taken:
            with self._queued_lock:
                self._queued_output -= taken

    def _gather(self, backlog: _Backlog) -> bool:
        """Until the backlog's next try: writes that must be kept join it, the others fail at
        once (the database is not tried for them before then). Whether the store is closing."""
        while (left := backlog.next_try - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if item is None:
                return True
            self._taken([item])
            if item.keep:
                backlog.add(item)
            elif item.fut is not None:
                assert self._loop is not None
                assert backlog.failure is not None
                self._loop.call_soon_threadsafe(
                    _resolve, item.fut, None, self._error(backlog.failure)
                )
        return False

    def _last_try(self, conn: sqlite3.Connection, waiting: list[_Op]) -> None:
        """The master stops: write what waits once more, or say what is left out."""
        failure = self._run_batch(conn, waiting)
        if failure is None:
            return
        log.error(
            "the master stops with %d state changes not written (%s); its next start "
            "recovers their jobs from what was written",
            len(waiting),
            _describe(failure),
        )
        self._fail_others([op._replace(keep=False) for op in waiting], failure)

    def _fail_others(self, batch: list[_Op], failure: BaseException) -> list[_Op]:
        """Fail the batch's writes that are not kept; returns the kept ones."""
        assert self._loop is not None
        error = self._error(failure)
        kept = []
        for op in batch:
            if op.keep:
                kept.append(op)
            elif op.fut is not None:
                self._loop.call_soon_threadsafe(_resolve, op.fut, None, error)
        return kept

    def _error(self, failure: BaseException) -> BaseException:
        """What a write that failed with the database tells its caller."""
        if not isinstance(failure, sqlite3.Error) or not _transient(failure):
            return failure
        detail = f"the master cannot write its database {self.path}: {_describe(failure)}"
        if _primary(failure) == sqlite3.SQLITE_FULL:
            return StoreFull(f"{detail}; free space there, then try again")
        return StoreUnavailable(f"{detail}; try again later")

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> BaseException | None:
        """Run the batch in one transaction and resolve its futures; or, when the database
        could not take it, roll all of it back and return why (nothing is resolved then).
        A write that fails by itself (a constraint) fails alone; the rest commits."""
        results: list[tuple[asyncio.Future[Any] | None, Any, BaseException | None]] = []
        synchronous = "FULL" if any(op.durable for op in batch) else "NORMAL"
        self._inflight = batch  # (until it is resolved: failed if the writer stops meanwhile)
        started = self._batch_since = time.monotonic()
        try:
            if conn.in_transaction:  # a ROLLBACK that failed before
                conn.execute("ROLLBACK")
            if synchronous != self._synchronous:
                conn.execute(f"PRAGMA synchronous={synchronous}")
                self._synchronous = synchronous
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                conn.execute("SAVEPOINT op")  # each write holds whole or not at all
                try:
                    results.append((op.fut, op.fn(conn), None))
                except Exception as exc:
                    if not conn.in_transaction or (
                        isinstance(exc, sqlite3.Error) and _transient(exc)
                    ):
                        # The database failed (disk full, an I/O error), not this write: SQLite
                        # may have rolled the transaction back already, and what follows must
                        # not run outside it.
                        raise _BatchLost() from exc
                    conn.execute("ROLLBACK TO op")
                    results.append((op.fut, None, exc))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except (sqlite3.Error, _BatchLost) as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # (the writer must go on either way)
                    conn.execute("ROLLBACK")
            return exc.__cause__ or exc
        finally:
            self._batch_since = 0.0
        self.trouble = None  # (before any caller hears of its write)
        if time.monotonic() - started > STALL_S and not self._backlog.ops:
            self._backlog.answered(time.monotonic() - started)
        assert self._loop is not None
        for fut, value, error in results:
            if fut is not None:
                self._loop.call_soon_threadsafe(_resolve, fut, value, error)
        self._inflight = []
        return None

    def _write(
        self, fn: Callable[[sqlite3.Connection], T], durable: bool = False, keep: bool = False
    ) -> asyncio.Future[T]:
        assert self._loop is not None
        self._flush_output()  # buffered output keeps its place before any later write
        fut: asyncio.Future[T] = self._loop.create_future()
        if self._broken is not None:
            fut.set_exception(self._stopped())
            return fut
        if not keep and (stalled := self.stalled()):  # fails at once, as in an outage
            fut.set_exception(
                StoreUnavailable(
                    f"the master cannot write its database: {stalled}; try again later"
                )
            )
            return fut
        self._queue.put(_Op(fn, fut, durable, keep))
        return fut

    def stalled(self) -> str | None:
        """Why the writer is stuck, when a batch has waited for the disk longer than STALL_S
        (a disk that hangs gives no error: ``trouble`` stays unset)."""
        since = self._batch_since
        if not since or (waited := time.monotonic() - since) <= STALL_S:
            return None
        return f"{self.path} has not answered a write for {waited:.0f}s (a hung disk?)"

    def _flush_output(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._output:
            return
        rows, self._output = self._output, []
        size = sum(len(row[3]) for row in rows)
        with self._queued_lock:
            if self._queued_output + self._backlog.output_bytes + size > BACKLOG_OUTPUT_BYTES and (
                self.trouble is not None or self.stalled()
            ):
                self._backlog.drop(size)  # (the writer is stuck: it would pile up here)
                return
            self._queued_output += size
        self._queue.put(
            _Op(
                lambda conn: conn.executemany(
                    "INSERT OR REPLACE INTO output VALUES (?, ?, ?, ?)", rows
                ),
                keep=True,
                output_bytes=size,
            )
        )

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._reader is not None
        reader = self._reader
        return await asyncio.get_running_loop().run_in_executor(self._read_pool, lambda: fn(reader))

    async def insert(self, job: Job) -> int:
        return (await self.insert_many([job]))[0]

    def insert_many(
        self, jobs: Sequence[Job], instances: Mapping[JobId, str] | None = None
    ) -> asyncio.Future[list[int]]:
        """Accept jobs durably, all or none. Queued at once, before any later write; the future
        gives their sequence numbers once they are on disk. A job may arrive already RUNNING
        (placed at once): its node (and the ``instances`` of its process), attempt and start
        time are recorded with it."""
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
        on = [
            (job.id, job.attempt, (instances or {})[job.id])
            for job in jobs
            if job.status == JobStatus.RUNNING and (instances or {}).get(job.id)
        ]

        def op(conn: sqlite3.Connection) -> list[int]:
            seqs = []
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
            conn.executemany(_ATTEMPT_INSTANCE, on)
            return seqs

        return self._write(op, durable=True)

    async def mark_running(
        self,
        job_id: JobId,
        worker_id: str,
        attempt: int,
        started_at: datetime,
        instance: str = "",
    ) -> None:
        """``instance``: of the worker's process it is started on (see NodeInfo)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE jobs SET status = 'RUNNING', worker_id = ?, attempt = ?, started_at = ?"
                " WHERE id = ?",
                (worker_id, attempt, _ts(started_at), job_id),
            )
            conn.execute(_START_ATTEMPT, (job_id, attempt, worker_id, _ts(started_at)))
            if instance:
                conn.execute(_ATTEMPT_INSTANCE, (job_id, attempt, instance))

        await self._write(op, keep=True)

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

        return await self._write(op, keep=True)

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

        await self._write(op, keep=True)

    def note_attempt(self, job_id: JobId, attempt: int, detail: str) -> None:
        """Add to the history of a superseded attempt (one that is not the job's current
        one), once: a late result, a stale process. Not awaited."""
        self._flush_output()
        self._queue.put(
            _Op(
                lambda conn: conn.execute(
                    "UPDATE attempts SET detail ="
                    " CASE detail WHEN '' THEN ? ELSE detail || '; ' || ? END"
                    " WHERE job_id = ? AND attempt = ? AND instr(detail, ?) = 0"
                    " AND attempt < (SELECT attempt FROM jobs WHERE id = ?)",
                    (detail, detail, job_id, attempt, detail, job_id),
                ),
                keep=True,
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
            if row[11] is not None:  # ended: what its streams held past the stored end
                for stream, total in ((0, row[17]), (1, row[18])):
                    if total > ends[stream]:
                        parts[stream].append(omitted(total - ends[stream]))
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

    async def find_by_keys(
        self, keys: Collection[str], since: datetime, owner: str
    ) -> dict[str, tuple[JobId, str]]:
        """For each of ``owner``'s idempotency keys, the newest job it created with it since
        ``since``: (id, hash); keys without one are left out. One query per KEYS_PER_QUERY
        keys."""
        wanted = list(keys)

        def op(conn: sqlite3.Connection) -> dict[str, tuple[JobId, str]]:
            found: dict[str, tuple[JobId, str]] = {}
            for start in range(0, len(wanted), KEYS_PER_QUERY):
                part = wanted[start : start + KEYS_PER_QUERY]
                marks = ", ".join("?" * len(part))
                for key, job_id, digest in conn.execute(
                    "SELECT idempotency_key, id, request_hash FROM jobs"
                    f" WHERE idempotency_key IN ({marks}) AND owner = ? AND created_at >= ?"
                    " ORDER BY seq",
                    (*part, owner, _ts(since)),
                ):
                    found[key] = (JobId(job_id), digest)  # (the newest comes last)
            return found

        return await self._read(op)

    async def unfinished(self) -> list[tuple[int, Job]]:
        def op(conn: sqlite3.Connection) -> list[tuple[int, Job]]:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN ('PENDING', 'RUNNING')"
                " ORDER BY seq"
            ).fetchall()
            return [(r[0], _job_from_row(r)) for r in rows]

        return await self._read(op)

    async def prune(self, ended_before: datetime, keyed_before: datetime, limit: int) -> int:
        """Delete up to ``limit`` jobs that ended before ``ended_before`` (a job with an
        idempotency key only once it also ended before ``keyed_before``: it was created
        earlier still, and its key is honoured until then), with their output and history.
        Returns how many went."""
        ended, keyed = _ts(ended_before), _ts(min(ended_before, keyed_before))

        def op(conn: sqlite3.Connection) -> int:
            ids = [
                (row[0],)
                for row in conn.execute(
                    "SELECT id FROM jobs WHERE completed_at < ? AND idempotency_key = '' LIMIT ?",
                    (ended, limit),
                )
            ]
            ids += [
                (row[0],)
                for row in conn.execute(
                    "SELECT id FROM jobs WHERE completed_at < ? AND idempotency_key != '' LIMIT ?",
                    (keyed, limit - len(ids)),
                )
            ]
            conn.executemany("DELETE FROM output WHERE job_id = ?", ids)
            conn.executemany("DELETE FROM attempts WHERE job_id = ?", ids)
            conn.executemany("DELETE FROM attempt_instances WHERE job_id = ?", ids)
            conn.executemany("DELETE FROM jobs WHERE id = ?", ids)
            return len(ids)

        return await self._write(op)

    async def running_instances(self) -> dict[JobId, str]:
        """For each RUNNING job, the worker process its current attempt was started on."""

        def op(conn: sqlite3.Connection) -> dict[JobId, str]:
            return {
                JobId(job_id): instance
                for job_id, instance in conn.execute(
                    "SELECT a.job_id, a.instance FROM jobs j JOIN attempt_instances a"
                    " ON a.job_id = j.id AND a.attempt = j.attempt WHERE j.status = 'RUNNING'"
                )
            }

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

    async def read_output(
        self, job_id: JobId, offsets: Mapping[Stream, int], settled: bool = False
    ) -> list[OutputChunk]:
        """Stored output from ``offsets`` on, after every write queued before this call; or,
        when ``settled`` (a job whose end is committed: nothing of it is queued), as committed,
        from the reader (which goes on while writes cannot be made)."""

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

        return await (self._read(op) if settled else self._write(op))


class _Op(NamedTuple):
    """A queued write: run by the writer thread inside a batch's transaction."""

    fn: Callable[[sqlite3.Connection], Any]
    fut: asyncio.Future[Any] | None = None  # its result, when someone waits for it
    durable: bool = False  # fsynced (synchronous=FULL) before ``fut`` resolves
    # Kept through database failures and tried again until written: the writes that mirror
    # state the master has already acted on (a job started, retried or ended; output). The
    # others (accepting jobs, reads) fail at once: their caller can answer and retry.
    keep: bool = False
    output_bytes: int = 0  # (of a write of output: what it holds)


class _Backlog:
    """The kept writes that wait while the database cannot be written, oldest first, and
    when to try them again. Output waits up to BACKLOG_OUTPUT_BYTES; more is dropped (the
    stored output then has a gap, marked where it is read), so that an outage cannot take
    the master's memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ops: list[_Op] = []
        self.output_bytes = 0
        self.dropped = 0  # output bytes dropped in this outage
        self.failure: BaseException | None = None
        self.delay = RETRY_MIN_S
        self.next_try = self.since = self.reported = 0.0

    def began(self, kept: list[_Op], failure: BaseException) -> None:
        """A batch failed: its kept writes begin the backlog (if it has any)."""
        now = time.monotonic()
        if not kept:
            log.error("cannot write the database %s: %s", self.path, _describe(failure))
            return
        log.error(
            "cannot write the database %s: %s; the master's state changes wait in memory and "
            "are tried again until they can be written, and new jobs are refused meanwhile",
            self.path,
            _describe(failure),
        )
        self.since = self.reported = now
        self.delay = RETRY_MIN_S
        for op in kept:
            self.add(op)
        self.failed(failure)

    def add(self, op: _Op) -> None:
        if op.output_bytes and self.output_bytes + op.output_bytes > BACKLOG_OUTPUT_BYTES:
            self.drop(op.output_bytes)
            return
        self.ops.append(op)
        self.output_bytes += op.output_bytes

    def drop(self, size: int) -> None:
        """Output that is not kept (the limit is reached)."""
        if not self.dropped:
            log.error(
                "more than %d MiB of output waits for the database %s: further output of "
                "running jobs is not kept until it can be written",
                BACKLOG_OUTPUT_BYTES // 2**20,
                self.path,
            )
        self.dropped += size

    def failed(self, failure: BaseException) -> None:
        now = time.monotonic()
        self.failure = failure
        self.next_try = now + self.delay
        self.delay = min(self.delay * 2, RETRY_MAX_S)
        if now - self.reported >= REPORT_EVERY_S:
            self.reported = now
            log.error(
                "still cannot write the database %s after %.0fs: %s; %d writes wait",
                self.path,
                now - self.since,
                _describe(failure),
                len(self.ops),
            )

    def answered(self, took: float) -> None:
        """A write the disk held up for ``took`` seconds (and no error) went in at last."""
        log.warning(
            "the database %s answered a write after %.1fs%s",
            self.path,
            took,
            f"; {self.dropped} bytes of output were not kept meanwhile" if self.dropped else "",
        )
        self.dropped = 0

    def written(self, count: int) -> None:
        """The first ``count`` waiting writes are in the database."""
        done, self.ops = self.ops[:count], self.ops[count:]
        self.output_bytes -= sum(op.output_bytes for op in done)
        if not self.ops:
            log.warning(
                "the database %s can be written again, after %.1fs%s",
                self.path,
                time.monotonic() - self.since,
                f"; {self.dropped} bytes of output were not kept meanwhile" if self.dropped else "",
            )
            self.delay, self.failure, self.dropped = RETRY_MIN_S, None, 0


class _BatchLost(Exception):
    """The database failed a write of the batch, and the batch's transaction with it."""


# Primary result codes of failures of the database rather than of one write: the disk, the
# file system, locks, memory. (A constraint or a corrupt file is not cured by waiting.)
_TRANSIENT = {
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL,
}  # fmt: skip


def _open_error(path: Path, exc: sqlite3.Error) -> str:
    """Why the job database cannot be opened, and what to do: only a damaged file is worth
    moving away (that starts without every job it holds)."""
    if _primary(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return (
            f"cannot open the job database {path}: {_describe(exc)} (a damaged file: restore "
            "it from a backup, or move it and its -wal file away to start empty)"
        )
    if _transient(exc):
        return (
            f"cannot open the job database {path}: {_describe(exc)} (another process holding "
            "it, a full or failing disk: mend that and start again)"
        )
    return f"cannot open the job database {path}: {_describe(exc)}"


def _primary(exc: sqlite3.Error) -> int:
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def _transient(exc: sqlite3.Error) -> bool:
    return _primary(exc) in _TRANSIENT


def _describe(failure: BaseException) -> str:
    text = str(failure) or type(failure).__name__
    if not isinstance(failure, sqlite3.Error):
        return text
    if getattr(failure, "sqlite_errorcode", 0) == sqlite3.SQLITE_READONLY_DBMOVED:
        return (
            f"{text} (its file was moved or deleted while the master ran: put it back, or "
            "stop the master and start it again)"
        )
    if _primary(failure) == sqlite3.SQLITE_IOERR:  # (which step: a write, an fsync, ...)
        return f"{text} ({getattr(failure, 'sqlite_errorname', 'SQLITE_IOERR')})"
    return text


def _resolve(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
