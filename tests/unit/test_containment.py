"""The command executor under limits: real processes in a real cgroup, or under rlimits.

Every hostile command here is bounded by itself (a fork bomb of depth 7, a hog of 512 MiB, a
filler of 50 MB) and by a deadline, so a containment that fails cannot hurt the machine: the
test fails instead.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dist_exec.executors import ExecRequest
from dist_exec.executors.command import CommandExecutor, CommandSpec
from dist_exec.executors.containment import Cgroups, Containment, ContainmentError, Mode
from dist_exec.models import ExecOutcome, ExecStatus, TaskLimits
from tests.conftest import RecordingSink

MiB = 1024 * 1024
DEADLINE_S = 25.0
# At most 2^8 shells and 2^7 sleeps even if no limit holds; each leaf outlives the deadline.
FORK_BOMB = (
    'b() { if [ "$1" -gt 0 ]; then b $(($1 - 1)) & b $(($1 - 1)) & wait; else sleep 60; fi; }; b 7'
)
HOG = "b = []\nfor _ in range(512): b.append(bytearray(1 << 20))"  # 512 MiB, then exits 0
SPIN = "while :; do :; done"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs commands as nobody: needs root")


def world_python() -> str:
    """A python3 that the user nobody may run (a pyenv one under /root may not be)."""
    for path in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(path) and os.stat(os.path.realpath(path)).st_mode & stat.S_IXOTH:
            return path
    pytest.skip("no world-executable python3 for the memory hog")


@pytest.fixture(params=[Mode.CGROUP, Mode.RLIMIT])
def containment(request: pytest.FixtureRequest) -> Iterator[Containment]:
    mode = Mode(request.param)
    try:
        found = Containment.start(mode, TaskLimits(), "nobody")
    except ContainmentError as exc:
        pytest.skip(f"no cgroups here: {exc}")
    try:
        yield found
    finally:
        found.close()


async def run(
    containment: Containment, spec: CommandSpec, limits: TaskLimits
) -> tuple[ExecOutcome, RecordingSink]:
    executor = CommandExecutor({"containment": containment, "kill_grace_s": 1.0})
    sink = RecordingSink()
    request = ExecRequest("t", 1, spec.to_payload(), DEADLINE_S, limits=limits)
    async with asyncio.timeout(DEADLINE_S):
        outcome = await executor.execute(request, sink)
    return outcome, sink


def assert_killed_by(outcome: ExecOutcome, kind: str, message: str) -> None:
    assert outcome.status == ExecStatus.FAILURE, outcome
    assert outcome.error == message
    assert outcome.metadata == {"limit_exceeded": kind}


def assert_cgroups_removed(containment: Containment) -> None:
    if containment.cgroups is not None:
        for parent in containment.cgroups.parents.values():
            assert [p.name for p in parent.iterdir() if p.is_dir()] == []


async def test_fork_bomb_ends_at_the_process_limit(containment: Containment) -> None:
    outcome, _ = await run(
        containment, CommandSpec(FORK_BOMB, shell=True), TaskLimits(max_procs=32)
    )
    assert_killed_by(outcome, "procs", "killed: process limit 32 reached")
    assert_cgroups_removed(containment)
    ok, sink = await run(containment, CommandSpec("echo", ["still serving"]), TaskLimits())
    assert (ok.status, sink.stdout) == (ExecStatus.SUCCESS, b"still serving\n")


async def test_memory_hog_ends_at_the_memory_limit(containment: Containment) -> None:
    outcome, _ = await run(
        containment, CommandSpec(world_python(), ["-c", HOG]), TaskLimits(memory_bytes=64 * MiB)
    )
    assert_killed_by(outcome, "memory", "killed: memory limit 64 MiB exceeded")
    assert_cgroups_removed(containment)


async def test_cpu_spinner_ends_at_the_cpu_time_limit(containment: Containment) -> None:
    # Two spinners: under cgroups their CPU time counts together.
    outcome, _ = await run(
        containment, CommandSpec(f"{SPIN} & {SPIN}", shell=True), TaskLimits(cpu_time_s=1.0)
    )
    assert_killed_by(outcome, "cpu-time", "killed: CPU time limit 1s exceeded")
    assert_cgroups_removed(containment)


async def test_disk_filler_ends_at_the_file_size_limit(
    containment: Containment, shared_dir: Path
) -> None:
    target = shared_dir / "fill"
    outcome, _ = await run(
        containment,
        CommandSpec(f"head -c 50000000 /dev/zero > {target}", shell=True),
        TaskLimits(max_file_size_bytes=MiB),
    )
    assert_killed_by(outcome, "file-size", "killed: file size limit 1 MiB exceeded")
    assert target.stat().st_size <= MiB


async def test_commands_run_as_nobody_with_its_home(containment: Containment) -> None:
    outcome, sink = await run(
        containment, CommandSpec('id -u; id -G; echo "$HOME $USER"', shell=True), TaskLimits()
    )
    assert outcome.status == ExecStatus.SUCCESS
    uid, groups, identity = sink.stdout.decode().splitlines()
    assert uid == "65534"
    assert "0" not in groups.split()  # root's supplementary groups are gone
    assert identity.endswith(" nobody")


async def test_a_process_that_leaves_the_group_dies_with_the_task_cgroup() -> None:
    try:
        cgroups = Cgroups.create()
    except ContainmentError as exc:
        pytest.skip(f"no cgroups here: {exc}")
    containment = Containment(TaskLimits(), cgroups, None)
    try:
        outcome, sink = await run(
            containment,
            CommandSpec("setsid sleep 60 & echo $!", shell=True),
            TaskLimits(max_procs=16),
        )
        assert outcome.status == ExecStatus.SUCCESS
        escaped = int(sink.stdout.decode())
        # setsid left the process group, but not the cgroup: the task's end took it along.
        assert not Path(f"/proc/{escaped}").exists() or _zombie(escaped)
        assert_cgroups_removed(containment)
    finally:
        containment.close()
    assert not any(p.exists() for p in cgroups.parents.values())


def _zombie(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rfind(")") + 2] == "Z"


@pytest.mark.parametrize("limited", [True, False], ids=["with limits", "without"])
async def test_a_working_dir_is_entered_as_the_commands_user(
    containment: Containment, shared_dir: Path, limited: bool
) -> None:
    """subprocess enters its cwd before it switches user: a nobody job with limits (started
    by the worker's own fork) ran, and listed, a directory under a 0700 one it could not
    reach (a security review). Through the spawner (no limits) it was refused already."""
    private = shared_dir / "private"
    (private / "inner").mkdir(parents=True)
    private.chmod(0o700)
    (private / "inner").chmod(0o755)
    (private / "inner" / "secret").write_text("x")
    limits = TaskLimits(memory_bytes=256 * MiB) if limited else TaskLimits()
    spec = CommandSpec("ls", working_dir=str(private / "inner"))
    outcome, sink = await run(containment, spec, limits)
    assert (outcome.status, sink.stdout) == (ExecStatus.FAILURE, b"")
    assert outcome.error == f"cannot enter working directory {private / 'inner'}: permission denied"
    private.chmod(0o711)  # (searchable by all: now it may)
    outcome, sink = await run(containment, spec, limits)
    assert (outcome.status, sink.stdout) == (ExecStatus.SUCCESS, b"secret\n")
