"""The worker's end of the Dispatch stream: one long-lived stream per master.

The master starts attempts and acknowledges recorded results on it; the worker sends each
attempt's output and result back. Events that are ready together go out in one message, and the
output of an attempt whose result is in the same message is left out when the result carries it
whole (its head, not truncated): a short command costs one message each way, not a call.

An attempt outlives the stream: when it breaks, the attempt keeps running and its result is
held, exactly as when an ExecuteStream call breaks; the master re-attaches with ExecuteStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

from dist_exec import wire
from dist_exec.errors import DistExecError, TaskNotFound
from dist_exec.models import ExecOutcome, ExecStatus, Stream
from dist_exec.outbox import Outbox
from dist_exec.rpc.v1 import worker_pb2
from dist_exec.worker.task_runner import Attempt, TaskRunner

log = logging.getLogger(__name__)

MESSAGE_BYTES = 1024 * 1024  # events per message up to about this much (chunks are smaller)
OUTBOX_BYTES = 4 * 1024 * 1024  # output waiting to be sent; beyond it, commands wait (a pipe)
# Output alone waits this long (or until this much waits) for more events to share its message.
LINGER_S = 0.002
LINGER_BYTES = 64 * 1024

Progress = worker_pb2.ExecuteProgress


class DispatchSession:
    """Serves one Dispatch stream; ``start`` starts (or finds) the attempt a request names."""

    def __init__(
        self, runner: TaskRunner, start: Callable[[worker_pb2.ExecuteRequest], Attempt]
    ) -> None:
        self.runner = runner
        self.start = start
        self._outbox: Outbox[Progress] = Outbox(OUTBOX_BYTES, MESSAGE_BYTES, LINGER_BYTES, LINGER_S)
        self._error: BaseException | None = None  # what ended the request stream, if not EOF
        self._followers: set[asyncio.Task[None]] = set()

    async def serve(
        self, requests: AsyncIterator[worker_pb2.DispatchRequest]
    ) -> AsyncIterator[worker_pb2.DispatchEvents]:
        """The messages to send, until the master closes its side (or the call ends)."""
        reader = asyncio.create_task(self._read(requests))
        try:
            while batch := await self._outbox.next():
                # Output alone lingers: a short command's result follows its output closely,
                # and then both go in one message (the output often left out, see _coalesce).
                yield worker_pb2.DispatchEvents(events=_coalesce(batch))
            if self._error is not None:
                raise self._error
        finally:
            reader.cancel()
            for task in self._followers:
                task.cancel()
            await asyncio.gather(reader, *self._followers, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[worker_pb2.DispatchRequest]) -> None:
        try:
            async for request in requests:
                for ref in request.delivered:
                    with contextlib.suppress(TaskNotFound):
                        self.runner.delivered(self.runner.find(ref.task_id, ref.attempt))
                for start in request.start:
                    self._start(start)
        except Exception as exc:  # a malformed request, a broken call, or a bug: end the stream
            self._error = exc
        finally:
            self._outbox.close()

    def _start(self, request: worker_pb2.ExecuteRequest) -> None:
        try:
            if request.attach:
                raise TaskNotFound("attach to an attempt with ExecuteStream, not Dispatch")
            attempt = self.start(request)
        except DistExecError as exc:
            self._push(
                Progress(
                    type=worker_pb2.PROGRESS_ERROR,
                    task_id=request.task_id,
                    attempt=request.attempt,
                    data=exc.message.encode(),
                    error_code=exc.code.value[0],
                )
            )
            return
        follower = asyncio.create_task(self._follow(attempt))
        self._followers.add(follower)
        follower.add_done_callback(self._followers.discard)

    async def _follow(self, attempt: Attempt) -> None:
        try:
            async with contextlib.aclosing(progress(attempt, {}, tagged=True)) as events:
                async for event in events:
                    if event.type == worker_pb2.PROGRESS_OUTPUT:
                        await self._outbox.room()
                    self._push(event)
        except Exception:
            log.exception("cannot send the events of %s attempt %d", *attempt.key)

    def _push(self, event: Progress) -> None:
        self._outbox.push(event, len(event.data), urgent=event.type != worker_pb2.PROGRESS_OUTPUT)


async def progress(
    attempt: Attempt, offsets: Mapping[Stream, int], tagged: bool
) -> AsyncGenerator[Progress, None]:
    """An attempt's output from ``offsets`` on, live, then its result. ``tagged``: each message
    names the attempt (the Dispatch stream carries many; an ExecuteStream call only one)."""
    ids: dict[str, Any] = {"task_id": attempt.task_id, "attempt": attempt.attempt} if tagged else {}
    output = attempt.output
    sub = output.subscribe(offsets)
    try:
        async for chunk in output.follow(sub):
            yield Progress(
                type=worker_pb2.PROGRESS_OUTPUT,
                data=chunk.data,
                output_type=chunk.stream.value,  # type: ignore[arg-type]
                offset=chunk.offset,
                **ids,
            )
        await attempt.done.wait()
        yield Progress(type=worker_pb2.PROGRESS_COMPLETED, final_result=_result(attempt), **ids)
    finally:
        output.unsubscribe(sub)


def _result(attempt: Attempt) -> worker_pb2.ExecuteResponse:
    """The attempt's result as sent; one that cannot be put in a message (a bug) is sent as a
    failure that says so, never left unsent: the task would stay RUNNING, its slot taken."""
    assert attempt.outcome is not None
    try:
        return wire.outcome_to_pb(attempt.outcome, attempt.task_id, attempt.attempt)
    except Exception as exc:
        log.exception("cannot encode the result of %s attempt %d", *attempt.key)
        failed = ExecOutcome(
            ExecStatus.FAILURE,
            error=f"the worker could not send this attempt's result: {type(exc).__name__}",
        )
        return wire.outcome_to_pb(failed, attempt.task_id, attempt.attempt)


def _coalesce(batch: list[Progress]) -> list[Progress]:
    """Leave out output that a result in the same batch carries whole."""
    whole = {
        (e.task_id, e.attempt)
        for e in batch
        if e.type == worker_pb2.PROGRESS_COMPLETED and not e.final_result.output_truncated
    }
    if not whole:
        return batch
    return [
        e
        for e in batch
        if not (e.type == worker_pb2.PROGRESS_OUTPUT and (e.task_id, e.attempt) in whole)
    ]
