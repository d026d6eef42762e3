"""Resource limits of a task: checking them, fitting them to a worker's own, naming them.

A task may ask for a memory limit, a CPU-time limit, a process limit and a file-size limit. A
worker has its own limits for each (``--task-memory-limit`` ...), which are both the default of
a task that sets none and the ceiling no task may exceed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dist_exec.config import format_duration
from dist_exec.errors import InvalidTaskSpec
from dist_exec.models import TaskLimits

MAX_BYTES = 2**62
MAX_PROCS = 4_194_304  # the kernel's largest pid_max
MAX_CPU_TIME_S = 366 * 86400.0
LIMIT_METADATA_KEY = "limit_exceeded"  # result metadata: which limit ended the task


class LimitKind(enum.StrEnum):
    MEMORY = "memory"
    CPU_TIME = "cpu-time"
    PROCS = "procs"
    FILE_SIZE = "file-size"


_FIELDS = {
    LimitKind.MEMORY: "memory_bytes",
    LimitKind.CPU_TIME: "cpu_time_s",
    LimitKind.PROCS: "max_procs",
    LimitKind.FILE_SIZE: "max_file_size_bytes",
}
_NAMES = {
    LimitKind.MEMORY: "memory limit",
    LimitKind.CPU_TIME: "CPU time limit",
    LimitKind.PROCS: "process limit",
    LimitKind.FILE_SIZE: "file size limit",
}
_MAXIMA: dict[LimitKind, float] = {
    LimitKind.MEMORY: MAX_BYTES,
    LimitKind.CPU_TIME: MAX_CPU_TIME_S,
    LimitKind.PROCS: MAX_PROCS,
    LimitKind.FILE_SIZE: MAX_BYTES,
}


def format_size(n: int) -> str:
    """Bytes in the largest binary unit that keeps it whole-ish: 64 MiB, 1.5 GiB, 100 B."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            return f"{value:g} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    raise AssertionError("unreachable")


def limit_value(limits: TaskLimits, kind: LimitKind) -> float:
    value: float = getattr(limits, _FIELDS[kind])
    return value


def _shown(kind: LimitKind, value: float) -> str:
    if kind in (LimitKind.MEMORY, LimitKind.FILE_SIZE):
        return format_size(int(value))
    if kind == LimitKind.CPU_TIME:
        return format_duration(value)
    return str(int(value))


def describe(kind: LimitKind, value: float) -> str:
    """'memory limit 64 MiB', 'CPU time limit 2s', 'process limit 32'."""
    return f"{_NAMES[kind]} {_shown(kind, value)}"


def summary(limits: TaskLimits) -> str:
    """'memory limit 64 MiB, process limit 32' (only the limits that are set)."""
    return ", ".join(
        describe(kind, limit_value(limits, kind)) for kind in LimitKind if limit_value(limits, kind)
    )


def check(limits: TaskLimits) -> None:
    """Refuse values no worker could apply (InvalidTaskSpec says which and why)."""
    for kind in LimitKind:
        value = limit_value(limits, kind)
        if value < 0:
            raise InvalidTaskSpec(f"{_NAMES[kind]} must not be negative")
        if value > _MAXIMA[kind]:
            raise InvalidTaskSpec(
                f"{_NAMES[kind]} is too large; at most {_shown(kind, _MAXIMA[kind])}"
            )


def fit(asked: TaskLimits, worker: TaskLimits) -> TaskLimits:
    """The limits a task runs under: what it asked for within the worker's own limits, and the
    worker's limit where it asked for none. More than the worker allows is refused."""
    check(asked)
    fitted: dict[str, float] = {}
    for kind, name in _FIELDS.items():
        want, ceiling = limit_value(asked, kind), limit_value(worker, kind)
        if ceiling and want > ceiling:
            raise InvalidTaskSpec(
                f"{describe(kind, want)} is more than this worker allows "
                f"({describe(kind, ceiling)})"
            )
        fitted[name] = want or ceiling
    return TaskLimits(**fitted)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Exceeded:
    """Which limit ended a task, for its error and its result metadata."""

    kind: LimitKind
    value: float

    @property
    def message(self) -> str:
        verb = "reached" if self.kind == LimitKind.PROCS else "exceeded"
        return f"killed: {describe(self.kind, self.value)} {verb}"

    @property
    def metadata(self) -> dict[str, str]:
        return {LIMIT_METADATA_KEY: self.kind.value}
