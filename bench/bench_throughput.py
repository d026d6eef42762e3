"""Throughput and latency of dist-exec against plain local process spawning.

One run starts a real local cluster (a master and N workers as child processes), then measures:

* throughput: ``--jobs`` trivial ``echo I`` commands (argv, no shell) with ``--concurrency``
  in flight, through dist-exec and through ``asyncio.create_subprocess_exec``; every output
  and exit code is checked;
* latency: ``--latency-jobs`` sequential single commands, both ways (p50, p99).

Run it as ``python bench/bench_throughput.py`` (``--help`` lists the options). It exits 1 when
any output was wrong or the cluster could not be run, 0 otherwise (targets met or not).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import pwd
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dist_exec import procfs, supervised
from dist_exec.client import Client, command_spec
from dist_exec.models import Job, JobStatus, OutputChunk, Stream
from dist_exec.tuning import tune_grpc

TARGET_RATIO = 0.5  # dist-exec throughput / local throughput
TARGET_P50_MS = 4.0  # dist-exec single-command latency, median
OTHER_LOAD_WARN = 0.10  # warn when other processes used more of the machine's CPU than this
MAX_FAILURES_IN_A_ROW = 10  # then the cluster is taken to be broken and the run stops


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---- the cluster ----------------------------------------------------------------------------


class ClusterError(Exception):
    """A server process did not start or stop as expected."""


@dataclass
class Server:
    """One dist-exec server process this benchmark started."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _read_ready_line(server: Server, timeout_s: float) -> str:
    """The ADDRESS of the child's 'listening on ADDRESS' line, waiting at most ``timeout_s``."""
    stdout = server.proc.stdout
    assert stdout is not None
    deadline = time.monotonic() + timeout_s
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not sel.select(timeout=remaining):
                break
            chunk = os.read(stdout.fileno(), 4096)
            if not chunk:
                break  # the process closed stdout: it exited
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if " listening on " in text:
                    return text.rsplit(" listening on ", 1)[1].strip()
    state = "exited" if server.proc.poll() is not None else f"not ready after {timeout_s:g}s"
    raise ClusterError(f"{server.name} {state}; end of {server.log_path}:\n{server.log_tail()}")


class Cluster:
    """A master and workers started as child processes; ``stop`` ends exactly those."""

    def __init__(self, tmp: Path, ready_timeout_s: float, stop_timeout_s: float) -> None:
        self.tmp = tmp
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.master: Server | None = None
        self.workers: list[Server] = []

    @property
    def servers(self) -> list[Server]:
        return [*self.workers, *([self.master] if self.master else [])]

    def _start(self, name: str, args: list[str]) -> Server:
        env = dict(os.environ)
        for key in ("DIST_EXEC_MASTER", "MASTER_ADDRESS", "WORKER_ADDRESS", "WORKER_ID"):
            env.pop(key, None)
        log_path = self.tmp / f"{name}.log"
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                supervised.argv(args),  # (dist-exec ARGS, stopped when this process dies)
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=env,
            )
        server = Server(name, proc, log_path)
        # Registered before waiting, so a process that never becomes ready is still stopped.
        if name == "master":
            self.master = server
        else:
            self.workers.append(server)
        server.address = _read_ready_line(server, self.ready_timeout_s)
        log(f"{name} pid {server.pid} listening on {server.address}")
        return server

    def start(self, workers: int, slots: int, log_level: str, run_as: str) -> None:
        data_dir = self.tmp / "master-data"
        master = self._start(
            "master",
            ["master", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
             "--log-level", log_level],
        )  # fmt: skip
        for n in range(1, workers + 1):
            self._start(
                f"worker-{n}",
                ["worker", "--master", master.address, "--listen", "127.0.0.1:0",
                 "--worker-id", f"bench-{n}", "--max-concurrent-tasks", str(slots),
                 "--log-level", log_level, *(["--run-as", run_as] if run_as else [])],
            )  # fmt: skip

    def stop(self) -> None:
        """SIGTERM (workers first: they deregister from the master), SIGKILL after a deadline."""
        started = time.monotonic()
        for group in (self.workers, [self.master] if self.master else []):
            for server in group:
                if server.proc.poll() is None:
                    server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            for server in group:
                try:
                    server.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log(f"{server.name} (pid {server.pid}) ignored SIGTERM; killing it")
                    server.proc.kill()
                    server.proc.wait()
                if server.proc.stdout is not None:
                    server.proc.stdout.close()
        if self.servers:
            log(f"cluster stopped in {time.monotonic() - started:.1f}s")


def process_cpu_s(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of a process and of its reaped children (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan, math.nan
    fields = [int(f) for f in stat[stat.rfind(")") + 2 :].split()[11:15]]
    tick = os.sysconf("SC_CLK_TCK")
    return (fields[0] + fields[1]) / tick, (fields[2] + fields[3]) / tick


def machine_busy_s() -> float:
    """CPU seconds all of this machine's CPUs have been busy (or stolen) so far; NaN off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def helpers(pid: int) -> list[int]:
    """The helper processes a server started (``python -I -m dist_exec.executors.X``: a
    worker's command spawner and process guardian), found among its children."""
    found = []
    for child in procfs.pids():
        fields = procfs.stat(child)
        if fields is None or int(fields[1]) != pid:
            continue
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(b"dist_exec.executors.") for a in argv):
            found.append(child)
    return found


def cpu_snapshot(cluster: Cluster, helper_pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each server (with its helper processes), the commands the
    workers ran (reaped by a worker or its spawner), this client, the commands it ran itself
    ("local commands"), and the whole machine ("machine")."""
    snap: dict[str, float] = {"commands": 0.0}
    for server in cluster.servers:
        own, children = process_cpu_s(server.pid)
        for pid in helper_pids.get(server.name, []):
            helper_own, helper_children = process_cpu_s(pid)
            own += helper_own
            children += helper_children
        snap[server.name] = own
        if server.name != "master":
            snap["commands"] += children
    snap["client"] = time.process_time()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped: the local commands only
    snap["local commands"] = usage.ru_utime + usage.ru_stime
    snap["machine"] = machine_busy_s()
    return snap


@dataclass
class CpuUse:
    """CPU used during some measured periods, by this benchmark's processes and by others."""

    seconds: dict[str, float] = field(default_factory=dict)  # CPU seconds per component
    wall_s: float = 0.0

    def add(self, before: dict[str, float], after: dict[str, float], wall_s: float) -> None:
        for key in before:
            self.seconds[key] = self.seconds.get(key, 0.0) + after[key] - before[key]
        self.wall_s += wall_s

    def per_job_ms(self, keys: Sequence[str], jobs: int) -> dict[str, float]:
        return {k: round(self.seconds.get(k, 0.0) * 1000 / jobs, 3) for k in keys}

    def others_share(self) -> float:
        """Share of the machine's CPU capacity used by processes other than this benchmark's."""
        ours = sum(v for k, v in self.seconds.items() if k != "machine")
        capacity = self.wall_s * (os.cpu_count() or 1)
        return max(0.0, (self.seconds.get("machine", 0.0) - ours) / capacity) if capacity else 0.0


@contextmanager
def running_cluster(
    tmp: Path,
    workers: int,
    slots: int,
    log_level: str,
    ready_s: float,
    stop_s: float,
    run_as: str = "",
) -> Iterator[Cluster]:
    cluster = Cluster(tmp, ready_s, stop_s)
    try:
        cluster.start(workers, slots, log_level, run_as)
        yield cluster
    finally:
        cluster.stop()


# ---- measurements ---------------------------------------------------------------------------


@dataclass
class Checks:
    """Counts right and wrong results; gives up when too many fail in a row."""

    max_in_a_row: int = MAX_FAILURES_IN_A_ROW
    ok: int = 0
    wrong: int = 0
    in_a_row: int = 0
    examples: list[str] = field(default_factory=list)

    def record(self, i: int, problem: str | None) -> None:
        if problem is None:
            self.ok += 1
            self.in_a_row = 0
            return
        self.wrong += 1
        self.in_a_row += 1
        if len(self.examples) < 5:
            self.examples.append(f"echo {i}: {problem}")
        if self.in_a_row >= self.max_in_a_row:
            raise ClusterError(
                f"{self.in_a_row} jobs in a row failed; giving up. First failures: "
                + "; ".join(self.examples)
            )


RunOne = Callable[[int], Awaitable[str | None]]  # returns None when the output was right


def expected(i: int) -> bytes:
    return f"{i}\n".encode()


def check_output(i: int, stdout: bytes, exit_code: int | None, status: str = "") -> str | None:
    want = expected(i)
    if status and status != JobStatus.COMPLETED.value:
        return f"status {status}, exit code {exit_code}, stdout {stdout!r}"
    if exit_code != 0:
        return f"exit code {exit_code}, stdout {stdout!r}"
    if stdout != want:
        return f"stdout {stdout!r}, expected {want!r}"
    return None


Segments = list[tuple[float, float, float]]  # per job: submit, wait for the end, fetch (s)


class DistRunner:
    """Runs ``echo I`` through dist-exec and checks the result; call it with I."""

    def __init__(
        self,
        client: Client,
        wait: str,
        job_timeout_s: float,
        poll_s: float,
        segments: Segments | None = None,
    ) -> None:
        self.client = client
        bodies = {
            "run": self.by_run,
            "stream": self.by_stream,
            "stream-get": self.by_stream_get,
            "poll": self.by_poll,
        }
        self.body = bodies[wait]
        self.job_timeout_s = job_timeout_s
        self.poll_s = poll_s
        self.segments = segments

    async def __call__(self, i: int) -> str | None:
        try:
            async with asyncio.timeout(self.job_timeout_s):
                return await self.body(i)
        except TimeoutError:
            return f"no result within {self.job_timeout_s:g}s"
        except Exception as exc:  # a failed RPC is a wrong result, not a crash of the bench
            return f"{type(exc).__name__}: {exc}"

    async def by_run(self, i: int) -> str | None:
        """One run (Client.run(), a request on the client's RunSession stream): the job id once
        it is accepted, then output and the final state."""
        t0 = time.perf_counter()
        return await self._follow(i, t0, self.client.run(command_spec(["echo", str(i)])))

    async def by_stream(self, i: int) -> str | None:
        """Submit, then follow the output stream, which ends with the job's final state."""
        t0 = time.perf_counter()
        job_id = await self.client.submit(command_spec(["echo", str(i)]))
        return await self._follow(i, t0, self.client.watch(job_id), submitted=time.perf_counter())

    async def _follow(
        self,
        i: int,
        t0: float,
        items: AsyncIterator[str | tuple[int, OutputChunk] | Job],
        submitted: float = 0.0,
    ) -> str | None:
        """Check what ``items`` streams for ``echo I``; ``submitted``: when the id came back
        (else the id is the first item)."""
        streamed = bytearray()
        final: Job | None = None
        async for item in items:
            if isinstance(item, str):
                submitted = time.perf_counter()
            elif isinstance(item, Job):
                final = item
            elif item[1].stream == Stream.STDOUT:
                streamed += item[1].data
        if self.segments is not None:
            self.segments.append((submitted - t0, time.perf_counter() - submitted, 0.0))
        if final is None:
            return "the stream ended without the job's final state"
        return check_output(i, bytes(streamed), final.exit_code, final.status.value)

    async def by_stream_get(self, i: int) -> str | None:
        """Submit, follow stream_output() to its end, then GetStatus (one RPC more)."""
        t0 = time.perf_counter()
        job_id = await self.client.submit(command_spec(["echo", str(i)]))
        t1 = time.perf_counter()
        streamed = bytearray()
        async for _attempt, chunk in self.client.stream_output(job_id):
            if chunk.stream == Stream.STDOUT:
                streamed += chunk.data
        t2 = time.perf_counter()
        job = await self.client.get(job_id)
        if self.segments is not None:
            self.segments.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        problem = check_output(i, job.stdout, job.exit_code, job.status.value)
        if problem is None and bytes(streamed) != expected(i):
            problem = f"streamed stdout {bytes(streamed)!r} differs from stored {job.stdout!r}"
        return problem

    async def by_poll(self, i: int) -> str | None:
        """Submit, then GetStatus until the job has ended."""
        t0 = time.perf_counter()
        job_id = await self.client.submit(command_spec(["echo", str(i)]))
        t1 = time.perf_counter()
        while True:
            job = await self.client.get(job_id)
            if job.status.terminal:
                if self.segments is not None:
                    self.segments.append((t1 - t0, time.perf_counter() - t1, 0.0))
                return check_output(i, job.stdout, job.exit_code, job.status.value)
            if self.poll_s > 0:
                await asyncio.sleep(self.poll_s)


class BatchingRunner:
    """Runs ``echo I`` through dist-exec as a script with many jobs would: it keeps up to
    ``concurrency`` jobs in flight and refills in batches, one run_many() (submit and follow)
    per batch, whenever at least ``batch`` slots are free."""

    def __init__(self, client: Client, job_timeout_s: float, batch: int) -> None:
        self.client = client
        self.job_timeout_s = job_timeout_s
        self.batch = batch

    async def run_all(self, ids: Sequence[int], concurrency: int) -> Checks:
        checks = Checks()
        pending = list(ids)
        pending.reverse()
        free = asyncio.Semaphore(concurrency)
        async with asyncio.TaskGroup() as tg:
            while pending:
                # Take a whole batch of slots (fewer at the end) before submitting.
                size = min(self.batch, len(pending), concurrency)
                for _ in range(size):
                    await free.acquire()
                chunk = [pending.pop() for _ in range(size)]
                tg.create_task(self._run(chunk, checks, free))
        return checks

    async def _run(self, ids: list[int], checks: Checks, free: asyncio.Semaphore) -> None:
        done: set[int] = set()
        try:
            async with asyncio.timeout(self.job_timeout_s):
                events = self.client.run_many([command_spec(["echo", str(i)]) for i in ids])
                job_ids = await anext(events)
                assert isinstance(job_ids, list)
                number = dict(zip(job_ids, ids, strict=True))
                streamed = {job_id: bytearray() for job_id in job_ids}
                async for event in events:
                    assert isinstance(event, tuple)
                    job_id, item = event
                    i = number[job_id]
                    if isinstance(item, Job):
                        checks.record(
                            i,
                            check_output(
                                i, bytes(streamed[job_id]), item.exit_code, item.status.value
                            ),
                        )
                        done.add(i)
                        free.release()
                    elif item[1].stream == Stream.STDOUT:
                        streamed[job_id] += item[1].data
            message = "the watch ended before this job did"
        except TimeoutError:
            message = f"no result within {self.job_timeout_s:g}s"
        except Exception as exc:  # a failed RPC is a wrong result, not a crash of the bench
            message = f"{type(exc).__name__}: {exc}"
        for i in ids:
            if i not in done:
                checks.record(i, message)
                free.release()


def make_local_runner(job_timeout_s: float) -> RunOne:
    async def run(i: int) -> str | None:
        proc = await asyncio.create_subprocess_exec(
            "echo",
            str(i),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(job_timeout_s):
                stdout, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return f"no result within {job_timeout_s:g}s"
        return check_output(i, stdout, proc.returncode)

    return run


@dataclass
class Throughput:
    jobs: int
    concurrency: int
    seconds: float
    per_second: float
    wrong: int
    examples: list[str]

    def __add__(self, other: Throughput) -> Throughput:
        jobs, seconds = self.jobs + other.jobs, self.seconds + other.seconds
        return Throughput(
            jobs,
            self.concurrency,
            seconds,
            jobs / seconds if seconds else 0.0,
            self.wrong + other.wrong,
            (self.examples + other.examples)[:5],
        )


async def measure_throughput(
    run: RunOne | BatchingRunner, ids: Sequence[int], concurrency: int
) -> Throughput:
    """Run every id with at most ``concurrency`` in flight; time the whole batch."""
    if isinstance(run, BatchingRunner):
        started = time.perf_counter()
        checks = await run.run_all(ids, concurrency)
        seconds = time.perf_counter() - started
        return Throughput(
            len(ids), concurrency, seconds, len(ids) / seconds, checks.wrong, checks.examples
        )
    checks = Checks()
    pending = iter(ids)

    async def lane() -> None:
        for i in pending:  # the lanes share one iterator: each id runs exactly once
            checks.record(i, await run(i))

    started = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(min(concurrency, len(ids))):
                tg.create_task(lane())
    except BaseExceptionGroup as group:  # a lane gave up (ClusterError) or crashed
        raise group.exceptions[0] from None
    seconds = time.perf_counter() - started
    return Throughput(
        len(ids), concurrency, seconds, len(ids) / seconds, checks.wrong, checks.examples
    )


def servers_grpc_experiments() -> str:
    """What the master and workers run with: started as ``dist-exec``, they tune gRPC
    (dist_exec.tuning) unless GRPC_EXPERIMENTS is set here already. This process, a library
    user, keeps gRPC's defaults."""
    env = dict(os.environ)
    tune_grpc(env)
    return env.get("GRPC_EXPERIMENTS") or "(gRPC's defaults)"


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Latency:
    jobs: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    wrong: int
    examples: list[str]


async def measure_latency(run: RunOne, ids: Sequence[int]) -> Latency:
    checks = Checks()
    samples: list[float] = []
    for i in ids:
        started = time.perf_counter()
        problem = await run(i)
        samples.append((time.perf_counter() - started) * 1000)
        checks.record(i, problem)
    seconds = sum(samples) / 1000
    samples.sort()
    return Latency(
        len(samples),
        seconds,
        percentile(samples, 50),
        percentile(samples, 99),
        sum(samples) / len(samples),
        samples[0],
        samples[-1],
        checks.wrong,
        checks.examples,
    )


# ---- the run --------------------------------------------------------------------------------


@dataclass
class Results:
    config: dict[str, Any]
    dist_throughput: Throughput
    local_throughput: Throughput
    single_throughput: Throughput  # one job per call (empty with --no-batch)
    single_ratio: float
    dist_latency: Latency
    local_latency: Latency
    dist_latency_segments_p50_ms: dict[str, float]
    dist_cpu_ms_per_job: dict[str, float]
    local_cpu_ms_per_job: dict[str, float]
    other_load_share: dict[str, float]  # machine CPU used by other processes while measuring
    disturbed: bool  # other load above OTHER_LOAD_WARN somewhere: the numbers are unreliable
    throughput_ratio: float
    ratio_target_met: bool
    p50_target_met: bool
    wrong_outputs: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _rounds(jobs: int, rounds: int) -> list[tuple[int, int]]:
    """Split ids 0..jobs-1 into ``rounds`` consecutive ranges of (nearly) equal size."""
    bounds = [jobs * r // rounds for r in range(rounds + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


async def run_benchmark(cluster: Cluster, args: argparse.Namespace) -> Results:
    assert cluster.master is not None
    concurrency = args.concurrency or args.workers * args.slots
    local = make_local_runner(args.job_timeout)
    async with Client(cluster.master.address, timeout_s=args.job_timeout) as client:
        single = DistRunner(client, args.wait, args.job_timeout, args.poll_interval)
        dist: RunOne | BatchingRunner = (
            BatchingRunner(client, args.job_timeout, args.batch_size) if args.batch else single
        )
        if args.warmup:
            log(f"warm-up: {args.warmup} jobs each way")
            warm = range(10_000_000, 10_000_000 + args.warmup)
            for result in (
                await measure_throughput(dist, warm, concurrency),
                await measure_throughput(local, warm, concurrency),
            ):
                if result.wrong:
                    raise ClusterError(f"warm-up failed: {result.examples}")

        log(
            f"throughput: {args.jobs} x echo each way, concurrency {concurrency}, "
            f"{args.rounds} interleaved round(s)"
        )
        helper_pids = {server.name: helpers(server.pid) for server in cluster.servers}
        empty = Throughput(0, concurrency, 0.0, 0.0, 0, [])
        dist_tp = local_tp = single_tp = empty
        dist_use, local_use, single_use = CpuUse(), CpuUse(), CpuUse()
        runs: list[tuple[str, RunOne | BatchingRunner, CpuUse]] = [
            ("dist-exec", dist, dist_use),
            ("local", local, local_use),
        ]
        if args.batch:  # also the one-job-at-a-time client, for comparison
            runs.append(("dist-exec single", single, single_use))
        for start, end in _rounds(args.jobs, args.rounds):
            for name, runner, use in runs:
                before = cpu_snapshot(cluster, helper_pids)
                result = await measure_throughput(runner, range(start, end), concurrency)
                use.add(before, cpu_snapshot(cluster, helper_pids), result.seconds)
                log(f"  {name}: {end - start} in {result.seconds:.2f}s, {result.per_second:.0f}/s")
                if name == "local":
                    local_tp += result
                elif name == "dist-exec":
                    dist_tp += result
                else:
                    single_tp += result
        workers = [w.name for w in cluster.workers]
        dist_cpu = dist_use.per_job_ms(["master", *workers, "commands", "client"], args.jobs)
        local_cpu = local_use.per_job_ms(["client", "local commands"], args.jobs)
        others = {
            "dist-exec throughput": dist_use.others_share(),
            "local throughput": local_use.others_share(),
        }
        log(f"  CPU ms/job: dist-exec {dist_cpu}; local {local_cpu}")
        if args.batch:
            others["dist-exec single throughput"] = single_use.others_share()

        lat_ids = range(args.latency_jobs)
        log(f"latency: {args.latency_jobs} sequential jobs each way")
        segments: Segments = []
        timed = DistRunner(client, args.wait, args.job_timeout, args.poll_interval, segments)
        for name, runner in (("dist-exec", timed), ("local", local)):
            before, use = cpu_snapshot(cluster, helper_pids), CpuUse()
            latency = await measure_latency(runner, lat_ids)
            use.add(before, cpu_snapshot(cluster, helper_pids), latency.seconds)
            others[f"{name} latency"] = use.others_share()
            if name == "local":
                local_lat = latency
            else:
                dist_lat = latency
    others = {k: round(v, 3) for k, v in others.items()}
    log(f"CPU share used by other processes while measuring: {others}")

    segments_p50 = {
        name: round(percentile(sorted(seg[k] * 1000 for seg in segments), 50), 3)
        for k, name in enumerate(("submit", "wait_end", "get_result"))
    }
    ratio = dist_tp.per_second / local_tp.per_second if local_tp.per_second else 0.0
    single_ratio = single_tp.per_second / local_tp.per_second if local_tp.per_second else 0.0
    return Results(
        config={
            "workers": args.workers,
            "slots_per_worker": args.slots,
            "commands_run_as": args.run_as if os.geteuid() == 0 else "(the workers' user)",
            "concurrency": concurrency,
            "jobs": args.jobs,
            "latency_jobs": args.latency_jobs,
            "warmup": args.warmup,
            "wait": args.wait,
            "batch": args.batch,
            "rounds": args.rounds,
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "servers_grpc_experiments": servers_grpc_experiments(),
        },
        dist_throughput=dist_tp,
        local_throughput=local_tp,
        single_throughput=single_tp,
        single_ratio=single_ratio,
        dist_latency=dist_lat,
        local_latency=local_lat,
        dist_latency_segments_p50_ms=segments_p50,
        dist_cpu_ms_per_job=dist_cpu,
        local_cpu_ms_per_job=local_cpu,
        other_load_share=others,
        disturbed=max(others.values()) > OTHER_LOAD_WARN,
        throughput_ratio=ratio,
        ratio_target_met=ratio >= TARGET_RATIO,
        p50_target_met=dist_lat.p50_ms < TARGET_P50_MS,
        wrong_outputs=dist_tp.wrong
        + local_tp.wrong
        + single_tp.wrong
        + dist_lat.wrong
        + local_lat.wrong,
    )


def print_summary(r: Results) -> None:
    c = r.config
    dt, lt, dl, ll = r.dist_throughput, r.local_throughput, r.dist_latency, r.local_latency

    def met(ok: bool) -> str:
        return ("MET" if ok else "NOT MET") + (" (unreliable: other load)" if r.disturbed else "")

    print()
    print(
        f"dist-exec benchmark: {c['workers']} workers x {c['slots_per_worker']} slots, "
        f"concurrency {c['concurrency']}, wait={c['wait']}, {c['cpus']} CPUs, "
        f"commands run as {c['commands_run_as']}"
    )
    print(f"master and workers' GRPC_EXPERIMENTS: {c['servers_grpc_experiments']}")
    print(f"{'':<26}{'dist-exec':>12}{'local':>12}")
    label = "throughput, batch (cmds/s)" if c["batch"] else "throughput (cmds/s)"
    print(f"{label:<26}{dt.per_second:>12.1f}{lt.per_second:>12.1f}")
    if c["batch"]:
        st = r.single_throughput
        print(f"{'throughput, single (/s)':<26}{st.per_second:>12.1f}{'':>12}")
    print(f"{'  wall time (s)':<26}{dt.seconds:>12.2f}{lt.seconds:>12.2f}")
    print(f"{'  wrong outputs':<26}{dt.wrong:>12d}{lt.wrong:>12d}")
    print(f"{'latency p50 (ms)':<26}{dl.p50_ms:>12.2f}{ll.p50_ms:>12.2f}")
    print(f"{'latency p99 (ms)':<26}{dl.p99_ms:>12.2f}{ll.p99_ms:>12.2f}")
    print(f"{'latency mean (ms)':<26}{dl.mean_ms:>12.2f}{ll.mean_ms:>12.2f}")
    print(f"{'  wrong outputs':<26}{dl.wrong:>12d}{ll.wrong:>12d}")
    seg = r.dist_latency_segments_p50_ms
    print(
        f"dist-exec latency p50 by step (ms): submit {seg['submit']:.2f}, "
        f"wait for end {seg['wait_end']:.2f}, get result {seg['get_result']:.2f}"
    )
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in r.dist_cpu_ms_per_job.items())
    print(f"dist-exec CPU per job (ms, throughput phase): {cpu}")
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in r.local_cpu_ms_per_job.items())
    print(f"local CPU per job (ms, throughput phase): {cpu}")
    shares = r.other_load_share
    print(
        "machine CPU used by other processes while measuring: "
        + ", ".join(f"{v:.0%} ({k})" for k, v in shares.items())
    )
    if r.disturbed:
        print("WARNING: other load on this machine disturbed the measurement; run it again")
    print()
    how = "batched client" if c["batch"] else "one job per call"
    print(
        f"throughput ratio dist-exec/local ({how}): {r.throughput_ratio:.3f} "
        f"(target >= {TARGET_RATIO}): {met(r.ratio_target_met)}"
    )
    if c["batch"]:
        print(f"throughput ratio, one job per call: {r.single_ratio:.3f}")
    print(
        f"dist-exec p50 latency: {dl.p50_ms:.2f} ms (target < {TARGET_P50_MS} ms): "
        f"{met(r.p50_target_met)}"
    )
    for name, examples in (("dist-exec", dt.examples + dl.examples),
                           ("local", lt.examples + ll.examples)):  # fmt: skip
        for example in examples:
            print(f"WRONG ({name}): {example}")
    print("outputs: " + ("all correct" if not r.wrong_outputs else f"{r.wrong_outputs} WRONG"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--jobs", type=int, default=2000, help="commands in the throughput phase")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--slots", "-k", type=int, default=8, help="--max-concurrent-tasks per worker")
    p.add_argument(
        "--concurrency", "-c", type=int, default=0, help="jobs in flight (0: workers x slots)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="throughput is measured in this many rounds, dist-exec and local in turn",
    )
    p.add_argument("--latency-jobs", type=int, default=200, help="sequential latency samples")
    p.add_argument("--warmup", type=int, default=32, help="warm-up jobs each way (0: none)")
    p.add_argument(
        "--wait",
        choices=("run", "stream", "stream-get", "poll"),
        default="run",
        help="how a job is run: Client.run() (one request on the client's RunSession stream "
        "submits the job and streams its output and final state), Submit then Client.watch() "
        "(the output stream, ended by the job's final state), Submit then stream_output() then "
        "GetStatus, or Submit then polling GetStatus",
    )
    p.add_argument(
        "--no-batch",
        dest="batch",
        action="store_false",
        help="throughput with one job per call only (--wait says how; default: measure the "
        "batched client, one run_many() per batch, and also this, for comparison)",
    )
    p.add_argument(
        "--batch-size", type=int, default=4, help="jobs per run_many() in the batched client"
    )
    p.add_argument(
        "--poll-interval", type=float, default=0.001, help="seconds between polls (--wait poll)"
    )
    p.add_argument("--job-timeout", type=float, default=10.0, help="seconds allowed per job")
    p.add_argument("--ready-timeout", type=float, default=20.0, help="seconds to start a server")
    p.add_argument("--stop-timeout", type=float, default=15.0, help="seconds before SIGKILL")
    p.add_argument("--log-level", default="WARNING", help="servers' --log-level")
    p.add_argument(
        "--run-as",
        default=pwd.getpwuid(os.geteuid()).pw_name,
        help="workers' --run-as (default: this user, so commands run as the same user both "
        "ways; as root, 'nobody' measures the worker's default user switch)",
    )
    p.add_argument(
        "--tmp-dir", type=Path, default=None, help="where the temp dir goes (default: system's)"
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, database)")
    p.add_argument(
        "--pause-before",
        type=float,
        default=0.0,
        help="seconds to wait after the cluster is up (time to attach a profiler)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)
    for name in ("jobs", "workers", "slots", "latency_jobs", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.concurrency < 0 or args.warmup < 0 or args.job_timeout <= 0:
        p.error("--concurrency and --warmup must not be negative, --job-timeout must be > 0")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the cluster


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="dist-exec-bench-", dir=args.tmp_dir))
    try:
        with running_cluster(
            tmp,
            args.workers,
            args.slots,
            args.log_level,
            args.ready_timeout,
            args.stop_timeout,
            args.run_as if os.geteuid() == 0 else "",
        ) as cluster:
            if args.pause_before > 0:
                log(f"pausing {args.pause_before:g}s before measuring")
                time.sleep(args.pause_before)
            results = asyncio.run(run_benchmark(cluster, args))
    except ClusterError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results.to_json(), indent=2))
    else:
        print_summary(results)
    return 1 if results.wrong_outputs else 0


if __name__ == "__main__":
    sys.exit(main())
