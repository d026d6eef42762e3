"""The auto scaler end to end, shared by the local and the Kubernetes backend tests.

A backlog of jobs makes the master scale up, the new workers drain the queue, and after the
idle delay the master scales down again. Every job must complete exactly once: each one appends
a line to its own marker file, and none may need a second attempt (a worker removed while it
ran a job would have forced one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from dist_exec.client import Client, command_spec
from dist_exec.models import JobStatus, ScalerStatus
from dist_exec.security.credentials import Credentials

T = TypeVar("T")
# Scaler timings short enough for a test (environment of the master, or of `dist-exec up`).
FAST_SCALING = {
    "SCALE_DOWN_DELAY_SECONDS": "2s",
    "COOLDOWN_SECONDS": "0.5s",
    "SCALE_DOWN_COOLDOWN_SECONDS": "1s",
    "MIN_WORKER_LIFETIME_SECONDS": "1s",
    "SCALE_INTERVAL_SECONDS": "0.2s",
    "HEARTBEAT_INTERVAL_SECONDS": "0.5s",
    "HEARTBEAT_TIMEOUT_SECONDS": "3s",
}


async def until(
    probe: Callable[[], Awaitable[T | None]], timeout: float, what: str, poll: float = 0.05
) -> T:
    """Await ``probe`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(poll)


@dataclass
class ScaleRun:
    backlog_to_scale_up_s: float = 0.0
    idle_to_scale_down_s: float = 0.0
    peak_nodes: int = 0
    nodes_seen: set[str] = field(default_factory=set)


async def scaler(client: Client) -> ScalerStatus:
    status = await client.scaler_status()
    assert status is not None, "the master runs no auto scaler"
    return status


async def backlog_then_idle(
    address: str,
    markers: Path,
    *,
    jobs: int,
    job_s: float,
    min_nodes: int,
    max_nodes: int,
    timeout: float = 90.0,
    credentials: Credentials | None = None,
) -> ScaleRun:
    """Run the scenario against the master at ``address``; returns what was measured."""
    run = ScaleRun()
    markers.mkdir(parents=True, exist_ok=True)
    markers.chmod(0o777)  # commands of a root worker run as nobody
    async with Client(address, credentials=credentials) as client:

        async def settled() -> bool:
            status = await scaler(client)
            nodes = await client.nodes()
            return status.desired == min_nodes and len(nodes) == min_nodes

        await until(settled, 30, f"{min_nodes} worker(s) at the start")
        before = (await scaler(client)).desired
        specs = [
            command_spec(f"echo ran >> {markers}/{i}; sleep {job_s}", shell=True, timeout_s=60)
            for i in range(jobs)
        ]
        job_ids = await client.submit_many(specs)
        submitted = time.monotonic()

        async def scaled_up() -> bool:
            return (await scaler(client)).desired > before

        await until(scaled_up, 30, "the first scale-up", poll=0.02)
        run.backlog_to_scale_up_s = time.monotonic() - submitted

        peak = 0  # desired workers, at most

        async def all_done() -> bool:
            nonlocal peak
            nodes = await client.nodes()
            run.nodes_seen |= {n.id for n in nodes}
            run.peak_nodes = max(run.peak_nodes, len(nodes))
            peak = max(peak, (await scaler(client)).desired)
            finished = [await client.get(j) for j in job_ids]
            return all(j.status.terminal for j in finished)

        await until(all_done, timeout, "every job to finish", poll=0.2)
        idle = time.monotonic()

        async def scaled_down() -> bool:
            return (await scaler(client)).desired < peak

        await until(scaled_down, timeout, "the first scale-down", poll=0.02)
        run.idle_to_scale_down_s = time.monotonic() - idle
        await until(settled, timeout, f"back to {min_nodes} worker(s)")

        for job_id in job_ids:
            job = await client.get(job_id)
            assert job.status == JobStatus.COMPLETED, (job.id, job.status, job.error)
            assert job.attempt == 1, f"job {job.id} needed {job.attempt} attempts"
        for i in range(jobs):
            assert (markers / str(i)).read_text() == "ran\n", f"job {i} did not run exactly once"
        assert 1 < run.peak_nodes <= max_nodes, run
        assert peak <= max_nodes
    return run
