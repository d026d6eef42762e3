"""Protobuf <-> domain conversion, and nothing else. Protobuf objects stop here."""

from __future__ import annotations

import signal
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from dist_exec.errors import InvalidTaskSpec
from dist_exec.models import (
    NO_LIMITS,
    AttemptOutcome,
    AttemptRecord,
    ExecOutcome,
    ExecStatus,
    Job,
    JobId,
    JobStatus,
    NodeId,
    NodeInfo,
    NodeStatus,
    ScalerStatus,
    TaskLimits,
    TaskSpec,
)
from dist_exec.rpc.v1 import common_pb2, master_pb2, worker_pb2

JOB_STATUS_TO_PB = {
    JobStatus.PENDING: common_pb2.JOB_STATUS_PENDING,
    JobStatus.RUNNING: common_pb2.JOB_STATUS_RUNNING,
    JobStatus.COMPLETED: common_pb2.JOB_STATUS_COMPLETED,
    JobStatus.FAILED: common_pb2.JOB_STATUS_FAILED,
    JobStatus.CANCELLED: common_pb2.JOB_STATUS_CANCELLED,
    JobStatus.TIMEOUT: common_pb2.JOB_STATUS_TIMEOUT,
}
JOB_STATUS_FROM_PB = {v: k for k, v in JOB_STATUS_TO_PB.items()}

EXEC_STATUS_TO_PB = {
    ExecStatus.SUCCESS: common_pb2.EXECUTION_STATUS_SUCCESS,
    ExecStatus.FAILURE: common_pb2.EXECUTION_STATUS_FAILURE,
    ExecStatus.TIMEOUT: common_pb2.EXECUTION_STATUS_TIMEOUT,
    ExecStatus.CANCELLED: common_pb2.EXECUTION_STATUS_CANCELLED,
}
EXEC_STATUS_FROM_PB = {v: k for k, v in EXEC_STATUS_TO_PB.items()}

NODE_STATUS_TO_PB = {
    NodeStatus.HEALTHY: common_pb2.NODE_STATUS_HEALTHY,
    NodeStatus.UNHEALTHY: common_pb2.NODE_STATUS_UNHEALTHY,
    NodeStatus.DRAINING: common_pb2.NODE_STATUS_DRAINING,
    NodeStatus.SUSPECT: common_pb2.NODE_STATUS_SUSPECT,
    NodeStatus.DEGRADED: common_pb2.NODE_STATUS_DEGRADED,
}
NODE_STATUS_FROM_PB = {v: k for k, v in NODE_STATUS_TO_PB.items()}

STOP_SIGNAL_TO_PB: dict[signal.Signals, common_pb2.StopSignal] = {
    signal.SIGTERM: common_pb2.STOP_SIGNAL_TERM,
    signal.SIGINT: common_pb2.STOP_SIGNAL_INT,
    signal.SIGHUP: common_pb2.STOP_SIGNAL_HUP,
    signal.SIGQUIT: common_pb2.STOP_SIGNAL_QUIT,
    signal.SIGKILL: common_pb2.STOP_SIGNAL_KILL,
}
STOP_SIGNAL_FROM_PB: dict[int, signal.Signals] = {v: k for k, v in STOP_SIGNAL_TO_PB.items()}


def stop_signal_from_pb(value: int) -> signal.Signals | None:
    """A cancel's signal; None when it names none (the receiver's default: TERM)."""
    if value == common_pb2.STOP_SIGNAL_UNSPECIFIED:
        return None
    sig = STOP_SIGNAL_FROM_PB.get(value)
    if sig is None:
        names = ", ".join(s.name for s in STOP_SIGNAL_TO_PB)
        raise InvalidTaskSpec(f"unknown signal value {value}; a cancel may send {names}")
    return sig


def stop_signal_to_pb(sig: signal.Signals | None) -> common_pb2.StopSignal:
    return common_pb2.STOP_SIGNAL_UNSPECIFIED if sig is None else STOP_SIGNAL_TO_PB[sig]


# StreamOutput's initial metadata, sent before any output: the master took the stream and
# follows the job (a client resumes a stream that breaks after it, and reports one that fails
# before it at once).
STREAM_OPEN = (("dist-exec-stream", "open"),)
# RunSession's initial metadata: this master takes `pause` and `resume` of a run.
RUN_PAUSE = (("dist-exec-run-pause", "1"),)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def timestamp(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    if dt is None:
        return None
    # Same result as Timestamp.FromDatetime for aware datetimes, at a fraction of its cost.
    micros = (dt - _EPOCH) // _MICROSECOND
    seconds, micros = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=micros * 1000)


def from_timestamp(msg: object, name: str) -> datetime | None:
    """The datetime in ``msg.name``, or None when the field is unset."""
    if not msg.HasField(name):  # type: ignore[attr-defined]
        return None
    ts: timestamp_pb2.Timestamp = getattr(msg, name)
    return ts.ToDatetime(tzinfo=UTC)


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def from_duration(d: duration_pb2.Duration) -> float:
    return float(d.ToNanoseconds()) / 1e9


def limits_to_pb(limits: TaskLimits) -> common_pb2.Limits | None:
    if not limits.any:
        return None
    return common_pb2.Limits(
        memory_bytes=limits.memory_bytes,
        cpu_time=duration(limits.cpu_time_s) if limits.cpu_time_s else None,
        max_procs=limits.max_procs,
        max_file_size_bytes=limits.max_file_size_bytes,
    )


def limits_from_pb(msg: common_pb2.Limits) -> TaskLimits:
    """Limits as sent; a negative CPU time stays negative for validation to refuse."""
    if not msg.ByteSize():  # none asked (most tasks): one shared, immutable value
        return NO_LIMITS
    return TaskLimits(
        memory_bytes=msg.memory_bytes,
        cpu_time_s=from_duration(msg.cpu_time),
        max_procs=msg.max_procs,
        max_file_size_bytes=msg.max_file_size_bytes,
    )


def check_duration(value: duration_pb2.Duration, what: str) -> None:
    """InvalidTaskSpec unless ``value`` is a Duration of 0 or more, in its own range."""
    if value.seconds < 0 or value.nanos < 0:
        raise InvalidTaskSpec(f"{what} must not be negative")
    if value.nanos > 999_999_999:
        raise InvalidTaskSpec(
            f"{what} has nanos {value.nanos}: a Duration's nanos are 0-999999999, the rest "
            "goes in its seconds"
        )


def submit_request(spec: TaskSpec) -> master_pb2.SubmitRequest:
    if not isinstance(spec, TaskSpec):
        raise InvalidTaskSpec(
            f"a job is a TaskSpec (command_spec(...), say), not {type(spec).__name__}"
        )
    try:
        return _submit_request(spec)
    except (ValueError, OverflowError, TypeError) as exc:  # (a number its field cannot hold)
        raise InvalidTaskSpec(f"the job cannot be sent: {exc}") from None


def _submit_request(spec: TaskSpec) -> master_pb2.SubmitRequest:
    return master_pb2.SubmitRequest(
        task_type=spec.task_type,
        payload=spec.payload,
        timeout=duration(spec.timeout_s),
        priority=spec.priority,
        metadata=spec.metadata,
        max_retries=spec.max_retries,  # None leaves the optional field unset
        selector=spec.selector,
        idempotency_key=spec.idempotency_key,
        retry_on_failure=spec.retry_on_failure,
        queue_timeout=duration(spec.queue_timeout_s) if spec.queue_timeout_s else None,
        limits=limits_to_pb(spec.limits),
    )


def outcome_to_pb(outcome: ExecOutcome, task_id: str, attempt: int) -> worker_pb2.ExecuteResponse:
    try:
        return _outcome_pb(outcome, task_id, attempt)
    except UnicodeEncodeError:
        # Text no string field takes (lone surrogates, from an executor that kept bytes that
        # are not UTF-8): shown escaped, so the result still reaches the master.
        clean = replace(
            outcome,
            error=_escaped(outcome.error),
            metadata={_escaped(k): _escaped(v) for k, v in outcome.metadata.items()},
        )
        return _outcome_pb(clean, task_id, attempt)


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode()


def _outcome_pb(outcome: ExecOutcome, task_id: str, attempt: int) -> worker_pb2.ExecuteResponse:
    return worker_pb2.ExecuteResponse(
        task_id=task_id,
        status=EXEC_STATUS_TO_PB[outcome.status],
        output=outcome.stdout,
        error=outcome.error,
        exit_code=outcome.exit_code or 0,
        has_exit_code=outcome.exit_code is not None,
        duration=duration(outcome.duration_s),
        stderr=outcome.stderr,
        stdout_bytes=outcome.stdout_bytes,
        stderr_bytes=outcome.stderr_bytes,
        output_truncated=outcome.truncated,
        attempt=attempt,
        retryable=outcome.retryable,
        metadata=outcome.metadata,
    )


def outcome_from_pb(msg: worker_pb2.ExecuteResponse) -> ExecOutcome:
    has_exit = msg.has_exit_code or (
        # A worker built from the original protocol sets neither has_exit_code nor attempt.
        msg.attempt == 0
        and msg.status in (common_pb2.EXECUTION_STATUS_SUCCESS, common_pb2.EXECUTION_STATUS_FAILURE)
        and not msg.error
    )
    return ExecOutcome(
        status=EXEC_STATUS_FROM_PB.get(msg.status, ExecStatus.FAILURE),
        exit_code=msg.exit_code if has_exit else None,
        error=msg.error,
        stdout=msg.output,
        stderr=msg.stderr,
        stdout_bytes=msg.stdout_bytes or len(msg.output),
        stderr_bytes=msg.stderr_bytes or len(msg.stderr),
        truncated=msg.output_truncated,
        duration_s=from_duration(msg.duration),
        retryable=msg.retryable,
        metadata=dict(msg.metadata),
    )


def job_to_status_pb(job: Job) -> master_pb2.GetStatusResponse:
    return master_pb2.GetStatusResponse(
        job_id=job.id,
        status=JOB_STATUS_TO_PB[job.status],
        output=job.stdout,
        error=job.error,
        exit_code=job.exit_code or 0,
        has_exit_code=job.exit_code is not None,
        created_at=timestamp(job.created_at),
        started_at=timestamp(job.started_at),
        completed_at=timestamp(job.completed_at),
        worker_id=job.worker_id,
        stderr=job.stderr,
        priority=job.spec.priority,
        task_type=job.spec.task_type,
        payload=job.spec.payload,
        metadata=job.spec.metadata,
        timeout=duration(job.spec.timeout_s),
        retries=job.retries,
        max_retries=job.spec.max_retries or 0,
        stdout_bytes=job.stdout_bytes,
        stderr_bytes=job.stderr_bytes,
        output_truncated=job.truncated,
        pending_reason=job.pending_reason,
        selector=job.spec.selector,
        result_metadata=job.result_metadata,
        attempt=job.attempt,
        broadcast_id=job.spec.broadcast_id,
        node_id=job.spec.node_id,
        attempts=[attempt_to_pb(a) for a in job.attempts],
        owner=job.spec.owner,
        retry_on_failure=job.spec.retry_on_failure,
        queue_timeout=duration(job.spec.queue_timeout_s) if job.spec.queue_timeout_s else None,
        limits=limits_to_pb(job.spec.limits),
    )


def attempt_to_pb(record: AttemptRecord) -> master_pb2.AttemptInfo:
    return master_pb2.AttemptInfo(
        attempt=record.attempt,
        node_id=record.node_id,
        started_at=timestamp(record.started_at),
        ended_at=timestamp(record.ended_at),
        outcome=record.outcome.value if record.outcome else "",
        detail=record.detail,
    )


def attempt_from_pb(msg: master_pb2.AttemptInfo) -> AttemptRecord:
    outcome = msg.outcome if msg.outcome in AttemptOutcome.__members__ else None
    return AttemptRecord(
        attempt=msg.attempt,
        node_id=msg.node_id,
        started_at=from_timestamp(msg, "started_at"),
        ended_at=from_timestamp(msg, "ended_at"),
        outcome=AttemptOutcome(outcome) if outcome else None,
        detail=msg.detail,
    )


def job_from_status_pb(msg: master_pb2.GetStatusResponse) -> Job:
    return Job(
        id=JobId(msg.job_id),
        spec=TaskSpec(
            task_type=msg.task_type,
            payload=msg.payload,
            timeout_s=from_duration(msg.timeout),
            priority=msg.priority,
            metadata=dict(msg.metadata),
            max_retries=msg.max_retries,
            selector=dict(msg.selector),
            node_id=msg.node_id,
            broadcast_id=msg.broadcast_id,
            retry_on_failure=msg.retry_on_failure,
            queue_timeout_s=from_duration(msg.queue_timeout),
            owner=msg.owner,
            limits=limits_from_pb(msg.limits),
        ),
        status=JOB_STATUS_FROM_PB.get(msg.status, JobStatus.PENDING),
        created_at=from_timestamp(msg, "created_at") or datetime.fromtimestamp(0, UTC),
        started_at=from_timestamp(msg, "started_at"),
        completed_at=from_timestamp(msg, "completed_at"),
        worker_id=msg.worker_id,
        retries=msg.retries,
        exit_code=msg.exit_code if msg.has_exit_code else None,
        error=msg.error,
        stdout=msg.output,
        stderr=msg.stderr,
        stdout_bytes=msg.stdout_bytes,
        stderr_bytes=msg.stderr_bytes,
        truncated=msg.output_truncated,
        result_metadata=dict(msg.result_metadata),
        pending_reason=msg.pending_reason,
        attempt=msg.attempt,
        attempts=tuple(attempt_from_pb(a) for a in msg.attempts),
    )


def job_to_summary_pb(job: Job, summary: str) -> master_pb2.JobSummary:
    return master_pb2.JobSummary(
        job_id=job.id,
        task_type=job.spec.task_type,
        status=JOB_STATUS_TO_PB[job.status],
        created_at=timestamp(job.created_at),
        exit_code=job.exit_code or 0,
        has_exit_code=job.exit_code is not None,
        worker_id=job.worker_id,
        priority=job.spec.priority,
        started_at=timestamp(job.started_at),
        completed_at=timestamp(job.completed_at),
        error=job.error,
        summary=summary,
        broadcast_id=job.spec.broadcast_id,
        owner=job.spec.owner,
    )


def job_from_summary_pb(msg: master_pb2.JobSummary) -> tuple[Job, str]:
    """A listed job (no output, payload or timeout on the wire) and its one-line summary."""
    job = Job(
        id=JobId(msg.job_id),
        spec=TaskSpec(
            msg.task_type, b"", 0.0, msg.priority, broadcast_id=msg.broadcast_id, owner=msg.owner
        ),
        status=JOB_STATUS_FROM_PB.get(msg.status, JobStatus.PENDING),
        created_at=from_timestamp(msg, "created_at") or datetime.fromtimestamp(0, UTC),
        started_at=from_timestamp(msg, "started_at"),
        completed_at=from_timestamp(msg, "completed_at"),
        worker_id=msg.worker_id,
        exit_code=msg.exit_code if msg.has_exit_code else None,
        error=msg.error,
    )
    return job, msg.summary


def node_to_pb(node: NodeInfo) -> common_pb2.NodeInfo:
    return common_pb2.NodeInfo(
        node_id=node.id,
        address=node.address,
        status=NODE_STATUS_TO_PB[node.status],
        capabilities=sorted(node.capabilities),
        max_tasks=node.max_tasks,
        active_tasks=node.active_tasks,
        labels=node.labels,
        last_seen=timestamp(node.last_seen_wall),
        weight=node.effective_weight,
        task_limits=limits_to_pb(node.task_limits),
    )


def node_from_pb(msg: common_pb2.NodeInfo) -> NodeInfo:
    return NodeInfo(
        id=NodeId(msg.node_id),
        address=msg.address,
        capabilities=frozenset(msg.capabilities),
        max_tasks=msg.max_tasks,
        labels=dict(msg.labels),
        last_seen=0.0,
        last_seen_wall=from_timestamp(msg, "last_seen") or datetime.fromtimestamp(0, UTC),
        status=NODE_STATUS_FROM_PB.get(msg.status, NodeStatus.UNHEALTHY),
        active_tasks=msg.active_tasks,
        weight=msg.weight,
        task_limits=limits_from_pb(msg.task_limits),
    )


def scaler_status_to_pb(status: ScalerStatus) -> master_pb2.ScalerStatus:
    return master_pb2.ScalerStatus(
        backend=status.backend,
        desired_replicas=status.desired,
        ready_replicas=status.ready,
        min_replicas=status.min_replicas,
        max_replicas=status.max_replicas,
        floor=status.floor,
        draining=status.draining,
        last_decision=status.last_decision,
        last_event=status.last_event,
        last_event_at=timestamp(status.last_event_at),
        error=status.error,
    )


def scaler_status_from_pb(msg: master_pb2.ScalerStatus) -> ScalerStatus:
    return ScalerStatus(
        backend=msg.backend,
        desired=msg.desired_replicas,
        ready=msg.ready_replicas,
        min_replicas=msg.min_replicas,
        max_replicas=msg.max_replicas,
        floor=msg.floor,
        draining=tuple(msg.draining),
        last_decision=msg.last_decision,
        last_event=msg.last_event,
        last_event_at=from_timestamp(msg, "last_event_at"),
        error=msg.error,
    )
