"""Fault injection with real processes: SIGKILL, SIGSTOP, master crash, partition, drain, cancel.

Each scenario pushes a few hundred short jobs through a real cluster, injects one fault in the
middle of the load and checks the outcome with ``tests.faults.workload``: 0 lost, 0 duplicated,
0 orphans (the module docstring defines exactly what each counts).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from dist_exec.client import Client
from dist_exec.config import split_address
from dist_exec.errors import MasterUnavailable
from dist_exec.master.dispatcher import CHANNEL_OPTIONS
from dist_exec.models import AttemptOutcome, JobId, JobStatus, NodeStatus, TaskSpec
from dist_exec.rpc.v1 import master_pb2_grpc
from dist_exec.security.tls import INSECURE_FLAG
from tests.conftest import ClusterFactory, Proc, pid_alive, wait_until
from tests.faults.netns import NetnsPartition, netns_unavailable
from tests.faults.proxy import CuttableProxy
from tests.faults.workload import (
    KILL_GRACE_S,
    Fault,
    MarkedProcess,
    OrphansLeft,
    Workload,
    kill_marked,
    marked_processes,
    spawners,
)

pytestmark = pytest.mark.system

BEAT = "0.2s"  # heartbeat interval of every scenario
TERMINAL_STATES = [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMEOUT]
SHORT_JOB = "sleep 0.1"
LOAD = 200  # short jobs per scenario
# A dead worker's commands are killed by its guardian at once; this allows a loaded machine
# (verify() checks that none of them ran on next to its retry).
DIE_WITH_WORKER_S = 10.0


@pytest.fixture
def tmp_path(shared_dir: Path) -> Path:
    """Every scenario's files (master data, ledgers, gates) where the user its commands run as
    may reach them."""
    return shared_dir


@pytest.fixture(autouse=True)
def _default_workers(cluster: ClusterFactory) -> None:
    """Workers run commands as they do by default: as nobody when they run as root (through
    their command spawner), so the faults hit the mode users run."""
    cluster.run_as = None


@pytest.fixture
def workloads(tmp_path: Path) -> Iterator[list[Workload]]:
    """Workloads of a test; whatever they leave behind is killed at the end (by their mark)."""
    made: list[Workload] = []
    yield made
    for wl in made:
        kill_marked(wl.mark)


@pytest.fixture
def workload(tmp_path: Path, workloads: list[Workload]) -> Workload:
    wl = Workload(tmp_path)
    workloads.append(wl)
    return wl


def gate_body(gate: Path) -> str:
    """Runs until the test creates ``gate``; a background child keeps the group busy too."""
    return f"sleep 300 & while [ ! -e {gate} ]; do sleep 0.05; done; kill $!"


async def on_worker(client: Client, ids: list[JobId], worker_id: str) -> list[JobId]:
    """Those of ``ids`` that run on ``worker_id`` now."""
    found = []
    for job_id in ids:
        job = await client.get(job_id)
        if job.status == JobStatus.RUNNING and job.worker_id == worker_id:
            found.append(job_id)
    return found


def worker_pids(cluster: ClusterFactory) -> dict[str, set[int]]:
    """Node id -> pids of the worker processes the test started with that id."""
    pids: dict[str, set[int]] = {}
    for proc in cluster.procs:
        if proc.kind == "worker":
            pids.setdefault(proc.extra["id"], set()).add(proc.pid)
    return pids


def descendants_of(wl: Workload, worker: Proc) -> list[MarkedProcess]:
    """The workload's processes that ``worker`` started (itself or through its command
    spawner), and their children."""
    marked = {p.pid: p for p in marked_processes(wl.mark)}

    def root(p: MarkedProcess) -> int:
        while p.ppid in marked:
            p = marked[p.ppid]
        return p.ppid

    workers = spawners()
    return [p for p in marked.values() if workers.get(root(p), root(p)) == worker.pid]


async def all_gone(pids: set[int], timeout: float, what: str) -> None:
    def gone() -> bool:
        return not any(pid_alive(pid) for pid in pids)

    try:
        await wait_until(gone, timeout, what)
    except AssertionError as exc:
        raise OrphansLeft(str(exc)) from None


# ---- 1. worker SIGKILL ---------------------------------------------------------------------


async def test_worker_sigkill_mid_load_retries_its_tasks_elsewhere(
    cluster: ClusterFactory, workload: Workload, tmp_path: Path
) -> None:
    master = cluster.master(heartbeat_interval=BEAT, heartbeat_timeout="1s")
    victim = cluster.worker(master, worker_id="w1", max_tasks=6)
    gate = tmp_path / "gate"
    async with Client(master.address) as client:
        # w1 is full with six long jobs (so it starts no command when it is killed: that race
        # has its own test below); the load runs on w2 and w3 meanwhile.
        gated = await workload.submit(client, 6, gate_body(gate))
        await wait_until(lambda: len(workload.lines()) >= 6, what="six gated jobs on w1")
        for i in (2, 3):
            cluster.worker(master, worker_id=f"w{i}", max_tasks=6)
        await workload.submit(client, LOAD, SHORT_JOB)
        await wait_until(lambda: workload.ended() >= LOAD // 4, what="a quarter of the load")
        doomed = {p.pid for p in descendants_of(workload, victim)}
        victim.kill()
        # Its commands die with it (within a bound): none may finish later next to its retry.
        await all_gone(doomed, DIE_WITH_WORKER_S, "the killed worker's commands to die with it")
        fault = workload.fault(victim.pid)
        await wait_until(lambda: all_on(client, gated, {"w2", "w3"}), what="w1's jobs retried")
        gate.touch()
        await workload.verify(client, [fault], workers=worker_pids(cluster))
        for job_id in gated:
            job = workload.first_final[job_id]
            assert job.worker_id in {"w2", "w3"}, job
            first = job.attempts[0]
            assert (first.node_id, first.outcome) == ("w1", AttemptOutcome.WORKER_LOST)


async def all_on(client: Client, ids: list[JobId], workers: set[str]) -> bool:
    jobs = [await client.get(j) for j in ids]
    return all(j.status == JobStatus.RUNNING and j.worker_id in workers for j in jobs)


async def test_a_command_started_as_its_worker_dies_dies_with_it(
    cluster: ClusterFactory, workloads: list[Workload], tmp_path: Path
) -> None:
    master = cluster.master(heartbeat_interval=BEAT, heartbeat_timeout="1s")
    # Commands that kill their worker: only as root can they (as nobody, not a root worker).
    worker = cluster.worker(master, worker_id="w1", max_tasks=8, run_as="root")
    busy, poison = Workload(tmp_path, "busy"), Workload(tmp_path, "poison")
    workloads += [busy, poison]
    async with Client(master.address) as client:
        # Commands streaming output keep the worker's loop busy, as in production.
        await busy.submit(client, 6, "yes | head -c 200000000", expect=TERMINAL_STATES)
        await wait_until(lambda: len(busy.lines()) >= 6, what="the busy commands")
        await poison.submit(client, 1, "kill -9 $PPID; sleep 300", expect=[JobStatus.FAILED])
        await wait_until(lambda: not worker.alive(), what="the worker killed by its command")
        await all_gone(
            {p.pid for p in marked_processes(poison.mark)},
            DIE_WITH_WORKER_S,
            "the command to die with it",
        )


# ---- 2. worker SIGSTOP shorter than the heartbeat timeout ----------------------------------


async def test_worker_stalled_less_than_the_timeout_is_not_declared_dead(
    cluster: ClusterFactory, workload: Workload
) -> None:
    master = cluster.master(heartbeat_interval=BEAT, heartbeat_timeout="6s")
    stalled, _ = (cluster.worker(master, worker_id=f"w{i}", max_tasks=6) for i in (1, 2))
    async with Client(master.address) as client:
        await workload.submit(client, LOAD, SHORT_JOB)
        await wait_until(lambda: workload.ended() >= LOAD // 4, what="a quarter of the load")
        await wait_until(lambda: workload.running_on(stalled.pid), what="commands on w1")
        stalled.signal(signal.SIGSTOP)
        seen = set()
        stop_at = time.monotonic() + 1.5  # the fault itself: a 1.5 s stall, a quarter of the
        # timeout (heartbeats of a worker busy with 200 jobs come late too)
        try:
            while time.monotonic() < stop_at:
                seen |= {n.status for n in await client.nodes() if n.id == "w1"}
                await asyncio.sleep(0.05)
        finally:
            stalled.signal(signal.SIGCONT)
        assert NodeStatus.UNHEALTHY not in seen  # at most SUSPECT: slow, not dead
        await wait_until(lambda: node_status(client, "w1", NodeStatus.HEALTHY), what="w1 back")
        # No fault allowance: nothing may run twice.
        report = await workload.verify(client, workers=worker_pids(cluster))
        assert all(j.retries == 0 for j in workload.first_final.values()), report.summary()
        assert any(j.worker_id == "w1" for j in workload.first_final.values())


# ---- 3. master SIGKILL ---------------------------------------------------------------------


async def test_master_sigkill_mid_load_loses_nothing_and_runs_nothing_twice(
    cluster: ClusterFactory, workload: Workload
) -> None:
    master = cluster.master(heartbeat_interval=BEAT, heartbeat_timeout="3s")
    _, port = split_address(master.address)
    for i in (1, 2):
        cluster.worker(master, worker_id=f"w{i}", max_tasks=6)
    async with Client(master.address) as client:
        await workload.submit(client, LOAD, SHORT_JOB)
        await wait_until(lambda: workload.ended() >= LOAD // 4, what="a quarter of the load")
        master.kill()  # with jobs queued, running, and results on their way
        down = workload.fault()
        cluster.master(
            data_dir=master.extra["data_dir"],
            listen=f"127.0.0.1:{port}",
            heartbeat_interval=BEAT,
            heartbeat_timeout="3s",
        )
        back = workload.fault()
        # No fault allowance: the workers survived, so nothing may run twice.
        report = await workload.verify(client, workers=worker_pids(cluster))
        # Results of runs that ended while no master was up were accepted after the restart.
        ended_while_down = {
            r.pid
            for runs in workload.executions().values()
            for r in runs
            if r.end_line is not None and down.ledger_mark <= r.end_line < back.ledger_mark
        }
        accepted = {int(j.stdout.split()[-1]) for j in workload.first_final.values()}
        assert ended_while_down & accepted, report.summary()


# ---- 5. drain ------------------------------------------------------------------------------


async def test_worker_drain_mid_load_hands_back_what_it_cannot_finish(
    cluster: ClusterFactory, workload: Workload, tmp_path: Path
) -> None:
    master = cluster.master(heartbeat_interval=BEAT, heartbeat_timeout="2s")
    drained = cluster.worker(master, worker_id="w1", max_tasks=6, extra=["--drain-timeout", "0.5s"])
    for i in (2, 3):
        cluster.worker(master, worker_id=f"w{i}", max_tasks=6)
    gate = tmp_path / "gate"
    async with Client(master.address) as client:
        gated = await workload.submit(client, 3, gate_body(gate))
        await workload.submit(client, LOAD, SHORT_JOB)
        await wait_until(lambda: workload.ended() >= LOAD // 4, what="a quarter of the load")
        await wait_until(lambda: on_worker(client, gated, "w1"), what="a gated job on w1")
        drained.signal(signal.SIGTERM)
        assert await asyncio.to_thread(drained.proc.wait, 20) == 0
        gate.touch()
        # No fault allowance: what w1 could not finish was killed and handed back.
        report = await workload.verify(client, workers=worker_pids(cluster))
        handed_back = [workload.first_final[j] for j in gated]
        assert any(j.attempt > 1 and j.retries == 0 for j in handed_back), report.summary()
        assert all(j.worker_id != "w1" for j in handed_back)


# ---- 6. cancel while the worker is unreachable (stopped) -----------------------------------


@pytest.mark.parametrize(
    ("timeout", "forgotten"),
    [("3s", False), ("1s", True)],
    ids=["stall-shorter-than-timeout", "stall-until-forgotten"],
)
async def test_cancel_while_its_worker_is_stopped_ends_cancelled_and_kills_it_on_return(
    cluster: ClusterFactory,
    workload: Workload,
    tmp_path: Path,
    timeout: str,
    forgotten: bool,
) -> None:
    master = cluster.master(heartbeat_interval=BEAT, heartbeat_timeout=timeout)
    stopped = cluster.worker(master, worker_id="w1", max_tasks=2)
    gate = tmp_path / "gate"
    async with Client(master.address) as client:
        [job_id] = await workload.submit(client, 1, gate_body(gate), expect=[JobStatus.CANCELLED])
        await wait_until(lambda: len(descendants_of(workload, stopped)) >= 3, what="its processes")
        cluster.worker(master, worker_id="w2", max_tasks=2)  # where it could be restarted
        doomed = {p.pid for p in descendants_of(workload, stopped)}
        stopped.signal(signal.SIGSTOP)
        try:
            cancel = asyncio.create_task(client.cancel(job_id))
            if forgotten:
                # Stopped until the master gives up on w1 and forgets it (closing its channel):
                # the job is CANCELLED and the Cancel call answers, all while w1 is stopped.
                await wait_until(
                    lambda: job_status(client, job_id, JobStatus.CANCELLED), what="CANCELLED"
                )
                await wait_until(lambda: node_gone(client, "w1"), what="w1 forgotten")
                await wait_until(cancel.done, 5.0, "the Cancel call to answer")
            else:
                # The fault: a one-second stall, well within the timeout, with the cancel
                # pending on the stopped worker.
                await asyncio.wait({cancel}, timeout=1.0)
        finally:
            stopped.signal(signal.SIGCONT)
        await cancel
        await all_gone(doomed, KILL_GRACE_S + 5, "the cancelled command to die once w1 is back")
        gate.touch()  # a restarted run would finish now, and show in the ledger
        await workload.verify(client, workers=worker_pids(cluster))
        assert len(workload.executions()[workload.tokens[job_id]]) == 1  # never restarted


async def node_gone(client: Client, node_id: str) -> bool:
    return all(n.id != node_id for n in await client.nodes())


async def node_status(client: Client, node_id: str, status: NodeStatus) -> bool:
    return any(n.id == node_id and n.status == status for n in await client.nodes())


async def job_status(client: Client, job_id: JobId, status: JobStatus) -> bool:
    return (await client.get(job_id)).status == status


# ---- 7. cancel and timeout of commands whose children ignore SIGTERM -----------------------

# A shell ignoring TERM with a child shell and grandchildren: ignored signals are inherited, so
# every process of the group ignores TERM; only the KILL after the grace period stops them.
IGNORES_TERM = "trap '' TERM; sh -c 'sleep 300 & sleep 300' & sleep 300 & wait"


def ignores_term(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(next(ln for ln in status.splitlines() if ln.startswith("SigIgn:")).split()[1], 16)
    return bool(ignored & (1 << (signal.SIGTERM - 1)))


async def test_cancel_and_timeout_kill_children_and_grandchildren_that_ignore_sigterm(
    cluster: ClusterFactory, workloads: list[Workload], tmp_path: Path
) -> None:
    master = cluster.master()
    cluster.worker(master, worker_id="w1", max_tasks=2)
    cancelled, timed_out = Workload(tmp_path, "cancel"), Workload(tmp_path, "timeout")
    workloads += [cancelled, timed_out]
    async with Client(master.address) as client:
        [to_cancel] = await cancelled.submit(client, 1, IGNORES_TERM, expect=[JobStatus.CANCELLED])
        await timed_out.submit(client, 1, IGNORES_TERM, expect=[JobStatus.TIMEOUT], timeout_s=1.5)
        for wl in (cancelled, timed_out):
            # sh -c (the job), its child sh, three sleeps: children and grandchildren.
            procs = await wait_until(
                lambda wl=wl: (found := marked_processes(wl.mark)) and len(found) >= 5 and found,
                what=f"the {wl.mark} processes",
            )
            assert all(ignores_term(p.pid) for p in procs)
        await client.cancel(to_cancel)
        for wl in (cancelled, timed_out):
            await wl.verify(client, orphan_wait_s=2.0)  # KILL comes with the end of the job


async def test_cancel_kills_a_grandchild_that_left_the_process_group(
    cluster: ClusterFactory, workload: Workload
) -> None:
    master = cluster.master()
    cluster.worker(master, worker_id="w1", max_tasks=2)
    async with Client(master.address) as client:
        [job_id] = await workload.submit(
            client, 1, "setsid sleep 300 & sleep 300", expect=[JobStatus.CANCELLED]
        )
        await wait_until(lambda: len(marked_processes(workload.mark)) >= 3, what="processes")
        await client.cancel(job_id)
        await workload.verify(client, orphan_wait_s=2.0)


# ---- 8. idempotent submit under a client that retries --------------------------------------


class LoseFirstSubmitReply(grpc.aio.UnaryUnaryClientInterceptor):
    """The network on the way back: the master accepts each keyed Submit, and the reply to the
    first one with each key is lost (the client sees UNAVAILABLE, as on a dropped connection)."""

    def __init__(self) -> None:
        self.lost: set[str] = set()

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        call = await continuation(client_call_details, request)
        method = client_call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        key = getattr(request, "idempotency_key", "")
        if method.endswith("/Submit") and key and key not in self.lost:
            await call  # accepted and durable on the master
            self.lost.add(key)
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="reply lost on the way back (injected)",
            )
        return call


class LossyClient(Client):
    def __init__(self, address: str, interceptor: LoseFirstSubmitReply) -> None:
        super().__init__(address)
        self.interceptor = interceptor

    async def __aenter__(self) -> LossyClient:
        self._channel = grpc.aio.insecure_channel(
            self.address, options=CHANNEL_OPTIONS, interceptors=[self.interceptor]
        )
        self._stub = master_pb2_grpc.MasterServiceStub(self._channel)
        return self


async def submit_retrying(client: Client, spec: TaskSpec, attempts: int = 5) -> JobId:
    """What a careful client does: submit with a key, and submit again when the reply is lost."""
    for _ in range(attempts - 1):
        try:
            return await client.submit(spec)
        except MasterUnavailable:
            continue
    return await client.submit(spec)


async def test_a_client_retrying_lost_submit_replies_creates_each_job_once(
    cluster: ClusterFactory, workload: Workload
) -> None:
    master = cluster.master()
    for i in (1, 2):
        cluster.worker(master, worker_id=f"w{i}", max_tasks=6)
    lossy = LoseFirstSubmitReply()
    made = workload.make(200, SHORT_JOB, idempotent=True)
    async with LossyClient(master.address, lossy) as client:
        limit = asyncio.Semaphore(32)

        async def submit(spec: TaskSpec, hedged: bool) -> set[JobId]:
            async with limit:
                if hedged:  # and one more, concurrently, as an impatient client would
                    both = await asyncio.gather(
                        submit_retrying(client, spec), submit_retrying(client, spec)
                    )
                    return set(both)
                return {await submit_retrying(client, spec)}

        answers = await asyncio.gather(
            *(submit(spec, hedged=i % 5 == 0) for i, (_, spec) in enumerate(made))
        )
        assert len(lossy.lost) == len(made)  # every job had its first reply lost
        for ids, (token, _) in zip(answers, made, strict=True):
            assert len(ids) == 1, f"{token}: {ids}"
            workload.track(ids.pop(), token)
        _, total = await client.list_jobs()
        assert total == len(made)
        await workload.verify(client, workers=worker_pids(cluster))  # each ran exactly once


# ---- 4. network partition (and 6. cancel while partitioned) --------------------------------


@dataclass
class CutOff:
    """Worker w3 and how the scenario cuts it off from the master, and heals it."""

    worker: Proc
    cut: Callable[[], None]
    heal: Callable[[], None]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(params=["netns", "proxy", "sigstop"])
def cut_off(
    request: pytest.FixtureRequest, cluster: ClusterFactory
) -> Iterator[tuple[Proc, CutOff]]:
    """A master and worker w3, which the test can cut off: a veth pair into a network namespace
    taken down (root only), a TCP proxy on each direction that stops forwarding, or SIGSTOP
    past the heartbeat timeout (the worker, not the network, goes silent)."""
    mode = request.param

    def master(listen: str = "127.0.0.1:0", extra: list[str] | None = None) -> Proc:
        return cluster.master(
            listen=listen, heartbeat_interval=BEAT, heartbeat_timeout="1s", extra=extra
        )

    if mode == "netns":
        reason = netns_unavailable()
        if reason:
            pytest.skip(reason)
        net = NetnsPartition()
        try:
            net.create()
            # Plain gRPC on the veth addresses, as every other test uses on loopback.
            m = master(listen=f"{net.host_ip}:0", extra=[INSECURE_FLAG])
            w3 = cluster.worker(
                m, "w3", max_tasks=6, listen=f"{net.ns_ip}:0", prefix=net.prefix,
                extra=[INSECURE_FLAG],
            )  # fmt: skip
            yield m, CutOff(w3, net.cut, net.heal)
        finally:
            net.destroy()
    elif mode == "proxy":
        m = master()
        up = CuttableProxy(*split_address(m.address)).start()
        w3_port = free_port()
        down = CuttableProxy("127.0.0.1", w3_port).start()

        def cut() -> None:
            up.cut()
            down.cut()

        def heal() -> None:
            up.heal()
            down.heal()

        try:
            w3 = cluster.worker(
                up.address, "w3", max_tasks=6, listen=f"127.0.0.1:{w3_port}",
                extra=["--advertise", down.address],
            )  # fmt: skip
            yield m, CutOff(w3, cut, heal)
        finally:
            up.close()
            down.close()
    else:
        m = master()
        w3 = cluster.worker(m, "w3", max_tasks=6)
        yield m, CutOff(w3, lambda: w3.signal(signal.SIGSTOP), lambda: w3.signal(signal.SIGCONT))


async def test_cut_off_worker_tasks_run_elsewhere_and_its_stale_attempts_are_stopped(
    cluster: ClusterFactory, workload: Workload, tmp_path: Path, cut_off: tuple[Proc, CutOff]
) -> None:
    master, w3 = cut_off
    gate = tmp_path / "gate"
    async with Client(master.address) as client:
        # Two long jobs on w3 only (the others start later): one to be retried, one to cancel.
        retried, cancelled = await workload.submit(client, 2, gate_body(gate))
        workload.expected[cancelled] = frozenset({JobStatus.CANCELLED})
        await wait_until(
            lambda: len(descendants_of(workload, w3.worker)) >= 6, what="two gated jobs on w3"
        )
        for i in (1, 2):
            cluster.worker(master, worker_id=f"w{i}", max_tasks=6)
        await workload.submit(client, LOAD, SHORT_JOB)
        await wait_until(lambda: workload.ended() >= LOAD // 4, what="a quarter of the load")
        stale = {p.pid for p in descendants_of(workload, w3.worker)}
        w3.cut()
        try:
            cut = workload.fault(w3.worker.pid)
            cancel = asyncio.create_task(client.cancel(cancelled))
            await wait_until(
                lambda: job_status(client, cancelled, JobStatus.CANCELLED), what="cancelled"
            )
            await wait_until(
                lambda: job_on(client, retried, {"w1", "w2"}), what="the gated job retried"
            )
            short = [j for j in workload.tokens if j not in (retried, cancelled)]
            await wait_until(lambda: all_final(client, short), 30, "the load to finish without w3")
        finally:
            w3.heal()
        healed = workload.fault(w3.worker.pid)
        await cancel
        await all_gone(stale, 20.0, "w3's stale attempts to be stopped after the heal")
        gate.touch()
        # Runs of w3 that ended while it was cut off are stale: it could not know. Their
        # results must never be accepted; runs ending after the heal would be a failure.
        report = await workload.verify(client, [healed], workers=worker_pids(cluster))
        runs = workload.executions()
        for job_id, job in workload.first_final.items():
            if job.status != JobStatus.COMPLETED:
                continue
            pid = int(job.stdout.split()[-1])
            [accepted] = [r for r in runs[workload.tokens[job_id]] if r.pid == pid]
            late = accepted.ppid == w3.worker.pid and (accepted.end_line or 0) >= cut.ledger_mark
            assert not late, f"{job_id}: a result w3 produced while cut off was accepted"
        assert workload.first_final[retried].worker_id in {"w1", "w2"}
        assert len(runs[workload.tokens[cancelled]]) == 1, "the cancelled job was restarted"
        assert report.cut_off_runs > 0  # the cut really hit running work


async def job_on(client: Client, job_id: JobId, workers: set[str]) -> bool:
    job = await client.get(job_id)
    return job.status == JobStatus.RUNNING and job.worker_id in workers


async def all_final(client: Client, ids: list[JobId]) -> bool:
    statuses = await asyncio.gather(*(client.get(j) for j in ids))
    return all(job.status.terminal for job in statuses)


# ---- master stall --------------------------------------------------------------------------


async def test_master_stalled_past_the_heartbeat_timeout_declares_no_worker_dead(
    cluster: ClusterFactory, workload: Workload
) -> None:
    master = cluster.master(heartbeat_interval=BEAT, heartbeat_timeout="1s")
    for i in (1, 2):
        cluster.worker(master, worker_id=f"w{i}", max_tasks=6)
    async with Client(master.address) as client:
        await workload.submit(client, LOAD, SHORT_JOB)
        await wait_until(lambda: workload.ended() >= LOAD // 4, what="a quarter of the load")
        master.signal(signal.SIGSTOP)
        # The fault: the master itself is frozen for twice the heartbeat timeout. The workers
        # beat all along; that the master did not hear them is no sign that they are dead.
        resume_at = time.monotonic() + 2.0
        while time.monotonic() < resume_at:
            await asyncio.sleep(0.05)
        master.signal(signal.SIGCONT)
        report = await workload.verify(client, workers=worker_pids(cluster))
        assert all(j.retries == 0 for j in workload.first_final.values()), report.summary()


async def test_master_down_longer_than_the_heartbeat_timeout_runs_nothing_twice(
    cluster: ClusterFactory, workload: Workload
) -> None:
    master = cluster.master(heartbeat_interval=BEAT, heartbeat_timeout="1s")
    _, port = split_address(master.address)
    # The worker reaches the master through a proxy only to count its connection attempts.
    proxy = CuttableProxy("127.0.0.1", port).start()
    try:
        cluster.worker(proxy.address, worker_id="w1", max_tasks=12)
        async with Client(master.address) as client:
            await workload.submit(client, 12, "sleep 2")
            await wait_until(lambda: len(workload.lines()) >= 12, what="12 commands running")
            master.kill()
            # The fault: the master stays down while the worker tries to reconnect four times
            # (about 5 s); meanwhile the commands finish and the worker holds their results.
            before = proxy.accepted
            await wait_until(lambda: proxy.accepted >= before + 4, 20, "4 reconnect attempts")
            cluster.master(
                data_dir=master.extra["data_dir"],
                listen=f"127.0.0.1:{port}",
                heartbeat_interval=BEAT,
                heartbeat_timeout="1s",
            )
            report = await workload.verify(client, workers=worker_pids(cluster))
            assert all(j.retries == 0 for j in workload.first_final.values()), report.summary()
    finally:
        proxy.close()


# ---- a task that kills its workers ---------------------------------------------------------


async def test_a_task_that_kills_its_workers_is_failed_as_poison_and_the_rest_survive(
    cluster: ClusterFactory, workload: Workload
) -> None:
    master = cluster.master(
        heartbeat_interval=BEAT, heartbeat_timeout="1s", extra=["--poison-after", "2"]
    )
    # (as root: a command running as nobody cannot kill a root worker)
    workers = [
        cluster.worker(master, worker_id=f"w{i}", max_tasks=6, run_as="root") for i in (1, 2, 3)
    ]

    async def death(worker: Proc) -> Fault:
        """When ``worker`` dies: the ledger mark once its commands are gone too."""
        while worker.alive():  # polled, not waited on in a thread: cancellable
            await asyncio.sleep(0.02)
        await all_gone(
            {r.pid for r in workload.running_on(worker.pid)},
            DIE_WITH_WORKER_S,
            "its commands to die with it",
        )
        return workload.fault(worker.pid)

    deaths = [asyncio.create_task(death(w)) for w in workers]
    try:
        async with Client(master.address) as client:
            await workload.submit(client, LOAD // 2, SHORT_JOB)
            [poison] = await workload.submit(
                client, 1, "kill -9 $PPID; sleep 1", expect=[JobStatus.FAILED]
            )
            await workload.submit(client, LOAD // 2, SHORT_JOB)
            await wait_until(lambda: job_status(client, poison, JobStatus.FAILED), 30, "poison")
            job = await client.get(poison)
            assert "lost 2 times in a row" in job.error, job.error
            assert [a.outcome for a in job.attempts] == [AttemptOutcome.WORKER_LOST] * 2
            await wait_until(lambda: sum(d.done() for d in deaths) == 2, what="two deaths")
            faults = [d.result() for d in deaths if d.done()]
            await workload.verify(client, faults, workers=worker_pids(cluster))
    finally:
        for d in deaths:
            d.cancel()
        await asyncio.gather(*deaths, return_exceptions=True)
