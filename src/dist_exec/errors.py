"""One exception tree for dist-exec, each class carrying its gRPC status code.

    DistExecError                 INTERNAL
    ├── InvalidTaskSpec           INVALID_ARGUMENT   bad field, payload or task type
    ├── JobNotFound               NOT_FOUND
    ├── JobAlreadyFinished        FAILED_PRECONDITION  cancel of a job that has ended
    ├── ResourceExhausted         RESOURCE_EXHAUSTED   queue full, worker full
    │   ├── RateLimited           RESOURCE_EXHAUSTED   over a rate limit (retry-after-ms)
    │   └── StoreFull             RESOURCE_EXHAUSTED   the master's disk is full
    ├── AlreadyExists             ALREADY_EXISTS       idempotency key used for another request
    ├── AddressInUse              ALREADY_EXISTS       a live node registered that address
    ├── PolicyDenied              PERMISSION_DENIED    command refused by the command policy
    ├── AccessDenied              PERMISSION_DENIED    the caller's role may not do this
    ├── Unauthenticated           UNAUTHENTICATED      missing or invalid credentials
    ├── NoMatchingNode            FAILED_PRECONDITION  broadcast with no healthy matching node
    ├── WorkerDraining            FAILED_PRECONDITION  worker takes no new tasks
    ├── TaskNotFound              NOT_FOUND            worker does not hold that attempt
    ├── FollowerTooSlow           ABORTED              output stream fell behind; resume
    └── MasterUnavailable         UNAVAILABLE          client could not reach the master
        └── StoreUnavailable      UNAVAILABLE          the master cannot write its database

Servicers raise these; ``grpc_errors`` turns them into ``context.abort`` in one place, and the
SDK turns an ``AioRpcError`` back into the matching class with ``from_rpc_error``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, cast

import grpc
import grpc.aio

P = ParamSpec("P")
R = TypeVar("R")
log = logging.getLogger(__name__)


class DistExecError(Exception):
    """Root of all dist-exec errors; INTERNAL when nothing more specific applies."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Extra machine-readable detail sent with the status (e.g. retry-after-ms)."""
        return ()


class InvalidTaskSpec(DistExecError):
    """A submission or request field is malformed or out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class JobNotFound(DistExecError):
    """No job has that id."""

    code = grpc.StatusCode.NOT_FOUND


class JobAlreadyFinished(DistExecError):
    """The job has ended, so it cannot be cancelled."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(DistExecError):
    """A queue or rate limit is full; try again later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RateLimited(ResourceExhausted):
    """Over the client's rate limit; ``retry_after_s`` says when a retry would fit."""

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((RETRY_AFTER_KEY, str(math.ceil(self.retry_after_s * 1000))),)


class StoreFull(ResourceExhausted):
    """The master's database cannot grow: its disk (or SQLite's size limit) is full."""

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((STORE_KEY, "full"),)


class AlreadyExists(DistExecError):
    """The idempotency key was used for a different request."""

    code = grpc.StatusCode.ALREADY_EXISTS


class AddressInUse(DistExecError):
    """A worker registers an address another live node holds."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PolicyDenied(DistExecError):
    """The command policy (allowed / blocked commands) refuses this command."""

    code = grpc.StatusCode.PERMISSION_DENIED


class AccessDenied(DistExecError):
    """The caller is known, but its role (or ownership) does not allow the request."""

    code = grpc.StatusCode.PERMISSION_DENIED

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((ACCESS_DENIED_KEY, "role"),)


class Unauthenticated(DistExecError):
    """No credentials, or credentials the server does not accept."""

    code = grpc.StatusCode.UNAUTHENTICATED


class NoMatchingNode(DistExecError):
    """No healthy node can run the task now (a broadcast needs at least one)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class StaleStart(DistExecError):
    """A new attempt reached the worker after the master stopped waiting for it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class WorkerDraining(DistExecError):
    """The worker is shutting down and takes no new tasks."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class TaskNotFound(DistExecError):
    """The worker holds no attempt with that task id."""

    code = grpc.StatusCode.NOT_FOUND


class FollowerTooSlow(DistExecError):
    """An output stream fell too far behind its job; the client resumes from its offsets."""

    code = grpc.StatusCode.ABORTED


class MasterUnavailable(DistExecError):
    """The client could not reach the master."""

    code = grpc.StatusCode.UNAVAILABLE


class MasterTimeout(MasterUnavailable):
    """The master did not answer in time, or gave up on the call (its deadline passed while it
    was busy): what was asked may or may not have been done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StoreUnavailable(MasterUnavailable):
    """The master runs, but cannot write its database now (an I/O error, a lock held too
    long, a read-only file system): what it accepted stays safe; try again later."""

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((STORE_KEY, "unavailable"),)


_BY_CODE: dict[grpc.StatusCode, type[DistExecError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidTaskSpec,
    grpc.StatusCode.NOT_FOUND: JobNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: JobAlreadyFinished,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: MasterUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: MasterTimeout,
    grpc.StatusCode.CANCELLED: MasterTimeout,
    grpc.StatusCode.ABORTED: FollowerTooSlow,
    grpc.StatusCode.PERMISSION_DENIED: PolicyDenied,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}
ACCESS_DENIED_KEY = "dist-exec-denied"  # trailing metadata telling AccessDenied from PolicyDenied
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of RateLimited
STORE_KEY = "dist-exec-store"  # trailing metadata: the master's database failed, not the call


MAX_MESSAGE_CHARS = 1000  # a status message travels in a header: keep it well under 8 KiB


def shorten(value: str, limit: int = 60) -> str:
    """A value quoted in an error message, cut short when it is long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[0]} ({len(value)} chars)"


def cap_message(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."


def from_rpc_error(err: grpc.aio.AioRpcError, address: str = "") -> DistExecError:
    """The client-side twin of ``grpc_errors``: one class per status code."""
    code = err.code()
    details = err.details() or code.name
    trailers = dict(err.trailing_metadata() or ())
    if STORE_KEY in trailers:  # the master answered: its message says what is wrong
        store_error = (
            StoreFull(details) if trailers[STORE_KEY] == "full" else StoreUnavailable(details)
        )
        store_error.code = code
        return store_error
    if code == grpc.StatusCode.UNAVAILABLE and address and details.startswith("Stream removed"):
        details = (
            f"lost the connection to the master at {address} during the call ({details}): "
            "the master stopped or the network broke; what was asked may or may not have been "
            "done"
        )
    elif code == grpc.StatusCode.UNAVAILABLE and address:
        reason = details.rsplit(": ", 1)[-1]
        details = (
            f"cannot reach the master at {address} ({reason}); is it running? "
            "Point to it with --master or DIST_EXEC_MASTER"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"the master at {address or '?'} did not answer in time"
    elif code == grpc.StatusCode.CANCELLED:  # (by the server: a call cancelled here raises)
        details = (
            f"the master at {address or '?'} gave up on the call ({details}): its deadline "
            "passed while it was busy, or it is stopping; what was asked may or may not have "
            "been done"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and RETRY_AFTER_KEY in trailers:
        with contextlib.suppress(ValueError):
            limited = RateLimited(details, int(trailers[RETRY_AFTER_KEY]) / 1000)
            limited.code = code
            return limited
    cls = _BY_CODE.get(code, DistExecError)
    if code == grpc.StatusCode.PERMISSION_DENIED and ACCESS_DENIED_KEY in trailers:
        cls = AccessDenied
    exc = cls(details)
    exc.code = code
    return exc


def grpc_errors(
    fn: Callable[P, Awaitable[R]],
) -> Callable[P, Awaitable[R]]:
    """Decorate a unary servicer method: DistExecError -> the matching status and message."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:
            failure = _failure(fn, exc, args)
        context = _context(args)
        del args, kwargs  # (see _abort)
        await _abort(context, *failure)
        raise AssertionError("abort returned")  # (it raises)

    return wrapper


def grpc_stream_errors(
    fn: Callable[P, AsyncGenerator[R, None]],
) -> Callable[P, AsyncIterator[R]]:
    """The same for server-streaming methods."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[R]:
        try:
            # aclosing: a cancelled RPC runs the inner generator's cleanup now, not at GC time.
            async with contextlib.aclosing(fn(*args, **kwargs)) as items:
                async for item in items:
                    yield item
            return
        except Exception as exc:
            failure = _failure(fn, exc, args)
        context = _context(args)
        del args, kwargs  # (see _abort)
        await _abort(context, *failure)

    return wrapper


Failure = tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]


def _failure(fn: Callable[..., object], exc: Exception, args: tuple[Any, ...]) -> Failure:
    """What a servicer's exception is told to its caller: a DistExecError as its status and
    message, anything else as INTERNAL (and logged)."""
    if isinstance(exc, DistExecError):
        return exc.code, cap_message(exc.message), tuple(exc.trailing_metadata)
    log.exception("internal error in %s", fn.__name__, exc_info=exc)
    return grpc.StatusCode.INTERNAL, cap_message(_internal_message(fn, exc, args)), ()


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    message: str,
    trailing: tuple[tuple[str, str], ...],
) -> None:
    """Abort the call. Outside the ``except`` and without the request: the abort's exception
    stays with the call's state, which the call's context refers back to; a cycle through
    it that reached the request (its frames, or the servicer's exception) kept a refused
    request of up to 64 MiB in memory until a garbage collection, which a server that sees
    few but large requests hardly runs."""
    if trailing:
        context.set_trailing_metadata(trailing)
    await context.abort(code, message)


def _context(args: tuple[Any, ...]) -> grpc.aio.ServicerContext[Any, Any]:
    # Servicer methods are (self, request, context).
    return cast("grpc.aio.ServicerContext[Any, Any]", args[-1])


def _internal_message(fn: Callable[..., object], exc: Exception, args: tuple[Any, ...]) -> str:
    job_id = getattr(args[-2], "job_id", "") if len(args) >= 2 else ""
    about = f" for job {job_id}" if job_id else ""
    return (
        f"internal error in {fn.__name__}{about}: {type(exc).__name__}: {exc} (see the server log)"
    )
