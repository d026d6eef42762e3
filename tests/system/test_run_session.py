"""RunSession: the SDK's runs share one long-lived stream to the master (real master, workers
and gRPC on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from dist_exec import wire
from dist_exec.client import Client, command_spec
from dist_exec.client import _session as session_module
from dist_exec.client._session import RunSession
from dist_exec.errors import InvalidTaskSpec, MasterUnavailable
from dist_exec.models import Job, JobStatus, Stream
from dist_exec.rpc.v1 import common_pb2, master_pb2
from tests.conftest import ClusterFactory, wait_until


async def _run(client: Client, command: str) -> tuple[bytes, bytes, Job]:
    out, err = bytearray(), bytearray()
    final: Job | None = None
    async for item in client.run(command_spec(command, shell=True)):
        if isinstance(item, Job):
            final = item
        elif isinstance(item, tuple):
            (out if item[1].stream == Stream.STDOUT else err).extend(item[1].data)
    assert final is not None
    return bytes(out), bytes(err), final


def _session(client: Client) -> RunSession:
    [session] = client._sessions
    assert session.error is None
    return session


async def test_runs_one_after_another_and_at_once_share_one_stream(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master()
    cluster.worker(master, worker_id="w1", max_tasks=8)
    cluster.worker(master, worker_id="w2", max_tasks=8)
    async with Client(master.address) as client, asyncio.timeout(60):
        out, _, final = await _run(client, "echo first")
        assert (out, final.status) == (b"first\n", JobStatus.COMPLETED)
        session = _session(client)
        sent: list[master_pb2.RunSessionRequest] = []
        send = session._send

        def spy(request: master_pb2.RunSessionRequest) -> None:
            sent.append(request)
            send(request)

        session._send = spy  # type: ignore[method-assign]
        results = await asyncio.gather(
            *(_run(client, f"echo out-{i}; echo err-{i} >&2; exit {i % 3}") for i in range(24))
        )
        for i, (out, err, final) in enumerate(results):  # each run got its own events only
            assert (out, err) == (f"out-{i}\n".encode(), f"err-{i}\n".encode())
            assert final.exit_code == i % 3
            assert final.status == (JobStatus.COMPLETED if i % 3 == 0 else JobStatus.FAILED)
        with pytest.raises(InvalidTaskSpec, match="timeout"):  # a refusal ends its run only
            await _run_spec(client, command_spec(["true"], timeout_s=-1))
        assert (await _run(client, "echo last"))[0] == b"last\n"
        assert _session(client) is session
        assert len(sent) == 26
        assert not any(r.stop for r in sent)  # a run that ended needs no stop


async def _run_spec(client: Client, spec: object) -> None:
    async for _ in client.run(spec):  # type: ignore[arg-type]
        pass


async def test_a_run_left_early_stops_following_and_the_job_goes_on(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master()
    cluster.worker(master, worker_id="w1")
    async with Client(master.address) as client, asyncio.timeout(60):
        long_run = client.run(
            command_spec("for i in $(seq 1 200); do echo line-$i; sleep 0.01; done", shell=True)
        )
        job_id = await anext(long_run)
        assert isinstance(job_id, str)
        first = await anext(long_run)
        assert isinstance(first, tuple)
        await long_run.aclose()  # stop following: the master stops sending its output
        session = _session(client)
        assert (await _run(client, "echo meanwhile"))[0] == b"meanwhile\n"
        job = await _wait_ended(client, job_id)
        assert (job.status, job.stdout.count(b"\n")) == (JobStatus.COMPLETED, 200)
        assert _session(client) is session


async def _wait_ended(client: Client, job_id: str) -> Job:
    async for _ in client.watch(job_id):
        pass
    return await client.get(job_id)


async def test_a_run_after_the_master_restarted_opens_a_new_stream(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master()
    cluster.worker(master, worker_id="w1")
    async with Client(master.address) as client, asyncio.timeout(60):
        assert (await _run(client, "echo before"))[0] == b"before\n"
        old = _session(client)
        master.kill()
        await wait_until(lambda: old.error is not None, 10, "the stream to break")
        cluster.master(data_dir=master.extra["data_dir"], listen=master.address)
        await wait_until(lambda: _registered(client), 20, "w1 to register again")
        assert (await _run(client, "echo after"))[0] == b"after\n"
        assert _session(client) is not old


async def _registered(client: Client) -> bool:
    try:
        return len(await client.nodes()) == 1
    except MasterUnavailable:
        return False


async def test_a_master_without_run_session_gets_one_run_jobs_call_per_run() -> None:
    """A server that knows RunJobs only (RunSession is UNIMPLEMENTED, answered by gRPC)."""
    calls = 0

    async def run_jobs(
        request: master_pb2.RunJobsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncGenerator[master_pb2.JobEvent, None]:
        nonlocal calls
        calls += 1
        job_id = f"00000000-0000-4000-8000-{calls:012d}"
        yield master_pb2.JobEvent(job_id=job_id, accepted=True)
        yield master_pb2.JobEvent(
            job_id=job_id, output=master_pb2.OutputChunk(data=b"old\n", attempt=1)
        )
        status = master_pb2.GetStatusResponse(
            job_id=job_id, status=common_pb2.JOB_STATUS_COMPLETED, exit_code=0
        )
        yield master_pb2.JobEvent(job_id=job_id, result=status)

    handler = grpc.unary_stream_rpc_method_handler(
        run_jobs,
        request_deserializer=master_pb2.RunJobsRequest.FromString,
        response_serializer=master_pb2.JobEvent.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("distexec.v1.MasterService", {"RunJobs": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with Client(f"127.0.0.1:{port}") as client, asyncio.timeout(30):
            for i in range(1, 4):
                runs = [client.run(command_spec(["echo", "old"])) for _ in range(i)]
                for items in await asyncio.gather(*(_items(r) for r in runs)):
                    assert [type(item) for item in items] == [str, tuple, Job]
            assert calls == 1 + 2 + 3  # no run was sent twice, also those at once
    finally:
        await server.stop(None)


@pytest.mark.parametrize("master_pauses", [True, False])
async def test_a_run_not_read_for_long_is_held_back_and_loses_nothing(
    cluster: ClusterFactory, monkeypatch: pytest.MonkeyPatch, master_pauses: bool
) -> None:
    """The client keeps up to ROUTE_BYTES of a run's events for its caller; past that the
    master holds the run's events back until the caller has read half (the other runs go on),
    so a slow reader gets every byte, beyond what the master stores of a job's output (here
    4 kB of its start and 4 kB of its end). It used to cut the run off and resume it from the
    store, which silently skipped the middle: as it still does with a master that cannot pause
    a run (which keeps only what it stores)."""
    monkeypatch.setattr(session_module, "ROUTE_BYTES", 10_000)
    if not master_pauses:  # (as an older master: its RunSession says nothing of pausing)
        monkeypatch.setattr(wire, "RUN_PAUSE", (("not-this-master", "1"),))
    resumed: list[str] = []
    watch = Client._watch

    def spy(self: Client, job_id: str, *args: Any, **kwargs: Any) -> AsyncIterator[object]:
        resumed.append(job_id)
        return watch(self, job_id, *args, **kwargs)

    monkeypatch.setattr(Client, "_watch", spy)
    master = cluster.master(extra=["--max-output", "4K", "--output-tail", "4K"])
    cluster.worker(master, worker_id="w1")
    expected = b"".join(b"line-%05d\n" % i for i in range(5000))  # 55 kB
    async with Client(master.address) as client, asyncio.timeout(60):
        items = client.run(
            command_spec("i=0; while [ $i -lt 5000 ]; do printf 'line-%05d\\n' $i; "
                         "i=$((i+1)); done", shell=True)
        )  # fmt: skip
        job_id = await anext(items)
        assert isinstance(job_id, str)
        await wait_until(lambda: _ended(client, job_id), 30, "the job to end, unread")
        assert (await _run(client, "echo other"))[0] == b"other\n"  # the stream goes on
        received = bytearray()
        gaps = 0
        final: Job | None = None
        async for item in items:
            if isinstance(item, Job):
                final = item
            elif isinstance(item, tuple):
                assert item[1].offset >= len(received), "a repeat"
                gaps += item[1].offset > len(received)
                received += item[1].data
        assert final is not None
        assert final.status == JobStatus.COMPLETED
        if master_pauses:
            assert bytes(received) == expected
            assert not gaps
            assert resumed == []  # held back, never cut off
        else:
            assert gaps
            assert resumed == [job_id]  # cut off, and went on with StreamOutput


async def _ended(client: Client, job_id: str) -> bool:
    return (await client.get(job_id)).status.terminal


async def _items(stream: AsyncIterator[object]) -> list[object]:
    return [item async for item in stream]
