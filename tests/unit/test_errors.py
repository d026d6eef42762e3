"""The exception tree: one gRPC status code per class, and the client-side mapping back."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from dist_exec.client import Client
from dist_exec.errors import (
    ACCESS_DENIED_KEY,
    STORE_KEY,
    AccessDenied,
    AddressInUse,
    AlreadyExists,
    DistExecError,
    FollowerTooSlow,
    InvalidTaskSpec,
    JobAlreadyFinished,
    JobNotFound,
    MasterTimeout,
    MasterUnavailable,
    NoMatchingNode,
    PolicyDenied,
    RateLimited,
    ResourceExhausted,
    StaleStart,
    StoreFull,
    StoreUnavailable,
    TaskNotFound,
    Unauthenticated,
    WorkerDraining,
    from_rpc_error,
    shorten,
)

Code = grpc.StatusCode

EXPECTED_CODES: dict[type[DistExecError], grpc.StatusCode] = {
    DistExecError: Code.INTERNAL,
    InvalidTaskSpec: Code.INVALID_ARGUMENT,
    JobNotFound: Code.NOT_FOUND,
    JobAlreadyFinished: Code.FAILED_PRECONDITION,
    ResourceExhausted: Code.RESOURCE_EXHAUSTED,
    StaleStart: Code.FAILED_PRECONDITION,
    WorkerDraining: Code.FAILED_PRECONDITION,
    TaskNotFound: Code.NOT_FOUND,
    FollowerTooSlow: Code.ABORTED,
    AlreadyExists: Code.ALREADY_EXISTS,
    AddressInUse: Code.ALREADY_EXISTS,
    NoMatchingNode: Code.FAILED_PRECONDITION,
    RateLimited: Code.RESOURCE_EXHAUSTED,
    PolicyDenied: Code.PERMISSION_DENIED,
    MasterUnavailable: Code.UNAVAILABLE,
    MasterTimeout: Code.DEADLINE_EXCEEDED,
    StoreUnavailable: Code.UNAVAILABLE,
    StoreFull: Code.RESOURCE_EXHAUSTED,
    AccessDenied: Code.PERMISSION_DENIED,
    Unauthenticated: Code.UNAUTHENTICATED,
}


def all_subclasses(cls: type[DistExecError]) -> set[type[DistExecError]]:
    found: set[type[DistExecError]] = set()
    for sub in cls.__subclasses__():
        found |= {sub, *all_subclasses(sub)}
    return found


def rpc_error(
    code: grpc.StatusCode, details: str | None = "details", trailers: tuple[str, str] | None = None
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(*([trailers] if trailers else [])),
        details=details,
    )


def test_every_error_class_is_listed() -> None:
    assert all_subclasses(DistExecError) | {DistExecError} == set(EXPECTED_CODES)


@pytest.mark.parametrize(
    ("cls", "code"),
    [pytest.param(cls, code, id=cls.__name__) for cls, code in EXPECTED_CODES.items()],
)
def test_each_class_has_its_code(cls: type[DistExecError], code: grpc.StatusCode) -> None:
    assert cls.code is code
    exc = cls("what went wrong")
    assert exc.code is code
    assert exc.message == "what went wrong"
    assert str(exc) == "what went wrong"
    assert isinstance(exc, DistExecError)


def test_specific_classes_are_not_internal() -> None:
    for cls in all_subclasses(DistExecError):
        assert isinstance(cls.code, grpc.StatusCode)
        assert cls.code is not Code.INTERNAL, cls
        assert cls.code is not Code.OK, cls


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (Code.INVALID_ARGUMENT, InvalidTaskSpec),
        (Code.NOT_FOUND, JobNotFound),
        (Code.FAILED_PRECONDITION, JobAlreadyFinished),
        (Code.RESOURCE_EXHAUSTED, ResourceExhausted),
        (Code.UNAVAILABLE, MasterUnavailable),
        (Code.INTERNAL, DistExecError),
        (Code.PERMISSION_DENIED, PolicyDenied),
        (Code.UNAUTHENTICATED, Unauthenticated),
        (Code.UNKNOWN, DistExecError),
        (Code.UNIMPLEMENTED, DistExecError),
    ],
)
def test_from_rpc_error_maps_codes(code: grpc.StatusCode, cls: type[DistExecError]) -> None:
    exc = from_rpc_error(rpc_error(code, "job 42: it broke"))
    assert type(exc) is cls
    assert exc.code is code
    assert exc.message == "job 42: it broke"


def test_an_access_refusal_is_told_from_the_command_policy_by_its_trailer() -> None:
    exc = from_rpc_error(
        rpc_error(Code.PERMISSION_DENIED, "no", AccessDenied("x").trailing_metadata[0])
    )
    assert type(exc) is AccessDenied
    assert AccessDenied("x").trailing_metadata == ((ACCESS_DENIED_KEY, "role"),)


@pytest.mark.parametrize("cls", [pytest.param(cls, id=cls.__name__) for cls in EXPECTED_CODES])
def test_code_survives_the_round_trip(cls: type[DistExecError]) -> None:
    # What a servicer raises reaches the client as an error with the same status code.
    exc = from_rpc_error(rpc_error(cls.code, "msg"))
    assert exc.code is cls.code
    assert type(exc).code is cls.code


def test_code_on_one_error_does_not_leak_into_its_class() -> None:
    exc = from_rpc_error(rpc_error(Code.UNAUTHENTICATED))
    assert exc.code is Code.UNAUTHENTICATED
    assert DistExecError.code is Code.INTERNAL
    assert DistExecError("x").code is Code.INTERNAL


def test_missing_details_fall_back_to_the_code_name() -> None:
    assert from_rpc_error(rpc_error(Code.NOT_FOUND, None)).message == "NOT_FOUND"
    assert from_rpc_error(rpc_error(Code.NOT_FOUND, "")).message == "NOT_FOUND"


def test_unavailable_names_the_address() -> None:
    exc = from_rpc_error(
        rpc_error(Code.UNAVAILABLE, "failed to connect to all addresses: Connection refused"),
        address="10.1.2.3:50051",
    )
    assert isinstance(exc, MasterUnavailable)
    assert "cannot reach the master at 10.1.2.3:50051" in exc.message
    assert "Connection refused" in exc.message


@pytest.mark.parametrize("cls", [StoreUnavailable, StoreFull])
def test_a_master_that_cannot_write_its_database_is_not_called_unreachable(
    cls: type[DistExecError],
) -> None:
    """The master answered: its message says what is wrong with its database, where a
    transport failure would get "cannot reach the master"."""
    sent = cls("the master cannot write its database /d/master.db: disk I/O error")
    assert sent.trailing_metadata[0][0] == STORE_KEY
    exc = from_rpc_error(rpc_error(cls.code, sent.message, sent.trailing_metadata[0]), "h:1")
    assert type(exc) is cls
    assert exc.code is cls.code
    assert exc.message == sent.message
    assert isinstance(exc, MasterUnavailable if cls is StoreUnavailable else ResourceExhausted)


def test_unavailable_without_address_keeps_details() -> None:
    exc = from_rpc_error(rpc_error(Code.UNAVAILABLE, "Connection refused"))
    assert exc.message == "Connection refused"


@pytest.mark.parametrize(("address", "shown"), [("10.1.2.3:50051", "10.1.2.3:50051"), ("", "?")])
def test_deadline_exceeded(address: str, shown: str) -> None:
    exc = from_rpc_error(rpc_error(Code.DEADLINE_EXCEEDED, "Deadline Exceeded"), address)
    assert type(exc) is MasterTimeout
    assert isinstance(exc, MasterUnavailable)  # (what a script catches for "try again")
    assert exc.code is Code.DEADLINE_EXCEEDED
    assert exc.message == f"the master at {shown} did not answer in time"


def test_shorten_keeps_short_values() -> None:
    assert shorten("abc") == "'abc'"
    assert shorten("x" * 58) == repr("x" * 58)


def test_shorten_cuts_long_values() -> None:
    short = shorten("y" * 10_000)
    assert short.startswith("'yyyy")
    assert "...'" in short
    assert short.endswith("(10000 chars)")
    assert len(short) < 80


@pytest.mark.parametrize(
    ("details", "unauthenticated"),
    [
        # (what gRPC says: a plain client at a master that requires TLS; a master gone mid-call)
        (
            "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:h:1: Socket closed",
            True,
        ),
        ("Stream removed (Socket closed)", False),
    ],
)
def test_a_master_lost_during_a_call_is_not_a_credentials_problem(
    details: str, unauthenticated: bool
) -> None:
    """A master SIGKILLed during a cancel made the client say "not authenticated: it requires
    TLS" (exit 3): every "Socket closed" was taken for a TLS master refusing a plain client."""
    exc = Client("h:1")._error(rpc_error(Code.UNAVAILABLE, details))
    assert isinstance(exc, Unauthenticated) is unauthenticated
    if not unauthenticated:
        assert isinstance(exc, MasterUnavailable)
        assert exc.message.startswith("lost the connection to the master at h:1 during the call")


def test_a_master_that_gave_up_on_a_call_is_a_timeout() -> None:
    """CANCELLED from a master whose deadline for the call passed while it was busy (a call
    cancelled by the client raises CancelledError instead) came as DistExecError('CANCELLED'),
    which said nothing a person could act on and `except MasterUnavailable` did not catch."""
    exc = from_rpc_error(rpc_error(Code.CANCELLED, "CANCELLED"), "m:1")
    assert type(exc) is MasterTimeout
    assert exc.code is Code.CANCELLED
    assert "the master at m:1 gave up on the call (CANCELLED)" in exc.message


def test_a_rate_limit_says_when_to_try_again() -> None:
    trailing = grpc.aio.Metadata(*RateLimited("over", 1.25).trailing_metadata)
    error = from_rpc_error(
        grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), trailing, "over"
        )
    )
    assert isinstance(error, RateLimited)
    assert error.retry_after_s == 1.25
