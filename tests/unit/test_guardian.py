"""The process guardian with real processes: what it kills when its worker's pipe closes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dist_exec import procfs
from dist_exec.executors import guardian
from dist_exec.executors.guardian import GUARD_ENV, ProcessGuard
from tests.conftest import pid_alive, wait_for


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Process groups a test starts; whatever is left of them is killed at the end (the whole
    group: a shell's child outlives the shell)."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def group(
    spawned: list[subprocess.Popen[bytes]], script: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A process group of its own (as a command's), running ``script``."""
    proc = subprocess.Popen(
        ["/bin/sh", "-c", script], start_new_session=True, env=env or {}, stdout=subprocess.PIPE
    )
    spawned.append(proc)
    return proc


def dead(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def worker_dies(guard: ProcessGuard) -> None:
    """The pipe closes with no word first, as when the worker is killed (the kernel closes it)."""
    assert guard._proc.stdin is not None
    guard._proc.stdin.close()


def guardian_exits(guard: ProcessGuard) -> None:
    """The guardian leaves by itself (after its settle time when the worker died)."""
    wait_for(lambda: guard._proc.poll() is not None, 10, "the guardian to exit")
    assert guard._proc.returncode == 0


def test_a_group_in_the_table_dies_with_the_pipe_even_with_its_environment_cleared(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    guard = ProcessGuard()
    # The leader starts a member with an empty environment (no guard token): only the table
    # can find it.
    leader = group(spawned, "env -i sleep 300 & echo $!; wait")
    assert leader.stdout is not None
    member = int(leader.stdout.readline())
    ended = group(spawned, "sleep 300")
    guard.watch(leader.pid)
    guard.watch(ended.pid)
    guard.unwatch(ended.pid)  # out of the table again: the guardian leaves it alone
    worker_dies(guard)
    wait_for(lambda: dead(leader), 10, "the leader to be killed")
    wait_for(lambda: not pid_alive(member), 10, "the member without the token to be killed")
    guardian_exits(guard)
    assert not dead(ended)


def test_the_table_grows_and_keeps_every_group(
    spawned: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guardian, "FIRST_SLOTS", 2)
    guard = ProcessGuard()
    procs = [group(spawned, "sleep 300") for _ in range(7)]
    for proc in procs:
        guard.watch(proc.pid)
    guard.unwatch(procs[3].pid)
    guard.watch(procs[3].pid)  # its slot is used again
    guard.unwatch(procs[5].pid)
    worker_dies(guard)
    killed = procs[:5] + procs[6:]
    wait_for(lambda: all(dead(proc) for proc in killed), 10, "the watched groups to be killed")
    guardian_exits(guard)
    assert not dead(procs[5])


def test_without_memfd_the_table_is_an_unlinked_file(
    spawned: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memfd(name: str, flags: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    guard = ProcessGuard()
    proc = group(spawned, "sleep 300")
    guard.watch(proc.pid)
    guard.close()
    wait_for(lambda: dead(proc), 10, "the watched group to be killed")


def test_a_command_not_in_the_table_yet_dies_by_its_token(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    guard = ProcessGuard()
    tagged = group(spawned, "sleep 300", env={GUARD_ENV: guard.token})
    other = group(spawned, "sleep 300", env={GUARD_ENV: "another worker's token"})
    worker_dies(guard)
    wait_for(lambda: dead(tagged), 10, "the command with the token to be killed")
    guardian_exits(guard)
    assert not dead(other)


def test_a_command_that_execs_only_after_its_worker_died_dies_by_its_token(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    guard = ProcessGuard()
    worker_dies(guard)
    # A command the worker was still spawning: it takes the token only when it execs, after
    # the guardian's first look (the delay is the scenario, not a wait).
    late = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 300"],
        start_new_session=True,
        env={GUARD_ENV: guard.token},
        preexec_fn=lambda: time.sleep(0.3),
    )
    spawned.append(late)
    wait_for(lambda: dead(late), 10, "the command that exec'd late to be killed")
    guardian_exits(guard)


def test_after_a_normal_end_a_tagged_command_left_behind_still_dies(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    guard = ProcessGuard()
    tagged = group(spawned, "sleep 300", env={GUARD_ENV: guard.token})
    guard.close()  # the worker ends normally: the guardian makes its pass and exits
    assert guard._proc.returncode == 0
    wait_for(lambda: dead(tagged), 10, "the command with the token to be killed")


def test_the_guardian_exits_by_itself_when_its_pipe_closes() -> None:
    guard = ProcessGuard()
    guard.unwatch(12345)  # a group it never watched: nothing to do
    guard.close()
    # close() kills a guardian that is still there after 5 s: exit status 0 means it left alone.
    assert guard._proc.returncode == 0
    assert not pid_alive(guard.pid)


def test_settling_ends_though_a_killed_process_lingers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that SIGKILL does not end at once (stuck in the kernel) is found again and
    again: only a new one extends the guardian's watch, so it still ends."""
    rounds = iter(range(1000))
    found = [{7}, {7}, {7, 8}]  # 8 is new once; after that only the lingering ones

    def kill_tagged(tags: object) -> set[int]:
        i = next(rounds)
        return found[i] if i < len(found) else {7, 8}

    monkeypatch.setattr(guardian, "kill_tagged", kill_tagged)
    monkeypatch.setattr(guardian, "SETTLE_S", 0.05)
    monkeypatch.setattr(guardian, "SETTLE_POLL_S", 0.001)
    seen = {7}
    guardian.settle({GUARD_ENV: "t"}, seen)
    assert seen == {7, 8}


def test_a_guardian_that_died_is_replaced_and_guards_what_runs(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    """A guardian killed (OOM, an operator) was only a zombie of the worker: nothing noticed,
    and a crash of the worker left its commands running next to their retries."""
    guard = ProcessGuard()
    before = group(spawned, "sleep 300")  # (started while the first guardian ran)
    guard.watch(before.pid)
    assert guard.keep_alive() is False  # (alive: nothing to do)
    first = guard._proc
    first.kill()
    wait_for(lambda: first.poll() is not None, 10, "the guardian to die")
    assert guard.keep_alive() is True
    assert guard._proc is not first
    assert guard._proc.poll() is None
    tagged = group(spawned, "sleep 300", env={GUARD_ENV: guard.token})
    worker_dies(guard)
    wait_for(lambda: dead(before) and dead(tagged), 10, "the worker's commands to be killed")
    guardian_exits(guard)


def test_the_guard_token_is_not_on_the_guardians_command_line() -> None:
    """Any process, a job's too, can read a command line (ps)."""
    guard = ProcessGuard()
    try:
        cmdline = Path(f"/proc/{guard.pid}/cmdline").read_bytes()
        assert guard.token.encode() not in cmdline
    finally:
        guard.close()


def test_a_leftover_that_ran_a_set_user_id_program_is_still_found_by_its_real_uid() -> None:
    """The sweep after a normal end filtered on the owner of /proc/PID (the effective uid): a
    `setsid su root` left behind by a job of nobody ran on as root."""
    nobody = 65534
    leftover = subprocess.Popen(
        ["sleep", "300"],
        env={"DIST_EXEC_RUN": "run-of-a-job"},
        preexec_fn=lambda: os.setresuid(nobody, 0, 0),  # (as after exec of a set-uid-root one)
    )
    try:
        wait_for(lambda: (procfs.ids(leftover.pid) or ((),))[0][:1] == (nobody,), 10, "it")
        found = guardian.tagged({"DIST_EXEC_RUN": "run-of-a-job"}, uids={nobody})
        assert found == [leftover.pid]
    finally:
        leftover.kill()
        leftover.wait()
