"""What a library user gets for bad arguments and for a closed client: a DistExecError (or a
RuntimeError for misuse) that says what is wrong, never an IndexError or gRPC's UsageError."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from dist_exec import wire
from dist_exec.client import Client, InvalidTaskSpec, command_spec
from dist_exec.client._client import _Outage


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: command_spec([]), "the command is empty"),
        (lambda: command_spec(""), "the command is empty"),
        (lambda: command_spec("cat", stdin=5), "stdin must be str or bytes, not int"),  # type: ignore[arg-type]
        (lambda: command_spec(iter(["ls"])), "a shell string or a list of strings"),  # type: ignore[arg-type]
        (lambda: command_spec(["ls", 5]), "a shell string or a list of strings"),  # type: ignore[list-item]
        (lambda: command_spec(["ls", "-l"], shell=True), "shell=True runs a command string"),
        (
            lambda: wire.submit_request(command_spec("true", timeout_s=1e300)),
            "the job cannot be sent",
        ),
        (lambda: wire.submit_request("echo hi"), "a job is a TaskSpec"),  # type: ignore[arg-type]
        (
            lambda: wire.submit_request(command_spec("true", metadata={"a": 2})),  # type: ignore[dict-item]
            "the job cannot be sent",
        ),
        (
            lambda: wire.submit_request(command_spec("true", timeout_s="5")),  # type: ignore[arg-type]
            "the job cannot be sent",
        ),
        (
            lambda: wire.submit_request(command_spec("true", priority=2**40)),
            "the job cannot be sent: Value out of range",
        ),
    ],
)
def test_a_job_that_cannot_be_built_is_an_invalid_task_spec(make: object, message: str) -> None:
    with pytest.raises(InvalidTaskSpec, match=message):
        make()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("limit", "offset"), [(0, 0), (1001, 0), (10, -1), (10, 2**31), ("5", 0), (10, 1.5)]
)
async def test_list_limits_are_checked_before_sending(limit: int, offset: int) -> None:
    async with Client("127.0.0.1:1") as client:
        with pytest.raises(InvalidTaskSpec, match="limit must be 1-1000 and offset 0-"):
            await client.list_jobs(limit, offset)


async def test_a_job_id_that_is_not_a_string_is_an_invalid_task_spec() -> None:
    async with Client("127.0.0.1:1") as client:
        for call in (client.get(123), client.cancel(123)):  # type: ignore[arg-type]
            with pytest.raises(InvalidTaskSpec, match="a job id is a string, not int"):
                await call
        with pytest.raises(InvalidTaskSpec, match="a job id is a string, not int"):
            async for _ in client.watch_many([123]):  # type: ignore[list-item]
                pass


async def test_a_closed_client_says_so() -> None:
    async with Client("127.0.0.1:1") as client:
        pass
    with pytest.raises(RuntimeError, match="this Client is closed"):
        await client.get("3f2c0d6e-0000-4000-8000-000000000000")
    with pytest.raises(RuntimeError, match="use the Client as 'async with"):
        await Client("127.0.0.1:1").get("3f2c0d6e-0000-4000-8000-000000000000")


def test_a_client_without_an_address_takes_the_environments_or_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DIST_EXEC_MASTER", "10.9.8.7:6000")
    assert Client().address == "10.9.8.7:6000"
    monkeypatch.delenv("DIST_EXEC_MASTER")
    assert Client().address == "127.0.0.1:50051"
    assert Client("127.0.0.1:7").address == "127.0.0.1:7"  # (given: it wins)


@pytest.mark.parametrize(
    ("code", "told"),
    [
        (
            grpc.StatusCode.ABORTED,
            "this reader of job j fell too far behind it; following it again from where it was",
        ),
        (grpc.StatusCode.UNAVAILABLE, "lost the master while following job j"),
    ],
)
async def test_a_follower_told_it_fell_behind_is_not_said_to_have_lost_the_master(
    code: grpc.StatusCode, told: str
) -> None:
    heard: list[str] = []
    async with Client("127.0.0.1:1", on_reconnect=heard.append) as client:
        error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "behind")
        await client._after_break(_Outage(reached=True), error, "job j", "the job runs on")
    assert len(heard) == 1
    assert heard[0].startswith(told)
