"""What a refused or failed call leaves in a server's memory: nothing of its request.

A real grpc.aio server on 127.0.0.1 with the SecurityInterceptor of the master, a tokens
file, and a servicer whose Submit refuses everything (as a payload over the limit is). The
garbage collector is off while the calls are made, as good as it is on a server tuned to
collect rarely (``tune_gc``) that sees a few large requests and little else: what is left
after the calls is what a cycle kept alive.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pytest

from dist_exec.errors import InvalidTaskSpec, grpc_errors
from dist_exec.rpc.v1 import master_pb2, master_pb2_grpc
from dist_exec.security.auth import MASTER_RULES, Authenticator, SecurityInterceptor
from dist_exec.security.identity import Role
from dist_exec.security.tokens import TokenStore, add_token

if TYPE_CHECKING:
    from dist_exec.rpc.v1.master_pb2_grpc import MasterServiceAsyncStub

SIZE = 8 * 1024 * 1024
CALLS = 6
BIG = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


class Refusing:
    @grpc_errors
    async def Submit(self, request: master_pb2.SubmitRequest, context: Any) -> Any:
        raise InvalidTaskSpec(f"payload is {len(request.payload)} bytes; the limit is 1048576")


async def never_served(requests: AsyncIterator[Any], context: Any) -> None:
    raise AssertionError("a refused stream reached its servicer")


def refusing_service() -> grpc.GenericRpcHandler:
    submit = grpc.unary_unary_rpc_method_handler(
        Refusing().Submit,
        request_deserializer=master_pb2.SubmitRequest.FromString,
        response_serializer=master_pb2.SubmitResponse.SerializeToString,
    )
    session = grpc.stream_stream_rpc_method_handler(
        never_served,
        request_deserializer=master_pb2.RunSessionRequests.FromString,
        response_serializer=master_pb2.RunSessionEvents.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(
        "distexec.v1.MasterService", {"Submit": submit, "RunSession": session}
    )


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()
        gc.enable()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    tokens = tmp_path / "tokens.json"
    token = add_token(tokens, "alice", Role.SUBMIT)
    interceptor = SecurityInterceptor(Authenticator(TokenStore(tokens), tls=False), MASTER_RULES)
    server = grpc.aio.server(interceptors=[interceptor], options=BIG)
    server.add_generic_rpc_handlers((refusing_service(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", token
    finally:
        await server.stop(None)


async def assert_left_behind_nothing(
    address: str,
    call: Callable[[MasterServiceAsyncStub], Awaitable[grpc.StatusCode]],
) -> set[grpc.StatusCode]:
    """Make the refused ``call`` CALLS times (after one that warms up); what the server kept
    of them must be less than one request. The status codes they got."""
    codes = set()
    async with grpc.aio.insecure_channel(address, options=BIG) as channel:
        stub = master_pb2_grpc.MasterServiceStub(channel)
        codes.add(await call(stub))
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(CALLS):
            codes.add(await call(stub))
        after, _ = tracemalloc.get_traced_memory()
    # Before: every request stayed until a collection.
    assert after - before < SIZE, f"{(after - before) / 2**20:.1f} MiB left after {CALLS} calls"
    return codes


@pytest.mark.parametrize("caller", ["no credentials", "a wrong token", "a token, too big"])
async def test_a_refused_request_does_not_stay_in_memory(
    server: tuple[str, str], collector_off: None, caller: str
) -> None:
    address, token = server
    header = {"a wrong token": "dxt_not-a-token", "a token, too big": token}.get(caller)
    metadata = (("authorization", f"Bearer {header}"),) if header else None
    request = master_pb2.SubmitRequest(task_type="command", payload=b"x" * SIZE)

    async def call(stub: MasterServiceAsyncStub) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Submit(request, metadata=metadata, timeout=30)
        return refused.value.code()

    codes = await assert_left_behind_nothing(address, call)
    assert codes <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT}
    # (Also parsed: in upb's own memory, which tracemalloc does not see.)
    parsed = [
        o for o in gc.get_objects() if isinstance(o, master_pb2.SubmitRequest) and o is not request
    ]
    assert not parsed, f"{len(parsed)} parsed requests left after {CALLS} calls"


async def test_a_refused_stream_does_not_stay_in_memory(
    server: tuple[str, str], collector_off: None
) -> None:
    """A refused stream is drained for a moment (see auth._drain): the last message read was
    held by gRPC's receiving generator, itself kept by the refusal's cycle."""
    address, _ = server
    job = master_pb2.SubmitRequest(task_type="command", payload=b"x" * SIZE)
    message = master_pb2.RunSessionRequests(
        requests=[master_pb2.RunSessionRequest(tag=1, run=master_pb2.RunJobsRequest(jobs=[job]))]
    )

    async def call(stub: MasterServiceAsyncStub) -> grpc.StatusCode:
        session = stub.RunSession(iter([message]), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await session.read()
        return refused.value.code()

    assert await assert_left_behind_nothing(address, call) == {grpc.StatusCode.UNAUTHENTICATED}
