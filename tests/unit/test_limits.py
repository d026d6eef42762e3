"""Task limits: checking them, fitting them to a worker's own, telling what ended a task."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from dist_exec.errors import InvalidTaskSpec
from dist_exec.executors.containment import (
    Cgroups,
    ContainmentError,
    Jail,
    RunAs,
    resolve_run_as,
)
from dist_exec.executors.limits import (
    MAX_BYTES,
    Exceeded,
    LimitKind,
    check,
    fit,
    format_size,
    summary,
)
from dist_exec.models import TaskLimits

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (100, "100 B"), (1024, "1 KiB"), (64 * MiB, "64 MiB"), (3 * MiB // 2, "1.5 MiB")],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_fit_takes_the_worker_limit_where_the_task_sets_none() -> None:
    worker = TaskLimits(memory_bytes=512 * MiB, max_procs=64)
    assert fit(TaskLimits(memory_bytes=64 * MiB), worker) == TaskLimits(
        memory_bytes=64 * MiB, max_procs=64
    )
    assert fit(TaskLimits(cpu_time_s=2.0), TaskLimits()) == TaskLimits(cpu_time_s=2.0)


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        (
            TaskLimits(memory_bytes=1024 * MiB),
            "memory limit 1 GiB is more than this worker allows (memory limit 512 MiB)",
        ),
        (TaskLimits(max_procs=65), "process limit 65 is more than this worker allows"),
        (TaskLimits(cpu_time_s=61), "CPU time limit 61s is more than this worker allows"),
    ],
)
def test_fit_refuses_more_than_the_worker_allows(asked: TaskLimits, message: str) -> None:
    worker = TaskLimits(memory_bytes=512 * MiB, cpu_time_s=60, max_procs=64)
    with pytest.raises(InvalidTaskSpec, match=re.escape(message)):
        fit(asked, worker)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (TaskLimits(cpu_time_s=-1), "CPU time limit must not be negative"),
        (TaskLimits(memory_bytes=MAX_BYTES + 1), "memory limit is too large; at most 4 EiB"),
        (TaskLimits(max_procs=10**9), "process limit is too large; at most 4194304"),
    ],
)
def test_check_refuses_values_no_worker_could_apply(limits: TaskLimits, message: str) -> None:
    with pytest.raises(InvalidTaskSpec, match=message):
        check(limits)


def test_summary_and_exceeded_messages() -> None:
    limits = TaskLimits(memory_bytes=64 * MiB, cpu_time_s=1.5, max_procs=32)
    assert summary(limits) == "memory limit 64 MiB, CPU time limit 1.5s, process limit 32"
    assert Exceeded(LimitKind.MEMORY, 64 * MiB).message == "killed: memory limit 64 MiB exceeded"
    assert Exceeded(LimitKind.PROCS, 32).message == "killed: process limit 32 reached"
    assert Exceeded(LimitKind.FILE_SIZE, MiB).metadata == {"limit_exceeded": "file-size"}


def _verdict(limits: TaskLimits, returncode: int, stderr: bytes = b"") -> LimitKind | None:
    exceeded = Jail(limits, None, None).verdict(returncode, stderr)
    return None if exceeded is None else exceeded.kind


def test_verdict_under_rlimits() -> None:
    cpu = TaskLimits(cpu_time_s=1)
    assert _verdict(cpu, -signal.SIGXCPU) == LimitKind.CPU_TIME
    assert _verdict(cpu, 128 + signal.SIGXCPU) == LimitKind.CPU_TIME  # as a shell reports it
    assert _verdict(TaskLimits(), -signal.SIGXCPU) is None  # no limit, no blame
    assert _verdict(TaskLimits(max_file_size_bytes=MiB), -signal.SIGXFSZ) == LimitKind.FILE_SIZE
    memory = TaskLimits(memory_bytes=64 * MiB)
    assert _verdict(memory, 1, b"Traceback...\nMemoryError\n") == LimitKind.MEMORY
    assert _verdict(memory, 1, b"some other failure\n") is None
    assert _verdict(memory, 0, b"MemoryError, retrying with less\n") is None  # it coped
    procs = TaskLimits(max_procs=8)
    assert _verdict(procs, 2, b"/bin/sh: 0: Cannot fork\n") == LimitKind.PROCS
    assert _verdict(procs, 2, b"bash: fork: retry: Resource temporarily unavailable") == (
        LimitKind.PROCS
    )
    assert _verdict(procs, 2, b"forklift not found\n") is None
    # A bomb's first shell may end well while its children fail to fork: still the limit.
    assert _verdict(procs, 0, b"/bin/sh: 0: Cannot fork\n") == LimitKind.PROCS


def test_run_as_default_is_nobody_for_root_and_refused_otherwise() -> None:
    if os.geteuid() != 0:
        assert resolve_run_as(None) is None
        with pytest.raises(ContainmentError, match="must run as root"):
            resolve_run_as("root")
        return
    nobody = resolve_run_as(None)
    assert isinstance(nobody, RunAs)
    assert (nobody.name, nobody.uid) == ("nobody", 65534)
    assert os.path.isdir(nobody.home)
    assert resolve_run_as("root") is None  # explicitly root: unchanged
    assert resolve_run_as("65534") == nobody


def test_run_as_unknown_user_is_one_clear_error() -> None:
    with pytest.raises(ContainmentError, match="--run-as: no user 'no-such-user-here'"):
        resolve_run_as("no-such-user-here")


def test_within_a_ceiling() -> None:
    ceiling = TaskLimits(memory_bytes=512 * MiB, max_procs=64)
    assert TaskLimits().within(ceiling)
    assert TaskLimits(memory_bytes=512 * MiB, cpu_time_s=3600).within(ceiling)  # no CPU ceiling
    assert not TaskLimits(max_procs=65).within(ceiling)
    assert TaskLimits(memory_bytes=2**40).within(TaskLimits())


def test_cgroup_v2_files_are_written_and_read(tmp_path: Path) -> None:
    """The v2 layout, on a plain directory standing in for the cgroup file system (this host's
    real cgroups, v1, are exercised in test_containment.py)."""
    group = Cgroups(2, {"": tmp_path}).task(
        "task-1", TaskLimits(memory_bytes=64 * MiB, cpu_time_s=1.5, max_procs=8)
    )
    task = tmp_path / "task-1"
    assert group.procs_files == (str(task / "cgroup.procs"),)
    assert (task / "memory.max").read_text() == str(64 * MiB)
    assert (task / "pids.max").read_text() == "8"
    assert group.exceeded() is None
    (task / "cpu.stat").write_text("usage_usec 1600000\nuser_usec 1500000\n")
    assert group.exceeded() == LimitKind.CPU_TIME
    (task / "pids.events").write_text("max 2\n")
    assert group.exceeded() == LimitKind.PROCS
    (task / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
    assert group.exceeded() == LimitKind.MEMORY
