"""How ``dist-exec run`` ends a job it was told to stop (the logic, with a stand-in client;
the real cluster's cancel paths are in tests/system/test_cli.py)."""

from __future__ import annotations

import signal
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from dist_exec.cli.run import _cancel
from dist_exec.client import Client
from dist_exec.errors import JobAlreadyFinished
from dist_exec.models import Job, JobId, JobStatus, TaskSpec

RUNNING = Job(JobId("j1"), TaskSpec("command", b"{}", 10.0), JobStatus.RUNNING, datetime.now(UTC))


class StuckWorkerClient:
    """A master whose worker confirms the cancel only after the Cancel call has answered."""

    def __init__(self, cancel_error: Exception | None = None) -> None:
        self.calls: list[str] = []
        self.cancel_error = cancel_error

    async def cancel(self, job_id: str, sig: signal.Signals | None = None) -> str:
        self.calls.append("cancel")
        if self.cancel_error is not None:
            raise self.cancel_error
        return "cancel requested; the worker has not confirmed yet"

    async def get(self, job_id: str) -> Job:
        self.calls.append("get")
        return RUNNING

    async def wait(self, job_id: str) -> Job:
        self.calls.append("wait")
        return replace(RUNNING, status=JobStatus.CANCELLED, error="cancelled")


async def test_an_unconfirmed_cancel_waits_for_the_end_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = StuckWorkerClient()
    job = await _cancel(cast(Client, client), "j1", None)
    assert job.status == JobStatus.CANCELLED
    assert client.calls == ["cancel", "get", "wait"]
    assert capsys.readouterr().err == (
        "dist-exec: job j1 is still RUNNING: its worker has not confirmed the cancel yet; "
        "waiting for its end (Ctrl-C again to stop waiting)\n"
    )


async def test_a_job_that_ended_by_itself_is_returned_as_it_ended() -> None:
    done = replace(RUNNING, status=JobStatus.COMPLETED, exit_code=0)

    class Ended(StuckWorkerClient):
        async def get(self, job_id: str) -> Any:
            self.calls.append("get")
            return done

    client = Ended(JobAlreadyFinished("job j1 has already ended (COMPLETED)"))
    assert await _cancel(cast(Client, client), "j1", None) is done
    assert client.calls == ["cancel", "get"]
