"""What /proc says about the processes of this machine (Linux), for finding a task's processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

PROC = Path("/proc")


def pids() -> Iterator[int]:
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def stat(pid: int) -> list[str] | None:
    """The fields after the command name (state, ppid, pgrp, session, ...); None once gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def live(pid: int) -> list[str] | None:
    """``stat`` of a process that still runs (not a zombie)."""
    fields = stat(pid)
    return fields if fields is not None and fields[0] != "Z" else None


def environment(pid: int) -> set[bytes] | None:
    """The ``NAME=value`` entries a process started with; None if gone or not readable."""
    try:
        return set((PROC / str(pid) / "environ").read_bytes().split(b"\0"))
    except OSError:
        return None


def ids(pid: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The user ids (real, effective, saved, file system) and the group ids of a process;
    None once gone."""
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    found: dict[str, tuple[int, ...]] = {}
    for line in text.splitlines():
        if line.startswith(("Uid:", "Gid:")):
            found[line[:3]] = tuple(int(field) for field in line.split()[1:])
    return found.get("Uid", ()), found.get("Gid", ())
