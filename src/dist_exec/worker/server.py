"""WorkerService servicer: thin; the TaskRunner does the work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc.aio

from dist_exec import wire
from dist_exec.config import MAX_METADATA_BYTES
from dist_exec.errors import (
    InvalidTaskSpec,
    StaleStart,
    grpc_errors,
    grpc_stream_errors,
    shorten,
)
from dist_exec.executors import ExecRequest
from dist_exec.models import Stream
from dist_exec.rpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from dist_exec.worker.dispatch import DispatchSession, progress
from dist_exec.worker.task_runner import Attempt, TaskRunner

Context = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger(__name__)


class MasterClock:
    """The master's monotonic clock as seen from this worker, from its reading in Register and
    Heartbeat answers, each taken to be from halfway through its call. Of the last ``keep``
    samples the one with the shortest round trip counts (a slow answer says little about when
    the master read its clock); old ones age out, as two hosts' clocks drift apart."""

    def __init__(self, keep: int = 16) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=keep)  # (round trip, offset)
        self.offset: float | None = None

    def sample(self, master_s: float, sent: float, received: float) -> None:
        self._samples.append((received - sent, master_s - (sent + received) / 2))
        self.offset = min(self._samples)[1]

    def reset(self) -> None:
        """Another master (or the same one restarted elsewhere): start over."""
        self._samples.clear()
        self.offset = None

    def now(self) -> float | None:
        return None if self.offset is None else time.monotonic() + self.offset


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self, runner: TaskRunner, worker_id: str, master_clock: MasterClock | None = None
    ) -> None:
        self.runner = runner
        self.worker_id = worker_id
        self.master_clock = master_clock or MasterClock()
        self._sessions: set[asyncio.Task[Any]] = set()

    def _attempt(self, request: worker_pb2.ExecuteRequest) -> Attempt:
        if request.attach:
            return self.runner.find(request.task_id, request.attempt)
        _check_start(request)
        self._check_fresh(request)
        return self.runner.start(
            ExecRequest(
                task_id=request.task_id,
                attempt=request.attempt,
                payload=request.payload,
                timeout_s=wire.from_duration(request.timeout),
                metadata=dict(request.metadata),
                limits=wire.limits_from_pb(request.limits),
            ),
            request.task_type,
        )

    def _check_fresh(self, request: worker_pb2.ExecuteRequest) -> None:
        """Refuse a start that arrives after the master stopped waiting for it: held up in a
        partition, it may have run elsewhere since."""
        now = self.master_clock.now()
        if now is None or not request.HasField("start_by"):
            return
        if self.runner.holds(request.task_id, request.attempt):
            return  # a repeated start: it runs already
        late = now - wire.from_duration(request.start_by)
        if late > 0:
            log.warning(
                "refused attempt %d of %s: it arrived %.1fs after the master stopped waiting",
                request.attempt,
                request.task_id,
                late,
            )
            raise StaleStart(
                f"attempt {request.attempt} of task {shorten(request.task_id)} reached this "
                f"worker {late:.1f}s after the master stopped waiting for it; not started"
            )

    @grpc_stream_errors
    async def ExecuteStream(
        self, request: worker_pb2.ExecuteRequest, context: Context
    ) -> AsyncGenerator[worker_pb2.ExecuteProgress, None]:
        attempt = self._attempt(request)
        offsets = {Stream.STDOUT: request.stdout_offset, Stream.STDERR: request.stderr_offset}
        async with contextlib.aclosing(progress(attempt, offsets, tagged=False)) as events:
            async for event in events:
                yield event
        # Only reached when the last message was handed to the transport.
        self.runner.delivered(attempt)

    @grpc_stream_errors
    async def Dispatch(
        self, request_iterator: AsyncIterator[worker_pb2.DispatchRequest], context: Context
    ) -> AsyncGenerator[worker_pb2.DispatchEvents, None]:
        session = DispatchSession(self.runner, self._attempt)
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            async for message in session.serve(request_iterator):
                yield message
        finally:
            self._sessions.discard(task)

    def end_dispatch(self) -> None:
        """End the Dispatch streams (shutting down: every result has been delivered or is
        held for the master to collect with ExecuteStream)."""
        for task in self._sessions:
            task.cancel()

    @grpc_errors
    async def Execute(
        self, request: worker_pb2.ExecuteRequest, context: Context
    ) -> worker_pb2.ExecuteResponse:
        attempt = self._attempt(request)
        await attempt.done.wait()
        assert attempt.outcome is not None
        self.runner.delivered(attempt)
        return wire.outcome_to_pb(attempt.outcome, attempt.task_id, attempt.attempt)

    @grpc_errors
    async def CancelTask(
        self, request: worker_pb2.CancelTaskRequest, context: Context
    ) -> worker_pb2.CancelTaskResponse:
        try:
            sig = wire.stop_signal_from_pb(request.signal)
        except InvalidTaskSpec as exc:  # (a newer master's: the cancel still stops the task)
            log.warning("cancel of %s: %s; stopping it with TERM", shorten(request.task_id), exc)
            sig = None
        return worker_pb2.CancelTaskResponse(
            cancelled=self.runner.cancel(request.task_id, request.attempt, sig=sig)
        )

    @grpc_errors
    async def GetWorkerStatus(
        self, request: worker_pb2.GetWorkerStatusRequest, context: Context
    ) -> worker_pb2.GetWorkerStatusResponse:
        return worker_pb2.GetWorkerStatusResponse(
            worker_id=self.worker_id,
            capabilities=self.runner.capabilities,
            max_concurrent_tasks=self.runner.max_concurrent,
            active_tasks=self.runner.active_count,
            health=(
                common_pb2.WORKER_HEALTH_DEGRADED
                if self.runner.draining
                else common_pb2.WORKER_HEALTH_HEALTHY
            ),
            running_task_ids=self.runner.running_task_ids(),
        )


MAX_TASK_ID_CHARS = 256


def _check_start(request: worker_pb2.ExecuteRequest) -> None:
    """What the master checked already, checked again: a caller with the master's token may
    be another implementation of it."""
    if not 0 < len(request.task_id) <= MAX_TASK_ID_CHARS:
        raise InvalidTaskSpec(f"task_id must have 1-{MAX_TASK_ID_CHARS} characters")
    wire.check_duration(request.timeout, "timeout")
    wire.check_duration(request.limits.cpu_time, "CPU time limit")
    if sum(len(k) + len(v) for k, v in request.metadata.items()) > MAX_METADATA_BYTES:
        raise InvalidTaskSpec(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
