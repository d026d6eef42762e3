"""The "http" executor: one HTTP request per task; the status is the exit code, the body the output.

Payload (JSON): {"method": str, "url": str, "headers": {str: str}, "body": str,
"timeout_seconds": number}. Only "url" is required; "method" defaults to GET. The response body
is streamed to stdout as it arrives and read up to ``max_body_bytes``; 2xx and 3xx statuses are
SUCCESS, anything else FAILURE. Response headers, the status and timings go into the outcome's
metadata (``header.<name>``, ``http.status``, ``http.reason``, ``http.elapsed_ms``, ``http.url``).

Redirects are followed (at most ``MAX_REDIRECTS``), and only to the allowed schemes. Each
attempt uses its own ``ClientSession``, closed when the attempt ends, however it ends: nothing
is shared between tasks.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
from yarl import URL

from dist_exec import __version__
from dist_exec.config import format_duration, parse_size
from dist_exec.errors import InvalidTaskSpec, shorten
from dist_exec.executors import ExecRequest, OutputSink, json_payload
from dist_exec.models import ExecOutcome, ExecStatus, Stream
from dist_exec.security.audit import SECRET_NAME

READ_CHUNK = 64 * 1024
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 24 * 3600.0  # the most a payload's timeout_seconds may ask for
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DNS_THREADS = 8  # lookups at once, per worker (more wait for one of these)
MAX_REDIRECTS = 10  # aiohttp's default: the 10th redirect response is an error
MAX_URL_CHARS = 8192
MAX_METHOD_CHARS = 32
SCHEMES = frozenset({"http", "https"})
KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
USER_AGENT = f"dist-exec/{__version__}"
_FIELDS = {"method", "url", "headers", "body", "timeout_seconds"}
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 field name
_HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls, except tab
_IPV4 = re.compile(r"[0-9.]+")
_URL_BAD = re.compile(r"[\x00-\x20\x7f]")  # controls and spaces: percent-encode them
# aiohttp derives these from the body; a second, different value would corrupt the request.
_FRAMING_HEADERS = {"content-length", "transfer-encoding"}


@dataclass(frozen=True, slots=True)
class HttpSpec:
    url: str
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    timeout_seconds: float | None = None  # None: the executor's default

    def to_payload(self) -> bytes:
        data: dict[str, object] = {"url": self.url}
        if self.method != "GET":
            data["method"] = self.method
        if self.headers:
            data["headers"] = self.headers
        if self.body:
            data["body"] = self.body
        if self.timeout_seconds is not None:
            t = self.timeout_seconds
            data["timeout_seconds"] = int(t) if float(t).is_integer() else t
        return json.dumps(data).encode()


def parse_payload(payload: bytes, allowed_schemes: Iterable[str] = SCHEMES) -> HttpSpec:
    """Decode and check an http payload; InvalidTaskSpec says exactly what is wrong."""
    data = json_payload(payload, "http")
    if not isinstance(data, dict):
        raise InvalidTaskSpec("http payload must be a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise InvalidTaskSpec(
            f"http payload has unknown field(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(_FIELDS))}"
        )
    if "url" not in data:
        raise InvalidTaskSpec("http payload: 'url' is required")
    timeout = data.get("timeout_seconds")
    spec = HttpSpec(
        url=_url(_text(data, "url"), frozenset(allowed_schemes)),
        method=_method(_text(data, "method", "GET")),
        headers=_headers(data.get("headers", {})),
        body=_text(data, "body", ""),
        timeout_seconds=None if "timeout_seconds" not in data else _timeout(timeout),
    )
    if URL(spec.url).user is not None and "authorization" in map(str.lower, spec.headers):
        raise InvalidTaskSpec(
            "http payload: credentials in the 'url' and an Authorization header cannot go "
            "together; give one of them"
        )
    return spec


def _text(data: Mapping[str, object], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise InvalidTaskSpec(f"http payload: {key!r} must be a string")
    _check_unicode(value, repr(key))
    return value


def _check_unicode(value: str, what: str) -> None:
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidTaskSpec(
            f"http payload: {what} must be valid Unicode (lone surrogate)"
        ) from None


def _method(method: str) -> str:
    if method.upper() in KNOWN_METHODS and method != method.upper():
        raise InvalidTaskSpec(
            f"http payload: 'method' must be uppercase: {method.upper()!r}, not {method!r}"
        )
    if len(method) > MAX_METHOD_CHARS or not _METHOD.fullmatch(method):
        raise InvalidTaskSpec(
            f"http payload: 'method' must be an uppercase HTTP method such as "
            f"{', '.join(KNOWN_METHODS[:5])}; got {shorten(method)}"
        )
    if method == "CONNECT":
        raise InvalidTaskSpec("http payload: method CONNECT is not supported (it opens a tunnel)")
    return method


def _url(url: str, allowed_schemes: frozenset[str]) -> str:
    allowed = " or ".join(sorted(allowed_schemes))
    if not url:
        raise InvalidTaskSpec(f"http payload: 'url' must be an absolute {allowed} URL")
    if len(url) > MAX_URL_CHARS:
        raise InvalidTaskSpec(f"http payload: 'url' is longer than {MAX_URL_CHARS} characters")
    if _URL_BAD.search(url):
        raise InvalidTaskSpec(
            f"http payload: 'url' cannot hold spaces or control characters "
            f"(percent-encode them): {shorten(url)}"
        )
    try:
        parsed = URL(url)
        port = parsed.explicit_port
        host = parsed.host
        ascii_host = parsed.raw_host or ""
    except ValueError as exc:  # (UnicodeError too: a host that is not valid IDNA)
        raise InvalidTaskSpec(
            f"http payload: 'url' {shorten(url)} is not a valid URL: {exc}"
        ) from None
    if parsed.scheme and parsed.scheme not in allowed_schemes:
        raise InvalidTaskSpec(
            f"http payload: 'url' scheme {parsed.scheme!r} is not allowed; use {allowed}"
        )
    if not parsed.scheme or not host:
        raise InvalidTaskSpec(
            f"http payload: 'url' must be an absolute {allowed} URL with a host, "
            f"e.g. https://example.com/path; got {shorten(url)}"
        )
    if port == 0:
        raise InvalidTaskSpec(f"http payload: 'url' port must be 1-65535; got {shorten(url)}")
    _check_host(ascii_host, url)
    for part, value in (("user", parsed.user), ("password", parsed.password)):
        try:
            (value or "").encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidTaskSpec(
                f"http payload: the {part} in 'url' must be Latin-1 text (HTTP Basic); use "
                "an Authorization header for anything else"
            ) from None
    return url


def _check_host(host: str, url: str) -> None:
    """A DNS name a resolver takes: labels of 1-63 characters, 253 in all (an IP address, in
    brackets or not, passes as it is)."""
    if host.startswith("[") or _IPV4.fullmatch(host):
        return
    labels = host.rstrip(".").split(".")
    if len(host.rstrip(".")) > 253 or not all(0 < len(label) <= 63 for label in labels):
        raise InvalidTaskSpec(
            f"http payload: 'url' host is not a valid DNS name (each dot-separated part 1-63 "
            f"characters, 253 in all): {shorten(url)}"
        )


def _headers(headers: object) -> dict[str, str]:
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise InvalidTaskSpec("http payload: 'headers' must map strings to strings")
    seen: set[str] = set()
    for name, value in headers.items():
        _check_unicode(name, "header names")
        _check_unicode(value, f"header {shorten(name)}")
        if not _TOKEN.fullmatch(name):
            raise InvalidTaskSpec(f"http payload: invalid header name {shorten(name)}")
        if _HEADER_VALUE_BAD.search(value):
            raise InvalidTaskSpec(
                f"http payload: header {name} cannot hold CR, LF or other control characters"
            )
        lower = name.lower()
        if lower in _FRAMING_HEADERS:
            raise InvalidTaskSpec(f"http payload: header {name} is set from 'body'; leave it out")
        if lower in seen:
            raise InvalidTaskSpec(
                f"http payload: header {name} is given twice (header names ignore case)"
            )
        seen.add(lower)
    return dict(headers)


def _timeout(value: object) -> float:
    limit = format_duration(MAX_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTaskSpec("http payload: 'timeout_seconds' must be a number of seconds")
    # Compare before converting: a 4000-digit integer does not fit in a float.
    if (isinstance(value, float) and not math.isfinite(value)) or not 0 < value <= MAX_TIMEOUT_S:
        raise InvalidTaskSpec(
            f"http payload: 'timeout_seconds' must be more than 0 and at most {limit} "
            f"({MAX_TIMEOUT_S:.0f}); got {shorten(str(value), 30)}"
        )
    return float(value)


def describe(payload: bytes) -> str:
    """One line for listings: method and URL (without credentials)."""
    try:
        spec = parse_payload(payload)
    except InvalidTaskSpec:
        return "<invalid payload>"
    return f"{spec.method} {_display(URL(spec.url))}"


def _display(url: URL) -> str:
    """A URL for messages, metadata and job lists: user and password left out, and the values
    of query parameters whose names look secret (``?access_token=``) shown as ***."""
    shown = url.with_user(None) if url.user is not None else url
    if any(SECRET_NAME.search(name) for name in shown.query):
        shown = shown.with_query(
            [(k, "***" if SECRET_NAME.search(k) else v) for k, v in shown.query.items()]
        )
    return str(shown)


class _HopRefused(aiohttp.ClientError):
    """A redirect pointed at a scheme this executor does not allow."""

    def __init__(self, url: URL, allowed_schemes: frozenset[str]) -> None:
        super().__init__(url)
        self.url = url
        self.allowed_schemes = allowed_schemes


@dataclass(slots=True)
class _Exchange:
    """What one attempt has learned so far; every way it can end reports from this."""

    url: URL
    allowed_schemes: frozenset[str]
    started: float = field(default_factory=time.monotonic)
    response: aiohttp.ClientResponse | None = None
    elapsed_s: float = 0.0
    body_bytes: int = 0
    truncated: bool = False

    async def check_hop(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """Client middleware: runs for the first request and for every redirect."""
        if request.url.scheme not in self.allowed_schemes:
            raise _HopRefused(request.url, self.allowed_schemes)
        self.url = request.url
        return await handler(request)

    def metadata(self, max_body_bytes: int) -> dict[str, str]:
        meta = {"http.url": _display(self.url)}
        if self.response is not None:
            meta["http.redirects"] = str(len(self.response.history))
            for name in self.response.headers:
                key = f"header.{name.lower()}"
                if key not in meta:  # repeated headers: one entry, values joined as RFC 9110 allows
                    meta[_received(key)] = _received(", ".join(self.response.headers.getall(name)))
            meta["http.status"] = str(self.response.status)
            meta["http.reason"] = _received(self.response.reason or "")
            meta["http.elapsed_ms"] = str(round(self.elapsed_s * 1000))
            meta["http.body_bytes"] = str(self.body_bytes)
        if self.truncated:
            meta["truncated"] = "true"
            meta["http.max_body_bytes"] = str(max_body_bytes)
        return meta

    def duration_s(self) -> float:
        return time.monotonic() - self.started


class HttpExecutor:
    """Makes one HTTP request per task with aiohttp."""

    name = "http"

    def __init__(self, options: Mapping[str, object] | None = None) -> None:
        opts = options or {}
        self.timeout_s = _timeout_option(opts.get("timeout_s", DEFAULT_TIMEOUT_S))
        self.max_body_bytes = _size_option(opts.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES))
        self.allowed_schemes = _schemes_option(opts.get("allowed_schemes", SCHEMES))
        self._dns_threads = ThreadPoolExecutor(DNS_THREADS, "http-dns")  # (started on demand)

    def validate(self, payload: bytes) -> None:
        parse_payload(payload, self.allowed_schemes)

    def _resolver(self) -> aiohttp.abc.AbstractResolver:
        """aiohttp's threaded resolver, its lookups in this executor's own threads: a lookup
        can hang past its job's end (a resolver that does not answer), and must not take the
        loop's default threads, which the worker's kills of stopped commands need."""
        loop = asyncio.get_running_loop()
        lookups = _LookupsIn(loop, self._dns_threads)
        return aiohttp.ThreadedResolver(loop=cast(asyncio.AbstractEventLoop, lookups))

    async def health_check(self) -> bool:
        async with aiohttp.ClientSession():
            return True

    async def execute(self, request: ExecRequest, sink: OutputSink) -> ExecOutcome:
        spec = parse_payload(request.payload, self.allowed_schemes)
        limit_s, which = self._time_limit(spec, request)
        exchange = _Exchange(URL(spec.url), self.allowed_schemes)
        deadline = asyncio.timeout(limit_s)
        # Cancellation (the task's own timeout, a cancel, a drain) goes straight through: the
        # context managers in _exchange close the response and the session on the way out.
        try:
            async with deadline:
                await self._exchange(spec, exchange, sink)
        except (TimeoutError, aiohttp.ClientError) as exc:
            metadata = exchange.metadata(self.max_body_bytes)
            if deadline.expired():
                return ExecOutcome(
                    ExecStatus.TIMEOUT,
                    error=f"no complete response from {_display(exchange.url)} within "
                    f"{format_duration(limit_s)} ({which})",
                    duration_s=exchange.duration_s(),
                    metadata=metadata,
                )
            return ExecOutcome(
                ExecStatus.FAILURE,
                error=_failure_message(exc, exchange.url),
                duration_s=exchange.duration_s(),
                metadata=metadata,
            )
        return self._outcome(exchange)

    def _time_limit(self, spec: HttpSpec, request: ExecRequest) -> tuple[float, str]:
        if spec.timeout_seconds is not None:
            own = (spec.timeout_seconds, "the payload's timeout_seconds")
        else:
            own = (self.timeout_s, "the http executor's timeout_s")
        if 0 < request.timeout_s < own[0]:
            return request.timeout_s, "the task's timeout"
        return own

    async def _exchange(self, spec: HttpSpec, exchange: _Exchange, sink: OutputSink) -> None:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=self._resolver()),
                headers={"User-Agent": USER_AGENT},
                timeout=aiohttp.ClientTimeout(),  # no aiohttp timeouts: execute() sets the deadline
                middlewares=(exchange.check_hop,),
            ) as session,
            session.request(
                spec.method,
                spec.url,
                headers=spec.headers,
                data=spec.body or None,  # a str body is sent as UTF-8, text/plain by default
                max_redirects=MAX_REDIRECTS,
            ) as response,
        ):
            exchange.response = response
            exchange.elapsed_s = exchange.duration_s()
            while chunk := await response.content.read(READ_CHUNK):
                room = self.max_body_bytes - exchange.body_bytes
                if len(chunk) > room:
                    if room:
                        await sink.write(Stream.STDOUT, chunk[:room])
                        exchange.body_bytes += room
                    exchange.truncated = True
                    response.close()  # drop the connection rather than read the rest
                    return
                await sink.write(Stream.STDOUT, chunk)
                exchange.body_bytes += len(chunk)

    def _outcome(self, exchange: _Exchange) -> ExecOutcome:
        response = exchange.response
        assert response is not None
        errors = []
        ok = 200 <= response.status < 400
        if not ok:
            errors.append(f"HTTP {response.status} {_received(response.reason or '')}".rstrip())
        if exchange.truncated:
            errors.append(
                f"response body truncated at {self.max_body_bytes} bytes (max_body_bytes)"
            )
        return ExecOutcome(
            ExecStatus.SUCCESS if ok else ExecStatus.FAILURE,
            response.status,
            "; ".join(errors),
            duration_s=exchange.duration_s(),
            metadata=exchange.metadata(self.max_body_bytes),
        )


class _LookupsIn:
    """What aiohttp's ThreadedResolver uses of an event loop, with the blocking lookups run in
    ``threads`` instead of the loop's default executor."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: ThreadPoolExecutor) -> None:
        self._loop = loop
        self._threads = threads

    async def getaddrinfo(self, host: str, port: int, **hints: Any) -> list[Any]:
        lookup = functools.partial(socket.getaddrinfo, host, port, **hints)
        return await self._loop.run_in_executor(self._threads, lookup)

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int = 0) -> tuple[str, str]:
        return await self._loop.run_in_executor(self._threads, socket.getnameinfo, sockaddr, flags)


def _received(text: str) -> str:
    """Text from a response as something the result can carry: aiohttp keeps bytes that are not
    UTF-8 as lone surrogates (which no protobuf string takes); such text is taken as Latin-1,
    the bytes HTTP/1.1 headers historically are."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("latin-1")
    return text


def _failure_message(exc: BaseException, hop: URL) -> str:
    """A clear sentence for a request that got no complete response."""
    url = _display(hop)
    if isinstance(exc, _HopRefused):
        allowed = " and ".join(sorted(exc.allowed_schemes))
        return f"refused to follow the redirect to {_display(exc.url)}: only {allowed} allowed"
    if isinstance(exc, aiohttp.NonHttpUrlRedirectClientError):
        return f"refused to follow the redirect from {url} to {shorten(str(exc.args[0]))}"
    if isinstance(exc, aiohttp.InvalidUrlRedirectClientError):
        return f"{url} redirected to an invalid URL {shorten(str(exc.url))}"
    if isinstance(exc, aiohttp.TooManyRedirects):
        return f"gave up after {len(exc.history)} redirects; the last one was to {url}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _connect_message(exc, url)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{url} closed the connection before the response was complete"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"the response body from {url} was cut short or malformed: {exc}"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{url} sent an invalid HTTP response: {exc.message}"
    return f"request to {url} failed: {type(exc).__name__}: {exc}"


def _connect_message(exc: aiohttp.ClientConnectorError, url: str) -> str:
    err = exc.os_error
    reason = os.strerror(err.errno) if isinstance(err.errno, int) and err.errno > 0 else ""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve host {exc.host} of {url}: {err.strerror or err}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate of {url} is not trusted: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS handshake with {url} failed: {err.strerror or err}"
    return f"cannot connect to {url}: {reason or err.strerror or err}"


def _timeout_option(value: object) -> float:
    try:
        seconds = float(str(value))
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ValueError(
            f"http executor: timeout_s must be more than 0 and at most {MAX_TIMEOUT_S:.0f} "
            f"seconds; got {value!r}"
        )
    return seconds


def _size_option(value: object) -> int:
    if isinstance(value, bool):
        size = 0
    elif isinstance(value, int):
        size = value
    else:
        try:
            size = parse_size(str(value))
        except ValueError:
            size = 0
    if size <= 0:
        raise ValueError(
            f"http executor: max_body_bytes must be a positive size, e.g. 4M; got {value!r}"
        )
    return size


def _schemes_option(value: object) -> frozenset[str]:
    items: object = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, Iterable):
        items = [items]
    schemes = frozenset(str(s).strip().lower() for s in items)
    if not schemes or not schemes <= SCHEMES:
        raise ValueError(
            f"http executor: allowed_schemes must name http, https or both; got {value!r}"
        )
    return schemes
