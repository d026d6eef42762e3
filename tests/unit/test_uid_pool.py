"""A uid per task (--run-as-pool): jobs on one worker cannot read or outlive each other."""

from __future__ import annotations

import asyncio
import grp
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
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


HOPPER = """
import os, sys, time
os.setsid()
while True:  # a new pid every millisecond, one process at a time: no scan sees it
    if os.fork():
        os._exit(0)
    time.sleep(0.001)
"""


def test_a_uid_given_back_takes_a_process_that_keeps_changing_its_pid(tmp_path: Path) -> None:
    """Scans of /proc never found it (each pid was gone when its turn came): the uid went back
    to the pool with it alive, and the next task to get the uid could read its secrets."""
    uid = 61003
    hopper = subprocess.Popen(
        ["python3", "-c", HOPPER], user=uid, group=uid, extra_groups=[], cwd="/",
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert hopper.stdout is not None
    pool = UidPool(range(uid, uid + 1), claims=tmp_path / "claims")
    try:
        assert hopper.wait(10) == 0  # (its first pid is gone: its child hops on)
        pool.take()
        pool.give_back(uid)
        # Every hop inherits the pipe: it reads its end once none of them is left.
        ready, _, _ = select.select([hopper.stdout], [], [], 10)
        assert ready, "the hopper lives on"
        assert hopper.stdout.read() == b""
    finally:
        pool.close()
        subprocess.run(["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid, check=False)
        hopper.stdout.close()


def test_two_workers_cannot_hand_out_the_same_uids(tmp_path: Path) -> None:
    """`up --workers 2 --run-as-pool R` gave both workers R: a job on each ran as one uid,
    read the other's environment, and killed it at its end."""
    claims = tmp_path / "claims"
    mine = UidPool(range(61000, 61010), claims=claims)
    try:
        other = [sys.executable, "-c", (
            "import sys; from pathlib import Path; "
            "from dist_exec.executors.containment import UidPool, ContainmentError\n"
            "try:\n"
            "    first, end = int(sys.argv[1]), int(sys.argv[2])\n"
            f"    UidPool(range(first, end), claims=Path({str(claims)!r}))\n"
            "except ContainmentError as exc:\n"
            "    sys.exit(str(exc))\n"
        )]  # fmt: skip
        overlap = subprocess.run([*other, "61009", "61020"], capture_output=True, text=True)
        assert overlap.returncode == 1
        assert "another worker on this host has uids of this range in its pool" in overlap.stderr
        apart = subprocess.run([*other, "61010", "61020"], capture_output=True, text=True)
        assert apart.returncode == 0, apart.stderr
    finally:
        mine.close()
    again = subprocess.run([*other, "61000", "61010"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr  # (given up when its worker closed it)


def test_a_pool_whose_gids_are_a_groups_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task's gid is its uid's number: it got the files of a group with that gid."""

    def getgrgid(gid: int) -> grp.struct_group:
        if gid != 61002:
            raise KeyError(gid)
        return grp.struct_group(("builders", "x", 61002, []))

    monkeypatch.setattr(grp, "getgrgid", getgrgid)
    with pytest.raises(ContainmentError, match="--run-as-pool 61000-61003: gid 61002 is group"):
        parse_uid_pool(POOL)


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
    """Nor each other's files: a file a job left in a shared directory (/tmp) was readable by
    the others (umask 022), started by the spawner or (under limits) by the worker itself."""
    shared = Path(tempfile.mkdtemp(prefix="dist-exec-shared-", dir="/tmp"))  # (all reach it)
    shared.chmod(0o1777)
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), None, uid_pool=parse_uid_pool(POOL))
    try:
        executor = CommandExecutor({"containment": containment})
        secret = CommandSpec(
            f"echo alice-file > {shared}/a; echo $$ $(id -u); exec sleep 30",
            shell=True,
            env={"SECRET": "alice-only"},
        )
        alice_sink = RecordingSink()
        alice = asyncio.create_task(executor.execute(request(secret, "alice"), alice_sink))
        async with asyncio.timeout(10):
            await alice_sink.first_stdout.wait()
        alice_pid, alice_uid = (int(v) for v in alice_sink.stdout.split())
        snoop = CommandSpec(
            f"id -u; cat /proc/{alice_pid}/environ; cat {shared}/a; kill -0 {alice_pid}",
            shell=True,
        )
        bob_sink = RecordingSink()
        bob = await executor.execute(request(snoop, "bob"), bob_sink)
        bob_uid = int(bob_sink.stdout.split()[0])
        assert alice_uid != bob_uid
        assert {alice_uid, bob_uid} <= set(range(61000, 61004))
        assert b"alice-only" not in bob_sink.stdout
        assert b"alice-file" not in bob_sink.stdout
        assert bob_sink.stderr.count(b"Permission denied") == 2
        assert bob.status == ExecStatus.FAILURE  # (kill -0: not permitted either)
        for limits in (TaskLimits(), TaskLimits(max_procs=64)):  # (spawner, worker's fork)
            sink = RecordingSink()
            await executor.execute(request(CommandSpec("umask", shell=True), "m", limits), sink)
            assert sink.stdout == b"0077\n", limits
        alice.cancel()
        with pytest.raises(asyncio.CancelledError):
            await alice
    finally:
        if not alice.done():  # (a failed check above: not left running at the loop's end)
            alice.cancel()
            await asyncio.gather(alice, return_exceptions=True)
        containment.close()
        shutil.rmtree(shared, ignore_errors=True)


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
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), None, uid_pool=parse_uid_pool(POOL))
    # (left by an earlier job of this pool's: one from before the pool started is put aside)
    planted = shared_dir / "id"
    shutil.copy("/usr/bin/id", planted)
    os.chown(planted, 61003, 61003)
    planted.chmod(0o6755)
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
    pool = UidPool(range(uid, uid + 1), claims=tmp_path / "claims")
    try:
        assert pool.take().uid == uid
        pool.give_back(uid)
        assert effective_only.wait(10) == group_only.wait(10) == -signal.SIGKILL
        assert pool.take().uid == uid  # (free again, at once)
    finally:
        pool.close()
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


def test_a_pool_starting_puts_aside_what_its_uids_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed before it gave a uid back left that task's files in /tmp; the worker
    started again (`up` restarts it) gave the uid to a new task, which could read them."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    left, kept = shared / "left-by-61001", shared / "someone-elses"
    for path, uid in ((left, 61001), (kept, 62001)):
        path.write_text("x")
        os.chown(path, uid, uid)
    monkeypatch.setattr(containment_module, "TEMP_DIRS", (str(shared),))
    pool = UidPool(range(61000, 61004), claims=tmp_path / "claims")
    try:
        assert not left.exists()
        assert kept.exists()
    finally:
        pool.close()
