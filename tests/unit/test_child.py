"""The command executor's process handling: real processes, pipes and pidfds."""

from __future__ import annotations

import asyncio
import os

import pytest

from dist_exec.executors.child import Child, read_pipe, write_pipe
from tests.conftest import pid_alive


async def run_child(child: Child, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    """Feed ``stdin``, collect stdout and stderr, wait for the exit (10 s at most)."""
    out, err = bytearray(), bytearray()

    async def into(buffer: bytearray, data: bytes) -> None:
        buffer.extend(data)

    async with asyncio.timeout(10):
        await asyncio.gather(
            read_pipe(child.stdout, lambda data: into(out, data)),
            read_pipe(child.stderr, lambda data: into(err, data)),
            write_pipe(child.stdin, stdin),
        )
        code = await child.wait()
    return code, bytes(out), bytes(err)


async def test_output_exit_code_and_stdin() -> None:
    child = Child.spawn(
        ["/bin/sh", "-c", "cat; echo err >&2; exit 3"], stdin=True, cwd=None, env={}
    )
    assert await run_child(child, b"in\n" * 100_000) == (3, b"in\n" * 100_000, b"err\n")
    assert not pid_alive(child.pid)  # reaped, not a zombie


async def test_the_exit_is_seen_while_a_background_child_holds_the_pipes() -> None:
    child = Child.spawn(["/bin/sh", "-c", "sleep 30 & exit 7"], stdin=False, cwd=None, env={})
    try:
        async with asyncio.timeout(10):
            assert await child.wait() == 7
    finally:
        os.killpg(child.pid, 9)
        assert child.stdout is not None
        assert child.stderr is not None
        child.stdout.close()
        child.stderr.close()


async def test_without_pidfd_a_thread_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfd(pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    child = Child.spawn(["/bin/sh", "-c", "echo hi; exit 5"], stdin=False, cwd=None, env={})
    assert await run_child(child) == (5, b"hi\n", b"")
    assert not pid_alive(child.pid)


async def test_stdin_nobody_reads_is_dropped_quietly() -> None:
    child = Child.spawn(["/bin/true"], stdin=True, cwd=None, env={})
    assert await run_child(child, b"x" * (4 * 1024 * 1024)) == (0, b"", b"")


async def test_a_pipe_is_not_watched_while_its_sink_waits() -> None:
    """Else the loop would spin: the pipe stays ready while the output waits to be taken."""
    child = Child.spawn(["head", "-c", "1000000", "/dev/zero"], stdin=False, cwd=None, env={})
    assert child.stdout is not None
    fd = child.stdout.fileno()
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    taken = asyncio.Event()
    release = asyncio.Event()
    got = bytearray()

    async def slow(data: bytes) -> None:
        got.extend(data)
        taken.set()
        await release.wait()

    async with asyncio.timeout(10):
        reader = asyncio.create_task(read_pipe(child.stdout, slow))
        await taken.wait()
        assert fd not in selector.get_map()
        release.set()
        await reader
        await read_pipe(child.stderr, slow)
        assert await child.wait() == 0
    assert len(got) == 1_000_000


async def test_a_process_reaped_elsewhere_reports_255(caplog: pytest.LogCaptureFixture) -> None:
    child = Child.spawn(["/bin/sh", "-c", "exit 3"], stdin=False, cwd=None, env={})
    os.waitpid(child.pid, 0)  # noqa: ASYNC222  (taken before the loop could: its status is lost)
    async with asyncio.timeout(10):
        assert await run_child(child) == (255, b"", b"")
    assert "was lost" in caplog.text
