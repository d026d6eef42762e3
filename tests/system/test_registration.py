"""Who may register at which address, with real processes over mutual TLS: a worker credential
cannot take a live node's address, and a worker that restarts, or replaces a dead one at its
address, is dialled as itself."""

from __future__ import annotations

import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import grpc.aio
import pytest

from dist_exec import wire
from dist_exec.client import Client, command_spec
from dist_exec.models import JobStatus, NodeStatus
from dist_exec.rpc.v1 import worker_pb2, worker_pb2_grpc
from tests.conftest import ClusterFactory, pid_alive, wait_for, wait_until
from tests.system.test_recovery import wait_job
from tests.system.test_security import _audit

pytestmark = pytest.mark.system


async def test_a_worker_credential_cannot_take_a_live_nodes_address(
    cluster: ClusterFactory,
) -> None:
    """node-x claiming local-1's address used to be accepted: the master then dialled local-1
    expecting node-x's certificate, and local-1, still HEALTHY, lost every job it was given."""
    master = cluster.master(secure=True)
    local_1 = cluster.worker(master, worker_id="local-1", secure=True)
    pki = cluster.pki
    async with pki.credentials("node-x", "worker").channel(master.address) as channel:
        stub = worker_pb2_grpc.RegistrationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Register(
                worker_pb2.RegisterRequest(
                    worker_id="node-x", address=local_1.address, capabilities=["command"],
                    max_concurrent_tasks=4, dispatch_stream=True,
                ),
                timeout=10,
            )  # fmt: skip
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert info.value.details() == (
        f"address {local_1.address} is held by node local-1 (HEALTHY); another node may take "
        "it once local-1 is UNHEALTHY or gone"
    )
    assert ("register", "node-x", "denied") in [
        (e["action"], e["identity"], e["decision"]) for e in _audit(master)
    ]
    async with Client(master.address, credentials=pki.credentials("root", "admin")) as root:
        assert [(n.id, n.status) for n in await root.nodes()] == [("local-1", NodeStatus.HEALTHY)]
        done = await root.wait(await root.submit(command_spec(["echo", "still here"])))
        assert (done.status, done.worker_id, done.stdout) == (
            JobStatus.COMPLETED, "local-1", b"still here\n"
        )  # fmt: skip
        long = await root.submit(command_spec(["sleep", "60"]))

        async def running() -> bool:
            return (await root.get(long)).status == JobStatus.RUNNING

        await wait_until(running, 20, "the job to run")
        await root.cancel(long)
        cancelled = await root.wait(long)
        assert (cancelled.status, cancelled.worker_id) == (JobStatus.CANCELLED, "local-1")
        assert "unreachable" not in cancelled.error


async def test_an_address_passes_on_once_its_node_is_dead_and_a_restart_keeps_it(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master(secure=True)  # heartbeat timeout 2 s
    old = cluster.worker(master, worker_id="old", secure=True)
    listen = old.address  # (taken again once "old" is dead: as a restarted pod would)
    old.kill()
    # A new worker on the dead one's address: refused while "old" may still be alive, then
    # registered (the worker retries); the master dials it expecting its own certificate.
    new = cluster.worker(master, worker_id="new", secure=True, listen=listen)
    assert "is held by node old" in new.log_text()
    pki = cluster.pki
    async with Client(master.address, credentials=pki.credentials("root", "admin")) as root:
        nodes = {n.id: n.status for n in await root.nodes()}
        assert nodes == {"old": NodeStatus.UNHEALTHY, "new": NodeStatus.HEALTHY}
        done = await root.wait(await root.submit(command_spec(["echo", "new"])))
        assert (done.status, done.worker_id) == (JobStatus.COMPLETED, "new")
        # The same node restarting at its address registers at once (it holds the address).
        new.signal(signal.SIGKILL)
        new.proc.wait(timeout=10)
        again = cluster.worker(master, worker_id="new", secure=True, listen=listen)
        assert "is held by" not in again.log_text()
        done = await root.wait(await root.submit(command_spec(["echo", "again"])))
        assert (done.status, done.worker_id, done.stdout) == (
            JobStatus.COMPLETED, "new", b"again\n"
        )  # fmt: skip


class RecordingRegistry(worker_pb2_grpc.RegistrationServiceServicer):
    """A master's RegistrationService (on threads: the test's loop blocks while a worker
    starts) that records registrations and forgets the node at every heartbeat, so it
    registers again."""

    def __init__(self) -> None:
        self.registrations: list[worker_pb2.RegisterRequest] = []

    def Register(
        self, request: worker_pb2.RegisterRequest, context: object
    ) -> worker_pb2.RegisterResponse:
        self.registrations.append(request)
        return worker_pb2.RegisterResponse(accepted=True, heartbeat_interval=wire.duration(0.1))

    def Heartbeat(
        self, request: worker_pb2.HeartbeatRequest, context: object
    ) -> worker_pb2.HeartbeatResponse:
        return worker_pb2.HeartbeatResponse(acknowledged=False)

    def Deregister(
        self, request: worker_pb2.DeregisterRequest, context: object
    ) -> worker_pb2.DeregisterResponse:
        return worker_pb2.DeregisterResponse(acknowledged=True)


def test_a_worker_registers_again_as_the_same_instance_until_it_restarts(
    cluster: ClusterFactory,
) -> None:
    """What lets a master tell a start that never reached a worker (same process) from one a
    restarted worker lost (NOT_STARTED or WORKER_LOST)."""
    registry = RecordingRegistry()
    server = grpc.server(ThreadPoolExecutor(4))
    worker_pb2_grpc.add_RegistrationServiceServicer_to_server(registry, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        worker = cluster.worker(f"127.0.0.1:{port}", worker_id="w1")
        wait_for(lambda: len(registry.registrations) >= 3, 20, "three registrations")
        first = {r.instance for r in registry.registrations}
        assert len(first) == 1
        assert len(next(iter(first))) >= 16
        worker.stop()
        seen = len(registry.registrations)
        cluster.worker(f"127.0.0.1:{port}", worker_id="w1")
        wait_for(lambda: len(registry.registrations) > seen, 20, "a new registration")
        assert registry.registrations[-1].instance not in first
    finally:
        server.stop(None)


async def test_a_process_replaced_under_its_worker_id_is_told_to_stop(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    """x1 stalls past the heartbeat timeout, its job goes to x2, registered as the same id;
    then x1 wakes. Its heartbeats kept the node alive (at x2's address, even after x2 died),
    its deregistration removed x2, and its attempt ran on next to x2's. Now it is told to
    shut down, and its attempt dies with it."""
    master = cluster.master()
    x1 = cluster.worker(master, worker_id="x", max_tasks=1)
    pids = tmp_path / "pids"
    pids.mkdir()
    command = f'echo $$ > {pids}/"$DIST_EXEC_ATTEMPT"; exec sleep 300'
    async with Client(master.address) as client:
        job_id = await client.submit(command_spec(command, shell=True))
        await wait_until(lambda: (pids / "1").exists(), what="attempt 1 to start")
        first = int((pids / "1").read_text())
        x1.signal(signal.SIGSTOP)
        job = await wait_job(client, job_id, statuses={JobStatus.PENDING})
        x2 = cluster.worker(master, worker_id="x", max_tasks=1)
        await wait_until(lambda: (pids / "2").exists(), what="attempt 2 to start on x2")
        x1.signal(signal.SIGCONT)

        assert await asyncio.to_thread(x1.proc.wait, 30) == 1
        assert "another process registered with master" in x1.log_text()
        await wait_until(lambda: not pid_alive(first), what="attempt 1 to be killed")
        (node,) = await client.nodes()
        assert (node.address, node.status) == (x2.address, NodeStatus.HEALTHY)
        job = await client.get(job_id)
        assert (job.status, job.attempt, job.worker_id) == (JobStatus.RUNNING, 2, "x")
        assert pid_alive(int((pids / "2").read_text()))
        await client.cancel(job_id)
