"""TaskRunner: attempts on a worker, with the real command executor (and one scripted one)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import cast

import pytest

from dist_exec.errors import InvalidTaskSpec, ResourceExhausted, TaskNotFound, WorkerDraining
from dist_exec.executors import ExecRequest, Executor, OutputSink
from dist_exec.executors.command import CommandExecutor, CommandSpec
from dist_exec.models import ExecOutcome, ExecStatus, OutputChunk, Stream
from dist_exec.worker import task_runner
from dist_exec.worker.task_runner import Attempt, TaskRunner

MakeRunner = Callable[..., TaskRunner]


@pytest.fixture
async def make_runner() -> AsyncIterator[MakeRunner]:
    """Build TaskRunners; every attempt they still run is stopped at teardown."""
    runners: list[TaskRunner] = []

    def make(
        max_concurrent: int = 4,
        max_output_bytes: int = 1024 * 1024,
        executors: Mapping[str, Executor] | None = None,
    ) -> TaskRunner:
        runner = TaskRunner(
            executors
            if executors is not None
            else {"command": CommandExecutor({"kill_grace_s": 0.3})},
            max_concurrent=max_concurrent,
            max_output_bytes=max_output_bytes,
            result_retention_s=600.0,
        )
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        await runner.close()


def request(
    spec: CommandSpec | bytes, task_id: str = "task-1", attempt: int = 1, timeout_s: float = 30.0
) -> ExecRequest:
    raw = spec if isinstance(spec, bytes) else spec.to_payload()
    return ExecRequest(task_id=task_id, attempt=attempt, payload=raw, timeout_s=timeout_s)


def sh(script: str) -> CommandSpec:
    return CommandSpec(script, shell=True)


async def finished(attempt: Attempt, timeout: float = 10.0) -> ExecOutcome:
    async with asyncio.timeout(timeout):
        await attempt.done.wait()
    assert attempt.outcome is not None
    return attempt.outcome


def outcome_of(attempt: Attempt) -> ExecOutcome:
    """The outcome of an attempt that has already ended."""
    assert attempt.done.is_set()
    assert attempt.outcome is not None
    return attempt.outcome


async def first_output(attempt: Attempt) -> OutputChunk:
    """Wait (with a deadline) until the attempt has printed something."""
    sub = attempt.output.subscribe({})
    follow = cast("AsyncGenerator[OutputChunk, None]", attempt.output.follow(sub))
    try:
        async with asyncio.timeout(5), contextlib.aclosing(follow):
            async for chunk in follow:
                return chunk
    finally:
        attempt.output.unsubscribe(sub)
    raise AssertionError("the attempt ended without output")


def gone(pid: int) -> bool:
    """No such process runs any more (a zombie does not run)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


async def test_success(make_runner: MakeRunner) -> None:
    runner = make_runner()
    attempt = runner.start(request(CommandSpec("echo", ["hi"])), "command")
    assert attempt.key == ("task-1", 1)
    assert attempt.task_type == "command"

    outcome = await finished(attempt)

    assert outcome.status == ExecStatus.SUCCESS
    assert outcome.exit_code == 0
    assert outcome.stdout == b"hi\n"
    assert outcome.stdout_bytes == 3
    assert outcome.stderr == b""
    assert outcome.truncated is False
    assert outcome.retryable is False
    assert outcome.duration_s > 0
    assert runner.active_count == 0
    assert runner.find("task-1", 1) is attempt


async def test_failure_keeps_both_streams(make_runner: MakeRunner) -> None:
    runner = make_runner()
    outcome = await finished(runner.start(request(sh("echo out; echo err >&2; exit 4")), "command"))
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.exit_code == 4
    assert (outcome.stdout, outcome.stderr) == (b"out\n", b"err\n")
    assert (outcome.stdout_bytes, outcome.stderr_bytes) == (4, 4)


@pytest.mark.parametrize("stream", [Stream.STDOUT, Stream.STDERR])
async def test_output_is_bounded(make_runner: MakeRunner, stream: Stream) -> None:
    runner = make_runner(max_output_bytes=100)
    redirect = " >&2" if stream == Stream.STDERR else ""
    script = f"i=0; while [ $i -lt 500 ]; do printf '%04d-' $i; i=$((i+1)); done{redirect}"

    outcome = await finished(runner.start(request(sh(script)), "command"))

    everything = b"".join(b"%04d-" % i for i in range(500))
    kept, total = (
        (outcome.stdout, outcome.stdout_bytes)
        if stream == Stream.STDOUT
        else (outcome.stderr, outcome.stderr_bytes)
    )
    assert outcome.status == ExecStatus.SUCCESS
    assert outcome.truncated is True
    assert total == len(everything) == 2500
    assert kept == everything[:100]


async def test_output_exactly_at_the_limit_is_not_truncated(make_runner: MakeRunner) -> None:
    runner = make_runner(max_output_bytes=10)
    outcome = await finished(
        runner.start(request(CommandSpec("printf", ["0123456789"])), "command")
    )
    assert outcome.stdout == b"0123456789"
    assert outcome.stdout_bytes == 10
    assert outcome.truncated is False


async def test_timeout(make_runner: MakeRunner) -> None:
    runner = make_runner()
    attempt = runner.start(request(sh("echo $$; exec sleep 300"), timeout_s=0.3), "command")
    pid = int((await first_output(attempt)).data)

    outcome = await finished(attempt)

    assert outcome.status == ExecStatus.TIMEOUT
    assert outcome.exit_code is None
    assert outcome.error == "timed out after 300ms"
    assert outcome.retryable is False
    assert outcome.stdout == f"{pid}\n".encode()
    assert gone(pid)


async def test_cancel(make_runner: MakeRunner) -> None:
    runner = make_runner()
    attempt = runner.start(request(sh("echo $$; exec sleep 300")), "command")
    pid = int((await first_output(attempt)).data)

    assert runner.cancel("task-1") is True
    outcome = await finished(attempt)

    assert outcome.status == ExecStatus.CANCELLED
    assert outcome.error == "cancelled"
    assert outcome.retryable is False
    assert outcome.exit_code is None
    assert gone(pid)
    assert runner.cancel("task-1") is False  # it has ended


async def test_cancel_before_it_ever_ran(make_runner: MakeRunner) -> None:
    runner = make_runner()
    attempt = runner.start(request(CommandSpec("sleep", ["300"])), "command")
    assert runner.cancel("task-1", reason="changed my mind") is True
    outcome = await finished(attempt)
    assert outcome.status == ExecStatus.CANCELLED
    assert outcome.error == "changed my mind"


async def test_cancel_picks_the_attempt(make_runner: MakeRunner) -> None:
    runner = make_runner()
    first = runner.start(request(CommandSpec("sleep", ["300"]), attempt=1), "command")
    second = runner.start(request(CommandSpec("sleep", ["300"]), attempt=2), "command")

    assert runner.cancel("task-1", attempt_no=3) is False
    assert runner.cancel("other-task") is False
    assert runner.cancel("task-1", attempt_no=2) is True
    assert (await finished(second)).status == ExecStatus.CANCELLED
    assert first.outcome is None

    assert runner.cancel("task-1") is True  # 0: every running attempt of the task
    assert (await finished(first)).status == ExecStatus.CANCELLED


async def test_capacity_limit(make_runner: MakeRunner) -> None:
    runner = make_runner(max_concurrent=1)
    busy = runner.start(request(CommandSpec("sleep", ["300"]), task_id="busy"), "command")
    assert runner.active_count == 1
    assert runner.running_task_ids() == ["busy"]

    with pytest.raises(ResourceExhausted, match=r"worker is full \(1 tasks running\)"):
        runner.start(request(CommandSpec("true"), task_id="next"), "command")
    with pytest.raises(TaskNotFound):
        runner.find("next", 1)

    runner.cancel("busy")
    await finished(busy)
    assert runner.active_count == 0
    # A finished (held, undelivered) attempt does not take a slot.
    outcome = await finished(runner.start(request(CommandSpec("true"), task_id="next"), "command"))
    assert outcome.status == ExecStatus.SUCCESS


async def test_draining_takes_no_new_tasks(make_runner: MakeRunner) -> None:
    runner = make_runner()
    done = runner.start(request(CommandSpec("true"), task_id="old"), "command")
    await finished(done)
    async with asyncio.timeout(5):
        await runner.drain(timeout_s=5)
    assert runner.draining is True

    with pytest.raises(WorkerDraining, match="draining"):
        runner.start(request(CommandSpec("true"), task_id="new"), "command")
    # A retried Execute of an attempt it already holds still finds it.
    assert runner.start(request(CommandSpec("true"), task_id="old"), "command") is done


async def test_unknown_task_type(make_runner: MakeRunner) -> None:
    runner = make_runner()
    with pytest.raises(InvalidTaskSpec, match="cannot run task type 'gpu'; it runs: command"):
        runner.start(request(CommandSpec("true")), "gpu")
    assert runner.held() == []


async def test_invalid_payload(make_runner: MakeRunner) -> None:
    runner = make_runner()
    with pytest.raises(InvalidTaskSpec, match="must be a JSON object"):
        runner.start(request(b"[1, 2]"), "command")
    assert runner.held() == []
    assert runner.active_count == 0


async def test_start_of_an_existing_attempt_returns_it(make_runner: MakeRunner) -> None:
    runner = make_runner(max_concurrent=1)
    attempt = runner.start(request(sh("echo once")), "command")
    # Same (task_id, attempt): no second run, no capacity or validation check.
    assert runner.start(request(sh("echo once")), "command") is attempt
    assert runner.start(request(b"garbage"), "command") is attempt
    outcome = await finished(attempt)
    assert outcome.stdout == b"once\n"
    assert runner.start(request(sh("echo once")), "command") is attempt

    other = runner.start(request(sh("echo twice"), attempt=2), "command")
    assert other is not attempt
    assert (await finished(other)).stdout == b"twice\n"


async def follow_all(attempt: Attempt, offsets: Mapping[Stream, int]) -> list[OutputChunk]:
    sub = attempt.output.subscribe(offsets)
    try:
        async with asyncio.timeout(5):
            return [chunk async for chunk in attempt.output.follow(sub)]
    finally:
        attempt.output.unsubscribe(sub)


async def test_subscribe_replays_from_offsets(make_runner: MakeRunner) -> None:
    runner = make_runner()
    attempt = runner.start(request(sh("printf 'hello world'; printf 'oops' >&2")), "command")
    await finished(attempt)

    assert await follow_all(attempt, {}) == [
        OutputChunk(Stream.STDOUT, 0, b"hello world"),
        OutputChunk(Stream.STDERR, 0, b"oops"),
    ]
    assert await follow_all(attempt, {Stream.STDOUT: 6, Stream.STDERR: 4}) == [
        OutputChunk(Stream.STDOUT, 6, b"world")
    ]
    assert await follow_all(attempt, {Stream.STDOUT: 11, Stream.STDERR: 100}) == []


class ScriptedExecutor:
    """Writes what it is told, when it is told, then succeeds."""

    name = "scripted"

    def __init__(self) -> None:
        self.steps: asyncio.Queue[tuple[Stream, bytes] | None] = asyncio.Queue()
        self.written = asyncio.Event()

    def validate(self, payload: bytes) -> None:
        pass

    async def health_check(self) -> bool:
        return True

    async def execute(self, request: ExecRequest, sink: OutputSink) -> ExecOutcome:
        while (step := await self.steps.get()) is not None:
            await sink.write(*step)
            self.written.set()
        return ExecOutcome(ExecStatus.SUCCESS, exit_code=0)


async def test_subscribe_replays_then_follows_live(make_runner: MakeRunner) -> None:
    executor = ScriptedExecutor()
    runner = make_runner(executors={"scripted": executor})
    attempt = runner.start(request(b""), "scripted")

    executor.steps.put_nowait((Stream.STDOUT, b"abcdef"))
    async with asyncio.timeout(5):
        await executor.written.wait()

    # The master already has "abc": it gets the rest of what was printed, then live output.
    sub = attempt.output.subscribe({Stream.STDOUT: 3})
    executor.steps.put_nowait((Stream.STDERR, b"warn"))
    executor.steps.put_nowait((Stream.STDOUT, b"ghi"))
    executor.steps.put_nowait(None)
    async with asyncio.timeout(5):
        chunks = [chunk async for chunk in attempt.output.follow(sub)]

    assert chunks == [
        OutputChunk(Stream.STDOUT, 3, b"def"),
        OutputChunk(Stream.STDERR, 0, b"warn"),
        OutputChunk(Stream.STDOUT, 6, b"ghi"),
    ]
    assert (await finished(attempt)).stdout == b"abcdefghi"


async def test_delivered_keeps_the_result_only_among_recent_ones(
    make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = make_runner()
    attempt = runner.start(request(CommandSpec("true")), "command")
    await finished(attempt)
    assert runner.held() == [attempt]

    runner.delivered(attempt)

    # Still there for a master that dies before committing it, but no longer owed.
    assert runner.held() == [attempt]
    assert runner.find("task-1", 1) is attempt
    async with asyncio.timeout(5):
        await runner.wait_delivered()
    # Bounded: the oldest go first.
    monkeypatch.setattr(task_runner, "RECENT_RESULTS", 1)
    second = runner.start(request(CommandSpec("true"), attempt=2), "command")
    await finished(second)
    runner.delivered(second)
    assert runner.held() == [second]
    with pytest.raises(TaskNotFound, match="holds no attempt 1 of task 'task-1'"):
        runner.find("task-1", 1)


async def test_delivered_of_a_running_attempt_keeps_it(make_runner: MakeRunner) -> None:
    runner = make_runner()
    attempt = runner.start(request(CommandSpec("sleep", ["300"])), "command")
    runner.delivered(attempt)
    assert runner.find("task-1", 1) is attempt
    runner.cancel("task-1")
    await finished(attempt)


async def test_drain_hands_back_running_attempts_as_retryable(make_runner: MakeRunner) -> None:
    runner = make_runner()
    quick = runner.start(request(CommandSpec("true"), task_id="quick"), "command")
    slow = runner.start(request(sh("echo $$; exec sleep 300"), task_id="slow"), "command")
    pid = int((await first_output(slow)).data)

    async with asyncio.timeout(10):
        await runner.drain(timeout_s=0.3)

    assert runner.active_count == 0
    assert (outcome_of(quick)).status == ExecStatus.SUCCESS
    outcome = outcome_of(slow)
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.retryable is True
    assert outcome.error == "worker shut down before the task finished"
    assert outcome.stdout == f"{pid}\n".encode()
    assert gone(pid)


async def test_a_start_repeated_after_its_result_was_delivered_does_not_run_again(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    runner = make_runner()
    ran = tmp_path / "ran"
    spec = request(sh(f"echo once >> {ran}"))
    attempt = runner.start(spec, "command")
    assert (await finished(attempt)).status == ExecStatus.SUCCESS
    runner.delivered(attempt)
    again = runner.start(spec, "command")  # (a retried Execute whose reply was lost)
    assert again is attempt
    assert ran.read_text() == "once\n"


async def test_close_hands_back_running_attempts_and_keeps_a_cancel_a_cancel(
    make_runner: MakeRunner,
) -> None:
    """A second SIGTERM (close) failed the running jobs for good ("stopped"), where a
    SIGKILL of the worker has them run again elsewhere."""
    runner = make_runner()
    slow = runner.start(request(sh("echo $$; exec sleep 300"), task_id="slow"), "command")
    pid = int((await first_output(slow)).data)
    cancelled = runner.start(request(sh("echo $$; exec sleep 300"), task_id="asked"), "command")
    await first_output(cancelled)
    runner.cancel("asked")

    async with asyncio.timeout(10):
        await runner.close()

    outcome = outcome_of(slow)
    assert (outcome.status, outcome.retryable) == (ExecStatus.FAILURE, True)
    assert outcome.error == "the worker was stopped before the task finished"
    assert gone(pid)
    assert outcome_of(cancelled).status == ExecStatus.CANCELLED


async def test_close_right_after_a_start_still_ends_the_attempt(make_runner: MakeRunner) -> None:
    """Its task, cancelled before it ever ran, set no outcome: the attempt stayed open."""
    runner = make_runner()
    attempt = runner.start(request(CommandSpec("true")), "command")
    await runner.close()
    outcome = outcome_of(attempt)
    assert (outcome.status, outcome.retryable) == (ExecStatus.FAILURE, True)
    assert runner.active_count == 0


async def test_drain_waits_for_attempts_that_finish_in_time(make_runner: MakeRunner) -> None:
    executor = ScriptedExecutor()
    runner = make_runner(executors={"scripted": executor})
    attempt = runner.start(request(b""), "scripted")
    drain = asyncio.create_task(runner.drain(timeout_s=30))
    executor.steps.put_nowait((Stream.STDOUT, b"done"))
    executor.steps.put_nowait(None)

    async with asyncio.timeout(5):
        await drain
    outcome = outcome_of(attempt)
    assert outcome.status == ExecStatus.SUCCESS
    assert outcome.retryable is False
    assert outcome.stdout == b"done"


class TroubledExecutor:
    """Raises its own TimeoutError, or fails while it stops for a cancel (``on_cancel``)."""

    name = "troubled"

    def __init__(self, on_cancel: bool) -> None:
        self.on_cancel = on_cancel
        self.started = asyncio.Event()

    def validate(self, payload: bytes) -> None:
        pass

    async def health_check(self) -> bool:
        return True

    async def execute(self, request: ExecRequest, sink: OutputSink) -> ExecOutcome:
        self.started.set()
        if not self.on_cancel:
            raise TimeoutError("upstream did not answer")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup went wrong") from None
        raise AssertionError("unreachable")


async def test_an_executors_own_timeout_error_is_a_failure_not_a_timeout(
    make_runner: MakeRunner,
) -> None:
    runner = make_runner(executors={"troubled": TroubledExecutor(on_cancel=False)})
    outcome = await finished(runner.start(request(b"", timeout_s=30), "troubled"))
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.error == "executor troubled failed: upstream did not answer"


async def test_a_cancelled_attempt_stays_cancelled_when_its_executor_fails_stopping(
    make_runner: MakeRunner,
) -> None:
    executor = TroubledExecutor(on_cancel=True)
    runner = make_runner(executors={"troubled": executor})
    attempt = runner.start(request(b""), "troubled")
    async with asyncio.timeout(10):
        await executor.started.wait()
    assert runner.cancel("task-1", reason="no longer wanted")
    outcome = await finished(attempt)
    assert (outcome.status, outcome.error) == (ExecStatus.CANCELLED, "no longer wanted")
