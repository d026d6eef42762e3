"""Which write errors mean that the command's output is gone (and it should die of the signal a
local program would), and which are errors to report."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from dist_exec.cli.common import lost_output

EPIPE = OSError(errno.EPIPE, "Broken pipe")
EIO = OSError(errno.EIO, "Input/output error")


@contextmanager
def stdout_without_reader() -> Iterator[None]:
    """fd 1 is, for a moment, a pipe whose reader has exited."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    saved = os.dup(1)
    try:
        os.dup2(write_end, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(write_end)


def test_a_pipe_error_with_stdout_intact_is_not_lost_output() -> None:
    """An EPIPE or EIO from elsewhere (a socket, a failing disk) must be reported, not turned
    into a silent death by SIGPIPE or SIGHUP."""
    assert lost_output(EPIPE) is None
    assert lost_output(EIO) is None


def test_a_pipe_error_with_stdout_gone_is_sigpipe() -> None:
    with stdout_without_reader():
        assert lost_output(EPIPE) is signal.SIGPIPE


def test_an_error_about_a_file_is_never_lost_output() -> None:
    with stdout_without_reader():
        assert lost_output(OSError(errno.EPIPE, "Broken pipe", "/data/audit.log")) is None
        assert lost_output(OSError(errno.ENOSPC, "No space left on device")) is None
