"""The master's end of RunSession, with a stand-in for what one RunJobs sends (no gRPC here:
tests/system/test_run_session.py runs it for real)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
import pytest

from dist_exec.errors import InvalidTaskSpec, RateLimited
from dist_exec.master import run_session
from dist_exec.master.run_session import RunSession
from dist_exec.rpc.v1 import master_pb2

Event = master_pb2.RunSessionEvent


class Runs:
    """RunJobs stand-ins: a request's first job names what it does ("ok", "bad", "limited",
    "bug", or "wait": accepted, then output when ``release`` is set)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()  # a "wait" run is accepted and waits for ``release``
        self.closed: list[str] = []

    async def __call__(
        self, request: master_pb2.RunJobsRequest
    ) -> AsyncGenerator[master_pb2.JobEvent, None]:
        kind = request.jobs[0].task_type
        job = f"job-{kind}"
        try:
            if kind == "bad":
                raise InvalidTaskSpec("timeout must not be negative")
            if kind == "limited":
                raise RateLimited("over the rate limit", retry_after_s=1.5)
            if kind == "bug":
                raise KeyError("oops")
            yield master_pb2.JobEvent(job_id=job, accepted=True)
            if kind == "wait":
                self.waiting.set()
                await self.release.wait()
            yield master_pb2.JobEvent(job_id=job, output=master_pb2.OutputChunk(data=b"out"))
            yield master_pb2.JobEvent(job_id=job, result=master_pb2.GetStatusResponse(job_id=job))
        finally:
            self.closed.append(kind)


def run(tag: int, kind: str) -> master_pb2.RunSessionRequest:
    return master_pb2.RunSessionRequest(
        tag=tag, run=master_pb2.RunJobsRequest(jobs=[master_pb2.SubmitRequest(task_type=kind)])
    )


class Requests:
    """The client's side of the stream: requests are put in; ``end`` closes it."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[master_pb2.RunSessionRequests | None] = asyncio.Queue()

    def send(self, *requests: master_pb2.RunSessionRequest) -> None:
        self._queue.put_nowait(master_pb2.RunSessionRequests(requests=requests))

    def end(self) -> None:
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[master_pb2.RunSessionRequests]:
        while (message := await self._queue.get()) is not None:
            yield message


async def collect(stream: AsyncIterator[master_pb2.RunSessionEvents]) -> list[Event]:
    return [event async for message in stream for event in message.events]


def kinds(events: list[Event], tag: int) -> list[str]:
    """What the run ``tag`` got, in order: accepted, output, result or error CODE."""
    out = []
    for e in events:
        if e.tag != tag:
            continue
        if e.error_code:
            out.append(f"error {e.error_code}")
        elif e.event.accepted:
            out.append("accepted")
        elif e.event.HasField("output"):
            out.append("output")
        else:
            out.append("result")
    return out


async def test_runs_are_tagged_and_one_refusal_ends_only_its_run() -> None:
    runs, requests = Runs(), Requests()
    requests.send(run(1, "ok"), run(2, "bad"), run(3, "limited"), run(4, "bug"), run(5, "ok"))
    requests.end()
    async with asyncio.timeout(10):
        events = await collect(RunSession(runs).serve(aiter(requests)))
    assert kinds(events, 1) == kinds(events, 5) == ["accepted", "output", "result"]
    (bad,) = [e for e in events if e.tag == 2]
    assert (bad.error_code, bad.error) == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        "timeout must not be negative",
    )
    (limited,) = [e for e in events if e.tag == 3]
    assert limited.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert dict(limited.error_metadata) == {"retry-after-ms": "1500"}
    (bug,) = [e for e in events if e.tag == 4]
    assert bug.error_code == grpc.StatusCode.INTERNAL.value[0]
    assert "KeyError" in bug.error
    assert "see the server log" in bug.error


async def test_stop_ends_a_run() -> None:
    runs, requests = Runs(), Requests()
    stream = RunSession(runs).serve(aiter(requests))
    requests.send(run(7, "wait"))
    async with asyncio.timeout(10):
        first = await anext(stream)
        assert kinds(list(first.events), 7) == ["accepted"]
        requests.send(master_pb2.RunSessionRequest(tag=7, stop=True))
        requests.end()
        rest = await collect(stream)
    assert rest == []  # stopped: nothing more of it, and the stream ended with its runs
    assert runs.closed == ["wait"]  # its RunJobs was closed (it stops following the job)


async def test_an_accepted_event_waits_to_share_a_message_with_what_follows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run_session, "ACCEPTED_LINGER_S", 30.0)
    runs, requests = Runs(), Requests()
    stream = RunSession(runs).serve(aiter(requests))
    requests.send(run(7, "wait"))
    first = asyncio.ensure_future(anext(stream))
    async with asyncio.timeout(10):
        await runs.waiting.wait()
        await asyncio.sleep(0.05)  # a window for a message with the acceptance alone
        assert not first.done()
        runs.release.set()
        assert kinds(list((await first).events), 7) == ["accepted", "output", "result"]
        requests.end()
        assert await collect(stream) == []


async def test_a_tag_in_use_ends_the_stream() -> None:
    """The client could not tell the two runs' events apart: a protocol error."""
    runs, requests = Runs(), Requests()
    stream = RunSession(runs).serve(aiter(requests))
    requests.send(run(7, "wait"))
    async with asyncio.timeout(10):
        assert kinds(list((await anext(stream)).events), 7) == ["accepted"]
        requests.send(run(7, "ok"))
        with pytest.raises(InvalidTaskSpec, match="run 7 is still going"):
            await collect(stream)
    assert runs.closed == ["wait"]  # the runs are stopped with it


async def test_a_message_of_too_many_requests_ends_the_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run_session, "RUNS_PER_SESSION", 3)
    runs, requests = Runs(), Requests()
    requests.send(*(run(tag, "ok") for tag in range(1, 5)))
    with pytest.raises(InvalidTaskSpec, match="at most 3 requests, got 4"):
        async with asyncio.timeout(10):
            await collect(RunSession(runs).serve(aiter(requests)))
    assert runs.closed == []  # none of them was started


async def test_large_events_are_counted_by_their_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A final state carries the job's spec: a message holds a few of them, not thousands."""
    monkeypatch.setattr(run_session, "MESSAGE_BYTES", 250_000)

    async def big(request: master_pb2.RunJobsRequest) -> AsyncGenerator[master_pb2.JobEvent, None]:
        status = master_pb2.GetStatusResponse(job_id="j", payload=b"x" * 100_000)
        yield master_pb2.JobEvent(job_id="j", result=status)

    requests = Requests()
    requests.send(*(run(tag, "ok") for tag in range(1, 7)))
    requests.end()
    async with asyncio.timeout(10):
        messages = [m async for m in RunSession(big).serve(aiter(requests))]
    assert sum(len(m.events) for m in messages) == 6
    assert max(m.ByteSize() for m in messages) < 250_000


async def test_the_stream_ends_only_when_the_client_closed_its_side_and_every_run_ended() -> None:
    runs, requests = Runs(), Requests()
    stream = RunSession(runs).serve(aiter(requests))
    requests.send(run(1, "wait"))
    requests.end()
    async with asyncio.timeout(10):
        assert kinds(list((await anext(stream)).events), 1) == ["accepted"]
        runs.release.set()
        assert kinds(await collect(stream), 1) == ["output", "result"]


async def test_too_many_runs_at_once_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_session, "RUNS_PER_SESSION", 2)
    runs, requests = Runs(), Requests()
    stream = RunSession(runs).serve(aiter(requests))
    requests.send(run(1, "wait"), run(2, "wait"))
    requests.send(run(3, "ok"))
    async with asyncio.timeout(10):
        events = list((await anext(stream)).events)
        while not any(e.tag == 3 for e in events):
            events += (await anext(stream)).events
        (third,) = [e for e in events if e.tag == 3]
        assert third.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        runs.release.set()
        requests.end()
        events += await collect(stream)
    assert kinds(events, 1) == kinds(events, 2) == ["accepted", "output", "result"]


async def test_a_broken_request_stream_ends_the_session_with_its_error() -> None:
    runs = Runs()

    async def broken() -> AsyncIterator[master_pb2.RunSessionRequests]:
        yield master_pb2.RunSessionRequests(requests=[run(1, "wait")])
        await runs.waiting.wait()
        raise InvalidTaskSpec("malformed message")

    with pytest.raises(InvalidTaskSpec, match="malformed"):
        async with asyncio.timeout(10):
            await collect(RunSession(runs).serve(broken()))
    assert runs.closed == ["wait"]  # its runs are stopped too


async def test_a_run_stopped_frees_its_place_for_one_in_the_same_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client counts a run gone once it sends its stop, and may send a new run with it:
    the master still counted the stopped one (its task had not ended) and refused the new one
    as one too many."""
    monkeypatch.setattr(run_session, "RUNS_PER_SESSION", 2)
    runs, requests = Runs(), Requests()
    stream = RunSession(runs).serve(aiter(requests))
    requests.send(run(1, "wait"), run(2, "wait"))
    async with asyncio.timeout(10):
        events = list((await anext(stream)).events)
        while kinds(events, 2) != ["accepted"]:
            events += (await anext(stream)).events
        requests.send(master_pb2.RunSessionRequest(tag=1, stop=True), run(3, "ok"))
        runs.release.set()
        requests.end()
        events += await collect(stream)
    assert kinds(events, 3) == ["accepted", "output", "result"]


async def test_a_paused_run_sends_nothing_until_resumed() -> None:
    runs, requests = Runs(), Requests()
    stream = RunSession(runs).serve(aiter(requests))
    requests.send(run(1, "wait"))
    async with asyncio.timeout(10):
        events = list((await anext(stream)).events)
        assert kinds(events, 1) == ["accepted"]
        requests.send(master_pb2.RunSessionRequest(tag=1, pause=True), run(2, "ok"))
        events += (await anext(stream)).events
        while not any(e.tag == 2 and e.event.HasField("result") for e in events):
            events += (await anext(stream)).events
        runs.release.set()  # run 1's output is ready, but held back while a later run goes by
        requests.send(run(3, "ok"))
        while not any(e.tag == 3 and e.event.HasField("result") for e in events):
            events += (await anext(stream)).events
        assert kinds(events, 1) == ["accepted"]
        requests.send(master_pb2.RunSessionRequest(tag=1, resume=True))
        requests.end()
        events += await collect(stream)
    assert kinds(events, 1) == ["accepted", "output", "result"]
    assert kinds(events, 2) == ["accepted", "output", "result"]


async def test_a_client_that_closes_its_side_cannot_resume_so_its_paused_runs_go_on() -> None:
    """They waited for a resume that could not come: the stream hung until its deadline."""
    runs, requests = Runs(), Requests()
    stream = RunSession(runs).serve(aiter(requests))
    requests.send(run(1, "ok"), master_pb2.RunSessionRequest(tag=1, pause=True))
    requests.end()
    async with asyncio.timeout(10):
        events = await collect(stream)
    assert kinds(events, 1) == ["accepted", "output", "result"]
