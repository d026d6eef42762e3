"""The master's end of RunSession: RunJobs again and again over one long-lived stream.

A client that runs job after job (the SDK's ``Client.run``) keeps one open: each run is a
message instead of a call. Runs are independent: each has its own task, an error ends only its
run (as it would have ended its RunJobs call), and their events share the outgoing messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from dist_exec.config import RUNS_PER_SESSION
from dist_exec.errors import DistExecError, InvalidTaskSpec, ResourceExhausted, cap_message
from dist_exec.outbox import Outbox
from dist_exec.rpc.v1 import master_pb2

log = logging.getLogger(__name__)

MESSAGE_BYTES = 1024 * 1024  # events per message up to about this much
OUTBOX_BYTES = 4 * 1024 * 1024  # output waiting to be sent; beyond it, runs wait for the client
# A job's "accepted" event waits this long for company: a short job's output and result then
# share its message, which saves a write here and a wake-up in the client, on the job's path.
ACCEPTED_LINGER_S = 0.005

RunJobs = Callable[[master_pb2.RunJobsRequest], AsyncGenerator[master_pb2.JobEvent, None]]


class RunSession:
    """Serves one RunSession stream. ``run_jobs`` is what one RunJobs call sends: its
    DistExecError becomes the run's error event."""

    def __init__(self, run_jobs: RunJobs) -> None:
        self.run_jobs = run_jobs
        self._outbox: Outbox[master_pb2.RunSessionEvent] = Outbox(
            OUTBOX_BYTES, MESSAGE_BYTES, urgent_bytes=MESSAGE_BYTES, linger_s=ACCEPTED_LINGER_S
        )
        self._runs: dict[int, asyncio.Task[None]] = {}
        self._going: dict[int, asyncio.Event] = {}  # cleared while the client holds a run back
        self._reading = True
        self._error: BaseException | None = None  # what ended the request stream, if not EOF

    async def serve(
        self, requests: AsyncIterator[master_pb2.RunSessionRequests]
    ) -> AsyncGenerator[master_pb2.RunSessionEvents, None]:
        """The messages to send, until the client closed its side and every run has ended."""
        reader = asyncio.create_task(self._read(requests))
        try:
            while batch := await self._outbox.next():
                yield master_pb2.RunSessionEvents(events=batch)
            if self._error is not None:
                raise self._error
        finally:
            reader.cancel()
            runs = [reader, *self._runs.values()]
            for task in runs:
                task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[master_pb2.RunSessionRequests]) -> None:
        try:
            async for message in requests:
                if len(message.requests) > RUNS_PER_SESSION:
                    raise InvalidTaskSpec(
                        f"a message holds at most {RUNS_PER_SESSION} requests, got "
                        f"{len(message.requests)}"
                    )
                for request in message.requests:
                    self._request(request)
                await self._outbox.room()  # refusals wait for the client to read, as runs do
        except Exception as exc:  # malformed, a tag in use, a broken call: end the stream
            self._error = exc
            for task in self._runs.values():
                task.cancel()
            self._outbox.close()
        finally:
            self._reading = False
            for going in self._going.values():  # (a client that closed its side cannot resume)
                going.set()
            self._end_if_idle()

    def _request(self, request: master_pb2.RunSessionRequest) -> None:
        tag = request.tag
        if request.stop:
            # Gone from the count at once: the client may start another run in its place in
            # the same message, before the task has ended.
            task = self._runs.pop(tag, None)
            if task is not None:
                del self._going[tag]
                task.cancel()
            return
        if request.pause or request.resume:  # (a run that has ended meanwhile: nothing to do)
            going = self._going.get(tag)
            if going is not None and request.resume:
                going.set()
            elif going is not None:
                going.clear()
            return
        if tag in self._runs:  # the client could no longer tell the two runs' events apart
            raise InvalidTaskSpec(f"run {tag} is still going on this stream; give each its own tag")
        if len(self._runs) >= RUNS_PER_SESSION:
            self._refuse(
                tag,
                ResourceExhausted(
                    f"{RUNS_PER_SESSION} runs are followed on this stream already; wait for one to "
                    "end or open another stream"
                ),
            )
        else:
            going = self._going[tag] = asyncio.Event()
            going.set()
            task = asyncio.create_task(self._run(tag, request.run, going))
            self._runs[tag] = task
            task.add_done_callback(lambda done: self._ended(tag, done))

    async def _run(
        self, tag: int, request: master_pb2.RunJobsRequest, going: asyncio.Event
    ) -> None:
        outbox = self._outbox
        try:
            async with contextlib.aclosing(self.run_jobs(request)) as events:
                async for event in events:
                    await going.wait()  # (held back: its events wait in the job's follower)
                    await outbox.room()
                    item = master_pb2.RunSessionEvent(tag=tag, event=event)
                    # Output counts by its data (no need to encode it twice to know).
                    size = len(event.output.data) if event.HasField("output") else item.ByteSize()
                    outbox.push(item, size, urgent=not event.accepted)
        except DistExecError as exc:
            self._refuse(tag, exc)
        except Exception as exc:  # a bug must end this run only, and say so
            log.exception("internal error in run %d of a RunSession", tag)
            self._refuse(
                tag,
                DistExecError(
                    f"internal error in RunSession: {type(exc).__name__}: {exc} "
                    "(see the server log)"
                ),
            )

    def _refuse(self, tag: int, exc: DistExecError) -> None:
        event = master_pb2.RunSessionEvent(
            tag=tag,
            error_code=exc.code.value[0],
            error=cap_message(exc.message),
            error_metadata=dict(exc.trailing_metadata),
        )
        self._outbox.push(event, event.ByteSize())

    def _ended(self, tag: int, task: asyncio.Task[None]) -> None:
        if self._runs.get(tag) is task:
            del self._runs[tag]
            del self._going[tag]
        self._end_if_idle()

    def _end_if_idle(self) -> None:
        if not self._reading and not self._runs:
            self._outbox.close()
