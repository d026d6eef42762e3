"""The executor plugin contract, and discovery of executors through entry points.

An executor runs one kind of task ("command", "http", ...). Built-in and third-party executors
are found the same way: a package declares an entry point in the ``dist_exec.executors`` group
whose name is the task type and whose object is a factory ``factory(options) -> Executor``.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

from dist_exec.errors import InvalidTaskSpec
from dist_exec.models import ExecOutcome, Stream, TaskLimits

ENTRY_POINT_GROUP = "dist_exec.executors"
log = logging.getLogger(__name__)


@dataclass(slots=True)
class StopOrder:
    """How a cancelled attempt is to be stopped, set before its task is cancelled: what runs
    gets ``signal`` (then SIGKILL after the grace). A further cancel may change it while the
    attempt stops; an executor that signals sends the new one too."""

    signal: signal.Signals = signal.SIGTERM


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """One attempt of a task, as an executor sees it."""

    task_id: str
    attempt: int
    payload: bytes
    timeout_s: float
    metadata: Mapping[str, str] = field(default_factory=dict)
    limits: TaskLimits = field(default_factory=TaskLimits)  # as the task asked (0: not set)
    stop: StopOrder = field(default_factory=StopOrder)


class OutputSink(Protocol):
    """Where an executor writes output while it runs. ``write`` may wait (backpressure)."""

    async def write(self, stream: Stream, data: bytes) -> None: ...


@runtime_checkable
class Executor(Protocol):
    """Runs tasks of one type.

    ``validate`` runs on the master before a task is queued and again on the worker; it raises
    ``InvalidTaskSpec`` with a message a person can act on. ``execute`` runs one attempt and
    returns its outcome; when its asyncio task is cancelled (cancel or timeout) it must stop the
    work, release everything it started, and re-raise ``CancelledError``.
    """

    name: str

    def validate(self, payload: bytes) -> None: ...

    async def execute(self, request: ExecRequest, sink: OutputSink) -> ExecOutcome: ...

    async def health_check(self) -> bool: ...


class ExecutorFactory(Protocol):
    def __call__(self, options: Mapping[str, object]) -> Executor: ...


def describe_task(task_type: str, payload: bytes) -> str:
    """One line for listings: the command as typed, or the request made."""
    if task_type == "command":
        from dist_exec.executors.command import describe

        return describe(payload)
    if task_type == "http":
        from dist_exec.executors.http import describe as describe_http

        return describe_http(payload)
    return task_type


def json_payload(payload: bytes, task_type: str) -> object:
    """A payload's JSON, or InvalidTaskSpec saying what is wrong with it. UTF-8 only (JSON's
    own rule): json.loads would take UTF-16 and UTF-32 too, and call UTF-8 gone wrong a
    'utf-16-le' error."""
    try:
        text = payload.decode()
    except UnicodeDecodeError as exc:
        raise InvalidTaskSpec(
            f"{task_type} payload is not valid JSON: it is not UTF-8 (byte "
            f"0x{payload[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidTaskSpec(f"{task_type} payload is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # (Python's advice is for its own code)
            reason = f"a number has too many digits (at most {sys.get_int_max_str_digits()})"
        elif text.startswith("\ufeff"):
            reason = "it starts with a byte order mark (BOM)"
        else:
            reason = str(exc)
        raise InvalidTaskSpec(f"{task_type} payload is not valid JSON: {reason}") from None


def installed_executors() -> set[str]:
    """The names of the installed executors (entry points), without loading them."""
    return {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_executors(
    enabled: Iterable[str] | None = None,
    options: Mapping[str, Mapping[str, object]] | None = None,
) -> dict[str, Executor]:
    """Instantiate the executors named in ``enabled`` (all installed ones when None)."""
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    names = sorted(eps) if enabled is None else list(enabled)
    executors: dict[str, Executor] = {}
    for name in names:
        ep = eps.get(name)
        if ep is None:
            known = ", ".join(sorted(eps)) or "none"
            raise InvalidTaskSpec(f"unknown executor {name!r}; installed executors: {known}")
        factory: ExecutorFactory = ep.load()
        executor = factory((options or {}).get(name, {}))
        if not isinstance(executor, Executor) or executor.name != name:
            raise TypeError(f"entry point {ep.value} does not build an executor named {name!r}")
        executors[name] = executor
    return executors
