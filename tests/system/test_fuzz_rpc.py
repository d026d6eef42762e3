"""Hostile and malformed messages to every RPC of a real master and worker.

Each request is built field by field from the service descriptors (so a new RPC or field is
fuzzed without touching this file): invalid UTF-8 in every string field, negative and enormous
numbers, unknown enum values, deeply nested JSON in bytes fields, absurd durations, garbage that
is not protobuf at all, one huge field, and one message beyond the servers' receive limit. Every
call must end with a clear status (never UNKNOWN or INTERNAL, also as an error event on a
stream of many runs), a hostile value that no validator may let through is refused (but for a
short allow-list, each entry with its reason), the servers keep serving, and a job accepted
before the barrage is intact after it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from dist_exec.client import Client, command_spec
from dist_exec.config import MAX_MESSAGE_BYTES
from dist_exec.models import JobStatus
from dist_exec.rpc.v1 import master_pb2, worker_pb2
from tests.conftest import ClusterFactory, call_token_interceptors

pytestmark = pytest.mark.system
UNCLEAR = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}
STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
NESTED_JSON = b"[" * 200_000 + b"]" * 200_000
NESTED_COMMAND = b'{"command": "echo", "env": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001


# Values no validator may let through, on any RPC: bytes that are no protobuf (or no UTF-8
# where a string goes), enum values that name nothing, durations out of range, and payloads
# that are no task. A case whose label ends so must not end OK (nor, on a stream that carries
# many runs or attempts, pass without an error event)...
MUST_REFUSE = (
    "not protobuf", "truncated", "invalid utf-8", "nested garbage", "unknown enum",
    "negative enum", "duration negative", "duration bad nanos", "duration huge",
    "nested json", "nested command", "not json",
)  # fmt: skip
# ...except these, where the value is legitimately taken (the reason why).
ACCEPTED = {
    "Heartbeat [health: unknown enum]": "a newer worker's health state: read as healthy",
    "Heartbeat [health: negative enum]": "the same (proto3 enums are open)",
    "CancelTask [signal: unknown enum]": "a newer master's stop signal: the task stops by TERM",
    "CancelTask [signal: negative enum]": "the same",
}
# Cases refused by the check of the field itself (not for another field the fuzzed message
# leaves empty, such as Submit's task type): status and a fragment of the message.
INVALID = grpc.StatusCode.INVALID_ARGUMENT
REFUSED_FOR = {
    "Submit [not protobuf]": (INVALID, "malformed request to /distexec.v1.MasterService/Submit"),
    "Submit [timeout: duration negative]": (INVALID, "timeout must not be negative"),
    "Submit [queue_timeout: duration bad nanos]": (INVALID, "queue timeout has nanos"),
    "Submit [limits: inner cpu_time: duration negative]": (INVALID, "CPU time limit must not"),
    "ListJobs [limit: int -1]": (INVALID, "limit and offset must not be negative"),
    "ListJobs [offset: int -1]": (INVALID, "limit and offset must not be negative"),
    "ListJobs [status_filter: negative enum]": (INVALID, "unknown status_filter value -5"),
    "ListJobs [broadcast_id: control chars]": (INVALID, "invalid broadcast id"),
    "StreamOutput [attempt: int -1]": (INVALID, "attempt must not be negative"),
    "StreamOutput [stdout_offset: int -1]": (INVALID, "output offsets must not be negative"),
    "StreamOutput [stderr_offset: int min]": (INVALID, "output offsets must not be negative"),
    "Register [worker_id: control chars]": (INVALID, "is not an id"),
    # Refusals a stream sends as events:
    "RunSession [requests: inner run: inner jobs: inner timeout: duration negative]": (
        INVALID,
        "timeout must not be negative",
    ),
    "Dispatch [start: inner attach: bool 7]": (
        grpc.StatusCode.NOT_FOUND,
        "attach to an attempt with ExecuteStream, not Dispatch",
    ),
}


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers are ten-byte two's complement on the wire
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, body: bytes) -> bytes:
    key = _varint(number << 3 | wire_type)
    return key + (_varint(len(body)) + body if wire_type == 2 else body)


def _hostile_values(field: FieldDescriptor) -> Iterator[tuple[str, bytes]]:
    n = field.number
    if field.type == FieldDescriptor.TYPE_STRING:
        yield "invalid utf-8", _field(n, 2, b"ok\xc3\x28\xff\xfe")
        yield "control chars", _field(n, 2, b"\x00\x1b[31m\r\n../../etc/passwd")
    elif field.type == FieldDescriptor.TYPE_BYTES:
        yield "nested json", _field(n, 2, NESTED_JSON)
        yield "nested command", _field(n, 2, NESTED_COMMAND)
        yield "not json", _field(n, 2, b"\xff\x00garbage")
    elif field.type == FieldDescriptor.TYPE_ENUM:
        yield "unknown enum", _field(n, 0, _varint(99))
        yield "negative enum", _field(n, 0, _varint(-5))
    elif field.type == FieldDescriptor.TYPE_BOOL:
        yield "bool 7", _field(n, 0, _varint(7))
    elif field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64):
        for label, value in (("-1", -1), ("min", -(2**63)), ("max32", 2**31 - 1),
                             ("max64", 2**63 - 1)):  # fmt: skip
            yield f"int {label}", _field(n, 0, _varint(value))
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        inner_type = field.message_type
        assert inner_type is not None
        if inner_type.full_name in (
            "google.protobuf.Duration",
            "google.protobuf.Timestamp",
        ):
            for label, seconds, nanos in (("huge", 2**62, 0), ("negative", -(2**40), -5),
                                          ("bad nanos", 1, 2**31 - 1)):  # fmt: skip
                body = _field(1, 0, _varint(seconds)) + _field(2, 0, _varint(nanos))
                yield f"duration {label}", _field(n, 2, body)
        elif inner_type.GetOptions().map_entry:
            entry = _field(1, 2, b"\xff\xfekey") + _field(2, 2, b"v")
            yield "map invalid utf-8", _field(n, 2, entry)
            yield "map empty key", _field(n, 2, _field(2, 2, b"v"))
        else:
            yield "nested garbage", _field(n, 2, b"\xff\xff\xff\xff")
            for label, inner in _hostile_message(inner_type, depth=1):
                yield f"inner {label}", _field(n, 2, inner)


def _hostile_message(message: Descriptor, depth: int = 0) -> Iterator[tuple[str, bytes]]:
    if depth > 1:
        return
    for field in message.fields:
        for label, body in _hostile_values(field):
            yield f"{field.name}: {label}", body


def _requests(method: MethodDescriptor) -> Iterator[tuple[str, bytes]]:
    yield "not protobuf", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    yield "truncated", b"\x0a\x64abc"
    yield "unknown fields", _field(999, 2, b"x" * 100) + _field(1000, 0, _varint(-1))
    yield from _hostile_message(method.input_type)
    first_string = next(
        (f for f in method.input_type.fields if f.type == FieldDescriptor.TYPE_STRING), None
    )
    if first_string is not None:
        yield "huge string", _field(first_string.number, 2, b"a" * (8 * 1024 * 1024))


async def _call(
    channel: grpc.aio.Channel, path: str, method: MethodDescriptor, body: bytes
) -> tuple[grpc.StatusCode, str] | None:
    """Send ``body`` as the raw serialized request (no serializer: the bytes go as they are);
    to a method that takes a stream of requests, as its one message. Returns the first
    refusal a stream sent as an event (see ``_in_band_error``), if any."""
    replies: list[bytes] = []
    if method.client_streaming:
        bidi: Any = channel.stream_stream(path)
        replies = [reply async for reply in bidi(iter([body]), timeout=5)]
    elif method.server_streaming:
        call: Any = channel.unary_stream(path)
        replies = [reply async for reply in call(body, timeout=5)]
    else:
        unary: Any = channel.unary_unary(path)
        await unary(body, timeout=5)
    reply_type = GetMessageClass(method.output_type)
    for raw in replies:
        refused = _in_band_error(reply_type.FromString(raw))
        if refused is not None:
            return refused
    return None


def _in_band_error(reply: Message) -> tuple[grpc.StatusCode, str] | None:
    """A refusal that a stream carrying many runs or attempts (RunSession, Dispatch) sends as
    an event, not as the stream's status: the status a call of its own would have ended with
    (its ``error_code``) and its message."""
    for event in getattr(reply, "events", ()):
        if getattr(event, "error_code", 0):
            code = STATUS_BY_NUMBER.get(event.error_code, grpc.StatusCode.UNKNOWN)
            text = event.error if hasattr(event, "error") else event.data.decode(errors="replace")
            return code, text
    return None


async def _barrage(
    address: str,
    services: Sequence[tuple[str, Any]],
    codes: dict[str, grpc.StatusCode],
    reasons: dict[str, str],
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> list[str]:
    """Send every hostile request; ``codes`` gets each one's status (or the refusal a stream
    sent as an event: OK only when nothing was refused), ``reasons`` its message."""
    problems: list[str] = []
    options = [("grpc.max_send_message_length", -1)]
    async with grpc.aio.insecure_channel(
        address, options=options, interceptors=interceptors
    ) as channel:
        for service_name, descriptor in services:
            service = descriptor.services_by_name[service_name]
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                for label, body in _requests(method):
                    codes[f"{method.name} [{label}]"] = grpc.StatusCode.OK
                    try:
                        refused = await _call(channel, path, method, body)
                    except grpc.aio.AioRpcError as exc:
                        refused = exc.code(), exc.details() or ""
                        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not (
                            method.server_streaming
                        ):
                            problems.append(f"{path} [{label}]: no answer within 5s")
                    if refused is not None:
                        codes[f"{method.name} [{label}]"] = refused[0]
                        reasons[f"{method.name} [{label}]"] = refused[1]
                        if refused[0] in UNCLEAR:
                            problems.append(f"{path} [{label}]: {refused[0].name} {refused[1]}")
                # Beyond the receive limit: refused by gRPC itself, clearly.
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _call(
                        channel, path, method, _field(1, 2, b"x" * (MAX_MESSAGE_BYTES + 1024))
                    )
                if info.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    problems.append(f"{path} [oversized]: {info.value.code().name}")
    return problems


@pytest.mark.timeout(240)
async def test_every_rpc_survives_hostile_messages(cluster: ClusterFactory) -> None:
    master = cluster.master()
    worker = cluster.worker(master, worker_id="w1")
    async with Client(master.address) as client:
        before = await client.wait(await client.submit(command_spec("printf kept", shell=True)))
        assert before.status == JobStatus.COMPLETED
        codes: dict[str, grpc.StatusCode] = {}
        services = [
            ("MasterService", master_pb2.DESCRIPTOR),
            ("RegistrationService", worker_pb2.DESCRIPTOR),
        ]
        reasons: dict[str, str] = {}
        problems = await _barrage(master.address, services, codes, reasons)
        # As its master would call it (else every call is refused before it is read).
        problems += await _barrage(
            worker.address,
            [("WorkerService", worker_pb2.DESCRIPTOR)],
            codes,
            reasons,
            call_token_interceptors(),
        )
        assert problems == []
        invalid = INVALID
        assert codes["GetStatus [job_id: invalid utf-8]"] == invalid
        assert codes["Submit [not protobuf]"] == invalid
        assert codes["Submit [payload: nested json]"] == invalid
        assert codes["Submit [payload: nested command]"] == invalid
        assert codes["ListJobs [status_filter: unknown enum]"] == invalid
        assert codes["Execute [task_id: invalid utf-8]"] == invalid
        assert codes["Submit [timeout: duration negative]"] == invalid
        assert codes["Dispatch [not protobuf]"] == invalid
        assert codes["RunJobs [not protobuf]"] == invalid
        assert codes["RunSession [not protobuf]"] == invalid
        assert len(codes) > 200
        accepted = sorted(
            label
            for label, code in codes.items()
            if code == grpc.StatusCode.OK
            and label.removesuffix("]").endswith(MUST_REFUSE)
            and label not in ACCEPTED
        )
        assert accepted == [], "hostile values accepted"
        assert {label: codes.get(label) for label in ACCEPTED} == dict.fromkeys(
            ACCEPTED, grpc.StatusCode.OK
        )
        for label, (code, fragment) in REFUSED_FOR.items():
            assert (codes.get(label), label) == (code, label), reasons.get(label)
            assert fragment in reasons[label], (label, reasons[label])
        assert master.alive()
        assert worker.alive()
        after = await client.get(before.id)
        assert (after.status, after.stdout, after.exit_code) == (JobStatus.COMPLETED, b"kept", 0)
        job = await client.wait(await client.submit(command_spec("printf still", shell=True)))
        assert (job.status, job.stdout) == (JobStatus.COMPLETED, b"still")
