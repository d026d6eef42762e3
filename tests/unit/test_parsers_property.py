"""Property-based tests of the parsers that see untrusted input: command and http payloads,
durations and sizes, wire conversions and the audit log's task summary.

Their contract: a result or the parser's documented error, never anything else. The budget is
bounded (HYPOTHESIS_PROFILE=ci: 200 examples per property, no deadline); inputs that once broke
something live in tests/fuzz/corpus/ and run on every test run.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dist_exec import wire
from dist_exec.config import parse_duration, parse_size
from dist_exec.errors import InvalidTaskSpec
from dist_exec.executors import command, http
from dist_exec.security.audit import REDACTED, redact, redacted_payload, task_summary

T = TypeVar("T")
CORPUS = Path(__file__).parent.parent / "fuzz" / "corpus"
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
command_objects = st.fixed_dictionaries(
    {},
    optional={
        "command": st.text() | json_values,
        "args": st.lists(st.text(), max_size=4) | json_values,
        "shell": st.booleans() | json_values,
        "env": st.dictionaries(st.text(), st.text(), max_size=4) | json_values,
        "working_dir": st.text() | st.just("/tmp"),
        "stdin": st.text(),
        "stdin_base64": st.text() | st.binary().map(lambda b: base64.b64encode(b).decode()),
    },
)
http_objects = st.fixed_dictionaries(
    {},
    optional={
        "url": st.text() | st.sampled_from(["http://127.0.0.1:1/x", "https://h/", "ftp://h"]),
        "method": st.text(max_size=10) | st.sampled_from(["GET", "POST"]),
        "headers": st.dictionaries(st.text(max_size=10), st.text(max_size=10)) | json_values,
        "body": st.text() | json_values,
        "timeout_seconds": st.floats() | st.integers() | json_values,
    },
)


def _encode(value: object) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")


def _attempt(parse: Callable[[Any], T], data: Any, error: type[Exception]) -> tuple[T | None, str]:
    """(result, "") or (None, the error's message): the only two outcomes a parser may have."""
    try:
        return parse(data), ""
    except error as exc:
        return None, str(exc)


# Why each input of the corpus (hostile payloads, each refused once it was found) is refused,
# by the parser it was written for; the other parser refuses it too (unknown fields, say).
REFUSED = {
    "command-bom.json": "starts with a byte order mark (BOM)",
    "command-empty-env-key.json": "invalid environment variable ''",
    "command-huge-number.json": "'command' must be a string",
    "command-lone-surrogate.json": "strings must be valid Unicode (lone surrogate)",
    "command-nul.json": "command, args and working_dir cannot hold NUL",
    "command-relative-cwd.json": "'working_dir' must be an absolute path, got 'relative'",
    "http-bad-ipv6.json": "'http://[::1' is not a valid URL",
    "http-bad-method.json": "'method' must be an uppercase HTTP method",
    "http-file-scheme.json": "scheme 'file' is not allowed; use http or https",
    "http-header-injection.json": "header X cannot hold CR, LF or other control characters",
    "http-huge-timeout.json": "'timeout_seconds' must be more than 0 and at most 24h",
    "http-nan-timeout.json": "at most 24h (86400); got 'nan'",
    "nested-arrays.json": "is not valid JSON: nested too deeply",
    "not-object.json": "payload must be a JSON object",
    "not-utf8.bin": "is not valid JSON: it is not UTF-8 (byte 0xff at offset 0)",
    "utf16.json": "is not valid JSON: it is not UTF-8 (byte 0xff at offset 0)",
}


def test_every_corpus_input_says_why_it_is_refused() -> None:
    assert sorted(REFUSED) == sorted(p.name for p in CORPUS.iterdir())


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_corpus_inputs_are_refused_with_a_clear_answer(name: str) -> None:
    data = (CORPUS / name).read_bytes()
    own = http.parse_payload if name.startswith("http-") else command.parse_payload
    with pytest.raises(InvalidTaskSpec, match=re.escape(REFUSED[name])):
        own(data)
    for parse in (command.parse_payload, http.parse_payload):
        with pytest.raises(InvalidTaskSpec, match=r"^(command|http) payload"):
            parse(data)
    assert task_summary("command", data)["type"] == "command"


@given(st.binary() | command_objects.map(_encode))
@example(b"[" * 100_000)
def test_command_payloads_parse_or_say_why(payload: bytes) -> None:
    spec, error = _attempt(command.parse_payload, payload, InvalidTaskSpec)
    if spec is None:
        assert error.startswith("command payload")
        return
    assert spec.command.strip()
    assert command.parse_payload(spec.to_payload()) == spec


@given(
    st.builds(
        command.CommandSpec,
        command=st.text(min_size=1).filter(lambda s: s.strip() and "\0" not in s),
        args=st.lists(st.text().filter(lambda s: "\0" not in s), max_size=3),
        env=st.dictionaries(
            st.text(min_size=1).filter(lambda k: "=" not in k and "\0" not in k),
            st.text().filter(lambda v: "\0" not in v),
            max_size=3,
        ),
        stdin=st.binary(),
    )
)
def test_command_specs_round_trip(spec: command.CommandSpec) -> None:
    parsed, error = _attempt(command.parse_payload, spec.to_payload(), InvalidTaskSpec)
    if parsed is None:
        assert "lone surrogate" in error
        return
    assert parsed == spec


@given(st.binary() | http_objects.map(_encode))
def test_http_payloads_parse_or_say_why(payload: bytes) -> None:
    spec, error = _attempt(http.parse_payload, payload, InvalidTaskSpec)
    if spec is None:
        assert error.startswith("http payload")
        return
    assert http.parse_payload(spec.to_payload()) == spec


@given(st.text())
@example("1" * 400 + "s")
@example("1e999")
def test_durations_parse_or_raise_value_error(text: str) -> None:
    seconds, error = _attempt(parse_duration, text, ValueError)
    assert (seconds is None and error) or (seconds is not None and seconds >= 0)


@given(st.integers(0, 10**6), st.sampled_from(["ms", "s", "m", "h"]))
def test_durations_with_units(value: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    assert math.isclose(parse_duration(f"{value}{unit}"), value * factor)


@given(st.text())
def test_sizes_parse_or_raise_value_error(text: str) -> None:
    size, error = _attempt(parse_size, text, ValueError)
    assert (size is None and error) or (size is not None and size >= 0)


@given(st.integers(0, 2**40), st.sampled_from(["", "k", "M", "G", "KiB", "MiB"]))
def test_sizes_with_units(value: int, unit: str) -> None:
    factor = {"": 1, "k": 1024, "M": 1024**2, "G": 1024**3, "KiB": 1024, "MiB": 1024**2}[unit]
    assert parse_size(f"{value}{unit}") == value * factor


@given(st.floats(0, 10**9, allow_nan=False))
def test_wire_durations_round_trip(seconds: float) -> None:
    assert math.isclose(wire.from_duration(wire.duration(seconds)), seconds, abs_tol=1e-9)


@given(st.datetimes(min_value=datetime(1970, 1, 2), timezones=st.just(UTC)))
def test_wire_timestamps_round_trip(moment: datetime) -> None:
    msg = wire.timestamp(moment)
    assert msg is not None
    assert msg.ToDatetime(tzinfo=UTC) == moment


@given(st.binary() | command_objects.map(_encode) | http_objects.map(_encode))
def test_audit_summaries_never_fail_and_hide_secrets(payload: bytes) -> None:
    summary = task_summary("command", payload)
    for key in ("env", "headers"):
        for name, value in summary.get(key, {}).items():
            assert value == REDACTED or "TOKEN" not in name.upper()


@given(st.dictionaries(st.text(), st.text()))
def test_redaction_keeps_names_and_hides_secret_values(values: dict[str, str]) -> None:
    redacted = redact(values | {"DB_PASSWORD": "x", "GITHUB_TOKEN": "y", "aws_secret_key": "z"})
    assert redacted["DB_PASSWORD"] == redacted["GITHUB_TOKEN"] == REDACTED
    assert redacted["aws_secret_key"] == REDACTED


@given(st.text(alphabet=st.characters(categories=["L", "N"]), min_size=1))
def test_audit_summaries_hide_a_password_in_a_url(password: str) -> None:
    url = f"http://deploy:{password}@svc.internal:8080/hook?x=1"
    summary = task_summary("http", json.dumps({"url": url}).encode())
    assert summary["url"] == "http://deploy:***@svc.internal:8080/hook?x=1"


def test_audit_summaries_hide_a_password_in_a_url_that_does_not_parse() -> None:
    """A refused job is logged too: its URL may be one the executor would not take."""
    summary = task_summary("http", json.dumps({"url": "http://alice:s3cret@[bad/"}).encode())
    assert summary["url"] == "http://alice:***@[bad/"


@given(st.binary() | command_objects.map(_encode) | http_objects.map(_encode))
def test_a_redacted_payload_keeps_no_data_and_still_describes_the_task(payload: bytes) -> None:
    shown = redacted_payload(payload)
    if not shown:
        return  # (not a JSON object: redacted whole)
    body = json.loads(shown)
    for key in ("env", "headers"):
        value = body.get(key)
        assert value is None or value == REDACTED or set(value.values()) <= {REDACTED}
    assert body.get("stdin", REDACTED) == body.get("body", REDACTED) == REDACTED
    assert "stdin_base64" not in body
    try:  # a payload the executor takes is still one it takes: the client describes it
        command.parse_payload(payload)
    except InvalidTaskSpec:
        return
    command.parse_payload(shown)


def test_a_redacted_http_payload_masks_the_password_in_its_url() -> None:
    payload = {"url": "http://deploy:pw@svc/hook", "headers": {"Authorization": "Bearer x"}}
    assert json.loads(redacted_payload(json.dumps(payload).encode())) == {
        "url": "http://deploy:***@svc/hook",
        "headers": {"Authorization": REDACTED},
    }


def test_audit_summaries_hide_secret_query_parameters() -> None:
    """An ?access_token= stayed in the audit log (and for the read role)."""
    url = "https://svc.internal/hook?access_token=abc&page=2&Api-Key=k"
    summary = task_summary("http", json.dumps({"url": url}).encode())
    assert summary["url"] == "https://svc.internal/hook?access_token=***&page=2&Api-Key=***"


def test_an_http_jobs_description_hides_secret_query_parameters_too() -> None:
    """What `list` shows (and the job's http.url metadata, and its errors) to whoever may see
    the job, the read role included."""
    payload = json.dumps({"url": "https://u:pw@svc/x?access_token=SECRET&page=2"}).encode()
    assert http.describe(payload) == "GET https://svc/x?access_token=***&page=2"
