"""Bad values on the command line: a usage error (exit 2) or a refusal (exit 1; 125 for a job
the master refused, as `run` exits for a job it could not run), always one line that says
what is wrong, never a traceback. Each group also has a good path, so that a command that
fails for every input cannot pass."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from dist_exec.security import certs
from tests.conftest import CliResult, SmallCluster, run_cli

NOWHERE = "127.0.0.1:1"  # (refused before any call: nothing listens here)


def assert_one_line_error(result: CliResult, code: int, message: str) -> None:
    """``code``, and ``message`` in the one line that says what is wrong: click's "Error:"
    line after its usage lines, or else the whole of stderr."""
    assert (result.code, "Traceback" in result.stderr) == (code, False), result.stderr
    lines = result.stderr.splitlines()
    if lines and lines[0].startswith("Usage: "):
        assert lines[-1].startswith("Error: "), result.stderr
        assert message in lines[-1], result.stderr
    else:
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("dist-exec: "), result.stderr
        assert message in lines[0], result.stderr


# ---- certs --------------------------------------------------------------------------------


def test_certs_init_and_issue_make_a_ca_and_a_certificate_it_signed(tmp_path: Path) -> None:
    """The good path the refusals below are measured against: a CA, then a worker's
    certificate that names it and its role, with a key only its owner can read."""
    pki = tmp_path / "pki"
    made = run_cli("certs", "init", "--dir", str(pki))
    assert made.code == 0, made.stderr
    assert made.stdout == f"CA certificate: {pki}/ca.crt\nCA key (keep it secret): {pki}/ca.key\n"
    issued = run_cli("certs", "issue", "node-1", "--role", "worker", "--dir", str(pki))
    assert issued.code == 0, issued.stderr
    assert issued.stdout == f"certificate: {pki}/node-1.crt\nkey: {pki}/node-1.key\n"
    assert certs.identity_of((pki / "node-1.crt").read_bytes()) == ("node-1", "worker")
    assert stat.S_IMODE((pki / "node-1.key").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["issue", "w1", "--role", "bogus"], 2, "Invalid value for '--role': 'bogus' is not one"),
        (["issue", "w1", "--role", "worker", "--days", "0"], 2, "Invalid value for '--days'"),
        (["issue", "a/b", "--role", "worker"], 1, "invalid name 'a/b': use ASCII letters"),
        (["issue", "", "--role", "worker"], 1, "invalid name '': use ASCII letters"),
        (["issue", "a b", "--role", "worker"], 1, "invalid name 'a b'"),
        (["issue", "\u00e9", "--role", "worker"], 1, "invalid name '\u00e9'"),
        (["issue", "..\\x", "--role", "worker"], 1, "invalid name"),
        (["issue", "a\rb", "--role", "worker"], 1, "invalid name 'a\\rb'"),
        (["issue", "x*", "--role", "worker"], 1, "invalid name 'x*'"),
        (["issue", "..", "--role", "worker"], 1, "invalid name '..'"),
        (["issue", ".hidden", "--role", "worker"], 1, "starting with a letter or digit"),
        (["issue", "ca", "--role", "master"], 1, "'ca' would replace the CA's own files"),
        (["issue", "ca", "--role", "master", "--replace"], 1, "would replace the CA's own"),
        (["init"], 1, "a CA already exists in"),
    ],
)
def test_certs_refuses_bad_values(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    pki = tmp_path / "pki"
    assert run_cli("certs", "init", "--dir", str(pki)).code == 0
    before = {p.name for p in pki.iterdir()}
    result = run_cli("certs", *args, "--dir", str(pki))
    assert_one_line_error(result, code, message)
    assert {p.name for p in pki.iterdir()} == before  # nothing written


def test_certs_issue_replaces_a_certificate_only_when_told(tmp_path: Path) -> None:
    """A second issue of a name silently replaced its certificate and key (with `ca`, the CA's:
    every certificate issued after was signed by a leaf's key)."""
    pki = str(tmp_path)
    assert run_cli("certs", "init", "--dir", pki).code == 0
    assert run_cli("certs", "issue", "w1", "--role", "worker", "--dir", pki).code == 0
    first = (tmp_path / "w1.crt").read_bytes()
    again = run_cli("certs", "issue", "w1", "--role", "admin", "--dir", pki)
    assert_one_line_error(
        again, 1, f"{tmp_path / 'w1.crt'} exists; remove it, or give --replace to issue 'w1' again"
    )
    assert (tmp_path / "w1.crt").read_bytes() == first
    renewed = run_cli("certs", "issue", "w1", "--role", "admin", "--dir", pki, "--replace")
    assert renewed.code == 0, renewed.stderr
    assert certs.identity_of((tmp_path / "w1.crt").read_bytes()) == ("w1", "admin")


def test_certs_issue_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    result = run_cli("certs", "issue", "w1", "--role", "worker", "--dir", str(tmp_path / "none"))
    assert_one_line_error(
        result, 1, f"cannot read the CA in {tmp_path / 'none'} ([Errno 2] No such file"
    )
    assert "create it with 'dist-exec certs init'" in result.stderr


@pytest.mark.parametrize("existing", ["ca.crt", "ca.key"])
def test_certs_init_keeps_an_existing_ca_file(tmp_path: Path, existing: str) -> None:
    """Either half of a CA left in --dir stops init: a new key would orphan every certificate
    the old one signed."""
    (tmp_path / existing).write_text("kept")
    result = run_cli("certs", "init", "--dir", str(tmp_path))
    assert_one_line_error(result, 1, f"a CA already exists in {tmp_path}; remove it first")
    assert [p.name for p in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_text() == "kept"


def test_certs_dir_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    a_file = tmp_path / "f"
    a_file.write_text("")
    result = run_cli("certs", "init", "--dir", str(a_file))
    assert_one_line_error(result, 2, "Invalid value for '--dir'")


# ---- tokens -------------------------------------------------------------------------------


def test_tokens_add_list_and_revoke(tmp_path: Path) -> None:
    """The good path: a token is printed once, listed by name and role, and revoked."""
    file = str(tmp_path / "tokens.json")
    added = run_cli("tokens", "add", "bob", "--role", "submit", "--file", file)
    assert added.code == 0, added.stderr
    assert len(added.stdout.strip()) > 32
    listed = run_cli("tokens", "list", "--file", file)
    assert listed.stdout.split()[:2] == ["bob", "submit"]
    assert added.stdout.strip() not in (tmp_path / "tokens.json").read_text()  # (hashed)
    revoked = run_cli("tokens", "revoke", "bob", "--file", file)
    assert (revoked.code, revoked.stdout) == (0, "revoked the token of bob\n")
    assert run_cli("tokens", "list", "--file", file).stdout == ""


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["add", "bob", "--role", "bogus"], 2, "Invalid value for '--role': 'bogus' is not one"),
        (["add", "bob", "--role", "master"], 2, "Invalid value for '--role': 'master'"),
        (["add", "", "--role", "submit"], 1, "a token's name must be 1-128 printable characters"),
        (["add", "x" * 129, "--role", "submit"], 1, "a token's name must be 1-128 printable"),
        (["add", "a\nb", "--role", "submit"], 1, "a token's name must be 1-128 printable"),
        (["add", "a\x1bb", "--role", "read"], 1, "a token's name must be 1-128 printable"),
        (["add", "alice", "--role", "read"], 1, "'alice' already has a token in"),
        (["revoke", "nobody"], 1, "'nobody' has no token"),
        (["revoke", ""], 1, "'' has no token"),
    ],
)
def test_tokens_refuse_bad_values(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    file = tmp_path / "tokens.json"
    assert run_cli("tokens", "add", "alice", "--role", "admin", "--file", str(file)).code == 0
    before = file.read_text()
    result = run_cli("tokens", *args, "--file", str(file))
    assert_one_line_error(result, code, message)
    assert file.read_text() == before  # alice's token kept, nothing added


def test_tokens_in_an_unreadable_file_are_named_with_the_file(tmp_path: Path) -> None:
    file = tmp_path / "tokens.json"
    file.write_text(json.dumps({"tokens": [{"name": "x"}]}))
    for args in (["list"], ["add", "bob", "--role", "submit"], ["revoke", "x"]):
        result = run_cli("tokens", *args, "--file", str(file))
        assert_one_line_error(result, 1, f"cannot read tokens file {file}")


# ---- client commands: refused before anything is sent ------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--max-retries", "101", "true"], "'--max-retries': 101 is not in the range"),
        (["run", "--max-retries", "-1", "true"], "'--max-retries': -1 is not in the range 0<=x"),
        (["run", "--selector", "zone", "true"], "'--selector': expected KEY=VALUE, got 'zone'"),
        (["run", "--selector", "=a", "true"], "'--selector': expected KEY=VALUE, got '=a'"),
        (
            ["run", "--type", "http", "--url", "http://127.0.0.1:1/", "--header", "X"],
            "'--header': expected KEY=VALUE, got 'X'",
        ),
        (["list", "--offset", "-1"], "'--offset': -1 is not in the range 0<=x<=2147483647"),
        (["list", "--limit", "1001"], "'--limit': 1001 is not in the range"),
        (
            ["run", "--all", "--idempotency-key", "k1", "true"],
            "--idempotency-key does not go with --all",
        ),
    ],
)
def test_client_values_out_of_range_are_usage_errors(args: list[str], message: str) -> None:
    result = run_cli(*args, master=NOWHERE, timeout=30)
    assert_one_line_error(result, 2, message)
    assert "cannot reach the master" not in result.stderr  # (refused before connecting)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--max-retries", "100", "true"], "cannot reach the master at 127.0.0.1:1"),
        (["list", "--offset", "2147483647"], "cannot reach the master at 127.0.0.1:1"),
    ],
)
def test_values_at_the_bounds_get_past_the_command_line(args: list[str], message: str) -> None:
    """The bounds refused above are the real ones: at the bound the command tries the
    master (none here)."""
    result = run_cli(*args, master=NOWHERE, timeout=30)
    assert result.code in (1, 125)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# ---- client commands: refused by the master ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["run", "--type", "http", "--url", "http://127.0.0.1:1/", "--method", "BAD METHOD"],
            125,
            "http payload: 'method' must be an uppercase HTTP method such as GET, HEAD, POST, "
            "PUT, PATCH; got 'BAD METHOD'",
        ),
        (
            ["run", "--type", "http", "--url", "http://127.0.0.1:1/", "--method", "get"],
            125,
            "http payload: 'method' must be uppercase: 'GET', not 'get'",
        ),
        (
            ["run", "--selector", "zone=", "true"],
            125,
            "selector labels need a key and a value: --selector zone=a",
        ),
        (
            ["run", "--idempotency-key", "k" * 257, "true"],
            125,
            "idempotency key longer than 256 chars: 'kkk",
        ),
        (
            ["run", "--all", "--selector", "zone=nowhere", "true"],
            125,
            "no healthy worker runs task type 'command' with labels zone=nowhere: nothing to "
            "broadcast to",
        ),
        (["drain", "w9"], 1, "no registered node 'w9'"),
        (["drain", ""], 1, "no registered node ''"),
    ],
)
def test_values_the_master_refuses_are_one_line(
    small_cluster: SmallCluster, args: list[str], code: int, message: str
) -> None:
    result = run_cli(*args, master=small_cluster.address)
    assert_one_line_error(result, code, message)
    assert result.stdout == ""


def test_drain_of_a_registered_node_says_so(small_cluster: SmallCluster) -> None:
    """The good path of the drain refusals above."""
    result = run_cli("drain", "w2", master=small_cluster.address)
    assert (result.code, result.stderr) == (0, "")
    assert result.stdout == "node w2 is draining: no new tasks; running ones finish\n"
