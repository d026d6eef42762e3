"""Where jobs run: balancers, slot limits and label selectors, with real processes.

Every expectation here is about placement, which the master decides at submit time: a job that
fits is RUNNING on its node when ``submit`` returns. The tests keep nodes from filling up where
a full node would change the balancer's choices, and wait on conditions, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from dist_exec.client import Client, Job, JobStatus, command_spec
from dist_exec.models import TaskSpec
from tests.conftest import ClusterFactory, run_cli, wait_for

pytestmark = pytest.mark.system


# ---- helpers --------------------------------------------------------------------------------


async def finish(client: Client, job_ids: Sequence[str], timeout: float = 60.0) -> list[Job]:
    """The final state of every job, in the order of ``job_ids``."""
    final: dict[str, Job] = {}
    async with asyncio.timeout(timeout):
        async for job_id, item in client.watch_many(job_ids, with_output=False):
            if isinstance(item, Job):
                final[job_id] = item
    assert set(final) == set(job_ids)
    return [final[j] for j in job_ids]


async def run_in_batches(
    client: Client, specs: Sequence[TaskSpec], batch: int, timeout: float = 60.0
) -> list[Job]:
    """Submit ``batch`` jobs at a time, each batch only once the one before has ended."""
    done: list[Job] = []
    for start in range(0, len(specs), batch):
        ids = await client.submit_many(specs[start : start + batch])
        done += await finish(client, ids, timeout)
    return done


async def get_all(client: Client, job_ids: Sequence[str]) -> list[Job]:
    return [await client.get(j) for j in job_ids]


async def wait_active(client: Client, expected: dict[str, int], timeout: float = 10.0) -> None:
    """Until the master's reserved slots per node are exactly ``expected``."""
    seen: dict[str, int] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                seen = {n.id: n.active_tasks for n in await client.nodes()}
                if seen == expected:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"active tasks per node: wanted {expected}, last saw {seen}") from None


async def wait_status(
    client: Client, job_id: str, statuses: set[JobStatus], timeout: float = 20.0
) -> Job:
    async with asyncio.timeout(timeout):
        while True:
            job = await client.get(job_id)
            if job.status in statuses:
                return job
            await asyncio.sleep(0.02)


def gated(gate: Path, marker: Path | None = None) -> TaskSpec:
    """A job that runs until ``gate`` exists (touching ``marker`` once it has started)."""
    touch = f"touch {marker}; " if marker is not None else ""
    return command_spec(f"{touch}while [ ! -e {gate} ]; do sleep 0.02; done", shell=True)


def selecting(spec: TaskSpec, **labels: str) -> TaskSpec:
    return replace(spec, selector=labels)


def cli_json(*args: str, master: str) -> dict[str, object]:
    result = run_cli(*args, "--json", master=master)
    assert result.code == 0, result.stderr
    body: dict[str, object] = json.loads(result.stdout)
    return body


def longest_run(items: Sequence[str]) -> int:
    """The length of the longest stretch of equal consecutive items."""
    best = run = 0
    for i, item in enumerate(items):
        run = run + 1 if i and items[i - 1] == item else 1
        best = max(best, run)
    return best


def max_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end at t comes before a start at t)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    best = open_now = 0
    for _, delta in events:
        open_now += delta
        best = max(best, open_now)
    return best


# ---- balancers ------------------------------------------------------------------------------


async def test_weighted_shares_follow_worker_weights(cluster: ClusterFactory) -> None:
    master = cluster.master(extra=["--balancer", "weighted"])
    for weight in (1, 2, 3):
        cluster.worker(
            master, worker_id=f"w{weight}", max_tasks=16, extra=["--weight", f"{weight}"]
        )
    async with Client(master.address) as client:
        # Smooth WRR gives exact shares over every run of 6 picks while the set of eligible nodes
        # stays the same; a full node is skipped and would skew them. A batch of 12 puts at most
        # 6 on w3, so even with the previous batch's slots not yet released (results are
        # announced before the slot is freed) no node reaches its 16: the shares stay exact, and
        # the tolerance below only absorbs an unexpected infrastructure retry.
        jobs = await run_in_batches(client, [command_spec(["true"])] * 600, batch=12)
    assert all(j.status == JobStatus.COMPLETED for j in jobs), {j.error for j in jobs}
    counts = Counter(j.worker_id for j in jobs)
    assert set(counts) == {"w1", "w2", "w3"}, counts
    for weight in (1, 2, 3):
        assert abs(counts[f"w{weight}"] - 100 * weight) <= 6, counts  # 1% of 600 jobs
    # Interleaved, not bunched: the smooth sequence is w3 w2 w1 w3 w2 w3, repeating, so in
    # submission order (which is pick order here) no node gets more than two jobs in a row.
    assert longest_run([j.worker_id for j in jobs]) <= 2


@pytest.mark.parametrize(
    ("balancer", "longs_per_node"),
    [
        # Alternating long and short jobs: round robin sends every long one to w1.
        ("round-robin", {"w1": 4, "w2": 0}),
        # Least connections sends each job where the fewest slots are taken: the long ones
        # spread. (Ties take turns, so the exact order is L1 w1, L2 w2, L3 w2, L4 w1.)
        ("least-connections", {"w1": 2, "w2": 2}),
    ],
)
async def test_least_connections_spreads_long_jobs_where_round_robin_piles_them(
    cluster: ClusterFactory, tmp_path: Path, balancer: str, longs_per_node: dict[str, int]
) -> None:
    master = cluster.master(extra=["--balancer", balancer])
    for node in ("w1", "w2"):
        cluster.worker(master, worker_id=node, max_tasks=4)
    gate = tmp_path / "gate"
    longs: list[str] = []
    shorts: list[str] = []
    async with Client(master.address) as client:
        try:
            for _ in range(4):
                # Long: runs until the gate opens, so it is still running while the rest are
                # placed (no race against a sleep on a slow machine).
                longs.append(await client.submit(gated(gate)))
                shorts.append(await client.submit(command_spec(["true"])))
                (short,) = await finish(client, [shorts[-1]])
                assert short.status == JobStatus.COMPLETED, short.error
                # Its slot is free again before the next long job is placed.
                where = Counter(j.worker_id for j in await get_all(client, longs))
                await wait_active(client, {node: where[node] for node in ("w1", "w2")})
            running = await get_all(client, longs)
            assert all(j.status == JobStatus.RUNNING for j in running)
            placed = Counter(j.worker_id for j in running)
            assert {node: placed[node] for node in ("w1", "w2")} == longs_per_node
            # The master's own slot count agrees with where the jobs are.
            await wait_active(client, longs_per_node)
            if balancer == "round-robin":
                assert {j.worker_id for j in await get_all(client, shorts)} == {"w2"}
        finally:
            gate.touch()
        done = await finish(client, longs)
    assert all(j.status == JobStatus.COMPLETED for j in done), [j.error for j in done]


async def test_random_spreads_jobs_roughly_evenly(cluster: ClusterFactory) -> None:
    master = cluster.master(extra=["--balancer", "random"])
    for node in ("w1", "w2", "w3"):
        cluster.worker(master, worker_id=node, max_tasks=64)
    async with Client(master.address) as client:
        # Batches of 30 on 64 slots a node: no node is ever full, so every pick is uniform
        # among all three.
        jobs = await run_in_batches(client, [command_spec(["true"])] * 300, batch=30)
    assert all(j.status == JobStatus.COMPLETED for j in jobs), {j.error for j in jobs}
    counts = Counter(j.worker_id for j in jobs)
    assert set(counts) == {"w1", "w2", "w3"}, counts
    # Each count is Binomial(300, 1/3): mean 100, standard deviation 8.2. 60-140 is 4.9
    # standard deviations either side; a correct balancer fails this about 3 times in a
    # million runs (all three nodes together).
    assert all(60 <= c <= 140 for c in counts.values()), counts


# ---- slot limits ----------------------------------------------------------------------------


async def test_no_node_runs_more_tasks_than_its_slots(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    master = cluster.master()
    for node in ("w1", "w2"):
        cluster.worker(master, worker_id=node, max_tasks=2)
    times = tmp_path / "times"
    times.mkdir()
    specs = [
        command_spec(
            f"date +%s.%N > {times}/{i}.start; sleep 0.4; date +%s.%N > {times}/{i}.end",
            shell=True,
        )
        for i in range(20)
    ]
    samples: list[dict[str, tuple[int, int]]] = []
    async with Client(master.address) as client:
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                samples.append({n.id: (n.active_tasks, n.max_tasks) for n in await client.nodes()})
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        try:
            ids = await client.submit_many(specs)
            jobs = await finish(client, ids)
        finally:
            stop.set()
            await sampler
    assert all(j.status == JobStatus.COMPLETED for j in jobs), [j.error for j in jobs]
    assert all(j.retries == 0 for j in jobs)
    # The master's view: never more slots taken than a node has.
    assert samples
    over = [s for s in samples if any(active > most for active, most in s.values())]
    assert not over, over[:5]
    assert max(active for s in samples for active, _ in s.values()) == 2  # it did fill up
    # The workers' view: when each command really ran, from its own clock.
    intervals: dict[str, list[tuple[float, float]]] = {"w1": [], "w2": []}
    for i, job in enumerate(jobs):
        start = float((times / f"{i}.start").read_text())
        end = float((times / f"{i}.end").read_text())
        intervals[job.worker_id].append((start, end))
    overlap = {node: max_overlap(spans) for node, spans in intervals.items()}
    assert all(o <= 2 for o in overlap.values()), overlap
    assert max(overlap.values()) == 2, overlap  # jobs did run side by side


# ---- selectors ------------------------------------------------------------------------------


async def test_selector_jobs_land_only_on_matching_nodes(cluster: ClusterFactory) -> None:
    master = cluster.master()
    cluster.worker(master, worker_id="wa", max_tasks=4, labels={"zone": "a"})
    cluster.worker(master, worker_id="wb", max_tasks=4, labels={"zone": "b"})
    addr = master.address
    results = await asyncio.gather(
        *(
            asyncio.to_thread(cli_json, "run", "--selector", "zone=a", f"echo {i}", master=addr)
            for i in range(10)
        )
    )
    assert [r["output"] for r in results] == [f"{i}\n" for i in range(10)]
    assert {r["worker_id"] for r in results} == {"wa"}
    assert all(r["selector"] == {"zone": "a"} for r in results)
    async with Client(addr) as client:
        # The same through the SDK, and the other zone; jobs without a selector use both nodes.
        b_ids = await client.submit_many([selecting(command_spec(["true"]), zone="b")] * 10)
        b_jobs = await finish(client, b_ids)
        # (Only once wb is idle again: while it is full, jobs without a selector all go to wa.)
        await wait_active(client, {"wa": 0, "wb": 0})
        free_ids = await client.submit_many([command_spec(["true"])] * 8)
        free_jobs = await finish(client, free_ids)
    assert {j.worker_id for j in b_jobs} == {"wb"}
    assert Counter(j.worker_id for j in free_jobs) == {"wa": 4, "wb": 4}  # round robin


async def test_unmatched_selector_waits_for_a_matching_node(cluster: ClusterFactory) -> None:
    master = cluster.master()
    cluster.worker(master, worker_id="wa", labels={"zone": "a"})
    cluster.worker(master, worker_id="wb", labels={"zone": "b"})
    addr = master.address
    detached = run_cli("run", "-d", "--selector", "zone=c", "echo in c", master=addr)
    assert detached.code == 0, detached.stderr
    job_id = detached.stdout.strip()

    body = cli_json("status", job_id, master=addr)
    assert body["status"] == "PENDING"
    assert body["worker_id"] is None
    assert body["selector"] == {"zone": "c"}
    reason = body["pending_reason"]
    assert isinstance(reason, str)
    assert "no matching node" in reason
    assert "zone=c" in reason
    text = run_cli("status", job_id, master=addr)
    assert text.code == 0, text.stderr
    lines = text.stdout.splitlines()
    assert any(line.startswith("pending:") and "no matching node" in line for line in lines)
    assert any(line.startswith("selector:") and "zone=c" in line for line in lines)

    cluster.worker(master, worker_id="wc", labels={"zone": "c"})

    def completed() -> dict[str, object] | None:
        body = cli_json("status", job_id, master=addr)
        return body if body["status"] == "COMPLETED" else None

    body = wait_for(completed, timeout=20, what=f"job {job_id} to run on wc")
    assert body["worker_id"] == "wc"
    assert body["output"] == "in c\n"
    assert body["pending_reason"] is None
    assert not any(
        line.startswith("pending:")
        for line in run_cli("status", job_id, master=addr).stdout.splitlines()
    )


async def test_busy_matching_nodes_keep_a_selector_job_pending(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    master = cluster.master()
    cluster.worker(master, worker_id="wa", max_tasks=1, labels={"zone": "a"})
    cluster.worker(master, worker_id="wb", max_tasks=4, labels={"zone": "b"})
    addr = master.address
    gate, started = tmp_path / "gate", tmp_path / "started"
    async with Client(addr) as client:
        try:
            blocker = await client.submit(selecting(gated(gate, started), zone="a"))
            await asyncio.to_thread(wait_for, started.exists, 20, "the blocking job to start")
            assert (await client.get(blocker)).worker_id == "wa"
            waiting = await client.submit(selecting(command_spec(["echo", "second"]), zone="a"))
            job = await client.get(waiting)
            assert job.status == JobStatus.PENDING  # wb has room but not the label
            assert "busy" in job.pending_reason, job.pending_reason
            body = await asyncio.to_thread(cli_json, "status", waiting, master=addr)
            assert body["status"] == "PENDING"
            assert isinstance(body["pending_reason"], str)
            assert "busy" in body["pending_reason"]
            # A job without a selector is not held up behind it: it takes wb's free slot.
            (free,) = await finish(client, [await client.submit(command_spec(["true"]))], 20)
            assert free.status == JobStatus.COMPLETED
            assert free.worker_id == "wb"
            assert (await client.get(waiting)).status == JobStatus.PENDING
        finally:
            gate.touch()
        first, second = await finish(client, [blocker, waiting])
    assert first.status == second.status == JobStatus.COMPLETED
    assert first.worker_id == second.worker_id == "wa"
    async with Client(addr) as client:
        assert (await client.get(waiting)).stdout == b"second\n"
