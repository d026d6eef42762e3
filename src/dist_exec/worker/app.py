"""Worker composition root: serve WorkerService, register with the master, heartbeat, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dist_exec import wire
from dist_exec.config import (
    WorkerConfig,
    advertised_address,
    dial_address,
    listen_address,
    raise_open_files_limit,
    server_options,
)
from dist_exec.executors import Executor, load_executors
from dist_exec.executors.containment import Containment, ContainmentError, Mode, parse_uid_pool
from dist_exec.executors.guardian import ProcessGuard
from dist_exec.master.dispatcher import CHANNEL_OPTIONS
from dist_exec.rpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from dist_exec.security.auth import WORKER_RULES, Authenticator, SecurityInterceptor
from dist_exec.security.call_proof import CallProof
from dist_exec.security.credentials import Credentials
from dist_exec.worker.server import MasterClock, WorkerServicer
from dist_exec.worker.task_runner import TaskRunner

if TYPE_CHECKING:
    from dist_exec.rpc.v1.worker_pb2_grpc import RegistrationServiceAsyncStub

log = logging.getLogger(__name__)
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
REGISTER_BACKOFF_MAX_S = 5.0


class WorkerReplaced(Exception):
    """The master says another process has registered as this worker since: stop now."""


class Registrar:
    """Keeps this node registered with the master: register, heartbeat, register again."""

    def __init__(
        self,
        config: WorkerConfig,
        runner: TaskRunner,
        address: str,
        channel: grpc.aio.Channel,
        on_drain: Callable[[], Awaitable[None]],
        master_clock: MasterClock,
        caller: CallProof,
        on_shutdown: Callable[[], None],
        on_resume: Callable[[], Awaitable[None]],
    ) -> None:
        self.config = config
        self.on_shutdown = on_shutdown  # ... SHUTDOWN: drain and exit, as on SIGTERM
        self.caller = caller  # what the master must prove when it calls this worker
        self.master_clock = master_clock
        self.runner = runner
        self.address = address
        self.on_drain = on_drain  # the master's heartbeat reply said DRAIN
        self.on_resume = on_resume  # and then RESUME
        self.drain_requested = False
        self.stub: RegistrationServiceAsyncStub = worker_pb2_grpc.RegistrationServiceStub(channel)
        self.interval_s = config.heartbeat_interval_s
        self.registered = asyncio.Event()

    async def register(self) -> None:
        """Register, retrying with backoff until the master accepts."""
        backoff = 0.1
        while True:
            try:
                sent = time.monotonic()
                reply = await self.stub.Register(
                    self._register_request(), timeout=self.config.rpc_timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                log.warning("cannot register with master %s: %s", self.config.master, exc.details())
            else:
                # Another master, or the same one restarted, maybe elsewhere: start over. Not
                # before the answer: a start held up in a partition may arrive meanwhile, and it
                # must still be checked against the clock known so far.
                self.master_clock.reset()
                self._clock_sample(reply, sent)
                if reply.accepted:
                    if reply.HasField("heartbeat_interval"):
                        self.interval_s = (
                            wire.from_duration(reply.heartbeat_interval) or self.interval_s
                        )
                    log.info(
                        "registered with master %s as %s", self.config.master, self.config.worker_id
                    )
                    self.registered.set()
                    return
                log.warning("master refused registration: %s", reply.message)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, REGISTER_BACKOFF_MAX_S)

    def _register_request(self) -> worker_pb2.RegisterRequest:
        return worker_pb2.RegisterRequest(
            worker_id=self.config.worker_id,
            address=self.address,
            capabilities=self.runner.capabilities,
            max_concurrent_tasks=self.config.max_concurrent_tasks,
            labels=self.config.labels,
            weight=self.config.weight,
            task_limits=wire.limits_to_pb(self.config.task_limits),
            drain_requested=self.drain_requested,
            dispatch_stream=True,
            call_token=self.caller.token,
            instance=self.caller.instance,
            call_proof=True,
            held_attempts=[
                worker_pb2.HeldAttempt(
                    task_id=a.task_id, attempt=a.attempt, finished=a.outcome is not None
                )
                for a in self.runner.held()
            ],
        )

    async def heartbeat_forever(self) -> None:
        await self.register()
        while True:
            await asyncio.sleep(self.interval_s)
            await self.heartbeat()

    def _clock_sample(
        self, reply: worker_pb2.RegisterResponse | worker_pb2.HeartbeatResponse, sent: float
    ) -> None:
        if reply.HasField("master_clock"):
            master_s = wire.from_duration(reply.master_clock)
            self.master_clock.sample(master_s, sent, time.monotonic())

    async def heartbeat(self) -> None:
        sent = time.monotonic()
        try:
            reply = await self.stub.Heartbeat(
                worker_pb2.HeartbeatRequest(
                    worker_id=self.config.worker_id,
                    active_tasks=self.runner.active_count,
                    health=common_pb2.WORKER_HEALTH_HEALTHY,
                    draining=self.runner.draining,
                    instance=self.caller.instance,
                ),
                timeout=self.config.rpc_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("heartbeat to %s failed: %s", self.config.master, exc.details())
            return
        self._clock_sample(reply, sent)
        if reply.action == worker_pb2.HEARTBEAT_ACTION_SHUTDOWN and not reply.acknowledged:
            raise WorkerReplaced(
                f"another process registered with master {self.config.master} as worker "
                f"{self.config.worker_id} since this one did, and took over its tasks: this one "
                "stops (give each worker a --worker-id of its own)"
            )
        if reply.action == worker_pb2.HEARTBEAT_ACTION_SHUTDOWN:  # (a master of another make)
            log.info("the master asked this worker to shut down: draining, then exiting")
            self.on_shutdown()
            return
        if not reply.acknowledged:
            log.info("master does not know this node (restarted?); registering again")
            await self.register()
        elif reply.action == worker_pb2.HEARTBEAT_ACTION_DRAIN and not self.drain_requested:
            self.drain_requested = True
            await self.on_drain()
        elif reply.action == worker_pb2.HEARTBEAT_ACTION_RESUME and self.drain_requested:
            self.drain_requested = False
            await self.on_resume()

    async def deregister(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.stub.Deregister(
                worker_pb2.DeregisterRequest(
                    worker_id=self.config.worker_id, instance=self.caller.instance
                ),
                timeout=self.config.rpc_timeout_s,
            )


class _AskedToDrain:
    """What the master's DRAIN and RESUME do (an admin's drain, or one for scale-in)."""

    def __init__(
        self, runner: TaskRunner, health_servicer: health.aio.HealthServicer, stop: asyncio.Event
    ) -> None:
        self.runner = runner
        self.health = health_servicer
        self.stop = stop
        self.registrar: Registrar | None = None

    async def drain(self) -> None:
        # Stay up: on Kubernetes the pod is deleted once it is NotReady (a container that
        # exited would be restarted); a local scaler stops it.
        log.info("the master asked this node to drain: no new tasks; running ones finish")
        await self._serve(False)

    async def resume(self) -> None:
        if self.stop.is_set():  # (a worker stopping for good, SIGTERM, goes on stopping)
            return
        log.info("the master took this node's drain back: it takes new tasks again")
        await self._serve(True)

    async def _serve(self, serving: bool) -> None:
        self.runner.draining = not serving
        health = health_pb2.HealthCheckResponse
        status = health.SERVING if serving else health.NOT_SERVING
        for service in ("", WORKER_SERVICE):
            await self.health.set(service, status)
        if self.registrar is not None:
            await self.registrar.heartbeat()  # confirm now, not at the next beat


async def run_worker(
    config: WorkerConfig,
    stop: asyncio.Event,
    on_ready: Callable[[str], None] = lambda address: None,
    executors: dict[str, Executor] | None = None,
) -> None:
    """Serve until ``stop`` is set, then drain: no new tasks, finish (or hand back), deregister."""
    pool = parse_uid_pool(config.run_as_pool) if config.run_as_pool else None
    if pool is not None and len(pool) < config.max_concurrent_tasks:
        raise ContainmentError(
            f"--run-as-pool {config.run_as_pool}: {len(pool)} uids for "
            f"--max-concurrent-tasks {config.max_concurrent_tasks}"
        )
    containment = Containment.start(
        Mode(config.containment), config.task_limits, config.run_as, uid_pool=pool
    )
    if pool is not None:
        users = f"a uid of their own each ({config.run_as_pool})"
    else:
        users = containment.run_as.name if containment.run_as else "this worker's user"
    log.info("task limits through %s; commands run as %s", containment.mode, users)
    guard = ProcessGuard()
    executors = (
        executors
        if executors is not None
        else load_executors(
            config.task_types or None,
            options={
                "command": {
                    "kill_grace_s": config.kill_grace_s,
                    "inherit_env": config.inherit_env,
                    "allowed_commands": config.allowed_commands,
                    "allowed_env": config.allowed_env,
                    "blocked_commands": config.blocked_commands,
                    "process_guard": guard,
                    "containment": containment,
                },
                "http": {
                    "timeout_s": config.http_timeout_s,
                    "max_body_bytes": config.http_max_body_bytes,
                },
            },
        )
    )
    runner = TaskRunner(
        executors, config.max_concurrent_tasks, config.max_output_bytes, config.result_retention_s
    )
    # Only the master may call: it shows the certificate of the master role (TLS), or proves
    # the token this worker gave it when it registered (sent over the authenticated Register).
    # The instance is new at each start: registering again, the worker is the same process.
    caller = CallProof(config.call_token or secrets.token_urlsafe(32), secrets.token_hex(8))
    authenticator = Authenticator(None, tls=config.tls is not None, proof=caller)
    server = grpc.aio.server(
        options=server_options(raise_open_files_limit()),
        interceptors=[SecurityInterceptor(authenticator, WORKER_RULES)],
    )
    master_clock = MasterClock()
    servicer = WorkerServicer(runner, config.worker_id, master_clock)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            WORKER_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    if config.tls is not None:
        port = server.add_secure_port(
            listen_address(config.listen), config.tls.server_credentials()
        )
    else:
        port = server.add_insecure_port(listen_address(config.listen))
    await server.start()
    address = config.advertise or advertised_address(config.listen, port)
    for service in ("", WORKER_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    tls = config.tls
    credentials = Credentials(
        tls.ca if tls else None, tls.cert if tls else None, tls.key if tls else None, config.token
    )
    channel = credentials.channel(dial_address(config.master), CHANNEL_OPTIONS)

    asked = _AskedToDrain(runner, health_servicer, stop)
    registrar = Registrar(
        config,
        runner,
        address,
        channel,
        asked.drain,
        master_clock,
        caller,
        stop.set,
        asked.resume,
    )
    asked.registrar = registrar
    try:
        async with asyncio.TaskGroup() as tg:
            beats = tg.create_task(registrar.heartbeat_forever())
            guarding = tg.create_task(_keep_guard(guard))
            registered = tg.create_task(registrar.registered.wait())
            await asyncio.wait(
                {registered, tg.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
            )
            if registered.done():
                on_ready(address)
            else:
                registered.cancel()
            await stop.wait()
            log.info(
                "draining: no new tasks; waiting up to %ss for running ones", config.drain_timeout_s
            )
            for service in ("", WORKER_SERVICE):
                await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            runner.draining = True
            # Tell the master now, not at the next beat; but a master that does not answer,
            # or refuses to take this node back, must not hold the drain up.
            told = tg.create_task(_bounded(registrar.heartbeat(), config.rpc_timeout_s))
            await runner.drain(config.drain_timeout_s)
            await told
            # Let the master collect the results still held before this node goes away.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(config.rpc_timeout_s):
                    await runner.wait_delivered()
            beats.cancel()
            guarding.cancel()
            await registrar.deregister()
    except* WorkerReplaced as replaced:
        raise replaced.exceptions[0] from None  # (its attempts are stopped below)
    finally:
        await runner.close()
        servicer.end_dispatch()
        await server.stop(grace=1.0)
        await channel.close()
        await asyncio.to_thread(guard.close)
        containment.close()


async def _bounded(call: Awaitable[None], timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await call


GUARD_CHECK_S = 1.0  # how often the process guardian is checked for (and started again)


async def _keep_guard(guard: ProcessGuard) -> None:
    """A guardian that died (killed, OOM) is replaced within GUARD_CHECK_S: until then a
    crash of this worker would leave its commands running."""
    while True:
        await asyncio.sleep(GUARD_CHECK_S)
        guard.keep_alive()
