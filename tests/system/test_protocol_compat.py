"""Wire compatibility with design/PROTOCOL.md: a client and a worker built from its tables alone.

``protocol_tables.proto`` is written from the field tables alone, with message and enum names of
its own. It is compiled at test time into a private descriptor pool: the default pool already
holds our ``distexec.v1.*`` types (from ``dist_exec.rpc``, under other file names) and refuses a
second definition of the same full names, so nothing here goes through generated ``*_pb2``
modules. Calls use raw method paths (``/distexec.v1.MasterService/Submit``) with the pool's
message classes, exactly as a foreign implementation would put them on the wire.

The foreign worker sends its output three ways: in one PROGRESS_OUTPUT event, in several without
the ``offset`` addition (chunks then follow one another), and only in ``final_result``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dist_exec.client import Client, JobStatus
from dist_exec.models import NodeStatus
from tests.conftest import ClusterFactory, SmallCluster, wait_for

pytestmark = pytest.mark.system

T = TypeVar("T")
PACKAGE = "distexec.v1"
PROTO_FILE = Path(__file__).with_name("protocol_tables.proto")
RPC_TIMEOUT_S = 10.0
JOB_TIMEOUT_S = 30.0
POLL_S = 0.05


# ---- the contract, compiled from the tables ------------------------------------------------------


class Tables:
    """protocol_tables.proto in a descriptor pool of its own."""

    def __init__(self, descriptor_set: bytes) -> None:
        self.pool = descriptor_pool.DescriptorPool()
        for file in descriptor_pb2.FileDescriptorSet.FromString(descriptor_set).file:
            self.pool.Add(file)

    def message(self, name: str) -> Any:
        """The message class for ``distexec.v1.<name>`` (one of the tables' messages)."""
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))

    def enum(self, name: str, value: str) -> int:
        return self.pool.FindEnumTypeByName(f"{PACKAGE}.{name}").values_by_name[value].number

    def service(self, name: str) -> ServiceDescriptor:
        return self.pool.FindServiceByName(f"{PACKAGE}.{name}")

    def stub(self, channel: grpc.Channel | grpc.aio.Channel, service: str) -> Stub:
        return Stub(channel, self.service(service))


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


class Stub:
    """Client calls named by RPC (``stub.Submit(request, timeout=...)``), built from descriptors."""

    def __init__(
        self, channel: grpc.Channel | grpc.aio.Channel, service: ServiceDescriptor
    ) -> None:
        self._calls: dict[str, Any] = {}
        for method in service.methods:
            assert not method.client_streaming, "the tables have no client-streaming RPC"
            factory = channel.unary_stream if method.server_streaming else channel.unary_unary
            self._calls[method.name] = factory(
                f"/{service.full_name}/{method.name}",
                request_serializer=_serialize,
                response_deserializer=message_factory.GetMessageClass(
                    method.output_type
                ).FromString,
            )

    def __getattr__(self, name: str) -> Any:
        try:
            return self._calls[name]
        except KeyError:
            raise AttributeError(name) from None


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> Tables:
    out = tmp_path_factory.mktemp("protocol-tables") / "protocol_tables.pb"
    argv = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_FILE.parent}",
        f"--descriptor_set_out={out}", "--include_imports", PROTO_FILE.name,
    ]  # fmt: skip
    compiled = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert compiled.returncode == 0, f"protoc failed:\n{compiled.stderr}"
    return Tables(out.read_bytes())


# ---- helpers ------------------------------------------------------------------------------------


def command_order(tables: Tables, body: dict[str, Any], **fields: Any) -> Any:
    fields = {"task_type": "command", "payload": json.dumps(body).encode(), **fields}
    order = tables.message("JobOrder")(**fields)
    order.timeout.seconds = int(JOB_TIMEOUT_S)
    return order


def is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def ended(tables: Tables, report: Any) -> bool:
    live = {tables.enum("JobState", s) for s in ("JS_UNSPECIFIED", "JS_PENDING", "JS_RUNNING")}
    return report.status not in live


def state_name(tables: Tables, value: int) -> str:
    return str(tables.pool.FindEnumTypeByName(f"{PACKAGE}.JobState").values_by_number[value].name)


def timestamps_in_order(report: Any) -> bool:
    stamps = [report.created_at, report.started_at, report.completed_at]
    assert all(report.HasField(n) for n in ("created_at", "started_at", "completed_at")), report
    as_ns = [s.seconds * 10**9 + s.nanos for s in stamps]
    return as_ns[0] > 0 and as_ns == sorted(as_ns)


def expect_rpc_error(
    code: grpc.StatusCode, call: Callable[..., object], *args: Any, **kwargs: Any
) -> str:
    """``call(*args, **kwargs)`` must fail with ``code``; returns the (non-empty) details."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    err: Any = info.value  # a grpc.Call as well
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    details: str = err.details() or ""
    assert details, f"{code.name} without a message"
    return details


async def eventually(
    probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = JOB_TIMEOUT_S
) -> T:
    """Await ``probe`` every POLL_S until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(POLL_S)


def wait_ended(tables: Tables, master: Stub, job_id: str) -> Any:
    query = tables.message("JobRef")(job_id=job_id)

    def probe() -> Any:
        report = master.GetStatus(query, timeout=RPC_TIMEOUT_S)
        return report if ended(tables, report) else None

    return wait_for(probe, timeout=JOB_TIMEOUT_S, what=f"job {job_id} to end", poll=POLL_S)


# ---- MasterService through the table-built client ------------------------------------------------


def test_command_job_lifecycle(small_cluster: SmallCluster, tables: Tables) -> None:
    completed = tables.enum("JobState", "JS_COMPLETED")
    assert completed == 3
    body = {"command": "echo", "args": ["compat"]}
    with grpc.insecure_channel(small_cluster.address) as channel:
        master = tables.stub(channel, "MasterService")
        ticket = master.Submit(
            command_order(tables, body, priority=7, metadata={"origin": "compat"}),
            timeout=RPC_TIMEOUT_S,
        )
        job_id = ticket.job_id
        assert is_uuid(job_id), job_id

        report = wait_ended(tables, master, job_id)
        assert report.status == completed, (state_name(tables, report.status), report.error)
        assert report.job_id == job_id
        assert report.output == b"compat\n"
        assert report.exit_code == 0
        assert report.error == ""
        assert report.worker_id in {w.extra["id"] for w in small_cluster.workers}
        assert timestamps_in_order(report), report

        # ListJobs: the job as a JobSummary, with and without a status filter.
        page_query = tables.message("JobPageQuery")
        page = master.ListJobs(page_query(limit=10), timeout=RPC_TIMEOUT_S)
        assert page.total >= 1
        lines = [line for line in page.jobs if line.job_id == job_id]
        assert len(lines) == 1, page
        assert lines[0].task_type == "command"
        assert lines[0].status == completed
        assert lines[0].created_at == report.created_at
        only_completed = master.ListJobs(page_query(status_filter=completed), timeout=RPC_TIMEOUT_S)
        assert job_id in {line.job_id for line in only_completed.jobs}
        only_failed = master.ListJobs(
            page_query(status_filter=tables.enum("JobState", "JS_FAILED")), timeout=RPC_TIMEOUT_S
        )
        assert job_id not in {line.job_id for line in only_failed.jobs}

        # StreamOutput of an ended job: its stdout, then the stream ends by itself.
        ref = tables.message("JobRef")(job_id=job_id)
        chunks = list(master.StreamOutput(ref, timeout=RPC_TIMEOUT_S))
        assert chunks, "no output chunks"
        assert {c.type for c in chunks} == {tables.enum("StreamKind", "SK_STDOUT")}
        assert b"".join(c.data for c in chunks) == b"compat\n"

        # Cancelling a job that has ended.
        details = expect_rpc_error(
            grpc.StatusCode.FAILED_PRECONDITION, master.Cancel, ref, timeout=RPC_TIMEOUT_S
        )
        assert job_id in details


def test_error_codes(small_cluster: SmallCluster, tables: Tables) -> None:
    with grpc.insecure_channel(small_cluster.address) as channel:
        master = tables.stub(channel, "MasterService")
        unknown = tables.message("JobRef")(job_id=str(uuid.uuid4()))
        for rpc in ("GetStatus", "Cancel"):
            details = expect_rpc_error(
                grpc.StatusCode.NOT_FOUND, getattr(master, rpc), unknown, timeout=RPC_TIMEOUT_S
            )
            assert unknown.job_id in details, (rpc, details)
        expect_rpc_error(
            grpc.StatusCode.NOT_FOUND,
            lambda: list(master.StreamOutput(unknown, timeout=RPC_TIMEOUT_S)),
        )

        echo = {"command": "echo", "args": ["never"]}
        bad_orders = {
            "unknown task type": command_order(tables, echo, task_type="no-such-type"),
            "priority 11": command_order(tables, echo, priority=11),
            "priority -1": command_order(tables, echo, priority=-1),
            "payload not JSON": tables.message("JobOrder")(task_type="command", payload=b"{echo"),
        }
        for case, order in bad_orders.items():
            details = expect_rpc_error(
                grpc.StatusCode.INVALID_ARGUMENT, master.Submit, order, timeout=RPC_TIMEOUT_S
            )
            assert details, case

        # Nothing above created a job.
        page = master.ListJobs(tables.message("JobPageQuery")(), timeout=RPC_TIMEOUT_S)
        assert page.total == 0, page


# ---- health, reflection, and the served schema against the tables --------------------------------


def list_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = stub.ServerReflectionInfo(iter([request]), timeout=RPC_TIMEOUT_S)
    return {s.name for s in response.list_services_response.service}


def test_health_and_reflection(small_cluster: SmallCluster) -> None:
    servers = {
        small_cluster.master.address: {
            f"{PACKAGE}.MasterService",
            f"{PACKAGE}.RegistrationService",
        },
        small_cluster.workers[0].address: {f"{PACKAGE}.WorkerService"},
    }
    serving = health_pb2.HealthCheckResponse.SERVING
    for address, expected in servers.items():
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", *sorted(expected)):
                reply = health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S
                )
                assert reply.status == serving, (address, service, reply)
                watch = health.Watch(
                    health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S
                )
                assert next(watch).status == serving, (address, service)
                watch.cancel()
            listed = list_services(channel)
            assert expected <= listed, (address, listed)
            assert "grpc.health.v1.Health" in listed, (address, listed)


def reflected_pool(channel: grpc.Channel, symbols: Iterable[str]) -> descriptor_pool.DescriptorPool:
    """The files (with their dependencies) that define ``symbols``, as the server reflects them."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in symbols]
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for response in stub.ServerReflectionInfo(iter(requests), timeout=RPC_TIMEOUT_S):
        assert not response.HasField("error_response"), response.error_response
        for raw in response.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[proto.name] = proto
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name not in added:
            for dependency in files[name].dependency:
                add(dependency)
            pool.Add(files[name])
            added.add(name)

    for name in files:
        add(name)
    return pool


def assert_covers(
    theirs: Descriptor, ours: Descriptor, where: str, seen: set[tuple[str, str]]
) -> None:
    """Every field of ``ours`` is on ``theirs`` with the same number, name, type and cardinality."""
    if (ours.full_name, theirs.full_name) in seen:
        return
    seen.add((ours.full_name, theirs.full_name))
    if ours.full_name.startswith("google.protobuf."):
        assert theirs.full_name == ours.full_name, f"{where}: {theirs.full_name}"
    for mine in ours.fields:
        path = f"{where}.{mine.name}={mine.number}"
        other = theirs.fields_by_number.get(mine.number)
        assert other is not None, f"{path}: no field with that number on the server"
        assert (other.name, other.type, other.is_repeated) == (
            mine.name,
            mine.type,
            mine.is_repeated,
        ), f"{path}: the server has {other.full_name} type {other.type}"
        if mine.message_type is not None:
            assert other.message_type is not None
            assert_covers(other.message_type, mine.message_type, path, seen)
        elif mine.enum_type is not None:
            assert other.enum_type is not None
            missing = {v.number for v in mine.enum_type.values} - {
                v.number for v in other.enum_type.values
            }
            assert not missing, f"{path}: enum {other.enum_type.full_name} lacks {missing}"


def assert_service_covers(pool: descriptor_pool.DescriptorPool, ours: ServiceDescriptor) -> None:
    theirs = pool.FindServiceByName(ours.full_name)
    seen: set[tuple[str, str]] = set()
    for method in ours.methods:
        other = theirs.methods_by_name.get(method.name)
        where = f"{ours.full_name}/{method.name}"
        assert other is not None, f"{where}: not served"
        assert (other.client_streaming, other.server_streaming) == (
            method.client_streaming,
            method.server_streaming,
        ), f"{where}: streaming differs"
        assert_covers(other.input_type, method.input_type, f"{where} request", seen)
        assert_covers(other.output_type, method.output_type, f"{where} response", seen)


def test_served_schema_covers_the_tables(small_cluster: SmallCluster, tables: Tables) -> None:
    """What the servers reflect is a superset of the tables: same RPCs, numbers, types, names."""
    by_server = {
        small_cluster.master.address: ("MasterService", "RegistrationService"),
        small_cluster.workers[0].address: ("WorkerService",),
    }
    for address, services in by_server.items():
        with grpc.insecure_channel(address) as channel:
            pool = reflected_pool(channel, [f"{PACKAGE}.{s}" for s in services])
        for service in services:
            assert_service_covers(pool, tables.service(service))


# ---- a foreign worker: WorkerService from the tables, registered with a real master --------------


@dataclass
class ForeignWorker:
    """Implements WorkerService with table fields only. It 'runs' echo: prints its args."""

    tables: Tables
    worker_id: str
    output_chunks: int = 1  # PROGRESS_OUTPUT events per task; 0: output only in final_result
    broken_calls: int = 0  # the first ExecuteStream calls end at once with UNAVAILABLE
    health: str = "WL_HEALTHY"  # what its heartbeats say
    orders: list[Any] = field(default_factory=list)
    cancels: list[Any] = field(default_factory=list)
    active: int = 0

    def handler(self) -> grpc.GenericRpcHandler:
        service = self.tables.service("WorkerService")
        impls: dict[str, Any] = {
            "Execute": self.execute,
            "ExecuteStream": self.execute_stream,
            "CancelTask": self.cancel_task,
            "GetWorkerStatus": self.get_worker_status,
        }
        handlers = {}
        for method in service.methods:
            make = (
                grpc.unary_stream_rpc_method_handler
                if method.server_streaming
                else grpc.unary_unary_rpc_method_handler
            )
            handlers[method.name] = make(
                impls[method.name],
                request_deserializer=message_factory.GetMessageClass(method.input_type).FromString,
                response_serializer=_serialize,
            )
        return grpc.method_handlers_generic_handler(service.full_name, handlers)

    def run(self, order: Any) -> Any:
        body = json.loads(order.payload)
        result = self.tables.message("TaskResult")(task_id=order.task_id)
        result.duration.nanos = 1_000_000
        if order.task_type != "command" or body.get("command") != "echo":
            result.status = self.tables.enum("RunVerdict", "RV_FAILURE")
            result.error = f"foreign worker only runs echo, not {order.task_type} {body}"
            return result
        result.status = self.tables.enum("RunVerdict", "RV_SUCCESS")
        result.output = (" ".join(body.get("args", [])) + "\n").encode()
        result.exit_code = 0
        return result

    async def execute(self, order: Any, context: object) -> Any:
        self.orders.append(order)
        return self.run(order)

    async def execute_stream(
        self, order: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        self.orders.append(order)
        if len(self.orders) <= self.broken_calls:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the network broke")
        event = self.tables.message("TaskEvent")
        self.active += 1
        try:
            yield event(type=self.tables.enum("EventKind", "EK_PROGRESS_STARTED"))
            result = self.run(order)
            for piece in split(result.output, self.output_chunks):
                yield event(type=self.tables.enum("EventKind", "EK_PROGRESS_OUTPUT"), data=piece)
            yield event(
                type=self.tables.enum("EventKind", "EK_PROGRESS_COMPLETED"), final_result=result
            )
        finally:
            self.active -= 1

    async def cancel_task(self, ref: Any, context: object) -> Any:
        self.cancels.append(ref)
        return self.tables.message("TaskCancelVerdict")(cancelled=False)

    async def get_worker_status(self, request: Any, context: object) -> Any:
        return self.tables.message("WorkerReport")(
            worker_id=self.worker_id,
            capabilities=["command"],
            max_concurrent_tasks=2,
            active_tasks=self.active,
            health=self.tables.enum("Wellness", "WL_HEALTHY"),
        )


def split(data: bytes, parts: int) -> list[bytes]:
    if parts == 0:
        return []
    size = max(1, -(-len(data) // parts))
    return [data[start : start + size] for start in range(0, len(data), size)]


async def heartbeat_forever(
    tables: Tables, registration: Stub, worker: ForeignWorker, interval_s: float, acks: list[bool]
) -> None:
    pulse = tables.message("Pulse")
    while True:
        await asyncio.sleep(interval_s)
        reply = await registration.Heartbeat(
            pulse(
                worker_id=worker.worker_id,
                active_tasks=worker.active,
                health=tables.enum("Wellness", worker.health),
                metrics={"impl": "protocol-tables"},
            ),
            timeout=RPC_TIMEOUT_S,
        )
        acks.append(reply.acknowledged)


async def run_through_foreign_worker(
    cluster: ClusterFactory,
    tables: Tables,
    worker: ForeignWorker,
    args: list[str],
    queued: Callable[[str, str, list[bool]], Awaitable[None]] | None = None,
) -> tuple[Any, list[Any]]:
    """Serve ``worker``, register it with a fresh master and run one echo job through the master.
    ``queued(master address, job id, heartbeat answers)`` runs once the job is submitted.

    Returns the job's GetStatus report and what StreamOutput replays of it afterwards.
    """
    master_proc = cluster.master()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((worker.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(master_proc.address)
    beats: asyncio.Task[None] | None = None
    try:
        registration = tables.stub(channel, "RegistrationService")
        master = tables.stub(channel, "MasterService")
        pulse = tables.message("Pulse")(worker_id=worker.worker_id)
        stranger = await registration.Heartbeat(pulse, timeout=RPC_TIMEOUT_S)
        assert not stranger.acknowledged, "a heartbeat from an unknown worker was acknowledged"

        joined = await registration.Register(
            tables.message("JoinOrder")(
                worker_id=worker.worker_id,
                address=f"127.0.0.1:{port}",
                capabilities=["command"],
                max_concurrent_tasks=2,
                labels={"impl": "protocol-tables"},
            ),
            timeout=RPC_TIMEOUT_S,
        )
        assert joined.accepted, joined.message
        interval = joined.heartbeat_interval.seconds + joined.heartbeat_interval.nanos / 1e9
        assert 0 < interval <= 5, joined
        acks: list[bool] = []
        beats = asyncio.create_task(heartbeat_forever(tables, registration, worker, interval, acks))

        async def acked() -> bool:
            return bool(acks) or beats.done()

        await eventually(acked, "a heartbeat answer", timeout=5 * interval + RPC_TIMEOUT_S)
        assert acks, f"no heartbeat answer: {beats}"
        assert all(acks), acks

        body = {"command": "echo", "args": args}
        ticket = await master.Submit(command_order(tables, body), timeout=RPC_TIMEOUT_S)
        ref = tables.message("JobRef")(job_id=ticket.job_id)
        if queued is not None:
            await queued(master_proc.address, ticket.job_id, acks)

        async def finished() -> Any:
            report = await master.GetStatus(ref, timeout=RPC_TIMEOUT_S)
            return report if ended(tables, report) else None

        report = await eventually(finished, f"job {ticket.job_id} to end")
        assert len(worker.orders) == 1 + worker.broken_calls, worker.orders
        for order in worker.orders:  # (never an addition it cannot read, such as an attach)
            assert order.task_type == "command"
            assert json.loads(order.payload) == body
            assert order.task_id == ticket.job_id
        streamed = [chunk async for chunk in master.StreamOutput(ref, timeout=RPC_TIMEOUT_S)]
        assert not beats.done(), beats
        assert all(acks), acks

        left = await registration.Deregister(
            tables.message("LeaveOrder")(worker_id=worker.worker_id), timeout=RPC_TIMEOUT_S
        )
        assert left.acknowledged
        return report, streamed
    finally:
        if beats is not None:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)
        await channel.close()
        await server.stop(None)


# Known master bugs with a worker that speaks only the tables (see the module docstring).
@pytest.mark.parametrize(
    "output_chunks",
    [
        pytest.param(1, id="one-output-event"),
        pytest.param(3, id="three-output-events"),
        pytest.param(0, id="output-only-in-final-result"),
    ],
)
async def test_foreign_worker_runs_a_job(
    cluster: ClusterFactory, tables: Tables, output_chunks: int
) -> None:
    worker = ForeignWorker(tables, "foreign-1", output_chunks=output_chunks)
    report, streamed = await run_through_foreign_worker(cluster, tables, worker, ["from", "tables"])
    assert report.status == tables.enum("JobState", "JS_COMPLETED"), report
    assert report.exit_code == 0
    assert report.error == ""
    assert report.worker_id == "foreign-1"
    assert timestamps_in_order(report), report
    assert {c.type for c in streamed} <= {tables.enum("StreamKind", "SK_STDOUT")}
    assert b"".join(c.data for c in streamed) == b"from tables\n"
    assert report.output == b"from tables\n"


async def test_a_broken_call_to_a_foreign_worker_runs_the_job_again(
    cluster: ClusterFactory, tables: Tables
) -> None:
    """A worker of the protocol's first version cannot be re-attached to (it would take the
    attach for a task of no type, and fail the job): its attempt is stopped and run again."""
    worker = ForeignWorker(tables, "foreign-1", broken_calls=1)
    report, _ = await run_through_foreign_worker(cluster, tables, worker, ["second", "try"])
    assert report.status == tables.enum("JobState", "JS_COMPLETED"), report
    assert report.output == b"second try\n"
    assert [ref.task_id for ref in worker.cancels] == [worker.orders[0].task_id]


@pytest.mark.parametrize("health", ["WL_DEGRADED", "WL_UNHEALTHY"])
async def test_a_worker_whose_heartbeats_say_it_is_unwell_gets_no_new_task(
    cluster: ClusterFactory, tables: Tables, health: str
) -> None:
    worker = ForeignWorker(tables, "foreign-1", health=health)

    async def queued(address: str, job_id: str, acks: list[bool]) -> None:
        async with Client(address) as client:

            async def degraded() -> bool:
                (node,) = await client.nodes()
                return node.status == NodeStatus.DEGRADED

            await eventually(degraded, "the node to be DEGRADED")
            heard = len(acks)

            async def two_more_heartbeats() -> bool:
                return len(acks) >= heard + 2

            await eventually(two_more_heartbeats, "two more heartbeats")
            assert not worker.orders, "a task went to a worker that says it is unwell"
            assert (await client.get(job_id)).status == JobStatus.PENDING
            worker.health = "WL_HEALTHY"

    report, _ = await run_through_foreign_worker(cluster, tables, worker, ["well", "again"], queued)
    assert report.status == tables.enum("JobState", "JS_COMPLETED"), report
    assert report.output == b"well again\n"
