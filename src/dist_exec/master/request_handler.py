"""gRPC servicers of the master: MasterService (clients) and RegistrationService (workers).

Thin: check the shape of each request, convert with ``wire``, call the Master. Who may call
what is the SecurityInterceptor's job (``security.auth``); here only the checks that depend on
the request: a job's owner, the worker id a worker registers as, and the audit records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

import grpc.aio

from dist_exec import wire
from dist_exec.config import MasterConfig
from dist_exec.errors import (
    AccessDenied,
    AddressInUse,
    DistExecError,
    InvalidTaskSpec,
    JobNotFound,
    WorkerDraining,
    grpc_errors,
    grpc_stream_errors,
    shorten,
)
from dist_exec.executors import describe_task
from dist_exec.master.active import HeldAttempt
from dist_exec.master.core import Master
from dist_exec.master.run_session import RunSession
from dist_exec.models import (
    Job,
    JobId,
    NodeEndpoint,
    NodeId,
    NodeStatus,
    OutputChunk,
    ScalerStatus,
    Stream,
    TaskSpec,
)
from dist_exec.rpc.v1 import common_pb2, master_pb2, master_pb2_grpc, worker_pb2, worker_pb2_grpc
from dist_exec.security.audit import AuditLog, redacted_payload, task_summary
from dist_exec.security.auth import current_identity
from dist_exec.security.call_proof import CallProof
from dist_exec.security.identity import Identity, Role

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]


def _job_id(raw: str, what: str = "job id") -> JobId:
    try:
        return JobId(str(uuid.UUID(raw)))
    except ValueError:
        raise InvalidTaskSpec(f"invalid {what} {shorten(raw)}: expected a UUID") from None


def _log_unheard_failure(work: asyncio.Future[str]) -> None:
    """A cancel whose caller went away failed: an answer (the job had ended, say) is in the
    audit log or needs nobody; anything else is a fault to log."""
    if work.cancelled():
        return
    exc = work.exception()
    if exc is not None and not isinstance(exc, DistExecError):
        log.error("a cancel whose caller had gone away failed", exc_info=exc)


def _client(context: Context) -> str:
    """Who is asking, for rate limits: the authenticated identity; on an open server (no
    authentication) the peer's address without its port."""
    identity = current_identity()
    if identity.via != "none":
        return identity.name
    peer = context.peer() or ""  # "ipv4:127.0.0.1:51234", "ipv6:[::1]:51234", "unix:..."
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]") or peer
    return peer


def _check_owner(identity: Identity, job: Job) -> None:
    """A `submit` identity may only see and cancel the jobs it submitted."""
    if not identity.sees_all_jobs and job.spec.owner != identity.name:
        raise AccessDenied(
            f"job {job.id} belongs to another identity; {identity.name} "
            f"({identity.role.value}) may only see and cancel its own jobs"
        )


def _spec(request: master_pb2.SubmitRequest, owner: str) -> TaskSpec:
    wire.check_duration(request.timeout, "timeout")
    wire.check_duration(request.queue_timeout, "queue timeout")
    wire.check_duration(request.limits.cpu_time, "CPU time limit")
    return TaskSpec(
        task_type=request.task_type,
        payload=request.payload,
        timeout_s=wire.from_duration(request.timeout),
        priority=request.priority,
        metadata=dict(request.metadata),
        max_retries=request.max_retries if request.HasField("max_retries") else None,
        selector=dict(request.selector),
        idempotency_key=request.idempotency_key,
        retry_on_failure=request.retry_on_failure,
        queue_timeout_s=wire.from_duration(request.queue_timeout),
        owner=owner,
        limits=wire.limits_from_pb(request.limits),
    )


def _status_pb(job: Job) -> master_pb2.GetStatusResponse:
    """The job as the caller may see it: one who neither submitted it nor is an admin (the
    read role) gets its payload's data redacted (environment values, stdin, headers, body)."""
    identity = current_identity()
    if identity.role != Role.ADMIN and job.spec.owner != identity.name:
        job = replace(job, spec=replace(job.spec, payload=redacted_payload(job.spec.payload)))
    return wire.job_to_status_pb(job)


def _event_pb(job_id: JobId, item: tuple[int, OutputChunk] | Job) -> master_pb2.JobEvent:
    if isinstance(item, Job):
        return master_pb2.JobEvent(job_id=job_id, result=_status_pb(item))
    return master_pb2.JobEvent(job_id=job_id, output=_chunk_pb(*item))


def _chunk_pb(attempt: int, chunk: OutputChunk) -> master_pb2.OutputChunk:
    return master_pb2.OutputChunk(
        data=chunk.data,
        type=chunk.stream.value,  # type: ignore[arg-type]
        offset=chunk.offset,
        attempt=attempt,
    )


class Drains:
    """Nodes an admin asked to drain: told so on their next heartbeat; and nodes whose drain
    an admin took back: told to resume until they say they no longer drain."""

    def __init__(self) -> None:
        self.requested: set[NodeId] = set()
        self.resumed: set[NodeId] = set()

    def forget(self, node_id: NodeId) -> None:
        """The node left (deregistered): a node that registers under its id starts afresh."""
        self.requested.discard(node_id)
        self.resumed.discard(node_id)


class MasterServicer(master_pb2_grpc.MasterServiceServicer):
    def __init__(
        self,
        master: Master,
        config: MasterConfig,
        audit: AuditLog | None = None,
        drains: Drains | None = None,
        scaler_status: Callable[[], ScalerStatus | None] = lambda: None,
    ) -> None:
        self.master = master
        self.config = config
        self.audit = audit
        self.drains = drains or Drains()
        self.scaler_status = scaler_status
        self._cancels: set[asyncio.Future[str]] = set()  # cancels at work (see Cancel)

    def _audit(self, action: str, decision: str, reason: str = "", **details: Any) -> None:
        if self.audit is not None:
            self.audit.record(action, current_identity(), decision, reason, **details)

    async def _submit(
        self, action: str, requests: Sequence[master_pb2.SubmitRequest], context: Context
    ) -> list[JobId]:
        owner = current_identity().name
        try:
            specs = [_spec(r, owner) for r in requests]
            job_ids = await self.master.submit_many(specs, _client(context))
        except DistExecError as exc:
            self._audit(action, "denied", exc.message, tasks=_summaries(requests))
            raise
        self._audit(action, "allowed", jobs=job_ids, tasks=_summaries(requests))
        return job_ids

    def _visible(self, job: Job, action: str) -> None:
        """Refuse (and audit) a job the caller may not see or act on."""
        try:
            _check_owner(current_identity(), job)
        except AccessDenied as exc:
            self._audit(action, "denied", exc.message, jobs=[job.id])
            raise

    async def _owned(self, job_id: JobId, action: str) -> Job:
        """The job (without output), if the caller may see it."""
        job = await self.master.get(job_id, with_output=False)
        self._visible(job, action)
        return job

    @grpc_errors
    async def Submit(
        self, request: master_pb2.SubmitRequest, context: Context
    ) -> master_pb2.SubmitResponse:
        job_id = (await self._submit("submit", [request], context))[0]
        return master_pb2.SubmitResponse(job_id=job_id)

    @grpc_errors
    async def SubmitBatch(
        self, request: master_pb2.SubmitBatchRequest, context: Context
    ) -> master_pb2.SubmitBatchResponse:
        job_ids = await self._submit("submit_batch", request.jobs, context)
        return master_pb2.SubmitBatchResponse(job_ids=job_ids)

    @grpc_errors
    async def SubmitBroadcast(
        self, request: master_pb2.SubmitBroadcastRequest, context: Context
    ) -> master_pb2.SubmitBroadcastResponse:
        summary = _summaries([request.job])
        try:
            spec = _spec(request.job, current_identity().name)
            broadcast_id, tasks = await self.master.submit_broadcast(spec, _client(context))
        except DistExecError as exc:
            self._audit("submit_broadcast", "denied", exc.message, tasks=summary)
            raise
        self._audit(
            "submit_broadcast",
            "allowed",
            broadcast=broadcast_id,
            jobs=[j for j, _ in tasks],
            tasks=summary,
        )
        return master_pb2.SubmitBroadcastResponse(
            broadcast_id=broadcast_id,
            tasks=[master_pb2.BroadcastTask(job_id=j, node_id=n) for j, n in tasks],
        )

    @grpc_stream_errors
    async def WatchJobs(
        self, request: master_pb2.WatchJobsRequest, context: Context
    ) -> AsyncGenerator[master_pb2.JobEvent, None]:
        job_ids = [_job_id(j) for j in request.job_ids]
        if not current_identity().sees_all_jobs:
            for job_id in job_ids:
                await self._owned(job_id, "watch")
        async for job_id, item in self.master.watch(job_ids, with_output=not request.no_output):
            yield _event_pb(job_id, item)

    @grpc_stream_errors
    async def RunJobs(
        self, request: master_pb2.RunJobsRequest, context: Context
    ) -> AsyncGenerator[master_pb2.JobEvent, None]:
        async with contextlib.aclosing(self._run_jobs(request, context)) as events:
            async for event in events:
                yield event

    @grpc_stream_errors
    async def RunSession(
        self, request_iterator: AsyncIterator[master_pb2.RunSessionRequests], context: Context
    ) -> AsyncGenerator[master_pb2.RunSessionEvents, None]:
        # The client writes nothing before this arrives (an older master answers UNIMPLEMENTED).
        await context.send_initial_metadata(wire.RUN_PAUSE)
        session = RunSession(lambda request: self._run_jobs(request, context))
        async with contextlib.aclosing(session.serve(request_iterator)) as messages:
            async for message in messages:
                yield message

    async def _run_jobs(
        self, request: master_pb2.RunJobsRequest, context: Context
    ) -> AsyncGenerator[master_pb2.JobEvent, None]:
        """What one RunJobs call sends; a DistExecError ends it."""
        action = "submit" if len(request.jobs) == 1 else "submit_batch"
        job_ids = await self._submit(action, request.jobs, context)
        for job_id in job_ids:  # (a known key names the caller's own job: keys are an owner's)
            yield master_pb2.JobEvent(job_id=job_id, accepted=True)
        async for job_id, item in self.master.watch(job_ids, with_output=not request.no_output):
            yield _event_pb(job_id, item)

    @grpc_errors
    async def GetStatus(
        self, request: master_pb2.GetStatusRequest, context: Context
    ) -> master_pb2.GetStatusResponse:
        job = await self.master.get(_job_id(request.job_id))
        self._visible(job, "status")
        return _status_pb(job)

    @grpc_errors
    async def Cancel(
        self, request: master_pb2.CancelRequest, context: Context
    ) -> master_pb2.CancelResponse:
        remaining = context.time_remaining()
        wait_s = 15.0 if remaining is None else max(0.0, min(15.0, remaining - 0.5))
        job_id = _job_id(request.job_id)
        sig = wire.stop_signal_from_pb(request.signal)
        # A cancel that arrived is carried out whole, even when its caller goes away while the
        # job's owner is looked up (a client giving up at once, a Ctrl-C burst): the work is a
        # task of its own, which this call only waits for.
        work = asyncio.create_task(self._cancel(job_id, wait_s, sig))
        self._cancels.add(work)
        work.add_done_callback(self._cancels.discard)
        try:
            message = await asyncio.shield(work)
        except asyncio.CancelledError:  # the caller went away: nobody else hears how it ends
            work.add_done_callback(_log_unheard_failure)
            raise
        return master_pb2.CancelResponse(cancelled=True, message=message)

    async def _cancel(self, job_id: JobId, wait_s: float, sig: signal.Signals | None) -> str:
        details = {} if sig is None else {"signal": sig.name}
        try:
            await self._owned(job_id, "cancel")
        except JobNotFound as exc:
            self._audit("cancel", "denied", exc.message, jobs=[job_id], **details)
            raise
        message = await self.master.cancel(job_id, wait_s, sig)
        self._audit("cancel", "allowed", message, jobs=[job_id], **details)
        return message

    @grpc_errors
    async def ListJobs(
        self, request: master_pb2.ListJobsRequest, context: Context
    ) -> master_pb2.ListJobsResponse:
        status = None
        if request.status_filter:
            status = wire.JOB_STATUS_FROM_PB.get(request.status_filter)
            if status is None:
                raise InvalidTaskSpec(f"unknown status_filter value {request.status_filter}")
        broadcast = _job_id(request.broadcast_id, "broadcast id") if request.broadcast_id else ""
        identity = current_identity()
        owner = request.owner or None
        if not identity.sees_all_jobs:
            if owner not in (None, identity.name):
                self._audit("list", "denied", "a submitter lists only its own jobs", owner=owner)
                raise AccessDenied(f"{identity.name} may only list its own jobs")
            owner = identity.name
        jobs, total = await self.master.list_jobs(
            request.limit, request.offset, status, broadcast, owner
        )
        return master_pb2.ListJobsResponse(
            jobs=[
                wire.job_to_summary_pb(j, describe_task(j.spec.task_type, j.spec.payload))
                for j in jobs
            ],
            total=total,
        )

    @grpc_stream_errors
    async def StreamOutput(
        self, request: master_pb2.StreamOutputRequest, context: Context
    ) -> AsyncGenerator[master_pb2.OutputChunk, None]:
        if request.stdout_offset < 0 or request.stderr_offset < 0:
            raise InvalidTaskSpec("output offsets must not be negative")
        if request.attempt < 0:
            raise InvalidTaskSpec("attempt must not be negative")
        if not current_identity().sees_all_jobs:
            await self._owned(_job_id(request.job_id), "output")
        offsets = {Stream.STDOUT: request.stdout_offset, Stream.STDERR: request.stderr_offset}
        # Before any output (there may be none for a while): the caller knows it reached a
        # master that follows the job, so a break from now on is worth resuming.
        await context.send_initial_metadata(wire.STREAM_OPEN)
        async for item in self.master.stream_output(
            _job_id(request.job_id),
            offsets,
            not request.no_follow,
            request.include_result,
            request.attempt,
        ):
            if isinstance(item, Job):
                yield master_pb2.OutputChunk(result=_status_pb(item))
            else:
                yield _chunk_pb(*item)

    @grpc_errors
    async def ListNodes(
        self, request: master_pb2.ListNodesRequest, context: Context
    ) -> master_pb2.ListNodesResponse:
        scaler = self.scaler_status()
        return master_pb2.ListNodesResponse(
            nodes=[wire.node_to_pb(n) for n in self.master.nodes()],
            scaler=wire.scaler_status_to_pb(scaler) if scaler is not None else None,
        )

    @grpc_errors
    async def AuthDrainNode(
        self, request: master_pb2.AuthDrainNodeRequest, context: Context
    ) -> master_pb2.AuthDrainNodeResponse:
        node_id = NodeId(request.node_id)
        node = next((n for n in self.master.nodes() if n.id == node_id), None)
        if node is None:
            self._audit("drain", "denied", "no such node", node=request.node_id)
            raise JobNotFound(f"no registered node {shorten(request.node_id)}")
        if request.undo:
            if self.master.drain_requested(node_id):
                self._audit("undrain", "denied", "drained for scale-in", node=node_id)
                raise WorkerDraining(
                    f"node {node_id} is drained by the auto scaler, to be removed: it cannot be "
                    "taken back (the scaler starts another if the load needs it)"
                )
            self.drains.requested.discard(node_id)
            self.drains.resumed.add(node_id)
            self._audit("undrain", "allowed", node=node_id)
            return master_pb2.AuthDrainNodeResponse(
                message=f"node {node_id} is told to take new tasks again, at its next "
                "heartbeat (see 'dist-exec nodes'; a worker that is stopping goes on stopping)"
            )
        self.drains.requested.add(node_id)
        self.drains.resumed.discard(node_id)
        node.status = NodeStatus.DRAINING  # no new tasks from now on; the worker is told next
        self._audit("drain", "allowed", node=node_id)
        return master_pb2.AuthDrainNodeResponse(
            message=f"node {node_id} is draining: no new tasks; running ones finish"
        )

    @grpc_errors
    async def AuthWhoAmI(
        self, request: master_pb2.AuthWhoAmIRequest, context: Context
    ) -> master_pb2.AuthWhoAmIResponse:
        identity = current_identity()
        return master_pb2.AuthWhoAmIResponse(
            name=identity.name, role=identity.role.value, auth=identity.via
        )


def _summaries(requests: Sequence[master_pb2.SubmitRequest]) -> list[dict[str, Any]]:
    return [task_summary(r.task_type, r.payload) for r in requests[:100]]


MAX_INSTANCE_CHARS = 64


def _instance(instance: str) -> str:
    """A worker's instance id (kept with every attempt started on it): short, or refused."""
    if len(instance) > MAX_INSTANCE_CHARS:
        raise InvalidTaskSpec(
            f"instance is longer than {MAX_INSTANCE_CHARS} characters: {shorten(instance)}"
        )
    return instance


def _check_worker_id(worker_id: str) -> None:
    """A worker authenticated by a certificate or token registers only as the id it names
    (a pool credential: as NAME-anything)."""
    identity = current_identity()
    if not identity.may_act_as_worker(worker_id):
        allowed = f"{identity.name!r}" + (
            f" or {identity.name}-*" if identity.role == Role.WORKERS else ""
        )
        raise AccessDenied(
            f"this worker's credentials name {allowed}; it cannot act as worker "
            f"{shorten(worker_id)}"
        )


class RegistrationServicer(worker_pb2_grpc.RegistrationServiceServicer):
    def __init__(
        self,
        master: Master,
        config: MasterConfig,
        audit: AuditLog | None = None,
        drains: Drains | None = None,
        on_register: Callable[[NodeEndpoint, bool, str | CallProof], None] = (
            lambda *registered: None
        ),
    ) -> None:
        self.master = master
        self.config = config
        self.audit = audit
        self.drains = drains or Drains()
        # A node registered at this endpoint, says whether it serves the Dispatch stream, and
        # what its callers must prove (or send: a bearer token).
        self.on_register = on_register

    @grpc_errors
    async def Register(
        self, request: worker_pb2.RegisterRequest, context: Context
    ) -> worker_pb2.RegisterResponse:
        identity = current_identity()
        try:
            _check_worker_id(request.worker_id)
            node = self.master.register(
                NodeId(request.worker_id),
                request.address,
                list(request.capabilities),
                request.max_concurrent_tasks,
                dict(request.labels),
                [HeldAttempt(h.task_id, h.attempt, h.finished) for h in request.held_attempts],
                request.weight,
                wire.limits_from_pb(request.task_limits),
                # With TLS, the master dials it expecting the certificate it registered with.
                identity.name if identity.via == "cert" else request.worker_id,
                _instance(request.instance),
            )
        except (AccessDenied, AddressInUse) as exc:
            if self.audit is not None:
                self.audit.record("register", identity, "denied", exc.message)
            raise
        caller = (
            CallProof(request.call_token, request.instance)
            if request.call_proof and request.call_token
            else request.call_token
        )
        if request.call_token and not request.call_proof:
            log.warning(
                "worker %s proves no call token (a version before proofs): the master sends it "
                "its token as a bearer token, which whatever holds its port would get; upgrade it",
                request.worker_id,
            )
        self.on_register(node.endpoint, request.dispatch_stream, caller)
        self.drains.requested.discard(NodeId(request.worker_id))
        if request.drain_requested:  # chosen for scale-in by this master before it restarted
            self.master.request_drain(NodeId(request.worker_id))
        return worker_pb2.RegisterResponse(
            accepted=True,
            message="registered",
            heartbeat_interval=wire.duration(self.config.heartbeat_interval_s),
            master_clock=wire.duration(self.master.clock.monotonic()),
        )

    @grpc_errors
    async def Deregister(
        self, request: worker_pb2.DeregisterRequest, context: Context
    ) -> worker_pb2.DeregisterResponse:
        _check_worker_id(request.worker_id)
        if self._replaced(request.worker_id, request.instance, "deregistration"):
            return worker_pb2.DeregisterResponse(acknowledged=True)  # (it leaves nothing)
        self.master.deregister(NodeId(request.worker_id))
        self.drains.forget(NodeId(request.worker_id))
        return worker_pb2.DeregisterResponse(acknowledged=True)

    def _replaced(self, worker_id: str, instance: str, what: str) -> bool:
        """Whether ``instance`` is a process another one has registered as ``worker_id`` since
        (two processes given one id, or one back from a stall its replacement started in)."""
        node = self.master.registry.get(NodeId(worker_id))
        if node is None or not instance or not node.instance or node.instance == instance:
            return False
        log.warning(
            "a %s for worker %s from a process that is no longer it (another registered as %s "
            "at %s since): ignored; it is told to shut down",
            what,
            shorten(worker_id),
            shorten(worker_id),
            node.address,
        )
        return True

    @grpc_errors
    async def Heartbeat(
        self, request: worker_pb2.HeartbeatRequest, context: Context
    ) -> worker_pb2.HeartbeatResponse:
        _check_worker_id(request.worker_id)
        node_id = NodeId(request.worker_id)
        if self._replaced(request.worker_id, request.instance, "heartbeat"):
            return worker_pb2.HeartbeatResponse(
                acknowledged=False,
                action=worker_pb2.HEARTBEAT_ACTION_SHUTDOWN,
                master_clock=wire.duration(self.master.clock.monotonic()),
            )
        # Drained by an admin (AuthDrainNode) or for scale-in by the auto scaler.
        drain = node_id in self.drains.requested or self.master.drain_requested(node_id)
        # active_tasks is on the wire by contract; the master counts its own reservations.
        unwell = request.health in (
            common_pb2.WORKER_HEALTH_DEGRADED,
            common_pb2.WORKER_HEALTH_UNHEALTHY,
        )
        known = self.master.heartbeat(node_id, request.draining or drain, unwell)
        action = worker_pb2.HEARTBEAT_ACTION_DRAIN if drain else worker_pb2.HEARTBEAT_ACTION_NONE
        if node_id in self.drains.resumed and not drain:
            if request.draining:
                action = worker_pb2.HEARTBEAT_ACTION_RESUME
            else:
                self.drains.resumed.discard(node_id)  # (it resumed)
        return worker_pb2.HeartbeatResponse(
            acknowledged=known,
            action=action,
            master_clock=wire.duration(self.master.clock.monotonic()),
        )
