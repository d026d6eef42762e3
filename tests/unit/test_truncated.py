"""Whether a job's stored output is said truncated: only when the master keeps less of a
stream than was printed."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dist_exec.master.active import ActiveJob
from dist_exec.master.attempts import _truncated
from dist_exec.models import ExecOutcome, ExecStatus, Job, JobId, JobStatus, Stream, TaskSpec

MIB = 1 << 20
HEAD, TAIL = 4 * MIB, MIB


@pytest.mark.parametrize(
    ("seen", "printed", "truncated"),
    [
        # All of it reached the master, and head + tail hold it (it was said truncated for
        # anything past the head).
        ((HEAD + 400_000, 0), (HEAD + 400_000, 0), False),
        # A worker that kept less in memory than it streamed: the master has it all.
        ((2 * MIB, 0), (2 * MIB, 0), False),
        ((6 * MIB, 0), (6 * MIB, 0), True),  # past head and tail
        ((0, 6 * MIB), (0, 6 * MIB), True),  # stderr too
        ((6 * MIB, 0), None, True),  # no outcome (cancelled or timed out by the master)
        ((MIB, 0), (3 * MIB, 0), True),  # counted by the worker, never sent
        ((HEAD + TAIL, 0), (HEAD + TAIL, 0), False),  # exactly what head and tail hold
        ((HEAD + TAIL + 1, 0), (HEAD + TAIL + 1, 0), True),  # one byte more
        ((0, HEAD + TAIL + 1), None, True),
    ],
)
def test_output_is_truncated_when_the_master_keeps_less_than_was_printed(
    seen: tuple[int, int], printed: tuple[int, int] | None, truncated: bool
) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    job = ActiveJob(Job(JobId("j"), TaskSpec("command", b"{}", 10.0), JobStatus.RUNNING, now), 1)
    job.seen = {Stream.STDOUT: seen[0], Stream.STDERR: seen[1]}
    outcome = (
        None
        if printed is None
        else ExecOutcome(
            ExecStatus.SUCCESS, 0, stdout_bytes=printed[0], stderr_bytes=printed[1], truncated=True
        )
    )
    assert _truncated(job, outcome, HEAD, TAIL) is truncated
