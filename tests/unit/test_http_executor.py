"""The "http" executor: payload parsing, and real requests to an aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dist_exec.errors import InvalidTaskSpec
from dist_exec.executors import ExecRequest, Executor
from dist_exec.executors.http import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_TIMEOUT_S,
    USER_AGENT,
    HttpExecutor,
    HttpSpec,
    describe,
    parse_payload,
)
from dist_exec.models import ExecOutcome, ExecStatus
from dist_exec.wire import outcome_to_pb
from dist_exec.worker.task_runner import TaskRunner
from tests.conftest import RecordingSink

HANDLER_WAIT_S = 10.0  # the longest a slow endpoint waits; teardown releases it sooner

# --- payload parsing -------------------------------------------------------------------------


def payload(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (payload(url="http://example.com/"), HttpSpec("http://example.com/")),
        (payload(url="https://example.com/a?b=c#d"), HttpSpec("https://example.com/a?b=c#d")),
        (payload(url="HTTP://Example.COM"), HttpSpec("HTTP://Example.COM")),
        (payload(url="http://[::1]:8080/x"), HttpSpec("http://[::1]:8080/x")),
        (payload(url="http://user:pw@h/"), HttpSpec("http://user:pw@h/")),
        (
            payload(method="POST", url="http://h/", body='{"a": 1}'),
            HttpSpec("http://h/", "POST", body='{"a": 1}'),
        ),
        (payload(method="PROPFIND", url="http://h/"), HttpSpec("http://h/", "PROPFIND")),
        (payload(method="M-SEARCH", url="http://h/"), HttpSpec("http://h/", "M-SEARCH")),
        (
            payload(url="http://h/", headers={"Accept": "text/plain", "X-Tab": "a\tb"}),
            HttpSpec("http://h/", headers={"Accept": "text/plain", "X-Tab": "a\tb"}),
        ),
        (payload(url="http://h/", timeout_seconds=5), HttpSpec("http://h/", timeout_seconds=5.0)),
        (
            payload(url="http://h/", timeout_seconds=0.25),
            HttpSpec("http://h/", timeout_seconds=0.25),
        ),
        (
            payload(url="http://h/", timeout_seconds=86400),
            HttpSpec("http://h/", timeout_seconds=86400),
        ),
        # The body is data: any character, NUL included.
        (
            payload(url="http://h/", body="a\u0000b\u2603"),
            HttpSpec("http://h/", body="a\u0000b\u2603"),
        ),
        (b'  {"url": "http://h/"}\n', HttpSpec("http://h/")),
    ],
)
def test_parse_payload_accepts(raw: bytes, expected: HttpSpec) -> None:
    assert parse_payload(raw) == expected


def _nested(depth: int) -> bytes:
    return b'{"url": "http://h/", "headers": ' + b'{"a": ' * depth + b"{}" + b"}" * depth + b"}"


def bad(case: str, match: str, **fields: object) -> object:
    return pytest.param(payload(**fields), match, id=case)


URL = "http://h/"


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        pytest.param(b"", "not valid JSON", id="empty"),
        pytest.param(b"GET http://h/", "not valid JSON", id="not-json"),
        pytest.param(b'{"url": "http://h/"', "not valid JSON", id="truncated"),
        pytest.param(b'{"url": "\xff\xfe"}', "not valid JSON", id="not-utf8"),
        pytest.param(b"[]", "must be a JSON object", id="array"),
        pytest.param(b'"http://h/"', "must be a JSON object", id="string"),
        pytest.param(b"null", "must be a JSON object", id="null"),
        bad("unknown-field", "unknown field\\(s\\) timeout; allowed: body, ", url=URL, timeout=1),
        bad("no-url", "'url' is required", method="GET"),
        bad("url-null", "'url' must be a string", url=None),
        bad("url-list", "'url' must be a string", url=[URL]),
        bad("url-empty", "must be an absolute http or https URL", url=""),
        bad("url-relative", "must be an absolute http or https URL", url="/path"),
        bad("url-no-scheme", "must be an absolute http or https URL", url="example.com/x"),
        bad("url-ftp", "scheme 'ftp' is not allowed; use http or https", url="ftp://h/x"),
        bad("url-file", "scheme 'file' is not allowed", url="file:///etc/passwd"),
        bad("url-no-host", "with a host", url="http:///path"),
        bad("url-space", "spaces or control characters", url="http://h/a b"),
        bad("url-crlf", "spaces or control characters", url="http://h/\r\nX-Evil: 1"),
        bad("url-port-range", "is not a valid URL", url="http://h:99999/"),
        bad("url-port-text", "is not a valid URL", url="http://h:port/"),
        bad("url-port-zero", "port must be 1-65535", url="http://h:0/"),
        bad("url-ipv6-open", "is not a valid URL", url="http://[::1/"),
        bad("url-too-long", "longer than 8192", url="http://h/" + "a" * 9000),
        bad("method-lowercase", "must be uppercase: 'POST', not 'post'", url=URL, method="post"),
        bad("method-space", "uppercase HTTP method such as GET", url=URL, method="GE T"),
        bad("method-empty", "uppercase HTTP method", url=URL, method=""),
        bad("method-mixed", "uppercase HTTP method", url=URL, method="Fetch"),
        bad("method-long", "uppercase HTTP method", url=URL, method="X" * 33),
        bad("method-int", "'method' must be a string", url=URL, method=1),
        bad("method-connect", "CONNECT is not supported", url=URL, method="CONNECT"),
        bad("headers-list", "'headers' must map strings to strings", url=URL, headers=["A: b"]),
        bad("headers-int", "'headers' must map strings to strings", url=URL, headers={"A": 1}),
        bad("headers-null", "'headers' must map strings", url=URL, headers=None),
        bad("header-name-space", "invalid header name 'X A'", url=URL, headers={"X A": "1"}),
        bad("header-name-colon", "invalid header name", url=URL, headers={"X:": "1"}),
        bad("header-name-empty", "invalid header name", url=URL, headers={"": "1"}),
        bad("header-crlf", "cannot hold CR, LF", url=URL, headers={"X": "a\r\nX-Evil: 1"}),
        bad("header-lf", "cannot hold CR, LF", url=URL, headers={"X": "a\nb"}),
        bad("header-nul", "control characters", url=URL, headers={"X": "a\u0000"}),
        bad("content-length", "set from 'body'", url=URL, headers={"Content-Length": "5"}),
        bad("transfer-encoding", "set from 'body'", url=URL, headers={"transfer-encoding": "x"}),
        bad("header-twice", "given twice", url=URL, headers={"Accept": "a", "accept": "b"}),
        bad("body-int", "'body' must be a string", url=URL, body=5),
        bad("body-object", "'body' must be a string", url=URL, body={"a": 1}),
        bad("body-null", "'body' must be a string", url=URL, body=None),
        bad("timeout-zero", "more than 0 and at most 24h", url=URL, timeout_seconds=0),
        bad("timeout-negative", "more than 0", url=URL, timeout_seconds=-1),
        bad("timeout-too-long", "at most 24h \\(86400\\)", url=URL, timeout_seconds=86401),
        bad("timeout-str", "must be a number of seconds", url=URL, timeout_seconds="5"),
        bad("timeout-bool", "must be a number of seconds", url=URL, timeout_seconds=True),
        bad("timeout-null", "must be a number of seconds", url=URL, timeout_seconds=None),
        pytest.param(
            b'{"url": "http://h/", "timeout_seconds": NaN}', "more than 0", id="timeout-nan"
        ),
        pytest.param(
            b'{"url": "http://h/", "timeout_seconds": Infinity}', "more than 0", id="timeout-inf"
        ),
        pytest.param(
            b'{"url": "http://h/", "timeout_seconds": 1e999}', "more than 0", id="timeout-1e999"
        ),
        pytest.param(
            b'{"url": "http://h/", "timeout_seconds": ' + b"9" * 4000 + b"}",
            "more than 0",
            id="timeout-4000-digits",
        ),
        bad("bad-punycode", "is not a valid URL", url="http://xn--a.invalid/"),
        bad("label-too-long", "not a valid DNS name", url="http://" + "a" * 64 + ".example/"),
        bad("name-too-long", "not a valid DNS name", url="http://" + "a." * 127 + "bc/"),
        bad("empty-label", "not a valid DNS name", url="http://a..b/"),
        bad("user-not-latin1", "must be Latin-1 text", url="http://us\u2603er:pw@h/"),
        bad(
            "url-and-header-credentials",
            "cannot go together",
            url="http://u:p@h/",
            headers={"Authorization": "Bearer x"},
        ),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "not valid JSON", id="deep-array"),
        pytest.param(_nested(100_000), "not valid JSON", id="deep-inside-valid-object"),
    ],
)
def test_parse_payload_rejects(raw: bytes, match: str) -> None:
    with pytest.raises(InvalidTaskSpec, match=match):
        parse_payload(raw)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"url": "http://h/", "body": ' + b"1" * 5000 + b"}", id="in-body"),
        pytest.param(
            b'{"url": "http://h/", "timeout_seconds": ' + b"1" * 5000 + b"}", id="timeout"
        ),
        pytest.param(b"1" * 5000, id="whole-payload"),
    ],
)
def test_parse_payload_rejects_huge_integers(raw: bytes) -> None:
    # Integers of more than 4300 digits make json.loads raise ValueError, not JSONDecodeError.
    with pytest.raises(InvalidTaskSpec, match="not valid JSON"):
        parse_payload(raw)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"url": "http://h/\\ud800"}', id="url"),
        pytest.param(b'{"url": "http://h/", "method": "GET\\udfff"}', id="method"),
        pytest.param(b'{"url": "http://h/", "headers": {"X\\ud800": "1"}}', id="header-name"),
        pytest.param(b'{"url": "http://h/", "headers": {"X": "\\ud800"}}', id="header-value"),
        pytest.param(b'{"url": "http://h/", "body": "\\ud800"}', id="body"),
    ],
)
def test_parse_payload_rejects_lone_surrogates(raw: bytes) -> None:
    # Valid JSON, but no valid text: it cannot be encoded into a request.
    with pytest.raises(InvalidTaskSpec, match="lone surrogate"):
        parse_payload(raw)


@pytest.mark.parametrize(
    "spec",
    [
        HttpSpec("http://h/"),
        HttpSpec("https://h/x?y=1", "DELETE"),
        HttpSpec("http://h/", "POST", {"Content-Type": "application/json"}, '{"a": 1}', 2.5),
        HttpSpec("http://h/", timeout_seconds=30),
    ],
)
def test_to_payload_round_trip(spec: HttpSpec) -> None:
    assert parse_payload(spec.to_payload()) == spec


def test_to_payload_leaves_out_defaults_and_keeps_whole_seconds_whole() -> None:
    assert json.loads(HttpSpec("http://h/").to_payload()) == {"url": "http://h/"}
    raw = HttpSpec("http://h/", timeout_seconds=5.0).to_payload()
    assert b'"timeout_seconds": 5}' in raw


@pytest.mark.parametrize(
    ("raw", "line"),
    [
        (payload(url="http://h/x"), "GET http://h/x"),
        (payload(url="https://user:secret@h/x", method="PUT"), "PUT https://h/x"),
        (b"not json", "<invalid payload>"),
        (payload(url="ftp://h/"), "<invalid payload>"),
    ],
)
def test_describe(raw: bytes, line: str) -> None:
    assert describe(raw) == line


def test_validate_uses_the_allowed_schemes() -> None:
    HttpExecutor().validate(payload(url="http://h/"))
    https_only = HttpExecutor({"allowed_schemes": ["https"]})
    https_only.validate(payload(url="https://h/"))
    with pytest.raises(InvalidTaskSpec, match="scheme 'http' is not allowed; use https"):
        https_only.validate(payload(url="http://h/"))


def test_http_executor_is_an_executor() -> None:
    executor = HttpExecutor()
    assert isinstance(executor, Executor)
    assert executor.name == "http"
    assert executor.timeout_s == DEFAULT_TIMEOUT_S
    assert executor.max_body_bytes == DEFAULT_MAX_BODY_BYTES
    assert executor.allowed_schemes == {"http", "https"}


def test_options_from_config_strings() -> None:
    executor = HttpExecutor({"timeout_s": "5", "max_body_bytes": "1k", "allowed_schemes": "https"})
    assert executor.timeout_s == 5.0
    assert executor.max_body_bytes == 1024
    assert executor.allowed_schemes == {"https"}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"timeout_s": 0}, "timeout_s must be more than 0"),
        ({"timeout_s": "soon"}, "timeout_s must be more than 0"),
        ({"timeout_s": 1e9}, "timeout_s must be more than 0"),
        ({"max_body_bytes": 0}, "max_body_bytes must be a positive size"),
        ({"max_body_bytes": -5}, "max_body_bytes must be a positive size"),
        ({"max_body_bytes": "lots"}, "max_body_bytes must be a positive size"),
        ({"max_body_bytes": True}, "max_body_bytes must be a positive size"),
        ({"allowed_schemes": ["ftp"]}, "allowed_schemes must name http, https or both"),
        ({"allowed_schemes": []}, "allowed_schemes must name"),
        ({"allowed_schemes": 5}, "allowed_schemes must name"),
    ],
)
def test_bad_options(options: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HttpExecutor(options)


async def test_health_check() -> None:
    assert await HttpExecutor().health_check() is True


# --- real requests ---------------------------------------------------------------------------


def pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


@dataclass
class EchoServer:
    base: str = ""
    port: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends slow handlers
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)  # a handler was cut off
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a slow handler has started

    def url(self, path: str) -> str:
        return self.base + path


SERVER = web.AppKey("server", EchoServer)


async def _echo(request: web.Request) -> web.Response:
    body = {
        "method": request.method,
        "path": request.path_qs,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body": await request.text(),
    }
    return web.json_response(body, headers={"X-Test": "yes"})


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    return web.Response(status=code, text=f"body of {code}")


async def _bytes(request: web.Request) -> web.Response:
    return web.Response(body=pattern(int(request.match_info["n"])))


async def _chunked(request: web.Request) -> web.StreamResponse:
    n = int(request.match_info["n"])
    response = web.StreamResponse()  # no Content-Length: chunked transfer encoding
    await response.prepare(request)
    body = pattern(n)
    for start in range(0, n, 1000):
        await response.write(body[start : start + 1000])
    await response.write_eof()
    return response


async def _wait_for_release(request: web.Request) -> None:
    srv = request.app[SERVER]
    srv.arrived.set()
    try:
        async with asyncio.timeout(HANDLER_WAIT_S):
            await srv.release.wait()
    except asyncio.CancelledError:
        srv.client_gone.set()  # handler_cancellation: the client hung up
        raise


async def _slow(request: web.Request) -> web.Response:
    await _wait_for_release(request)
    return web.Response(text="late")


async def _stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"first\n")
    await _wait_for_release(request)
    await response.write(b"last\n")
    return response


async def _redirect(request: web.Request) -> web.Response:
    code = int(request.query.get("code", "302"))
    return web.Response(status=code, headers={"Location": request.query["to"]})


async def _loop(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/loop"})


async def _repeated(request: web.Request) -> web.Response:
    response = web.Response(text="ok")
    response.headers.add("X-Multi", "a")
    response.headers.add("X-Multi", "b")
    return response


ROUTES = [
    web.route("*", "/echo", _echo),
    web.get("/status/{code}", _status),
    web.get("/bytes/{n}", _bytes),
    web.get("/chunked/{n}", _chunked),
    web.get("/slow", _slow),
    web.get("/stream", _stream),
    web.get("/redirect", _redirect),
    web.get("/loop", _loop),
    web.get("/repeated", _repeated),
]


@pytest.fixture
async def server() -> AsyncIterator[EchoServer]:
    """A real aiohttp server on 127.0.0.1, stopped (slow handlers released) at teardown."""
    srv = EchoServer()
    app = web.Application()
    app[SERVER] = srv
    app.router.add_routes(ROUTES)
    # handler_cancellation: a handler stops when its client hangs up, as the tests check.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    srv.port = runner.addresses[0][1]
    srv.base = f"http://127.0.0.1:{srv.port}"
    try:
        yield srv
    finally:
        srv.release.set()
        await runner.cleanup()


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[bytes], Awaitable[str]]]:
    """Factory: a TCP server on 127.0.0.1 that answers any request with the given bytes."""
    servers: list[asyncio.Server] = []
    handlers: list[asyncio.Task[None]] = []

    async def start(reply: bytes) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.append(task)
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(reply)
                await writer.drain()
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(srv)
        return f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/"

    yield start
    for srv in servers:
        srv.close()
        await srv.wait_closed()
    await asyncio.gather(*handlers, return_exceptions=True)


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[aiohttp.ClientSession]:
    """Every ClientSession the executor creates, to check that each one was closed."""
    created: list[aiohttp.ClientSession] = []
    real = aiohttp.ClientSession

    def recording(*args: object, **kwargs: object) -> aiohttp.ClientSession:
        session = real(*args, **kwargs)  # type: ignore[arg-type]
        created.append(session)
        return session

    monkeypatch.setattr(aiohttp, "ClientSession", recording)
    return created


def request(spec: HttpSpec, timeout_s: float = 30.0) -> ExecRequest:
    return ExecRequest(task_id="t-1", attempt=1, payload=spec.to_payload(), timeout_s=timeout_s)


async def run(
    spec: HttpSpec, executor: HttpExecutor | None = None, timeout_s: float = 30.0
) -> tuple[ExecOutcome, RecordingSink]:
    sink = RecordingSink()
    async with asyncio.timeout(10):
        outcome = await (executor or HttpExecutor()).execute(request(spec, timeout_s), sink)
    return outcome, sink


async def test_get_with_headers(server: EchoServer, sessions: list[aiohttp.ClientSession]) -> None:
    url = server.url("/echo?q=1")
    outcome, sink = await run(HttpSpec(url, headers={"X-Token": "abc"}))
    assert outcome.status == ExecStatus.SUCCESS
    assert outcome.exit_code == 200
    assert outcome.error == ""
    assert outcome.duration_s > 0
    echoed = json.loads(sink.stdout)
    assert echoed["method"] == "GET"
    assert echoed["path"] == "/echo?q=1"
    assert echoed["headers"]["x-token"] == "abc"
    assert echoed["headers"]["user-agent"] == USER_AGENT
    meta = outcome.metadata
    assert meta["http.status"] == "200"
    assert meta["http.reason"] == "OK"
    assert meta["http.url"] == url
    assert meta["http.redirects"] == "0"
    assert meta["http.body_bytes"] == str(len(sink.stdout))
    assert int(meta["http.elapsed_ms"]) >= 0
    assert meta["header.x-test"] == "yes"
    assert meta["header.content-type"] == "application/json; charset=utf-8"
    assert meta["header.content-length"] == str(len(sink.stdout))
    assert "truncated" not in meta
    assert sessions
    assert all(s.closed for s in sessions)


@pytest.mark.parametrize(
    ("headers", "content_type"),
    [
        ({}, "text/plain; charset=utf-8"),
        ({"Content-Type": "application/json"}, "application/json"),
    ],
)
async def test_post_sends_the_body(
    server: EchoServer, headers: dict[str, str], content_type: str
) -> None:
    body = '{"greeting": "h\u00e9llo \u2603"}'
    outcome, sink = await run(HttpSpec(server.url("/echo"), "POST", headers, body))
    assert outcome.status == ExecStatus.SUCCESS
    echoed = json.loads(sink.stdout)
    assert echoed["method"] == "POST"
    assert echoed["body"] == body
    assert echoed["headers"]["content-type"] == content_type
    assert echoed["headers"]["content-length"] == str(len(body.encode()))


async def test_user_agent_can_be_replaced(server: EchoServer) -> None:
    _, sink = await run(HttpSpec(server.url("/echo"), headers={"user-agent": "probe/1"}))
    assert json.loads(sink.stdout)["headers"]["user-agent"] == "probe/1"


async def test_head_has_no_body(server: EchoServer) -> None:
    outcome, sink = await run(HttpSpec(server.url("/bytes/100"), "HEAD"))
    assert outcome.status == ExecStatus.SUCCESS
    assert sink.stdout == b""
    assert outcome.metadata["header.content-length"] == "100"
    assert outcome.metadata["http.body_bytes"] == "0"


async def test_404_is_a_failure_with_the_body(server: EchoServer) -> None:
    outcome, sink = await run(HttpSpec(server.url("/status/404")))
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.exit_code == 404
    assert outcome.error == "HTTP 404 Not Found"
    assert sink.stdout == b"body of 404"
    assert outcome.metadata["http.status"] == "404"
    assert outcome.metadata["http.reason"] == "Not Found"
    assert outcome.metadata["header.content-type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        (201, ExecStatus.SUCCESS, ""),
        (202, ExecStatus.SUCCESS, ""),
        (300, ExecStatus.SUCCESS, ""),  # a 3xx without Location is the final answer
        (400, ExecStatus.FAILURE, "HTTP 400 Bad Request"),
        (418, ExecStatus.FAILURE, "HTTP 418 I'm a Teapot"),
        (500, ExecStatus.FAILURE, "HTTP 500 Internal Server Error"),
        (503, ExecStatus.FAILURE, "HTTP 503 Service Unavailable"),
    ],
)
async def test_status_decides_success(
    server: EchoServer, code: int, status: ExecStatus, error: str
) -> None:
    outcome, sink = await run(HttpSpec(server.url(f"/status/{code}")))
    assert (outcome.status, outcome.exit_code, outcome.error) == (status, code, error)
    assert sink.stdout == f"body of {code}".encode()


async def test_repeated_response_headers_are_joined(server: EchoServer) -> None:
    outcome, _ = await run(HttpSpec(server.url("/repeated")))
    assert outcome.metadata["header.x-multi"] == "a, b"


@pytest.mark.parametrize("path", ["/bytes/100000", "/chunked/100000"])
async def test_big_body_is_truncated(
    server: EchoServer, sessions: list[aiohttp.ClientSession], path: str
) -> None:
    executor = HttpExecutor({"max_body_bytes": 1000})
    outcome, sink = await run(HttpSpec(server.url(path)), executor)
    assert sink.stdout == pattern(1000)
    assert outcome.status == ExecStatus.SUCCESS
    assert outcome.exit_code == 200
    assert outcome.error == "response body truncated at 1000 bytes (max_body_bytes)"
    assert outcome.metadata["truncated"] == "true"
    assert outcome.metadata["http.body_bytes"] == "1000"
    assert outcome.metadata["http.max_body_bytes"] == "1000"
    assert all(s.closed for s in sessions)


async def test_truncated_failure_says_both(server: EchoServer) -> None:
    outcome, sink = await run(
        HttpSpec(server.url("/status/500")), HttpExecutor({"max_body_bytes": 4})
    )
    assert sink.stdout == b"body"
    assert (
        outcome.error
        == "HTTP 500 Internal Server Error; response body truncated at 4 bytes (max_body_bytes)"
    )


@pytest.mark.parametrize("path", ["/bytes/1000", "/chunked/1000"])
async def test_body_of_exactly_the_limit_is_whole(server: EchoServer, path: str) -> None:
    outcome, sink = await run(HttpSpec(server.url(path)), HttpExecutor({"max_body_bytes": 1000}))
    assert sink.stdout == pattern(1000)
    assert outcome.error == ""
    assert "truncated" not in outcome.metadata


async def test_payload_timeout_before_the_headers(
    server: EchoServer, sessions: list[aiohttp.ClientSession]
) -> None:
    outcome, sink = await run(HttpSpec(server.url("/slow"), timeout_seconds=0.2))
    assert outcome.status == ExecStatus.TIMEOUT
    assert outcome.exit_code is None
    assert outcome.error == (
        f"no complete response from {server.url('/slow')} within 200ms "
        "(the payload's timeout_seconds)"
    )
    assert 0.2 <= outcome.duration_s < 5
    assert sink.stdout == b""
    assert "http.status" not in outcome.metadata
    assert all(s.closed for s in sessions)
    async with asyncio.timeout(5):
        await server.client_gone.wait()


async def test_payload_timeout_in_the_middle_of_the_body(server: EchoServer) -> None:
    outcome, sink = await run(HttpSpec(server.url("/stream"), timeout_seconds=0.3))
    assert outcome.status == ExecStatus.TIMEOUT
    assert outcome.exit_code is None
    assert "within 300ms (the payload's timeout_seconds)" in outcome.error
    assert sink.stdout == b"first\n"
    # What arrived before the deadline is reported.
    assert outcome.metadata["http.status"] == "200"
    assert outcome.metadata["http.body_bytes"] == "6"


async def test_shorter_task_timeout_wins(server: EchoServer) -> None:
    spec = HttpSpec(server.url("/slow"), timeout_seconds=30)
    outcome, _ = await run(spec, timeout_s=0.2)
    assert outcome.status == ExecStatus.TIMEOUT
    assert outcome.error.endswith("within 200ms (the task's timeout)")


async def test_executor_timeout_applies_when_the_payload_sets_none(server: EchoServer) -> None:
    outcome, _ = await run(HttpSpec(server.url("/slow")), HttpExecutor({"timeout_s": 0.2}))
    assert outcome.status == ExecStatus.TIMEOUT
    assert outcome.error.endswith("(the http executor's timeout_s)")


async def test_cancel_in_the_middle_of_the_body_cleans_up(
    server: EchoServer, sessions: list[aiohttp.ClientSession]
) -> None:
    sink = RecordingSink()
    work = asyncio.create_task(
        HttpExecutor().execute(request(HttpSpec(server.url("/stream"))), sink)
    )
    async with asyncio.timeout(5):
        await sink.first_stdout.wait()
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work
    assert sink.stdout == b"first\n"
    assert len(sessions) == 1
    assert sessions[0].closed
    async with asyncio.timeout(5):
        await server.client_gone.wait()  # the server saw the connection go


async def test_cancel_while_waiting_for_the_headers(
    server: EchoServer, sessions: list[aiohttp.ClientSession]
) -> None:
    work = asyncio.create_task(
        HttpExecutor().execute(request(HttpSpec(server.url("/slow"))), RecordingSink())
    )
    async with asyncio.timeout(5):
        await server.arrived.wait()  # the request is out, its headers not back yet
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work
    assert all(s.closed for s in sessions)
    async with asyncio.timeout(5):
        await server.client_gone.wait()


@pytest.fixture
async def task_runner() -> AsyncIterator[TaskRunner]:
    """A worker's TaskRunner with only the http executor; stopped at teardown."""
    runner = TaskRunner({"http": HttpExecutor()}, 2, 1024 * 1024, 600.0)
    try:
        yield runner
    finally:
        await runner.close()


async def test_task_runner_cancel_stops_the_request(
    server: EchoServer, sessions: list[aiohttp.ClientSession], task_runner: TaskRunner
) -> None:
    attempt = task_runner.start(request(HttpSpec(server.url("/stream"))), "http")
    async with asyncio.timeout(5):
        while not attempt.output.summary()[2]:  # stdout bytes so far
            await asyncio.sleep(0.01)
    assert task_runner.cancel("t-1", reason="cancelled by test")
    async with asyncio.timeout(5):
        await attempt.done.wait()
    assert attempt.outcome is not None
    assert attempt.outcome.status == ExecStatus.CANCELLED
    assert attempt.outcome.stdout == b"first\n"
    assert all(s.closed for s in sessions)
    async with asyncio.timeout(5):
        await server.client_gone.wait()


async def test_task_runner_timeout_stops_the_request(
    server: EchoServer, sessions: list[aiohttp.ClientSession], task_runner: TaskRunner
) -> None:
    attempt = task_runner.start(request(HttpSpec(server.url("/slow")), timeout_s=0.3), "http")
    async with asyncio.timeout(5):
        await attempt.done.wait()
    assert attempt.outcome is not None
    # The runner's timer and the executor's own deadline are the same: either may fire first.
    assert attempt.outcome.status == ExecStatus.TIMEOUT
    assert all(s.closed for s in sessions)


async def test_connection_refused(sessions: list[aiohttp.ClientSession]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound but not listening: connecting is refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        outcome, sink = await run(HttpSpec(url))
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.exit_code is None
    assert outcome.error == f"cannot connect to {url}: Connection refused"
    assert sink.stdout == b""
    assert outcome.metadata == {"http.url": url}
    assert all(s.closed for s in sessions)


async def test_tls_to_a_plain_http_server(server: EchoServer) -> None:
    url = f"https://127.0.0.1:{server.port}/echo"
    outcome, _ = await run(HttpSpec(url))
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.exit_code is None
    assert outcome.error.startswith(f"TLS handshake with {url} failed: ")


async def test_redirect_is_followed_and_the_final_url_recorded(server: EchoServer) -> None:
    spec = HttpSpec(server.url("/redirect?to=/echo%3Fhop%3D1&code=301"))
    outcome, sink = await run(spec)
    assert outcome.status == ExecStatus.SUCCESS
    assert json.loads(sink.stdout)["path"] == "/echo?hop=1"
    assert outcome.metadata["http.url"] == server.url("/echo?hop=1")
    assert outcome.metadata["http.redirects"] == "1"


async def test_redirect_loop_gives_up(server: EchoServer) -> None:
    outcome, _ = await run(HttpSpec(server.url("/loop")))
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.exit_code is None
    assert outcome.error == f"gave up after 10 redirects; the last one was to {server.url('/loop')}"


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://h/"])
async def test_redirect_to_another_scheme_is_refused(server: EchoServer, target: str) -> None:
    outcome, sink = await run(HttpSpec(server.url(f"/redirect?to={target}")))
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.exit_code is None
    assert outcome.error.startswith("refused to follow the redirect from ")
    assert target in outcome.error
    assert sink.stdout == b""


async def test_redirect_to_a_scheme_the_worker_disallows_is_refused(server: EchoServer) -> None:
    target = f"https://127.0.0.1:{server.port}/echo"
    executor = HttpExecutor({"allowed_schemes": ["http"]})
    outcome, _ = await run(HttpSpec(server.url(f"/redirect?to={target}")), executor)
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.error == f"refused to follow the redirect to {target}: only http allowed"


async def test_credentials_stay_out_of_errors_and_metadata(server: EchoServer) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        outcome, _ = await run(HttpSpec(f"http://user:s3cret@127.0.0.1:{port}/x"))
    assert "s3cret" not in outcome.error
    assert "s3cret" not in json.dumps(outcome.metadata)
    assert outcome.error == f"cannot connect to http://127.0.0.1:{port}/x: Connection refused"


@pytest.mark.parametrize(
    ("reply", "key", "value"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Name: caf\xe9\r\n\r\nok",
            "header.x-name",
            "caf\u00e9",
            id="header",
        ),
        pytest.param(
            b"HTTP/1.1 500 Bad \xff\r\nContent-Length: 2\r\n\r\nok",
            "http.reason",
            "Bad \u00ff",
            id="reason",
        ),
    ],
)
async def test_response_text_that_is_not_utf8_is_kept_as_latin1(
    raw_server: Callable[[bytes], Awaitable[str]], reply: bytes, key: str, value: str
) -> None:
    """Else the result cannot be sent: the task would stay RUNNING, its slot taken."""
    outcome, _ = await run(HttpSpec(await raw_server(reply)))
    assert outcome.metadata[key] == value
    sent = outcome_to_pb(outcome, "t-1", 1)
    assert sent.metadata[key] == value
    if key == "http.reason":  # a 500: its error names the reason
        assert outcome.status == ExecStatus.FAILURE
        assert value in sent.error
    else:
        assert outcome.status == ExecStatus.SUCCESS


def test_describe_of_a_payload_with_an_invalid_host_does_not_raise() -> None:
    assert describe(payload(url="http://xn--a.invalid/")) == "<invalid payload>"


async def test_body_cut_short(raw_server: Callable[[bytes], Awaitable[str]]) -> None:
    url = await raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
    outcome, sink = await run(HttpSpec(url))
    assert sink.stdout == b"only this"
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.exit_code is None
    assert outcome.error.startswith(f"the response body from {url} was cut short or malformed")
    assert outcome.metadata["http.status"] == "200"


async def test_not_an_http_server(raw_server: Callable[[bytes], Awaitable[str]]) -> None:
    url = await raw_server(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    outcome, _ = await run(HttpSpec(url))
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.exit_code is None
    assert outcome.error.startswith(f"{url} sent an invalid HTTP response")


async def test_server_hangs_up_without_answering(
    raw_server: Callable[[bytes], Awaitable[str]],
) -> None:
    url = await raw_server(b"")
    outcome, _ = await run(HttpSpec(url))
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.error == f"{url} closed the connection before the response was complete"


async def test_invalid_payload_raises_in_execute() -> None:
    raw = ExecRequest("t-1", 1, payload(url="ftp://h/"), 30.0)
    with pytest.raises(InvalidTaskSpec, match="scheme 'ftp' is not allowed"):
        await HttpExecutor().execute(raw, RecordingSink())


async def test_hung_dns_lookups_keep_to_their_own_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lookups that hang past their jobs' ends must not take the loop's default threads: the
    worker stops commands (kills, scans of /proc) with those."""
    release = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "hangs.invalid":
            release.wait(30)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    executor = HttpExecutor()
    try:
        outcomes = await asyncio.gather(
            *(
                run(HttpSpec("http://hangs.invalid/", timeout_seconds=0.2), executor)
                for _ in range(12)
            )
        )
        assert {o.status for o, _ in outcomes} == {ExecStatus.TIMEOUT}
        async with asyncio.timeout(5):  # (all 12 lookups still hang)
            assert await asyncio.to_thread(lambda: "free") == "free"
    finally:
        release.set()
