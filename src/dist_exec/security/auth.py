"""Authentication and authorization of every RPC, in one gRPC server interceptor.

The interceptor wraps each method's handler:

1. A request that does not parse (say, invalid UTF-8 in a string field) is INVALID_ARGUMENT,
   not the INTERNAL or UNKNOWN gRPC would give it.
2. The caller is identified: a bearer token (``authorization: Bearer dxt_...``) names it when
   one is sent; else the verified TLS client certificate does (common name and role); else, on
   a server that requires no authentication (plain loopback, no tokens file), it is the local
   admin. Nothing valid: UNAUTHENTICATED.
3. The method's rule decides whether the role may call it: PERMISSION_DENIED if not.
4. The identity is available to the servicer through ``current_identity()`` for the checks that
   depend on the request (a job's owner, the worker id a worker registers as).

Refusals are written to the audit log when there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, NoReturn

import grpc
import grpc.aio

from dist_exec.errors import AccessDenied, DistExecError, InvalidTaskSpec, Unauthenticated
from dist_exec.security.audit import AuditLog
from dist_exec.security.call_proof import PROOF, CallProof, Metadata, header
from dist_exec.security.certs import identity_of
from dist_exec.security.identity import LOCAL, Identity, Role
from dist_exec.security.tls import peer_cert_pem
from dist_exec.security.tokens import TokenStore

Context = grpc.aio.ServicerContext[Any, Any]
_CURRENT: contextvars.ContextVar[Identity] = contextvars.ContextVar("dist_exec_identity")
ANY_CLIENT = frozenset({Role.ADMIN, Role.SUBMIT, Role.READ})
SUBMITTERS = frozenset({Role.ADMIN, Role.SUBMIT})
ADMINS = frozenset({Role.ADMIN})
WORKERS = frozenset({Role.WORKER, Role.WORKERS})
MASTERS = frozenset({Role.MASTER})
REFUSED_DRAIN_S = 0.25  # see _drain
REFUSED_DRAIN_BYTES = 256 * 1024
_M = "/distexec.v1.MasterService/"
_R = "/distexec.v1.RegistrationService/"
_W = "/distexec.v1.WorkerService/"
MASTER_RULES: dict[str, frozenset[Role]] = {
    _M + "Submit": SUBMITTERS,
    _M + "SubmitBatch": SUBMITTERS,
    _M + "SubmitBroadcast": SUBMITTERS,
    _M + "RunJobs": SUBMITTERS,
    _M + "RunSession": SUBMITTERS,
    _M + "Cancel": SUBMITTERS,  # a submitter only its own jobs (checked by the servicer)
    _M + "GetStatus": ANY_CLIENT,  # likewise
    _M + "StreamOutput": ANY_CLIENT,
    _M + "WatchJobs": ANY_CLIENT,
    _M + "ListJobs": ANY_CLIENT,  # a submitter sees only its own
    _M + "ListNodes": ANY_CLIENT,
    _M + "AuthDrainNode": ADMINS,
    _M + "AuthWhoAmI": frozenset(Role),
    _R + "Register": WORKERS,
    _R + "Heartbeat": WORKERS,
    _R + "Deregister": WORKERS,
}
WORKER_RULES: dict[str, frozenset[Role]] = {
    _W + "Execute": MASTERS,
    _W + "ExecuteStream": MASTERS,
    _W + "Dispatch": MASTERS,
    _W + "CancelTask": MASTERS,
    _W + "GetWorkerStatus": MASTERS,
}


WORKER_CALLERS = (
    "a worker serves its master only (the master's certificate, or the token the worker gave "
    "it when it registered)"
)


def current_identity() -> Identity:
    """The caller of the RPC being served (the local admin outside an intercepted call)."""
    return _CURRENT.get(LOCAL)


def peer_address(context: Context) -> str:
    """'ipv4:127.0.0.1:51234' -> '127.0.0.1:51234'."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    return rest if kind in ("ipv4", "ipv6") else peer


class Authenticator:
    """Turns a call's credentials into an Identity."""

    def __init__(
        self, tokens: TokenStore | None, tls: bool, proof: CallProof | None = None
    ) -> None:
        """``proof``: a worker's call token, which identifies the master (it gave it the token
        when it registered): proved (see ``call_proof``), or sent as a bearer token by hand."""
        self.tokens = tokens
        self.tls = tls
        self.proof = proof

    @property
    def required(self) -> bool:
        return (
            self.tls
            or self.proof is not None
            or (self.tokens is not None and self.tokens.configured)
        )

    def identify(self, context: Context) -> Identity:
        peer = peer_address(context)
        known = self.by_metadata(context.invocation_metadata(), peer)
        if known is not None:
            return known
        pem = peer_cert_pem(context)
        if pem is not None:
            name, role = identity_of(pem)
            try:
                parsed = Role(role)
            except ValueError:
                parsed = Role.CLIENT
            if parsed == Role.CLIENT:
                raise Unauthenticated(
                    f"certificate {name!r} carries no role; send a token (--token or "
                    "DIST_EXEC_TOKEN)"
                )
            return Identity(name, parsed, "cert", peer)
        return self._without_credentials(peer)

    def by_metadata(self, metadata: Iterable[tuple[str, Any]] | None, peer: str) -> Identity | None:
        """The caller as its metadata alone tells (a token, or no credentials where TLS is not
        used); None when only its certificate can tell. Raises Unauthenticated."""
        if self.proof is not None and (proof := header(metadata, PROOF)) is not None:
            if self.proof.checked(proof) is None:
                raise Unauthenticated(WORKER_CALLERS + ": its proof is not of the token it gave")
            return Identity("master", Role.MASTER, "proof", peer)
        authorization = header(metadata, "authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("malformed authorization header: expected 'Bearer TOKEN'")
            if self.proof is not None and hmac.compare_digest(
                token.strip().encode(), self.proof.token.encode()
            ):
                return Identity("master", Role.MASTER, "token", peer)
            if self.tokens is None and self.proof is not None:
                raise Unauthenticated(WORKER_CALLERS + ": this token is not the one it gave")
            entry = self.tokens.lookup(token.strip()) if self.tokens is not None else None
            if entry is None:
                raise Unauthenticated("invalid token: it is not (or no longer) known to the master")
            return Identity(entry.name, entry.role, "token", peer)
        return None if self.tls else self._without_credentials(peer)

    def answer(self, metadata: Iterable[tuple[str, Any]] | None) -> Metadata:
        """A worker's initial metadata for an admitted call: its answer to a master's proof."""
        if self.proof is None or (proof := header(metadata, PROOF)) is None:
            return ()
        nonce = self.proof.checked(proof)
        return self.proof.answer(nonce) if nonce is not None else ()

    def _without_credentials(self, peer: str) -> Identity:
        if self.tokens is None and self.proof is not None:
            raise Unauthenticated(WORKER_CALLERS)
        if self.required:
            raise Unauthenticated(
                "no credentials: pass a token (--token or DIST_EXEC_TOKEN) or a client "
                "certificate (--cert/--key)"
            )
        return Identity(LOCAL.name, LOCAL.role, LOCAL.via, peer)


class _Malformed:
    """Stands in for a request that did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Malformed(exc)

    return parse


async def _drain(requests: AsyncIterator[bytes]) -> None:
    """Read and drop (unparsed) what a refused client sends, until it half-closes: for at
    most REFUSED_DRAIN_S and REFUSED_DRAIN_BYTES (one that keeps its stream open waits that
    long for its refusal)."""
    messages = aiter(requests)
    with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
        async with asyncio.timeout(REFUSED_DRAIN_S):
            taken, data = 0, b""
            async for data in messages:
                taken += len(data)
                if taken >= REFUSED_DRAIN_BYTES:
                    break
            del data
    close = getattr(messages, "aclose", None)
    if close is not None:  # (gRPC's generator holds the last message while it waits)
        with contextlib.suppress(Exception):
            await close()


async def _parsed(
    requests: AsyncIterator[bytes], method: str, parse: Callable[[bytes], Any] | None
) -> AsyncIterator[Any]:
    """The messages of a request stream (parsed only once the caller is let in); one that
    did not parse ends it with an error the servicer reports as INVALID_ARGUMENT."""
    async for data in requests:
        request = parse(data) if parse is not None else data
        if isinstance(request, _Malformed):
            raise InvalidTaskSpec(_malformed_message(method, request))
        yield request


def _malformed_message(method: str, request: _Malformed) -> str:
    return (
        f"malformed request to {method}: {type(request.error).__name__}: "
        f"{str(request.error)[:200]} (a string field must be valid UTF-8)"
    )


class SecurityInterceptor(grpc.aio.ServerInterceptor):
    """See the module docstring. ``rules`` maps full method names to the roles that may call
    them; methods without a rule (health, reflection) need no credentials."""

    def __init__(
        self,
        authenticator: Authenticator,
        rules: Mapping[str, frozenset[Role]],
        audit: AuditLog | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.rules = rules
        self.audit = audit
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}  # one per method
        self._refusals: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}  # one per method

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None or (handler.request_streaming and handler.stream_stream is None):
                return handler
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        if self._refused_early(method, details.invocation_metadata):
            return self._refusal(method, wrapped.request_streaming)
        return wrapped

    def _refused_early(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        """Whether the call's metadata alone is enough to refuse it (a token missing, unknown
        or of the wrong role; not where a certificate may still tell who calls)."""
        rule = self.rules.get(method)
        if rule is None:
            return False
        try:
            identity = self.authenticator.by_metadata(metadata, "")
        except DistExecError:
            return True
        return identity is not None and identity.via != "none" and identity.role not in rule

    def _refusal(self, method: str, streaming: bool) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler for a call refused on its metadata, whatever kind of call it is: a
        stream, so that a unary call is refused without its request being received (it
        would be, up to the 64 MiB a message may have, before a unary handler runs). A
        stream of requests is drained first (see ``_drain``)."""
        refusal = self._refusals.get(method)
        if refusal is None:
            rule = self.rules.get(method)

            async def refuse(requests: AsyncIterator[bytes], context: Context) -> None:
                denied = self._check(method, rule, context)
                if denied is None:  # (the tokens file changed meanwhile)
                    denied = None, Unauthenticated("credentials changed during the call; try again")
                if streaming:
                    await _drain(requests)
                del requests
                await self._refuse(method, denied, context)

            refusal = self._refusals[method] = grpc.stream_stream_rpc_method_handler(refuse)
        return refusal

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        rule = self.rules.get(method)
        deserialize = _lenient(handler.request_deserializer)
        # grpc.aio servicers are coroutines and async generators; the stubs type them as sync.
        # A streaming one may also be a coroutine that sends with ``context.write`` (as
        # grpcio-health-checking's Health.Watch does): it is wrapped as one.
        inner: Any = handler.unary_unary or handler.unary_stream or handler.stream_stream
        if handler.stream_stream is not None:

            async def let_in(requests: AsyncIterator[Any], context: Context) -> None:
                denied = self._check(method, rule, context)
                if denied is not None:
                    # A client that half-closes while the refusal is on its way may be told
                    # INTERNAL ("Internal error from Core") instead: take what it sends
                    # until it half-closes, for a moment, then refuse.
                    await _drain(requests)
                    await self._refuse(method, denied, context)
                await self._answer(context)

            async def bidi(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
                await let_in(requests, context)
                async for item in inner(_parsed(requests, method, deserialize), context):
                    yield item

            async def bidi_by_writes(requests: AsyncIterator[Any], context: Context) -> None:
                await let_in(requests, context)
                await inner(_parsed(requests, method, deserialize), context)

            return grpc.stream_stream_rpc_method_handler(
                bidi if inspect.isasyncgenfunction(inner) else bidi_by_writes,
                None,  # (bytes: parsed by _parsed, after the check)
                handler.response_serializer,
            )
        if handler.unary_unary is not None:

            async def unary(data: bytes, context: Context) -> Any:
                box = [data]
                del data  # (only the box holds it: see _enter)
                return await inner(
                    await self._enter(method, rule, box, deserialize, context), context
                )

            return grpc.unary_unary_rpc_method_handler(
                unary,
                None,  # (bytes: parsed by _enter, after the check)
                handler.response_serializer,
            )

        async def stream(data: bytes, context: Context) -> AsyncIterator[Any]:
            box = [data]
            del data  # (only the box holds it: see _enter)
            async for item in inner(
                await self._enter(method, rule, box, deserialize, context), context
            ):
                yield item

        async def stream_by_writes(data: bytes, context: Context) -> None:
            box = [data]
            del data
            await inner(await self._enter(method, rule, box, deserialize, context), context)

        return grpc.unary_stream_rpc_method_handler(
            stream if inspect.isasyncgenfunction(inner) else stream_by_writes,
            None,  # (bytes: parsed by _enter, after the check)
            handler.response_serializer,
        )

    async def _enter(
        self,
        method: str,
        rule: frozenset[Role] | None,
        data: list[bytes],
        parse: Callable[[bytes], Any] | None,
        context: Context,
    ) -> Any:
        """Check the call, then parse its request (``data``, taken from the list: a refused
        one is let go before the refusal, so nothing it sent outlives it). Sets the identity
        for the servicer (each RPC runs in its own task, with its own copy of the context, so
        nothing leaks to other calls)."""
        denied = self._check(method, rule, context)
        if denied is not None:
            data.clear()
            await self._refuse(method, denied, context)
        await self._answer(context)
        raw = data.pop()
        request = parse(raw) if parse is not None else raw
        del raw
        if isinstance(request, _Malformed):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, _malformed_message(method, request)
            )
        return request

    async def _answer(self, context: Context) -> None:
        """A worker answers a master's proof before anything else (see ``call_proof``)."""
        if self.authenticator.proof is not None:
            answer = self.authenticator.answer(context.invocation_metadata())
            if answer:
                await context.send_initial_metadata(answer)

    def _check(
        self, method: str, rule: frozenset[Role] | None, context: Context
    ) -> tuple[Identity | None, DistExecError] | None:
        """None when the call may go on (its identity set for the servicer); else who called
        (if known) and why it is refused."""
        identity: Identity | None = None
        try:
            identity = (
                self.authenticator.identify(context)
                if rule is not None
                else Identity(LOCAL.name, LOCAL.role, "none", peer_address(context))
            )
            if rule is not None and identity.via != "none" and identity.role not in rule:
                allowed = ", ".join(sorted(r.value for r in rule))
                raise AccessDenied(
                    f"{identity.name} has the role {identity.role.value}; "
                    f"{method.rsplit('/', 1)[-1]} needs {allowed}"
                )
        except DistExecError as exc:
            return identity, exc
        _CURRENT.set(identity)
        return None

    async def _refuse(
        self, method: str, denied: tuple[Identity | None, DistExecError], context: Context
    ) -> NoReturn:
        identity, exc = denied
        if self.audit is not None:
            self.audit.record(
                method.rsplit("/", 1)[-1], identity, "denied", exc.message,
                peer=peer_address(context),
            )  # fmt: skip
        if exc.trailing_metadata:
            context.set_trailing_metadata(exc.trailing_metadata)
        await context.abort(exc.code, exc.message)
        raise AssertionError("abort returned")  # (it raises)
