"""Master composition root: build the components, serve, and run them in one TaskGroup."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dist_exec.autoscaler import make_autoscaler
from dist_exec.clock import SystemClock
from dist_exec.config import (
    MasterConfig,
    dial_address,
    join_address,
    listen_address,
    raise_open_files_limit,
    server_options,
    split_address,
)
from dist_exec.executors import Executor, load_executors
from dist_exec.master.balancer import make_balancer
from dist_exec.master.core import Master
from dist_exec.master.dispatcher import CHANNEL_OPTIONS, GrpcWorkerClient
from dist_exec.master.registry import NodeRegistry
from dist_exec.master.request_handler import Drains, MasterServicer, RegistrationServicer
from dist_exec.master.scheduler import Scheduler
from dist_exec.master.store import SqliteJobStore
from dist_exec.rpc.v1 import master_pb2, master_pb2_grpc, worker_pb2, worker_pb2_grpc
from dist_exec.security.audit import AuditLog
from dist_exec.security.auth import MASTER_RULES, Authenticator, SecurityInterceptor
from dist_exec.security.tls import WorkerDialer
from dist_exec.security.tokens import TokenStore

log = logging.getLogger(__name__)
SERVICES = (
    master_pb2.DESCRIPTOR.services_by_name["MasterService"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["RegistrationService"].full_name,
)
DB_FILE = "master.db"
TOKENS_FILE = "tokens.json"
AUDIT_FILE = "audit.log"


async def run_master(
    config: MasterConfig,
    stop: asyncio.Event,
    on_ready: Callable[[str], None] = lambda address: None,
    executors: dict[str, Executor] | None = None,
) -> None:
    """Serve until ``stop`` is set; in-flight work stays recorded for the next start."""
    executors = (
        executors
        if executors is not None
        else load_executors(
            options={
                "command": {
                    "allowed_commands": config.allowed_commands,
                    "blocked_commands": config.blocked_commands,
                    "allowed_env": config.allowed_env,
                }
            }
        )
    )
    clock = SystemClock()
    dialer = WorkerDialer(config.tls, CHANNEL_OPTIONS)
    # A start the master may have given up on by the time it arrives is refused by the worker:
    # the master gives up on a node at the heartbeat timeout, and places nothing on a node that
    # missed two heartbeats.
    start_window_s = max(
        config.heartbeat_timeout_s - 2 * config.heartbeat_interval_s, config.heartbeat_interval_s
    )
    workers = GrpcWorkerClient(
        config.rpc_timeout_s, dialer.channel, start_window_s=start_window_s, clock=clock.monotonic
    )
    tokens = TokenStore(config.tokens_file or config.data_dir / TOKENS_FILE)
    authenticator = Authenticator(tokens, tls=config.tls is not None)
    if not authenticator.required:
        log.warning(
            "no TLS and no tokens file (%s): every caller is the local admin; "
            "this is only allowed on loopback addresses",
            tokens.path,
        )
    audit = AuditLog(
        config.audit_log or config.data_dir / AUDIT_FILE, config.audit_max_bytes, config.audit_keep
    )

    async with SqliteJobStore(config.data_dir / DB_FILE) as store:
        master = Master(
            config,
            store,
            NodeRegistry(
                clock,
                config.heartbeat_timeout_s,
                config.node_removal_s,
                # Two missed heartbeats, and never later than the timeout.
                min(2 * config.heartbeat_interval_s, config.heartbeat_timeout_s * 0.8),
            ),
            Scheduler(make_balancer(config.balancer), config.priority_aging_s),
            workers,
            executors,
            clock,
        )
        server = grpc.aio.server(
            options=server_options(raise_open_files_limit()),
            interceptors=[SecurityInterceptor(authenticator, MASTER_RULES, audit)],
        )
        if config.tls is not None:
            port = server.add_secure_port(
                listen_address(config.listen), config.tls.server_credentials()
            )
        else:
            port = server.add_insecure_port(listen_address(config.listen))
        host, _ = split_address(config.listen)
        scaler = make_autoscaler(
            config.autoscaler,
            master,
            clock,
            dial_address(join_address(host, port)),
            config.data_dir / "logs",
        )
        drains = Drains()
        master_pb2_grpc.add_MasterServiceServicer_to_server(
            MasterServicer(
                master, config, audit, drains, scaler.status if scaler else lambda: None
            ),
            server,
        )
        worker_pb2_grpc.add_RegistrationServiceServicer_to_server(
            RegistrationServicer(master, config, audit, drains, workers.dispatch_to), server
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                *SERVICES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                runner = tg.create_task(master.run())
                await master.ready.wait()
                await server.start()
                for service in ("", *SERVICES):
                    await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
                on_ready(join_address(host or "0.0.0.0", port))
                scaling = tg.create_task(scaler.run()) if scaler else None
                await stop.wait()
                if scaling is not None:
                    scaling.cancel()
                if scaler is not None:
                    await scaler.close()  # local workers drain while the master still serves
                for service in ("", *SERVICES):
                    await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
                await server.stop(grace=2.0)
                runner.cancel()
        finally:
            if scaler is not None:
                await scaler.close()
            await server.stop(grace=None)
            await workers.close()
            audit.close()
