"""A worker honours the DRAIN action of a heartbeat reply: it takes no new tasks, reports
NOT_SERVING on its health service (so its pod turns NotReady), says it is draining in its
heartbeats and stays up until it is stopped, then deregisters."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dist_exec.rpc.v1 import worker_pb2, worker_pb2_grpc
from tests.conftest import ClusterFactory, wait_for


class DrainingMaster(worker_pb2_grpc.RegistrationServiceServicer):
    """A master that answers every heartbeat with DRAIN once ``drain`` is set."""

    def __init__(self) -> None:
        self.drain = threading.Event()
        self.heartbeats: list[worker_pb2.HeartbeatRequest] = []
        self.registrations: list[worker_pb2.RegisterRequest] = []
        self.deregistered = threading.Event()
        self.forget = threading.Event()  # as a restarted master: the node is unknown
        self.refuse = threading.Event()  # registrations are refused (and the node is unknown)
        self.shutdown = threading.Event()  # heartbeats are answered SHUTDOWN

    def Register(self, request: Any, context: Any) -> worker_pb2.RegisterResponse:
        self.registrations.append(request)
        if self.refuse.is_set():
            return worker_pb2.RegisterResponse(accepted=False, message="not now")
        self.forget.clear()
        response = worker_pb2.RegisterResponse(accepted=True, message="ok")
        response.heartbeat_interval.FromMilliseconds(100)
        return response

    def Heartbeat(self, request: Any, context: Any) -> worker_pb2.HeartbeatResponse:
        self.heartbeats.append(request)
        action = worker_pb2.HEARTBEAT_ACTION_DRAIN if self.drain.is_set() else 0
        if self.shutdown.is_set():
            action = worker_pb2.HEARTBEAT_ACTION_SHUTDOWN
        known = not self.forget.is_set()
        return worker_pb2.HeartbeatResponse(acknowledged=known, action=action)  # type: ignore[arg-type]

    def Deregister(self, request: Any, context: Any) -> worker_pb2.DeregisterResponse:
        self.deregistered.set()
        return worker_pb2.DeregisterResponse(acknowledged=True)


@pytest.fixture
def fake_master() -> Iterator[tuple[DrainingMaster, str]]:
    servicer = DrainingMaster()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_RegistrationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        return int(reply.status)


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The readiness/liveness command of deploy/kubernetes/worker.yaml."""
    return subprocess.run(
        [sys.executable, "-m", "dist_exec.healthcheck", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_health_probe_speaks_mutual_tls(cluster: ClusterFactory) -> None:
    """With the TLS files of the server it runs beside (tls-patch.yaml's environment)."""
    master = cluster.master(secure=True)
    worker = cluster.worker(master, worker_id="tls-w", secure=True)
    for server, name in ((master, "master"), (worker, "tls-w")):
        issued = cluster.pki.issue(name, "master" if name == "master" else "worker")
        env = {
            "DIST_EXEC_TLS_CA": str(cluster.pki.ca),
            "DIST_EXEC_TLS_CERT": str(issued.cert),
            "DIST_EXEC_TLS_KEY": str(issued.key),
        }
        assert probe(server.address, env=env).returncode == 0, probe(server.address, env=env)
        assert probe(server.address).returncode == 1  # plain text at a TLS server
    broken = probe(master.address, env={**env, "DIST_EXEC_TLS_KEY": "/nonexistent"})
    assert broken.returncode == 1
    assert broken.stderr.startswith("unhealthy: cannot read the TLS files")


def test_health_probe_bad_input_and_unreachable_server() -> None:
    usage = probe()
    assert usage.returncode == 2
    assert "usage: python -m dist_exec.healthcheck HOST:PORT [--alive]" in usage.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        down = probe(address, "--alive")
    assert down.returncode == 1
    assert down.stderr.startswith(f"unhealthy: {address}: UNAVAILABLE")


def test_drain_action_makes_the_worker_not_serving_and_keeps_it_up(
    cluster: ClusterFactory, fake_master: tuple[DrainingMaster, str]
) -> None:
    servicer, address = fake_master
    worker = cluster.worker(address, worker_id="victim")
    wait_for(lambda: servicer.heartbeats, 10, "a first heartbeat")
    assert health(worker.address) == health_pb2.HealthCheckResponse.SERVING
    assert probe(worker.address).returncode == 0
    assert not servicer.heartbeats[-1].draining
    with grpc.insecure_channel(worker.address) as channel:  # a Watch hears the change too
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        servicer.drain.set()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    wait_for(
        lambda: health(worker.address) == health_pb2.HealthCheckResponse.NOT_SERVING,
        10,
        "the worker to report NOT_SERVING",
    )
    wait_for(lambda: servicer.heartbeats[-1].draining, 10, "a heartbeat saying draining")
    count = len(servicer.heartbeats)
    wait_for(lambda: len(servicer.heartbeats) > count + 2, 10, "more heartbeats")
    assert worker.alive(), "a drained worker stays up until it is stopped"
    # The pod's probes: not ready (the ReplicaSet deletes it first), but alive (no restart).
    readiness = probe(worker.address)
    assert readiness.returncode == 1
    assert readiness.stderr.strip() == f"unhealthy: {worker.address}: NOT_SERVING"
    assert probe(worker.address, "--alive").returncode == 0
    assert "the master asked this node to drain" in worker.log_text()

    assert worker.stop() == 0
    assert servicer.deregistered.is_set()


def test_a_master_that_will_not_take_the_node_back_does_not_hold_up_its_drain(
    cluster: ClusterFactory, fake_master: tuple[DrainingMaster, str]
) -> None:
    """Its drain heartbeat registered again, and kept trying until the master accepted."""
    servicer, address = fake_master
    worker = cluster.worker(address, worker_id="victim", extra=["--drain-timeout", "1s"])
    wait_for(lambda: servicer.heartbeats, 10, "a first heartbeat")
    servicer.refuse.set()
    servicer.forget.set()
    wait_for(lambda: len(servicer.registrations) > 1, 10, "a registration refused")
    assert worker.stop() == 0  # (within stop's own deadline)


def test_a_master_that_says_shutdown_has_the_worker_drain_and_exit(
    cluster: ClusterFactory, fake_master: tuple[DrainingMaster, str]
) -> None:
    """SHUTDOWN (in the contract) from a master that knows the node: a drain, then exit 0."""
    servicer, address = fake_master
    worker = cluster.worker(address, worker_id="victim")
    wait_for(lambda: servicer.heartbeats, 10, "a first heartbeat")
    servicer.shutdown.set()
    assert worker.proc.wait(timeout=30) == 0
    assert servicer.deregistered.is_set()
    assert "the master asked this worker to shut down" in worker.log_text()
