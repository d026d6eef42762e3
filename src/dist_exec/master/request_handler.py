"""gRPC servicers of the master: MasterService (clients) and RegistrationService (workers).

Thin: check the shape of each request, convert with ``wire``, call the Master.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from typing import Any

import grpc.aio

from dist_exec import wire
from dist_exec.config import MasterConfig
from dist_exec.errors import InvalidTaskSpec, grpc_errors, grpc_stream_errors, shorten
from dist_exec.executors import describe_task
from dist_exec.master.core import HeldAttempt, Master
from dist_exec.models import Job, JobId, NodeId, OutputChunk, Stream, TaskSpec
from dist_exec.rpc.v1 import master_pb2, master_pb2_grpc, worker_pb2, worker_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _job_id(raw: str) -> JobId:
    try:
        return JobId(str(uuid.UUID(raw)))
    except ValueError:
        raise InvalidTaskSpec(f"invalid job id {shorten(raw)}: expected a UUID") from None


def _client(context: Context) -> str:
    """Who is asking: until there is authentication, the peer's address without its port."""
    peer = context.peer() or ""  # "ipv4:127.0.0.1:51234", "ipv6:[::1]:51234", "unix:..."
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]") or peer
    return peer


def _spec(request: master_pb2.SubmitRequest) -> TaskSpec:
    if request.timeout.seconds < 0 or request.timeout.nanos < 0:
        raise InvalidTaskSpec("timeout must not be negative")
    if request.queue_timeout.seconds < 0 or request.queue_timeout.nanos < 0:
        raise InvalidTaskSpec("queue timeout must not be negative")
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
    )


def _chunk_pb(attempt: int, chunk: OutputChunk) -> master_pb2.OutputChunk:
    return master_pb2.OutputChunk(
        data=chunk.data,
        type=chunk.stream.value,  # type: ignore[arg-type]
        offset=chunk.offset,
        attempt=attempt,
    )


class MasterServicer(master_pb2_grpc.MasterServiceServicer):
    def __init__(self, master: Master, config: MasterConfig) -> None:
        self.master = master
        self.config = config

    @grpc_errors
    async def Submit(
        self, request: master_pb2.SubmitRequest, context: Context
    ) -> master_pb2.SubmitResponse:
        job_id = (await self.master.submit_many([_spec(request)], _client(context)))[0]
        return master_pb2.SubmitResponse(job_id=job_id)

    @grpc_errors
    async def SubmitBatch(
        self, request: master_pb2.SubmitBatchRequest, context: Context
    ) -> master_pb2.SubmitBatchResponse:
        job_ids = await self.master.submit_many([_spec(r) for r in request.jobs], _client(context))
        return master_pb2.SubmitBatchResponse(job_ids=job_ids)

    @grpc_errors
    async def SubmitBroadcast(
        self, request: master_pb2.SubmitBroadcastRequest, context: Context
    ) -> master_pb2.SubmitBroadcastResponse:
        broadcast_id, tasks = await self.master.submit_broadcast(
            _spec(request.job), _client(context)
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
        async for job_id, item in self.master.watch(job_ids, with_output=not request.no_output):
            if isinstance(item, Job):
                yield master_pb2.JobEvent(job_id=job_id, result=wire.job_to_status_pb(item))
            else:
                yield master_pb2.JobEvent(job_id=job_id, output=_chunk_pb(*item))

    @grpc_errors
    async def GetStatus(
        self, request: master_pb2.GetStatusRequest, context: Context
    ) -> master_pb2.GetStatusResponse:
        job = await self.master.get(_job_id(request.job_id))
        return wire.job_to_status_pb(job)

    @grpc_errors
    async def Cancel(
        self, request: master_pb2.CancelRequest, context: Context
    ) -> master_pb2.CancelResponse:
        remaining = context.time_remaining()
        wait_s = 15.0 if remaining is None else max(0.0, min(15.0, remaining - 0.5))
        message = await self.master.cancel(_job_id(request.job_id), wait_s)
        return master_pb2.CancelResponse(cancelled=True, message=message)

    @grpc_errors
    async def ListJobs(
        self, request: master_pb2.ListJobsRequest, context: Context
    ) -> master_pb2.ListJobsResponse:
        status = None
        if request.status_filter:
            status = wire.JOB_STATUS_FROM_PB.get(request.status_filter)
            if status is None:
                raise InvalidTaskSpec(f"unknown status_filter value {request.status_filter}")
        broadcast = _job_id(request.broadcast_id) if request.broadcast_id else ""
        jobs, total = await self.master.list_jobs(request.limit, request.offset, status, broadcast)
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
        offsets = {Stream.STDOUT: request.stdout_offset, Stream.STDERR: request.stderr_offset}
        async for item in self.master.stream_output(
            _job_id(request.job_id), offsets, not request.no_follow, request.include_result
        ):
            if isinstance(item, Job):
                yield master_pb2.OutputChunk(result=wire.job_to_status_pb(item))
            else:
                yield _chunk_pb(*item)

    @grpc_errors
    async def ListNodes(
        self, request: master_pb2.ListNodesRequest, context: Context
    ) -> master_pb2.ListNodesResponse:
        return master_pb2.ListNodesResponse(nodes=[wire.node_to_pb(n) for n in self.master.nodes()])


class RegistrationServicer(worker_pb2_grpc.RegistrationServiceServicer):
    def __init__(self, master: Master, config: MasterConfig) -> None:
        self.master = master
        self.config = config

    @grpc_errors
    async def Register(
        self, request: worker_pb2.RegisterRequest, context: Context
    ) -> worker_pb2.RegisterResponse:
        self.master.register(
            NodeId(request.worker_id),
            request.address,
            list(request.capabilities),
            request.max_concurrent_tasks,
            dict(request.labels),
            [HeldAttempt(h.task_id, h.attempt, h.finished) for h in request.held_attempts],
            request.weight,
        )
        return worker_pb2.RegisterResponse(
            accepted=True,
            message="registered",
            heartbeat_interval=wire.duration(self.config.heartbeat_interval_s),
        )

    @grpc_errors
    async def Deregister(
        self, request: worker_pb2.DeregisterRequest, context: Context
    ) -> worker_pb2.DeregisterResponse:
        self.master.deregister(NodeId(request.worker_id))
        return worker_pb2.DeregisterResponse(acknowledged=True)

    @grpc_errors
    async def Heartbeat(
        self, request: worker_pb2.HeartbeatRequest, context: Context
    ) -> worker_pb2.HeartbeatResponse:
        # active_tasks is on the wire by contract; the master counts its own reservations.
        known = self.master.heartbeat(NodeId(request.worker_id), request.draining)
        return worker_pb2.HeartbeatResponse(
            acknowledged=known, action=worker_pb2.HEARTBEAT_ACTION_NONE
        )
