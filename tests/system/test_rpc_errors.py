"""Bad input on every RPC gets the right status code and a message a person can act on."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2

from dist_exec.rpc.v1 import common_pb2, master_pb2, master_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import SmallCluster, worker_channel

if TYPE_CHECKING:
    from dist_exec.rpc.v1.master_pb2_grpc import MasterServiceAsyncStub
    from dist_exec.rpc.v1.worker_pb2_grpc import (
        RegistrationServiceAsyncStub,
        WorkerServiceAsyncStub,
    )

CODE = grpc.StatusCode
ECHO = json.dumps({"command": "echo", "args": ["x"]}).encode()
UNKNOWN_JOB = str(uuid.uuid4())


@pytest.fixture
async def channels(small_cluster: SmallCluster) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    master = grpc.aio.insecure_channel(small_cluster.address)
    worker = worker_channel(small_cluster.workers[0].address)
    yield {"master": master, "worker": worker}
    await master.close()
    await worker.close()


def submit(**fields: Any) -> master_pb2.SubmitRequest:
    body: dict[str, Any] = {"task_type": "command", "payload": ECHO} | fields
    return master_pb2.SubmitRequest(**body)


async def _drain(call: Any) -> None:
    if hasattr(call, "__aiter__"):
        async for _ in call:
            pass
    else:
        await call


async def expect(call: Any, code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _drain(call)
    assert info.value.code() == code, info.value.details()
    assert fragment in (info.value.details() or "")


@pytest.mark.parametrize(
    ("request_fields", "fragment"),
    [
        ({"task_type": "nope"}, "unknown task type 'nope'; known types: command"),
        ({"task_type": ""}, "unknown task type ''"),
        ({"payload": b"{not json"}, "not valid JSON"),
        ({"payload": b"\xff\xfe"}, "not valid JSON"),
        ({"payload": b"[1, 2]"}, "must be a JSON object"),
        ({"payload": b'{"command": "ls", "typo": 1}'}, "unknown field(s) typo"),
        ({"payload": b'{"command": ""}'}, "'command' must be a non-empty string"),
        ({"payload": b"[" * 100_000 + b"]" * 100_000}, "not valid JSON"),
        ({"payload": b'{"command": "x", "pad": "' + b"a" * 2_000_000 + b'"}'}, "the limit is"),
        ({"priority": 11}, "priority must be 0-10, got 11"),
        ({"priority": -1}, "priority must be 0-10, got -1"),
        ({"timeout": duration_pb2.Duration(seconds=-5)}, "timeout must not be negative"),
        ({"timeout": duration_pb2.Duration(seconds=10**9)}, "timeout must be between"),
        ({"timeout": duration_pb2.Duration(nanos=999_999)}, "timeout must be between 1ms and"),
        ({"timeout": duration_pb2.Duration(nanos=2_000_000_000)}, "nanos are 0-999999999"),
        (
            {"queue_timeout": duration_pb2.Duration(seconds=1, nanos=10**9)},
            "queue timeout has nanos 1000000000",
        ),
        ({"payload": b'{"command": "x", "env": {"A": ' + b"9" * 5000 + b"}}"}, "too many digits"),
        ({"max_retries": 101}, "max_retries must be 0-100"),
        ({"metadata": {"": "x"}}, "metadata keys must not be empty"),
    ],
)
async def test_submit_rejects_bad_input(
    channels: dict[str, grpc.aio.Channel], request_fields: dict[str, Any], fragment: str
) -> None:
    stub: MasterServiceAsyncStub = master_pb2_grpc.MasterServiceStub(channels["master"])
    await expect(stub.Submit(submit(**request_fields)), CODE.INVALID_ARGUMENT, fragment)
    # The master keeps serving.
    reply = await stub.Submit(submit())
    assert uuid.UUID(reply.job_id)


async def test_job_rpcs_reject_bad_ids_and_values(channels: dict[str, grpc.aio.Channel]) -> None:
    stub: MasterServiceAsyncStub = master_pb2_grpc.MasterServiceStub(channels["master"])
    for bad in ("", "not-a-uuid", "x" * 10_000):
        await expect(
            stub.GetStatus(master_pb2.GetStatusRequest(job_id=bad)),
            CODE.INVALID_ARGUMENT,
            "expected a UUID",
        )
        await expect(
            stub.Cancel(master_pb2.CancelRequest(job_id=bad)), CODE.INVALID_ARGUMENT, "UUID"
        )
        await expect(
            stub.StreamOutput(master_pb2.StreamOutputRequest(job_id=bad)),
            CODE.INVALID_ARGUMENT,
            "UUID",
        )
    unknown = f"job {UNKNOWN_JOB} not found"
    await expect(
        stub.GetStatus(master_pb2.GetStatusRequest(job_id=UNKNOWN_JOB)), CODE.NOT_FOUND, unknown
    )
    await expect(stub.Cancel(master_pb2.CancelRequest(job_id=UNKNOWN_JOB)), CODE.NOT_FOUND, unknown)
    await expect(
        stub.Cancel(master_pb2.CancelRequest(job_id=UNKNOWN_JOB, signal=99)),  # type: ignore[arg-type]
        CODE.INVALID_ARGUMENT,
        "unknown signal value 99; a cancel may send SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGKILL",
    )
    await expect(
        stub.StreamOutput(master_pb2.StreamOutputRequest(job_id=UNKNOWN_JOB)),
        CODE.NOT_FOUND,
        unknown,
    )
    await expect(
        stub.StreamOutput(master_pb2.StreamOutputRequest(job_id=UNKNOWN_JOB, stdout_offset=-1)),
        CODE.INVALID_ARGUMENT,
        "offsets must not be negative",
    )
    await expect(
        stub.ListJobs(master_pb2.ListJobsRequest(limit=-1)),
        CODE.INVALID_ARGUMENT,
        "must not be negative",
    )
    await expect(
        stub.ListJobs(master_pb2.ListJobsRequest(status_filter=99)),  # type: ignore[arg-type]
        CODE.INVALID_ARGUMENT,
        "unknown status_filter value 99",
    )


async def test_cancel_of_a_finished_job_is_failed_precondition(
    channels: dict[str, grpc.aio.Channel],
) -> None:
    stub: MasterServiceAsyncStub = master_pb2_grpc.MasterServiceStub(channels["master"])
    job_id = (await stub.Submit(submit())).job_id
    async for _ in stub.StreamOutput(master_pb2.StreamOutputRequest(job_id=job_id)):
        pass
    await expect(
        stub.Cancel(master_pb2.CancelRequest(job_id=job_id)),
        CODE.FAILED_PRECONDITION,
        "has already ended (COMPLETED)",
    )


async def test_registration_rejects_bad_nodes(channels: dict[str, grpc.aio.Channel]) -> None:
    stub: RegistrationServiceAsyncStub = worker_pb2_grpc.RegistrationServiceStub(channels["master"])
    node = worker_pb2.RegisterRequest
    for request, message in (
        (node(worker_id="", address="127.0.0.1:1", max_concurrent_tasks=1), "worker_id is empty"),
        (node(worker_id="x", address="", max_concurrent_tasks=1), "address '' cannot be dialled"),
        (node(worker_id="x", address="127.0.0.1:1"), "max_concurrent_tasks must be 1-100000"),
        (node(worker_id="a b\nc", address="127.0.0.1:1", max_concurrent_tasks=1), "not an id"),
        (
            node(worker_id="x" * 1_000_000, address="127.0.0.1:1", max_concurrent_tasks=1),
            "not an id",
        ),
        (node(worker_id="x", address="not an address!!", max_concurrent_tasks=1), "HOST:PORT"),
        (node(worker_id="x", address="localhost", max_concurrent_tasks=1), "HOST:PORT"),
        (node(worker_id="x", address="127.0.0.1:99999", max_concurrent_tasks=1), "0-65535"),
        (node(worker_id="x", address="127.0.0.1:0", max_concurrent_tasks=1), "port is 0"),
        (node(worker_id="x", address="unix:/tmp/x.sock", max_concurrent_tasks=1), "HOST:PORT"),
        (node(worker_id="x", address="[nope]:80", max_concurrent_tasks=1), "not an IPv6"),
        (
            node(worker_id="x", address="127.0.0.1:1", max_concurrent_tasks=1, capabilities=[""]),
            "capability '' is empty or has control characters",
        ),
        (
            node(
                worker_id="x",
                address="127.0.0.1:1",
                max_concurrent_tasks=1,
                labels={str(i): "v" for i in range(300)},
            ),
            "more than 256 labels",
        ),
        (
            node(
                worker_id="x",
                address="127.0.0.1:1",
                max_concurrent_tasks=1,
                labels={"zone": "a\nb"},
            ),
            "control characters",
        ),
    ):
        await expect(stub.Register(request), CODE.INVALID_ARGUMENT, message)
    beat = await stub.Heartbeat(worker_pb2.HeartbeatRequest(worker_id="never-registered"))
    assert not beat.acknowledged
    bye = await stub.Deregister(worker_pb2.DeregisterRequest(worker_id="never-registered"))
    assert bye.acknowledged


async def test_worker_rejects_bad_execute_requests(channels: dict[str, grpc.aio.Channel]) -> None:
    stub: WorkerServiceAsyncStub = worker_pb2_grpc.WorkerServiceStub(channels["worker"])
    await expect(
        stub.Execute(worker_pb2.ExecuteRequest(task_id="t", task_type="nope", payload=ECHO)),
        CODE.INVALID_ARGUMENT,
        "cannot run task type 'nope'",
    )
    await expect(
        stub.Execute(worker_pb2.ExecuteRequest(task_id="t", task_type="command", payload=b"{")),
        CODE.INVALID_ARGUMENT,
        "not valid JSON",
    )
    start = functools.partial(worker_pb2.ExecuteRequest, task_type="command", payload=ECHO)
    for request, message in (
        (start(task_id=""), "task_id must have 1-256 characters"),
        (start(task_id="t" * 1_000_000), "task_id must have 1-256 characters"),
        (start(task_id="t", timeout=duration_pb2.Duration(seconds=-1)), "must not be negative"),
        (start(task_id="t", timeout=duration_pb2.Duration(nanos=10**9)), "nanos are 0-999999999"),
        (start(task_id="t", metadata={"k": "v" * 70_000}), "metadata is larger than 65536"),
        (
            start(
                task_id="t", limits=common_pb2.Limits(cpu_time=duration_pb2.Duration(seconds=-1))
            ),
            "CPU time limit must not be negative",
        ),
    ):
        await expect(stub.Execute(request), CODE.INVALID_ARGUMENT, message)
    await expect(
        stub.ExecuteStream(worker_pb2.ExecuteRequest(task_id="t", attempt=3, attach=True)),
        CODE.NOT_FOUND,
        "holds no attempt 3 of task 't'",
    )
    cancelled = await stub.CancelTask(worker_pb2.CancelTaskRequest(task_id="unknown"))
    assert not cancelled.cancelled
    await expect(
        stub.CancelTask(worker_pb2.CancelTaskRequest(task_id="unknown", signal=9)),  # type: ignore[arg-type]
        CODE.INVALID_ARGUMENT,
        "unknown signal value 9",
    )
    status = await stub.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())
    assert status.worker_id == "w1"
    assert list(status.capabilities) == ["command", "http"]
    ok = await stub.Execute(
        worker_pb2.ExecuteRequest(task_id="direct", task_type="command", payload=ECHO)
    )
    assert ok.output == b"x\n"
