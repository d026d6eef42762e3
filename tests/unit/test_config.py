"""Parsers shared by flags and env values: durations and addresses."""

from __future__ import annotations

import resource
import subprocess
import sys
from typing import Any

import pytest

from dist_exec.config import (
    OPEN_FILES_WANTED,
    dial_address,
    format_duration,
    listen_address,
    node_problem,
    parse_duration,
    raise_open_files_limit,
    server_options,
    split_address,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("1ms", 0.001),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("2m30s", 150.0),
        ("1h0m5s500ms", 3605.5),
        ("1H30M", 5400.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("42", 42.0),
        ("0.25", 0.25),
        ("  30s  ", 30.0),
        ("\t5m\n", 300.0),
    ],
)
def test_parse_duration_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty duration"),
        ("   ", "empty duration"),
        ("-1s", "invalid duration"),
        ("-1", "use a number with a unit"),
        ("abc", "invalid duration"),
        ("5x", "invalid duration"),
        ("1s2", "invalid duration"),
        ("s", "invalid duration"),
        ("ms", "invalid duration"),
        ("1 s", "invalid duration"),
        ("1s 2m", "invalid duration"),
        ("1m-5s", "invalid duration"),
        ("nan", "use a number with a unit"),
        ("NaN", "use a number with a unit"),
        ("inf", "use a number with a unit"),
        ("-inf", "use a number with a unit"),
        ("infinity", "use a number with a unit"),
        ("1e999", "use a number with a unit"),
        ("1_000", "use a number with a unit"),
        (".5x", "use a number with a unit"),
        ("\u0663s", "use a number with a unit"),
    ],
)
def test_parse_duration_rejects(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.001, "1ms"),
        (0.5, "500ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (30.0, "30s"),
        (90.0, "90s"),
        (119.0, "119s"),
        (120.0, "2m"),
        (300.0, "5m"),
        (5400.0, "90m"),
        (7200.0, "2h"),
        (86400.0, "24h"),
        (7 * 86400.0, "7d"),
        (2.5 * 86400.0, "2.5d"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0.001, 0.25, 1.0, 2.5, 59.0, 120.0, 3600.0, 5400.0, 604800.0])
def test_format_duration_parses_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("localhost:80", ("localhost", 80)),
        ("example.com:65535", ("example.com", 65535)),
        ("10.0.0.1:0", ("10.0.0.1", 0)),
        (":50051", ("", 50051)),
        ("[::1]:80", ("::1", 80)),
        ("[::]:50051", ("::", 50051)),
        ("[fe80::1]:443", ("fe80::1", 443)),
    ],
)
def test_split_address(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize(
    ("address", "match"),
    [
        ("", "expected HOST:PORT"),
        ("localhost", "expected HOST:PORT"),
        ("localhost:", "expected HOST:PORT"),
        ("localhost:http", "expected HOST:PORT"),
        ("localhost:-1", "expected HOST:PORT"),
        ("localhost:1.5", "expected HOST:PORT"),
        ("localhost: 80", "expected HOST:PORT"),
        ("[::1]", "expected HOST:PORT"),
        ("localhost:65536", "port must be 0-65535"),
        ("localhost:99999", "port must be 0-65535"),
    ],
)
def test_split_address_rejects(address: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_address(address)


def test_split_address_rejects_bare_ipv6() -> None:
    # "::1" is the IPv6 loopback without a port (or, at best, host ":" and port 1): neither is a
    # usable HOST:PORT, and an IPv6 host must be written in brackets.
    with pytest.raises(ValueError, match="invalid address"):
        split_address("::1")


@pytest.mark.parametrize(
    ("address", "dial"),
    [
        (":50051", "127.0.0.1:50051"),
        ("127.0.0.1:1", "127.0.0.1:1"),
        ("example.com:8080", "example.com:8080"),
        ("[::1]:80", "[::1]:80"),
        # A server listening on every interface is reached at this machine's loopback (what
        # its certificate names: `up --listen 0.0.0.0:P`'s workers failed TLS for 0.0.0.0).
        ("[::]:80", "127.0.0.1:80"),
        ("0.0.0.0:80", "127.0.0.1:80"),
    ],
)
def test_dial_address(address: str, dial: str) -> None:
    assert dial_address(address) == dial


@pytest.mark.parametrize(
    ("address", "listen"),
    [
        (":50051", "0.0.0.0:50051"),
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("[::]:50051", "[::]:50051"),
        ("[::1]:1", "[::1]:1"),
    ],
)
def test_listen_address(address: str, listen: str) -> None:
    assert listen_address(address) == listen


@pytest.mark.parametrize("address", ["host:70000", "host:", "nohost", "[::1]"])
def test_dial_and_listen_reject_bad_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="invalid address"):
        dial_address(address)
    with pytest.raises(ValueError, match="invalid address"):
        listen_address(address)


def test_a_server_raises_its_descriptor_limit_to_the_hard_one() -> None:
    """In a child given a low soft limit (prlimit may only lower the hard one here)."""
    code = (
        "import resource; from dist_exec.config import raise_open_files_limit as r; "
        "print(r(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run(
        ["prlimit", "--nofile=100:200", sys.executable, "-c", code],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.split() == ["200", "200"]


@pytest.mark.parametrize(
    ("soft", "hard", "allowed", "expected"),
    [
        (1024, 1_048_576, True, OPEN_FILES_WANTED),
        (1024, resource.RLIM_INFINITY, True, OPEN_FILES_WANTED),
        (100_000, 1_048_576, True, 100_000),  # (never lowered)
        (1024, 4096, False, 1024),  # refused: kept
    ],
)
def test_the_raise_stops_at_open_files_wanted(
    monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, allowed: bool, expected: int
) -> None:
    """The limits a test cannot give a child without privilege, through a fake setrlimit."""
    limits = [(soft, hard)]

    def setrlimit(which: int, value: tuple[int, int]) -> None:
        if not allowed:
            raise ValueError("not allowed")
        limits.append(value)

    monkeypatch.setattr(resource, "getrlimit", lambda which: limits[-1])
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert raise_open_files_limit() == expected
    assert limits[-1] == (expected, hard)


def test_a_server_accepts_connections_with_three_quarters_of_its_descriptors() -> None:
    assert dict(server_options(1024))["grpc.max_allowed_incoming_connections"] == 768
    assert dict(server_options(10))["grpc.max_allowed_incoming_connections"] == 16


@pytest.mark.parametrize(
    ("node_id", "address", "labels"),
    [
        ("worker-1", "127.0.0.1:50052", {}),
        ("host.example.com-1234", "host.example.com:1", {"zone": "a", "dist-exec.io/pool": ""}),
        ("pod_7@zone:a+b", "[::1]:65535", {"k": "v"}),
        ("w", "10.0.0.1:8080", {}),
        ("_w", "host.example.com.:50052", {"gpu": "Tesla T4", "k": "x" * 1000}),
        ("rack1/n3", "my_host:1", {"a=b": "c=d"}),
        ("nœud-1", "localhost:1", {"note": "été"}),
    ],
)
def test_node_problem_takes_good_registrations(
    node_id: str, address: str, labels: dict[str, str]
) -> None:
    assert node_problem(node_id, address, ["command", "http"], labels, 8, 0) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"node_id": ""}, "worker_id is empty"),
        ({"node_id": "a b"}, "not an id"),
        ({"node_id": "a\nb"}, "not an id"),
        ({"node_id": "x" * 254}, "not an id"),
        ({"address": "host"}, "expected HOST:PORT"),
        ({"address": ":80"}, "names no host"),
        ({"address": "bad host:80"}, "not a host name"),
        ({"address": "-host-:80"}, "not a host name"),
        ({"address": "[::g]:80"}, "not an IPv6 address"),
        ({"address": "[host]:80"}, "not an IPv6 address"),
        ({"max_tasks": 0}, "max_concurrent_tasks must be 1-100000, got 0"),
        ({"max_tasks": 100_001}, "max_concurrent_tasks must be"),
        ({"weight": -1}, "weight must be 0-100000"),
        ({"capabilities": [""]}, "capability '' is empty"),
        ({"capabilities": ["a\tb"]}, "control characters"),
        ({"capabilities": ["c"] * 257}, "more than 256 capabilities"),
        ({"labels": {"": "v"}}, "label key '' is empty"),
        ({"labels": {"k": "x" * 70_000}}, "larger than 65536 bytes"),
        ({"labels": {"k\x00": "v"}}, "control characters"),
        ({"labels": {"k": "a\nb"}}, "the value has control characters"),
    ],
)
def test_node_problem_says_what_is_wrong(kwargs: dict[str, Any], match: str) -> None:
    fields: dict[str, Any] = {
        "node_id": "w1",
        "address": "127.0.0.1:1",
        "capabilities": ["command"],
        "labels": {},
        "max_tasks": 1,
        "weight": 0,
    }
    problem = node_problem(**(fields | kwargs))
    assert problem is not None
    assert match in problem, problem
