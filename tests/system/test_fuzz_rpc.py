"""Hostile and malformed messages to every RPC of a real master and worker.

Each request is built field by field from the service descriptors (so a new RPC or field is
fuzzed without touching this file): invalid UTF-8 in every string field, negative and enormous
numbers, unknown enum values, deeply nested JSON in bytes fields, absurd durations, garbage that
is not protobuf at all, one huge field, and one message beyond the servers' receive limit. Every
call must end with a clear status (never UNKNOWN or INTERNAL), the servers keep serving, and a
job accepted before the barrage is intact after it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor

from dist_exec.client import Client, command_spec
from dist_exec.config import MAX_MESSAGE_BYTES
from dist_exec.models import JobStatus
from dist_exec.rpc.v1 import master_pb2, worker_pb2
from tests.conftest import ClusterFactory, call_token_interceptors

pytestmark = pytest.mark.system
UNCLEAR = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}
NESTED_JSON = b"[" * 200_000 + b"]" * 200_000
NESTED_COMMAND = b'{"command": "echo", "env": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001


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


async def _call(channel: grpc.aio.Channel, path: str, method: Any, body: bytes) -> None:
    """Send ``body`` as the raw serialized request (no serializer: the bytes go as they are);
    to a method that takes a stream of requests, as its one message."""
    if method.client_streaming:
        bidi: Any = channel.stream_stream(path)
        async for _ in bidi(iter([body]), timeout=5):
            pass
    elif method.server_streaming:
        call: Any = channel.unary_stream(path)
        async for _ in call(body, timeout=5):
            pass
    else:
        unary: Any = channel.unary_unary(path)
        await unary(body, timeout=5)


async def _barrage(
    address: str,
    services: Sequence[tuple[str, Any]],
    codes: dict[str, grpc.StatusCode],
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> list[str]:
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
                        await _call(channel, path, method, body)
                    except grpc.aio.AioRpcError as exc:
                        codes[f"{method.name} [{label}]"] = exc.code()
                        if exc.code() in UNCLEAR:
                            problems.append(f"{path} [{label}]: {exc.code().name} {exc.details()}")
                        elif exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not (
                            method.server_streaming
                        ):
                            problems.append(f"{path} [{label}]: no answer within 5s")
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
        problems = await _barrage(master.address, services, codes)
        # As its master would call it (else every call is refused before it is read).
        problems += await _barrage(
            worker.address,
            [("WorkerService", worker_pb2.DESCRIPTOR)],
            codes,
            call_token_interceptors(),
        )
        assert problems == []
        invalid = grpc.StatusCode.INVALID_ARGUMENT
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
        assert master.alive()
        assert worker.alive()
        after = await client.get(before.id)
        assert (after.status, after.stdout, after.exit_code) == (JobStatus.COMPLETED, b"kept", 0)
        job = await client.wait(await client.submit(command_spec("printf still", shell=True)))
        assert (job.status, job.stdout) == (JobStatus.COMPLETED, b"still")
