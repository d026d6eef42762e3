"""run's exit code when output did not reach it: never 0 for a job whose output went missing."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from dist_exec.cli.run import OutputPrinter, _exit_code
from dist_exec.models import Job, JobId, JobStatus, OutputChunk, Stream, TaskSpec

DONE = replace(
    Job(JobId("j1"), TaskSpec("command", b"{}", 10.0), JobStatus.COMPLETED, datetime.now(UTC)),
    exit_code=0,
    stdout_bytes=10,
)


def printed(*chunks: OutputChunk) -> OutputPrinter:
    printer = OutputPrinter()
    for chunk in chunks:
        printer.write(chunk)
    return printer


def test_all_output_printed_keeps_the_commands_code(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    printer = printed(OutputChunk(Stream.STDOUT, 0, b"0123456789"))
    assert _exit_code(DONE, False, printer) == 0
    assert capsysbinary.readouterr().err == b""


@pytest.mark.parametrize(
    ("chunks", "lost"),
    [
        ([OutputChunk(Stream.STDOUT, 0, b"01"), OutputChunk(Stream.STDOUT, 8, b"89")], 6),  # gap
        ([OutputChunk(Stream.STDOUT, 0, b"0123")], 6),  # the end never came
    ],
)
def test_output_that_did_not_arrive_makes_a_zero_exit_125(
    chunks: list[OutputChunk], lost: int, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert _exit_code(DONE, False, printed(*chunks)) == 125
    err = capsysbinary.readouterr().err.decode()
    assert f"{lost} bytes of job j1's output did not reach this terminal" in err
    # A command that failed keeps its own code.
    assert _exit_code(replace(DONE, exit_code=3), False, printed(*chunks)) == 3
