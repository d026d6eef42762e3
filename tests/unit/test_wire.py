"""Protobuf <-> domain conversions: every round trip gives back what went in."""

from __future__ import annotations

import signal
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from dist_exec import wire
from dist_exec.client import Client
from dist_exec.errors import InvalidTaskSpec
from dist_exec.models import (
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

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


JOB = Job(
    id=JobId("6f1c2a4e-0000-4000-8000-000000000001"),
    spec=TaskSpec(
        task_type="command",
        payload=b'{"command": "echo"}\x00\xff',
        timeout_s=90.5,
        priority=7,
        metadata={"owner": "alice", "note": "\u00e9t\u00e9"},
        max_retries=2,
    ),
    status=JobStatus.COMPLETED,
    created_at=T0,
    started_at=T0 + timedelta(seconds=1),
    completed_at=T0 + timedelta(seconds=3, microseconds=1),
    worker_id="worker-1",
    retries=1,
    exit_code=0,
    error="",
    stdout=b"hello\n",
    stderr=b"warn\n",
    stdout_bytes=6000,
    stderr_bytes=5,
    truncated=True,
)


@pytest.mark.parametrize(
    "job",
    [
        pytest.param(JOB, id="completed"),
        pytest.param(replace(JOB, exit_code=None, status=JobStatus.PENDING), id="pending"),
        pytest.param(
            replace(JOB, exit_code=None, started_at=None, completed_at=None), id="no-times"
        ),
        pytest.param(replace(JOB, exit_code=0), id="exit-0"),
        pytest.param(replace(JOB, exit_code=137, status=JobStatus.FAILED), id="exit-137"),
        pytest.param(replace(JOB, exit_code=-1, status=JobStatus.FAILED), id="exit-negative"),
        pytest.param(
            replace(JOB, exit_code=None, status=JobStatus.TIMEOUT, error="t"), id="timeout"
        ),
        pytest.param(replace(JOB, status=JobStatus.CANCELLED, exit_code=None), id="cancelled"),
        pytest.param(replace(JOB, status=JobStatus.RUNNING, completed_at=None), id="running"),
        pytest.param(
            replace(JOB, stdout=b"", stderr=b"", spec=replace(JOB.spec, metadata={})), id="empty"
        ),
        pytest.param(
            replace(JOB, spec=replace(JOB.spec, limits=TaskLimits(64 << 20, 1.5, 32, 1 << 20))),
            id="limits",
        ),
    ],
)
def test_job_status_round_trip(job: Job) -> None:
    assert wire.job_from_status_pb(wire.job_to_status_pb(job)) == job


def test_job_status_survives_serialization() -> None:
    job = JOB
    msg = master_pb2.GetStatusResponse.FromString(wire.job_to_status_pb(job).SerializeToString())
    assert wire.job_from_status_pb(msg) == job


@pytest.mark.parametrize(("exit_code", "has"), [(None, False), (0, True), (3, True)])
def test_job_exit_code_none_is_not_zero(exit_code: int | None, has: bool) -> None:
    msg = wire.job_to_status_pb(replace(JOB, exit_code=exit_code))
    assert msg.has_exit_code is has
    assert wire.job_from_status_pb(msg).exit_code == exit_code


def test_job_status_pb_unset_times() -> None:
    msg = wire.job_to_status_pb(replace(JOB, started_at=None, completed_at=None))
    assert not msg.HasField("started_at")
    assert not msg.HasField("completed_at")
    assert msg.HasField("created_at")


def test_job_summary_round_trip() -> None:
    job = replace(JOB, status=JobStatus.FAILED, exit_code=2, error="command exited with status 2")
    back, summary = wire.job_from_summary_pb(wire.job_to_summary_pb(job, "echo hi"))
    assert summary == "echo hi"
    assert (back.id, back.status, back.exit_code, back.error, back.worker_id) == (
        job.id,
        job.status,
        2,
        job.error,
        job.worker_id,
    )
    assert (back.created_at, back.started_at, back.completed_at) == (
        job.created_at,
        job.started_at,
        job.completed_at,
    )
    assert (back.spec.task_type, back.spec.priority) == ("command", 7)
    no_exit, _ = wire.job_from_summary_pb(wire.job_to_summary_pb(replace(JOB, exit_code=None), ""))
    assert no_exit.exit_code is None


@pytest.mark.parametrize(
    "outcome",
    [
        pytest.param(ExecOutcome(ExecStatus.SUCCESS, 0, duration_s=1.5), id="success"),
        pytest.param(
            ExecOutcome(
                ExecStatus.FAILURE,
                1,
                "command exited with status 1",
                b"out",
                b"err",
                3,
                3,
                duration_s=0.25,
            ),
            id="failure-exit-1",
        ),
        pytest.param(
            ExecOutcome(ExecStatus.FAILURE, None, "working directory /x does not exist"),
            id="failure-no-exit-code",
        ),
        pytest.param(ExecOutcome(ExecStatus.FAILURE, 137, "killed by SIGKILL"), id="signal"),
        # An executor without exit codes (a plugin, e.g. an HTTP call) reports none at all.
        pytest.param(
            ExecOutcome(ExecStatus.SUCCESS, None, "", b"{}", b"", 2), id="success-no-exit-code"
        ),
        pytest.param(ExecOutcome(ExecStatus.TIMEOUT, None, "timed out after 1s"), id="timeout"),
        pytest.param(ExecOutcome(ExecStatus.CANCELLED, None, "cancelled"), id="cancelled"),
        pytest.param(ExecOutcome(ExecStatus.CANCELLED, None, ""), id="cancelled-no-reason"),
        pytest.param(
            ExecOutcome(ExecStatus.FAILURE, None, "worker shut down", retryable=True),
            id="retryable",
        ),
        pytest.param(
            ExecOutcome(ExecStatus.SUCCESS, 0, "", b"x" * 10, b"", 10_000_000_000, 0, True, 3600.0),
            id="truncated-big-counts",
        ),
    ],
)
def test_outcome_round_trip(outcome: ExecOutcome) -> None:
    msg = wire.outcome_to_pb(outcome, "task-1", 3)
    assert (msg.task_id, msg.attempt) == ("task-1", 3)
    back = wire.outcome_from_pb(worker_pb2.ExecuteResponse.FromString(msg.SerializeToString()))
    assert back == outcome


@pytest.mark.parametrize(("exit_code", "has"), [(None, False), (0, True), (1, True)])
def test_outcome_exit_code_none_is_not_zero(exit_code: int | None, has: bool) -> None:
    outcome = ExecOutcome(ExecStatus.FAILURE, exit_code, "it failed")
    msg = wire.outcome_to_pb(outcome, "t", 1)
    assert msg.has_exit_code is has
    assert wire.outcome_from_pb(msg).exit_code == exit_code


def test_outcome_from_an_original_worker() -> None:
    # A worker built from the original contract sends neither has_exit_code nor byte counts.
    ok = worker_pb2.ExecuteResponse(
        task_id="t", status=common_pb2.EXECUTION_STATUS_SUCCESS, output=b"hi\n", exit_code=0
    )
    outcome = wire.outcome_from_pb(ok)
    assert (outcome.status, outcome.exit_code, outcome.stdout_bytes) == (ExecStatus.SUCCESS, 0, 3)

    failed = worker_pb2.ExecuteResponse(
        task_id="t", status=common_pb2.EXECUTION_STATUS_FAILURE, exit_code=2
    )
    assert wire.outcome_from_pb(failed).exit_code == 2

    timeout = worker_pb2.ExecuteResponse(
        task_id="t", status=common_pb2.EXECUTION_STATUS_TIMEOUT, error="timed out"
    )
    assert wire.outcome_from_pb(timeout).exit_code is None


@pytest.mark.parametrize(
    "seconds", [0.0, 0.001, 0.25, 1.5, 59.999999999, 3600.0, 7 * 86400.0, 123456.789]
)
def test_duration_round_trip(seconds: float) -> None:
    assert wire.from_duration(wire.duration(seconds)) == pytest.approx(seconds, abs=1e-9)


def test_duration_is_exact_in_nanoseconds() -> None:
    d = wire.duration(1.5)
    assert (d.seconds, d.nanos) == (1, 500_000_000)
    assert wire.duration(0.001).ToNanoseconds() == 1_000_000


def test_timestamp_none() -> None:
    assert wire.timestamp(None) is None


@pytest.mark.parametrize(
    "when",
    [
        T0,
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2100, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
def test_timestamp_round_trip(when: datetime) -> None:
    msg = master_pb2.GetStatusResponse(created_at=wire.timestamp(when))
    back = wire.from_timestamp(msg, "created_at")
    assert back == when
    assert back is not None
    assert back.tzinfo is not None


def test_from_timestamp_unset_is_none() -> None:
    assert wire.from_timestamp(master_pb2.GetStatusResponse(), "started_at") is None


def make_node(status: NodeStatus = NodeStatus.HEALTHY) -> NodeInfo:
    return NodeInfo(
        id=NodeId("worker-1"),
        address="10.0.0.7:7000",
        capabilities=frozenset({"command", "http"}),
        max_tasks=8,
        labels={"zone": "eu-1", "gpu": "no"},
        last_seen=1234.5,
        last_seen_wall=T0,
        status=status,
        active_tasks=3,
    )


@pytest.mark.parametrize("status", list(NodeStatus))
def test_node_round_trip(status: NodeStatus) -> None:
    node = make_node(status)
    msg = common_pb2.NodeInfo.FromString(wire.node_to_pb(node).SerializeToString())
    assert list(msg.capabilities) == ["command", "http"]
    back = wire.node_from_pb(msg)
    # The registry's monotonic clock and the node's own report do not travel; the weight
    # travels as the one in force (an unset weight is the node's slot count).
    assert back.weight == node.effective_weight == node.max_tasks
    assert back == NodeInfo(
        id=node.id,
        address=node.address,
        capabilities=node.capabilities,
        max_tasks=node.max_tasks,
        labels=node.labels,
        last_seen=0.0,
        last_seen_wall=node.last_seen_wall,
        status=node.status,
        active_tasks=node.active_tasks,
        weight=node.max_tasks,
    )


def test_submit_request_max_retries_unset_vs_zero() -> None:
    spec = TaskSpec("command", b"{}", 30.0, 5, {"k": "v"})
    msg = wire.submit_request(spec)
    assert not msg.HasField("max_retries")
    assert (msg.task_type, msg.payload, msg.priority, dict(msg.metadata)) == (
        "command",
        b"{}",
        5,
        {"k": "v"},
    )
    assert wire.from_duration(msg.timeout) == 30.0

    zero = wire.submit_request(TaskSpec("command", b"{}", 30.0, max_retries=0))
    assert zero.HasField("max_retries")
    assert zero.max_retries == 0


def test_limits_travel_in_submit_execute_and_node_messages() -> None:
    limits = TaskLimits(memory_bytes=64 << 20, cpu_time_s=0.25, max_procs=7)
    spec = TaskSpec("command", b"{}", 30.0, limits=limits)
    submitted = master_pb2.SubmitRequest.FromString(wire.submit_request(spec).SerializeToString())
    assert wire.limits_from_pb(submitted.limits) == limits
    assert not wire.submit_request(TaskSpec("command", b"{}", 30.0)).HasField("limits")
    assert wire.limits_from_pb(common_pb2.Limits()) == TaskLimits()  # none asked: none set
    node = replace(make_node(), task_limits=TaskLimits(max_file_size_bytes=1 << 20))
    assert wire.node_from_pb(wire.node_to_pb(node)).task_limits == node.task_limits
    # A negative CPU time stays negative, for validation to refuse.
    forged = worker_pb2.ExecuteRequest(limits=common_pb2.Limits(cpu_time=wire.duration(-2)))
    assert wire.limits_from_pb(forged.limits).cpu_time_s == -2


@pytest.mark.parametrize("event_at", [None, datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)])
def test_scaler_status_round_trip(event_at: datetime | None) -> None:
    status = ScalerStatus(
        backend="kubernetes deployment ns/dist-exec-worker",
        desired=4,
        ready=3,
        min_replicas=1,
        max_replicas=10,
        floor=2,
        draining=("w-a", "w-b"),
        last_decision="idle; scale-down cooldown (3s left)",
        last_event="scaled up to 4: no free slot and 9 task(s) pending",
        last_event_at=event_at,
        error="Kubernetes refused to read deployment ns/dist-exec-worker (HTTP 403)",
    )
    msg = master_pb2.ScalerStatus.FromString(wire.scaler_status_to_pb(status).SerializeToString())
    assert wire.scaler_status_from_pb(msg) == status


def test_a_result_with_text_no_string_field_takes_is_sent_escaped() -> None:
    """An executor that kept bytes that are not UTF-8 as lone surrogates must not make its
    result unsendable (the task would stay RUNNING, its worker slot taken)."""
    outcome = ExecOutcome(
        ExecStatus.FAILURE, 1, "bad \udce9", metadata={"header.x-\udcff": "caf\udce9"}
    )
    sent = wire.outcome_to_pb(outcome, "t-1", 2)
    assert sent.error == "bad \\udce9"
    assert dict(sent.metadata) == {"header.x-\\udcff": "caf\\udce9"}
    assert (sent.task_id, sent.attempt, sent.exit_code) == ("t-1", 2, 1)


def test_every_stop_signal_round_trips_and_an_unknown_one_is_refused() -> None:
    for sig in wire.STOP_SIGNAL_TO_PB:
        assert wire.stop_signal_from_pb(wire.stop_signal_to_pb(sig)) is sig
    assert wire.stop_signal_from_pb(wire.stop_signal_to_pb(None)) is None
    with pytest.raises(InvalidTaskSpec, match="unknown signal value 42; a cancel may send"):
        wire.stop_signal_from_pb(42)


async def test_the_client_refuses_a_signal_a_cancel_cannot_send() -> None:
    async with Client("127.0.0.1:1") as client:  # (refused before any call)
        with pytest.raises(InvalidTaskSpec, match="a cancel cannot send SIGUSR1"):
            await client.cancel(str(uuid.uuid4()), signal.SIGUSR1)
