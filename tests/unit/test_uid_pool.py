"""A uid per task (--run-as-pool): jobs on one worker cannot read or outlive each other."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from dist_exec.executors import ExecRequest
from dist_exec.executors.command import CommandExecutor, CommandSpec
from dist_exec.executors.containment import (
    Containment,
    ContainmentError,
    Mode,
    parse_uid_pool,
)
from dist_exec.executors.spawner import Spawner
from dist_exec.models import ExecStatus, TaskLimits
from tests.conftest import RecordingSink, pid_alive, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switches users: needs root")
POOL = "61000-61003"


def request(spec: CommandSpec, task_id: str, limits: TaskLimits | None = None) -> ExecRequest:
    return ExecRequest(task_id, 1, spec.to_payload(), 20.0, limits=limits or TaskLimits())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "expected FIRST-LAST"),
        ("100-200", "with 1000 <= FIRST <= LAST"),
        ("62000-61000", "with 1000 <= FIRST <= LAST"),
        ("65534-65534", "uid 65534 belongs to user nobody"),
    ],
)
def test_a_pool_is_refused_in_one_line(text: str, message: str) -> None:
    with pytest.raises(ContainmentError, match=message):
        parse_uid_pool(text)


async def test_jobs_run_as_uids_of_their_own_and_cannot_read_each_other() -> None:
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), None, uid_pool=parse_uid_pool(POOL))
    try:
        executor = CommandExecutor({"containment": containment})
        secret = CommandSpec(
            "echo $$ $(id -u); exec sleep 30", shell=True, env={"SECRET": "alice-only"}
        )
        alice_sink = RecordingSink()
        alice = asyncio.create_task(executor.execute(request(secret, "alice"), alice_sink))
        async with asyncio.timeout(10):
            await alice_sink.first_stdout.wait()
        alice_pid, alice_uid = (int(v) for v in alice_sink.stdout.split())
        snoop = CommandSpec(
            f"id -u; cat /proc/{alice_pid}/environ; kill -0 {alice_pid}", shell=True
        )
        bob_sink = RecordingSink()
        bob = await executor.execute(request(snoop, "bob"), bob_sink)
        bob_uid = int(bob_sink.stdout.split()[0])
        assert alice_uid != bob_uid
        assert {alice_uid, bob_uid} <= set(range(61000, 61004))
        assert b"alice-only" not in bob_sink.stdout
        assert b"Permission denied" in bob_sink.stderr
        assert bob.status == ExecStatus.FAILURE  # (kill -0: not permitted either)
        alice.cancel()
        with pytest.raises(asyncio.CancelledError):
            await alice
    finally:
        containment.close()


async def test_what_a_job_leaves_behind_dies_with_it_even_without_its_tags() -> None:
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), None, uid_pool=parse_uid_pool(POOL))
    try:
        executor = CommandExecutor({"containment": containment, "kill_grace_s": 1.0})
        sink = RecordingSink()
        escape = CommandSpec("env -i setsid sleep 60 > /dev/null 2>&1 & echo $!", shell=True)
        outcome = await executor.execute(request(escape, "t1"), sink)
        assert outcome.status == ExecStatus.SUCCESS, outcome
        escaped = int(sink.stdout)
        await wait_until(lambda: not pid_alive(escaped), 10, "the escaped process killed")
        # Under limits the worker forks the command itself, as a uid of the pool too.
        limited = RecordingSink()
        outcome = await executor.execute(
            request(CommandSpec("id", ["-u"]), "t2", TaskLimits(cpu_time_s=5)), limited
        )
        assert outcome.status == ExecStatus.SUCCESS, outcome
        assert int(limited.stdout) in range(61000, 61004)
    finally:
        containment.close()


async def test_the_spawner_starts_only_uids_of_its_range() -> None:
    spawner = Spawner(61000, 61000, 61003)
    try:
        with pytest.raises(OSError, match="uid 61010 is not one this spawner starts"):
            await spawner.spawn(["true"], stdin=False, cwd=None, env={}, uid=61010)
        child = await spawner.spawn(["sleep", "30"], stdin=False, cwd=None, env={}, uid=61002)
        assert os.stat(f"/proc/{child.pid}").st_uid == 61002
        os.killpg(child.pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            await child.wait()
        for pipe in (child.stdout, child.stderr):
            assert pipe is not None
            pipe.close()
    finally:
        spawner.close()
