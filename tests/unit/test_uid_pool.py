"""A uid per task (--run-as-pool): jobs on one worker cannot read or outlive each other."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from dist_exec.executors import ExecRequest
from dist_exec.executors import containment as containment_module
from dist_exec.executors.command import CommandExecutor, CommandSpec
from dist_exec.executors.containment import (
    SET_ASIDE,
    Containment,
    ContainmentError,
    Mode,
    UidPool,
    parse_uid_pool,
)
from dist_exec.executors.spawner import Spawner
from dist_exec.models import ExecStatus, TaskLimits
from tests.conftest import RecordingSink, pid_alive, wait_for, wait_until

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


@pytest.mark.parametrize("limited", [False, True], ids=["spawned", "forked under limits"])
async def test_a_set_user_id_program_gives_a_pooled_job_no_other_uid(
    shared_dir: Path, limited: bool
) -> None:
    """A job could leave a set-user-id copy of a program as its uid; a later job of another
    uid of the pool ran it and became the first uid, with what the next job of that uid had
    (a security review read another owner's job's environment so). With no_new_privs set
    for the pool's commands, set-user-id bits do nothing for them."""
    planted = shared_dir / "id"
    shutil.copy("/usr/bin/id", planted)
    os.chown(planted, 61003, 61003)
    planted.chmod(0o6755)
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), None, uid_pool=parse_uid_pool(POOL))
    try:
        executor = CommandExecutor({"containment": containment})
        sink = RecordingSink()
        limits = TaskLimits(cpu_time_s=5) if limited else None
        spec = CommandSpec(str(planted), ["-u"])
        outcome = await executor.execute(request(spec, "t1", limits), sink)
        assert outcome.status == ExecStatus.SUCCESS, outcome
        assert int(sink.stdout) in range(61000, 61003)  # its own uid, not 61003
    finally:
        containment.close()


def test_a_uid_given_back_leaves_no_files_and_no_process_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next task to get the uid read a 0600 file an earlier one had left in /tmp; and a
    process with the uid only as its effective id (a set-user-id program) outlived it. A
    tree of 1,100 directories (too deep for a recursive removal) neither keeps the uid out
    of the pool nor holds up the task's end."""
    uid, other = 61001, 61002
    shared = tmp_path / "tmp"
    (shared / "open").mkdir(parents=True)
    (shared / "open").chmod(0o1777)
    (shared / "closed").mkdir(mode=0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not the task's")
    left = {
        shared / "secret": "file",
        shared / "open" / "deeper": "file",
        shared / "closed" / "not-reached": "file",  # (no world-writable way there: kept)
        shared / "link": "link",
        shared / "dir": "dir",
    }
    for path, kind in left.items():
        if kind == "file":
            path.write_text("x")
        elif kind == "link":
            path.symlink_to(elsewhere)
        else:
            path.mkdir()
            (path / "inside").write_text("x")
        os.chown(path, uid, uid, follow_symlinks=False)
    deep = shared / "deep"
    subprocess.run(
        ["sh", "-c", f"cd {deep.parent} && mkdir deep && cd deep && "
         "for i in $(seq 1100); do mkdir a && cd a; done && touch bottom"],
        check=True,
    )  # fmt: skip
    os.chown(deep, uid, uid)
    (shared / "theirs").write_text("x")
    os.chown(shared / "theirs", other, other)
    monkeypatch.setattr(containment_module, "TEMP_DIRS", (str(shared),))
    effective_only = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: os.setresuid(0, uid, 0))
    group_only = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: os.setresgid(0, uid, 0))
    try:
        pool = UidPool(range(uid, uid + 1))
        assert pool.take().uid == uid
        pool.give_back(uid)
        assert effective_only.wait(10) == group_only.wait(10) == -signal.SIGKILL
        assert pool.take().uid == uid  # (free again, at once)
    finally:
        for proc in (effective_only, group_only):
            proc.kill()
            proc.wait()

    def remaining() -> list[str]:
        return sorted(str(p.relative_to(shared)) for p in shared.iterdir()) + sorted(
            str(p.relative_to(shared)) for p in (shared / "open").iterdir()
        )

    wait_for(lambda: not any(SET_ASIDE in name for name in remaining()), 30, "the removal")
    assert sorted(str(p.relative_to(shared)) for p in shared.rglob("*")) == [
        "closed",
        "closed/not-reached",
        "open",
        "theirs",
    ]
    assert elsewhere.read_text() == "not the task's"  # (the link went, not what it named)
