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
HTTP = json.dumps({"url": "http://example.com/"}).encode()
UNKNOWN_JOB = str(uuid.uuid4())
WEIGHT_RANGE = "weight must be 0-100000 (0: max_concurrent_tasks)"


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
        ({"metadata": {"k": "v" * 70_000}}, "metadata is larger than 65536 bytes"),
        ({"selector": {"zone": ""}}, "selector labels need a key and a value: --selector zone=a"),
        ({"selector": {"": "a"}}, "selector labels need a key and a value"),
        ({"selector": {"zone": "a" * 70_000}}, "selector is larger than 65536 bytes"),
        (
            {"selector": {str(i): "v" * 100 for i in range(700)}},
            "selector is larger than 65536 bytes",
        ),
        ({"idempotency_key": "k" * 257}, "idempotency key longer than 256 chars: 'kkkk"),
        (
            {"queue_timeout": duration_pb2.Duration(seconds=10**9)},
            "queue timeout must be between 0 (none) and",
        ),
        ({"queue_timeout": duration_pb2.Duration(seconds=-1)}, "queue timeout must not be"),
        (
            {"limits": common_pb2.Limits(cpu_time=duration_pb2.Duration(seconds=-1))},
            "CPU time limit must not be negative",
        ),
        (
            {"task_type": "http", "payload": HTTP, "limits": common_pb2.Limits(max_procs=4)},
            "resource limits apply to command jobs only",
        ),
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


async def test_submit_accepts_values_at_their_limits(
    channels: dict[str, grpc.aio.Channel],
) -> None:
    """The bounds refused above are the real ones: one step inside each, the job is accepted
    (a check off by one would refuse these, or pass its refusal cases by accident)."""
    stub: MasterServiceAsyncStub = master_pb2_grpc.MasterServiceStub(channels["master"])
    for fields in (
        {"idempotency_key": "k" * 256},
        {"metadata": {"k": "v" * 65_535}},
        {"selector": {"zone": "a" * 65_532}},  # (waits: no node has that label)
        {"queue_timeout": duration_pb2.Duration(seconds=3600)},
        {"max_retries": 100, "priority": 10},
    ):
        reply = await stub.Submit(submit(**fields))
        assert uuid.UUID(reply.job_id), fields


async def test_submit_broadcast_rejects_bad_input(channels: dict[str, grpc.aio.Channel]) -> None:
    """A broadcast's job is checked as a single job is, before nodes are counted; with no
    node to run on, the caller is told which labels matched none (not an empty broadcast)."""
    stub: MasterServiceAsyncStub = master_pb2_grpc.MasterServiceStub(channels["master"])
    broadcast = master_pb2.SubmitBroadcastRequest
    for job, code, fragment in (
        (submit(priority=11), CODE.INVALID_ARGUMENT, "priority must be 0-10, got 11"),
        (submit(selector={"zone": ""}), CODE.INVALID_ARGUMENT, "selector labels need a key"),
        (submit(task_type="nope"), CODE.INVALID_ARGUMENT, "unknown task type 'nope'"),
        (
            # (Its jobs, one per node, took the key in turn: the second was refused as another
            # request with the same key, and the key stayed taken by a job never created.)
            submit(idempotency_key="k1"),
            CODE.INVALID_ARGUMENT,
            "a broadcast takes no idempotency key",
        ),
        (
            submit(selector={"zone": "nowhere"}),
            CODE.FAILED_PRECONDITION,
            "no healthy worker runs task type 'command' with labels zone=nowhere: nothing to "
            "broadcast to",
        ),
    ):
        await expect(stub.SubmitBroadcast(broadcast(job=job)), code, fragment)
    reply = await stub.SubmitBroadcast(broadcast(job=submit()))
    assert sorted(t.node_id for t in reply.tasks) == ["w1", "w2"]
    assert uuid.UUID(reply.broadcast_id)
    keyed = await stub.Submit(submit(idempotency_key="k1"))  # the key is free
    assert (await stub.Submit(submit(idempotency_key="k1"))).job_id == keyed.job_id


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
        stub.StreamOutput(master_pb2.StreamOutputRequest(job_id=UNKNOWN_JOB, attempt=-1)),
        CODE.INVALID_ARGUMENT,
        "attempt must not be negative",
    )
    await expect(
        stub.ListJobs(master_pb2.ListJobsRequest(limit=-1)),
        CODE.INVALID_ARGUMENT,
        "must not be negative",
    )
    await expect(
        stub.ListJobs(master_pb2.ListJobsRequest(offset=-1)),
        CODE.INVALID_ARGUMENT,
        "limit and offset must not be negative",
    )
    for bad in ("nope", "x" * 10_000, f"{UNKNOWN_JOB}/../x"):
        await expect(
            stub.ListJobs(master_pb2.ListJobsRequest(broadcast_id=bad)),
            CODE.INVALID_ARGUMENT,
            "invalid broadcast id",
        )
    await expect(
        stub.ListJobs(master_pb2.ListJobsRequest(status_filter=99)),  # type: ignore[arg-type]
        CODE.INVALID_ARGUMENT,
        "unknown status_filter value 99",
    )


async def test_list_jobs_of_an_unknown_owner_or_broadcast_is_empty(
    channels: dict[str, grpc.aio.Channel],
) -> None:
    """Filters name no job rather than fail: an owner is any identity's name (on an open
    master, everyone sees every job), a well-formed broadcast id may name none."""
    stub: MasterServiceAsyncStub = master_pb2_grpc.MasterServiceStub(channels["master"])
    await stub.Submit(submit())
    everything = await stub.ListJobs(master_pb2.ListJobsRequest())
    assert everything.total == 1
    for request in (
        master_pb2.ListJobsRequest(owner="nobody"),
        master_pb2.ListJobsRequest(owner="x" * 10_000),
        master_pb2.ListJobsRequest(owner="%' OR 1=1 --"),
        master_pb2.ListJobsRequest(broadcast_id=UNKNOWN_JOB),
    ):
        reply = await stub.ListJobs(request)
        assert (len(reply.jobs), reply.total) == (0, 0), request


async def test_drain_of_an_unknown_or_empty_node_is_not_found(
    channels: dict[str, grpc.aio.Channel],
) -> None:
    """Only a registered node can be drained; a typo is NOT_FOUND and names what was given."""
    stub: MasterServiceAsyncStub = master_pb2_grpc.MasterServiceStub(channels["master"])
    drain = master_pb2.AuthDrainNodeRequest
    await expect(stub.AuthDrainNode(drain(node_id="w9")), CODE.NOT_FOUND, "no registered node 'w9'")
    await expect(stub.AuthDrainNode(drain(node_id="")), CODE.NOT_FOUND, "no registered node ''")
    await expect(
        stub.AuthDrainNode(drain(node_id="w" * 10_000)),
        CODE.NOT_FOUND,
        "(10000 chars)",
    )
    reply = await stub.AuthDrainNode(drain(node_id="w2"))
    assert reply.message == "node w2 is draining: no new tasks; running ones finish"


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
    good = functools.partial(node, address="127.0.0.1:1", max_concurrent_tasks=1)
    for request, message in (
        (good(worker_id="x", instance="i" * 65), "instance is longer than 64 characters: 'iii"),
        (good(worker_id="x", weight=-1), f"{WEIGHT_RANGE}, got -1"),
        (good(worker_id="x", weight=100_001), f"{WEIGHT_RANGE}, got 100001"),
        (good(worker_id="x", max_concurrent_tasks=100_001), "must be 1-100000, got 100001"),
        (good(worker_id="x" * 254), "not an id: up to 253 characters"),
        (
            good(worker_id="x", labels={str(i): "v" * 300 for i in range(250)}),
            "labels and capabilities are larger than 65536 bytes",
        ),
        (
            good(worker_id="x", capabilities=[f"c{i}" for i in range(257)]),
            "more than 256 capabilities (257)",
        ),
    ):
        await expect(stub.Register(request), CODE.INVALID_ARGUMENT, message)
    # One step inside each bound, a node is accepted (then removed again).
    accepted = await stub.Register(
        good(worker_id="y" * 253, instance="i" * 64, weight=100_000, capabilities=["command"])
    )
    assert accepted.accepted
    bye = await stub.Deregister(worker_pb2.DeregisterRequest(worker_id="y" * 253))
    assert bye.acknowledged
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
    # A signal this worker does not know (a newer master's) still cancels: with TERM.
    newer = worker_pb2.CancelTaskRequest(task_id="unknown", signal=9)  # type: ignore[arg-type]
    assert not (await stub.CancelTask(newer)).cancelled
    status = await stub.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())
    assert status.worker_id == "w1"
    assert list(status.capabilities) == ["command", "http"]
    ok = await stub.Execute(
        worker_pb2.ExecuteRequest(task_id="direct", task_type="command", payload=ECHO)
    )
    assert ok.output == b"x\n"
