"""A fault-injection workload: many short shell jobs that leave a trace of every real execution.

Each job runs ``sh -c`` with a script that appends ``TOKEN start PID WORKER`` to a ledger file,
sleeps, appends ``TOKEN end PID WORKER`` and prints its PID. So, per job:

- an *execution* is one process that wrote a ``start`` line (WORKER is the pid of the worker
  that started it: its parent, or its parent's parent when the worker's command spawner is the
  parent);
- a *completed execution* is one that also wrote its ``end`` line (it did its whole side effect);
- the *accepted outcome* is the job's terminal record in the master's store; for a COMPLETED job
  its stdout names the execution whose result was accepted.

Every process of the workload carries ``DIST_EXEC_FAULT_MARK=<unique mark>`` in its environment
(the shell, its ``sleep`` and anything else it starts), so processes left behind are found by
scanning ``/proc`` for the mark.

``Workload.verify`` counts, and raises one of the errors below (first failing kind first):

- ``LostJobs``: a submitted job that is missing, not in a terminal state at the deadline, or
  not in the state the scenario expects (normally COMPLETED);
- ``DuplicateOutcome``: a job whose accepted outcome changed after it was first seen final;
  or a COMPLETED job whose attempt history does not have exactly one COMPLETED attempt, the
  one the job reports; or whose accepted outcome names no execution that completed (a result
  from nowhere), or one spawned by another worker than the one the master credits;
- ``ExtraRuns``: a COMPLETED job with a completed execution besides the accepted one, other than
  the ones a fault legitimately cut off: an execution on a worker the scenario killed (or cut
  off) that wrote its ``end`` line *before* the fault (at-least-once: the side effect happened,
  the result never reached the master, so the job is retried). An ``end`` written after the
  fault by such a worker's process means the process outlived its worker and kept working;
- ``OrphansLeft``: a process with the mark still running once every job has ended (after the
  kill grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import time
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dist_exec import procfs
from dist_exec.client import Client, command_spec
from dist_exec.errors import DistExecError
from dist_exec.executors.spawner import COMM as SPAWNER_COMM
from dist_exec.models import AttemptOutcome, Job, JobId, JobStatus, TaskSpec

MARK_ENV = "DIST_EXEC_FAULT_MARK"
TERMINAL = frozenset(
    {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMEOUT}
)
KILL_GRACE_S = 5.0  # the worker's TERM-then-KILL grace (WorkerConfig.kill_grace_s)


class LostJobs(AssertionError):
    """A submitted job did not reach the expected final state."""


class DuplicateOutcome(AssertionError):
    """A job has more than one accepted outcome, or one no execution produced."""


class ExtraRuns(AssertionError):
    """A completed job ran to completion more than once beyond what a fault explains."""


class OrphansLeft(AssertionError):
    """Processes of the workload outlived their jobs."""


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault injected at a point of the ledger: executions of ``workers`` (by pid) that had
    not written their ``end`` line by ``ledger_mark`` lines were cut off by it."""

    workers: frozenset[int]
    ledger_mark: int


@dataclass(slots=True)
class Execution:
    token: str
    pid: int
    ppid: int
    start_line: int
    end_line: int | None = None


@dataclass(frozen=True, slots=True)
class MarkedProcess:
    pid: int
    ppid: int
    cmdline: str


@dataclass(slots=True)
class Report:
    submitted: int = 0
    finished: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    extra_runs: list[str] = field(default_factory=list)
    cut_off_runs: int = 0  # completed executions a fault explains (see Fault)
    orphans: list[MarkedProcess] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"submitted={self.submitted} finished={self.finished} lost={len(self.lost)} "
            f"duplicated={len(self.duplicated)} extra_runs={len(self.extra_runs)} "
            f"cut_off_runs={self.cut_off_runs} orphans={len(self.orphans)}"
        )


def spawners() -> dict[int, int]:
    """Pid -> parent pid (the worker) of every live command spawner."""
    found = {}
    for pid in procfs.pids():
        with contextlib.suppress(OSError):
            if (Path(f"/proc/{pid}/comm").read_text().strip() == SPAWNER_COMM) and (
                fields := procfs.stat(pid)
            ):
                found[pid] = int(fields[1])
    return found


def marked_processes(mark: str) -> list[MarkedProcess]:
    """Live (non-zombie) processes whose environment carries ``MARK_ENV=mark``."""
    needle = f"{MARK_ENV}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            if needle not in environ.split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        found.append(MarkedProcess(int(entry.name), int(fields[1]), cmdline.strip()))
    return found


class Workload:
    """Jobs of one scenario, their ledger, and the checks of 0 lost, 0 duplicated, 0 orphans."""

    def __init__(self, tmp: Path, name: str = "load") -> None:
        self.ledger = tmp / f"{name}.ledger"
        self.ledger.touch()
        self.ledger.chmod(0o666)  # for commands that run as another user
        self.mark = f"{name}-{uuid.uuid4().hex[:12]}"
        self.tokens: dict[JobId, str] = {}
        self.expected: dict[JobId, frozenset[JobStatus]] = {}
        self.first_final: dict[JobId, Job] = {}
        self._expect: dict[str, frozenset[JobStatus]] = {}
        self._count = 0

    # ---- jobs ---------------------------------------------------------------------------

    def _token(self) -> str:
        self._count += 1
        return f"t{self._count}"

    def script(self, token: str, body: str) -> str:
        """Each execution writes its pid and its worker's to the ledger: the shell's parent,
        or the parent of that when it is the worker's command spawner (shell builtins only)."""
        ledger = shlex.quote(str(self.ledger))
        return (
            f": {self.mark}; "  # the mark in argv too, for a person reading ps
            f"read -r _ parent _ grandparent _ < /proc/$PPID/stat; worker=$PPID; "
            f'case "$parent" in "({SPAWNER_COMM})") worker=$grandparent;; esac; '
            f"echo {token} start $$ $worker >> {ledger}; {body}; "
            f"echo {token} end $$ $worker >> {ledger}; echo $$"
        )

    def spec(
        self, token: str, body: str, timeout_s: float = 60.0, max_retries: int | None = None
    ) -> TaskSpec:
        return command_spec(
            self.script(token, body),
            shell=True,
            timeout_s=timeout_s,
            env={MARK_ENV: self.mark},
            max_retries=max_retries,
        )

    def make(
        self,
        count: int,
        body: str,
        expect: Iterable[JobStatus] = (JobStatus.COMPLETED,),
        timeout_s: float = 60.0,
        idempotent: bool = False,
        max_retries: int | None = None,
    ) -> list[tuple[str, TaskSpec]]:
        """``count`` new (token, spec) pairs; call ``track`` with the ids they got."""
        made = []
        for _ in range(count):
            token = self._token()
            spec = self.spec(token, body, timeout_s, max_retries)
            if idempotent:
                spec = replace(spec, idempotency_key=f"{self.mark}-{token}")
            made.append((token, spec))
            self._expect[token] = frozenset(expect)
        return made

    async def submit(
        self,
        client: Client,
        count: int,
        body: str = "sleep 0.2",
        expect: Iterable[JobStatus] = (JobStatus.COMPLETED,),
        timeout_s: float = 60.0,
        max_retries: int | None = None,
    ) -> list[JobId]:
        """Submit ``count`` jobs in batches; returns their ids in order."""
        made = self.make(count, body, expect, timeout_s, max_retries=max_retries)
        ids: list[JobId] = []
        for start in range(0, count, 100):
            ids += await client.submit_many([spec for _, spec in made[start : start + 100]])
        for job_id, (token, _) in zip(ids, made, strict=True):
            self.track(job_id, token)
        return ids

    def track(self, job_id: JobId, token: str) -> None:
        self.tokens[job_id] = token
        self.expected[job_id] = self._expect[token]

    # ---- ledger -------------------------------------------------------------------------

    def lines(self) -> list[str]:
        return self.ledger.read_text().splitlines()

    def ended(self) -> int:
        return sum(1 for line in self.lines() if " end " in line)

    def executions(self) -> dict[str, list[Execution]]:
        by_key: dict[tuple[str, int], Execution] = {}
        for i, line in enumerate(self.lines()):
            token, event, pid, ppid = line.split()
            key = (token, int(pid))
            if event == "start":
                by_key[key] = Execution(token, int(pid), int(ppid), i)
            else:
                by_key[key].end_line = i
        runs: dict[str, list[Execution]] = {}
        for run in by_key.values():
            runs.setdefault(run.token, []).append(run)
        return runs

    def running_on(self, worker_pid: int) -> list[Execution]:
        """Executions spawned by ``worker_pid`` that have not written their end line."""
        return [
            run
            for runs in self.executions().values()
            for run in runs
            if run.ppid == worker_pid and run.end_line is None
        ]

    def fault(self, *worker_pids: int) -> Fault:
        """Call right after injecting a fault on these workers."""
        return Fault(frozenset(worker_pids), len(self.lines()))

    # ---- waiting and checking -----------------------------------------------------------

    async def jobs(self, client: Client) -> dict[JobId, Job]:
        """Every job the master lists, by id (without output)."""
        found: dict[JobId, Job] = {}
        offset = 0
        while True:
            page, total = await client.list_jobs(limit=1000, offset=offset)
            found.update((job.id, job) for job, _ in page)
            offset += len(page)
            if not page or offset >= total:
                return found

    async def wait_final(self, client: Client, timeout: float = 45.0) -> dict[JobId, Job]:
        """Until every job is terminal (tolerating a master that restarts meanwhile); the jobs
        as first seen final, with output. Returns what it has at the deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                listed = await self.jobs(client)
            except DistExecError:
                listed = {}
            fresh = [
                j for j, job in listed.items()
                if j in self.tokens and j not in self.first_final and job.status in TERMINAL
            ]  # fmt: skip
            for job_id, job in zip(fresh, await self._get_all(client, fresh), strict=True):
                if job is not None:
                    self.first_final[job_id] = job
            if len(self.first_final) == len(self.tokens):
                break
            await asyncio.sleep(0.1)
        return self.first_final

    async def _get_all(self, client: Client, ids: Sequence[JobId]) -> list[Job | None]:
        limit = asyncio.Semaphore(32)

        async def one(job_id: JobId) -> Job | None:
            async with limit:
                try:
                    return await client.get(job_id)
                except DistExecError:
                    return None

        return list(await asyncio.gather(*(one(j) for j in ids)))

    async def verify(
        self,
        client: Client,
        faults: Sequence[Fault] = (),
        orphan_wait_s: float = KILL_GRACE_S + 5.0,
        workers: Mapping[str, Collection[int]] | None = None,
    ) -> Report:
        """Check every job (see the module docstring); raises on the first kind that fails.
        ``workers`` (node id -> pids of the processes that had it): also check that the
        accepted run was spawned by the worker the master says ran the accepted attempt."""
        report = Report(submitted=len(self.tokens))
        await self.wait_final(client)
        report.finished = len(self.first_final)
        ids = list(self.tokens)
        again = dict(zip(ids, await self._get_all(client, ids), strict=True))
        runs = self.executions()
        for job_id, token in self.tokens.items():
            first, now = self.first_final.get(job_id), again[job_id]
            if first is None or now is None:
                report.lost.append(f"{job_id} ({token}): never final ({now and now.status})")
                continue
            if now.status not in self.expected[job_id]:
                report.lost.append(f"{job_id} ({token}): {now.status.value}: {now.error}")
                continue
            if _outcome(first) != _outcome(now):
                report.duplicated.append(
                    f"{job_id}: outcome changed {_outcome(first)} -> {_outcome(now)}"
                )
                continue
            if now.status == JobStatus.COMPLETED:
                accepted = [a for a in now.attempts if a.outcome == AttemptOutcome.COMPLETED]
                if [(a.attempt, a.node_id) for a in accepted] != [(now.attempt, now.worker_id)]:
                    report.duplicated.append(
                        f"{job_id} ({token}): attempt {now.attempt} on {now.worker_id} is the "
                        f"outcome, but its history has these completed: {accepted}"
                    )
                    continue
                self._check_runs(job_id, token, now, runs.get(token, []), faults, workers, report)
        report.orphans = await _orphans_after(self.mark, orphan_wait_s)
        _raise_first(report)
        return report

    def _check_runs(
        self,
        job_id: JobId,
        token: str,
        job: Job,
        runs: list[Execution],
        faults: Sequence[Fault],
        workers: Mapping[str, Collection[int]] | None,
        report: Report,
    ) -> None:
        accepted_pid = int(job.stdout.split()[-1]) if job.stdout.split() else -1
        completed = [r for r in runs if r.end_line is not None]
        accepted = [r for r in completed if r.pid == accepted_pid]
        if not accepted:
            report.duplicated.append(
                f"{job_id} ({token}): accepted output {job.stdout!r} names no completed run"
            )
            return
        if workers is not None and accepted[0].ppid not in workers.get(job.worker_id, ()):
            report.duplicated.append(
                f"{job_id} ({token}): accepted run {accepted_pid} was spawned by pid "
                f"{accepted[0].ppid}, not by {job.worker_id} (pids {workers.get(job.worker_id)})"
            )
            return
        for run in completed:
            if run.pid == accepted_pid:
                continue
            assert run.end_line is not None
            if any(run.ppid in f.workers and run.end_line < f.ledger_mark for f in faults):
                report.cut_off_runs += 1
            else:
                report.extra_runs.append(
                    f"{job_id} ({token}): pid {run.pid} under worker {run.ppid} also ran to the "
                    f"end (ledger line {run.end_line}); accepted pid {accepted_pid}"
                )


def _outcome(job: Job) -> tuple[object, ...]:
    return (job.status, job.exit_code, job.stdout, job.worker_id, job.attempt)


async def _orphans_after(mark: str, wait_s: float) -> list[MarkedProcess]:
    deadline = time.monotonic() + wait_s
    while True:
        left = await asyncio.to_thread(marked_processes, mark)
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.1)


def _raise_first(report: Report) -> None:
    def listing(items: Sequence[object]) -> str:
        return "\n  ".join(str(i) for i in items[:10]) + ("\n  ..." if len(items) > 10 else "")

    if report.lost:
        raise LostJobs(f"{report.summary()}; lost:\n  {listing(report.lost)}")
    if report.duplicated:
        raise DuplicateOutcome(f"{report.summary()}; duplicated:\n  {listing(report.duplicated)}")
    if report.extra_runs:
        raise ExtraRuns(f"{report.summary()}; extra runs:\n  {listing(report.extra_runs)}")
    if report.orphans:
        raise OrphansLeft(f"{report.summary()}; orphans:\n  {listing(report.orphans)}")


def kill_marked(mark: str) -> None:
    """Test cleanup: SIGKILL whatever the workload left behind (found by the mark)."""
    for proc in marked_processes(mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
