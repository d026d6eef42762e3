"""The "command" executor: payload parsing, and running real (short-lived) processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dist_exec.cli.common import printable
from dist_exec.client import command_spec
from dist_exec.errors import InvalidTaskSpec
from dist_exec.executors import ExecRequest, Executor, command, describe_task
from dist_exec.executors.command import (
    ATTEMPT_ENV,
    BASE_ENV_KEYS,
    JOB_ENV,
    RUN_ENV,
    CommandExecutor,
    CommandSpec,
    describe,
    parse_payload,
)
from dist_exec.executors.guardian import kill_tagged, tagged
from dist_exec.models import ExecOutcome, ExecStatus
from dist_exec.tuning import GRPC_EXPERIMENTS
from tests.conftest import RecordingSink

# --- payload parsing -------------------------------------------------------------------------


def payload(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (payload(command="echo"), CommandSpec("echo")),
        (payload(command="echo", args=["a", "b c"]), CommandSpec("echo", ["a", "b c"])),
        (
            payload(command="echo $HOME | wc", shell=True),
            CommandSpec("echo $HOME | wc", shell=True),
        ),
        (payload(command="true", shell=False, args=[]), CommandSpec("true")),
        (
            payload(command="env", env={"A": "1", "B_2": ""}),
            CommandSpec("env", env={"A": "1", "B_2": ""}),
        ),
        (payload(command="ls", working_dir="/tmp"), CommandSpec("ls", working_dir="/tmp")),
        (payload(command="cat", stdin="line\n"), CommandSpec("cat", stdin=b"line\n")),
        # stdin is data, not an argument: it may hold any character, NUL included.
        (payload(command="cat", stdin="a\u0000b"), CommandSpec("cat", stdin=b"a\0b")),
        (payload(command="cat", stdin="\u00e9\r\n"), CommandSpec("cat", stdin=b"\xc3\xa9\r\n")),
        # ... and any bytes, UTF-8 or not, in base64.
        (payload(command="cat", stdin_base64="/wAN"), CommandSpec("cat", stdin=b"\xff\0\r")),
        (payload(command="cat", stdin_base64=""), CommandSpec("cat")),
        (
            payload(command="echo", args=["h\u00e9llo", "\u2603"]),
            CommandSpec("echo", ["h\u00e9llo", "\u2603"]),
        ),
        (b'  {"command": "echo"}\n', CommandSpec("echo")),
    ],
)
def test_parse_payload_accepts(raw: bytes, expected: CommandSpec) -> None:
    assert parse_payload(raw) == expected


def _nested(depth: int) -> bytes:
    return b'{"command": "x", "env": ' + b'{"a": ' * depth + b"{}" + b"}" * depth + b"}"


def bad(case: str, match: str, **fields: object) -> object:
    return pytest.param(payload(**fields), match, id=case)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        pytest.param(b"", "not valid JSON", id="empty"),
        pytest.param(b"echo hello", "not valid JSON", id="not-json"),
        pytest.param(b'{"command": "echo"', "not valid JSON", id="truncated"),
        pytest.param(b'{"command": "\xff\xfe"}', "not valid JSON", id="not-utf8"),
        pytest.param(b"[]", "must be a JSON object", id="array"),
        pytest.param(b'"echo"', "must be a JSON object", id="string"),
        pytest.param(b"42", "must be a JSON object", id="number"),
        pytest.param(b"null", "must be a JSON object", id="null"),
        bad("unknown-field", "unknown field\\(s\\) cmd", command="x", cmd="y"),
        bad("unknown-timeout", "unknown field", command="x", timeout=1),
        bad("no-command", "'command' must be a string"),
        bad("command-null", "'command' must be a string", command=None),
        bad("command-list", "'command' must be a string", command=["ls"]),
        bad("command-empty", "non-empty", command=""),
        bad("command-blank", "non-empty", command="  \t"),
        bad("args-str", "'args' must be a list of strings", command="x", args="a b"),
        bad("args-int", "'args' must be a list of strings", command="x", args=[1]),
        bad("args-null", "'args' must be a list of strings", command="x", args=[None]),
        bad("args-dict", "'args' must be a list of strings", command="x", args={"a": "b"}),
        bad("shell-str", "'shell' must be true or false", command="x", shell="yes"),
        bad("shell-int", "'shell' must be true or false", command="x", shell=1),
        bad("shell-args", "cannot be combined", command="ls", shell=True, args=["-l"]),
        bad("env-list", "'env' must map strings to strings", command="x", env=["A=1"]),
        bad("env-int", "'env' must map strings to strings", command="x", env={"A": 1}),
        bad("env-null", "'env' must map strings to strings", command="x", env={"A": None}),
        bad("env-eq", "invalid environment variable", command="x", env={"A=B": "1"}),
        bad("env-empty", "invalid environment variable", command="x", env={"": "1"}),
        bad("env-nul-key", "invalid environment variable", command="x", env={"A\0": "1"}),
        bad("env-nul-value", "invalid environment variable", command="x", env={"A": "1\0"}),
        bad("wd-relative", "must be an absolute path", command="x", working_dir="tmp"),
        bad("wd-dot", "must be an absolute path", command="x", working_dir="./x"),
        bad("wd-int", "'working_dir' must be a string", command="x", working_dir=5),
        bad("nul-command", "cannot hold NUL", command="ec\0ho"),
        bad("nul-arg", "cannot hold NUL", command="echo", args=["a\0"]),
        bad("nul-wd", "cannot hold NUL", command="x", working_dir="/tmp/\0"),
        bad("stdin-int", "'stdin' must be a string", command="cat", stdin=5),
        bad("stdin-b64-int", "'stdin_base64' must be a string", command="cat", stdin_base64=5),
        bad("stdin-b64-bad", "'stdin_base64' is not valid base64", command="c", stdin_base64="a"),
        bad("stdin-b64-text", "'stdin_base64' is not valid base64", command="c", stdin_base64="é"),
        bad(
            "stdin-both",
            "'stdin' or 'stdin_base64', not both",
            command="c",
            stdin="",
            stdin_base64="",
        ),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "not valid JSON", id="deep-array"),
        pytest.param(b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "not valid JSON", id="deep-obj"),
        pytest.param(_nested(100_000), "not valid JSON", id="deep-inside-valid-object"),
    ],
)
def test_parse_payload_rejects(raw: bytes, match: str) -> None:
    with pytest.raises(InvalidTaskSpec, match=match):
        parse_payload(raw)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"command": "x", "args": [' + b"1" * 5000 + b"]}", id="in-args"),
        pytest.param(b'{"command": "x", "env": {"A": ' + b"9" * 5000 + b"}}", id="in-env"),
        pytest.param(b'{"command": "x", "extra": ' + b"1" * 5000 + b"}", id="in-unknown-field"),
        pytest.param(b"1" * 5000, id="whole-payload"),
    ],
)
def test_parse_payload_rejects_huge_integers(raw: bytes) -> None:
    # Python refuses to convert integers of more than 4300 digits (ValueError, not
    # JSONDecodeError); a malformed payload must still be an InvalidTaskSpec.
    with pytest.raises(InvalidTaskSpec):
        parse_payload(raw)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"command": "echo\\ud800"}', id="command"),
        pytest.param(b'{"command": "echo", "args": ["\\udfff"]}', id="args"),
        pytest.param(b'{"command": "env", "env": {"A\\ud800": "1"}}', id="env-key"),
        pytest.param(b'{"command": "env", "env": {"A": "\\ud800"}}', id="env-value"),
        pytest.param(b'{"command": "ls", "working_dir": "/tmp/\\ud800"}', id="working-dir"),
        pytest.param(b'{"command": "cat", "stdin": "\\ud800"}', id="stdin"),
    ],
)
def test_parse_payload_rejects_lone_surrogates(raw: bytes) -> None:
    # "\ud800" is valid JSON but no valid text: it cannot be encoded into an argument, an
    # environment entry, a path or stdin bytes, so the command could never be started.
    with pytest.raises(InvalidTaskSpec):
        parse_payload(raw)


@pytest.mark.parametrize(
    ("stdin", "field"),
    [
        (b"plain\r\n", {"stdin": "plain\r\n"}),
        ("\u00e9".encode() * 3, {"stdin": "\u00e9" * 3}),
        (b"\xff\n", {"stdin_base64": "/wo="}),  # not UTF-8
        # Control characters: escaped in JSON (6 bytes a NUL), base64 is smaller.
        (b"\0" * 6, {"stdin_base64": "AAAAAAAA"}),
    ],
)
def test_stdin_goes_as_text_when_it_is_utf8_else_as_base64(
    stdin: bytes, field: dict[str, str]
) -> None:
    raw = CommandSpec("cat", stdin=stdin).to_payload()
    assert json.loads(raw) == {"command": "cat", **field}
    assert parse_payload(raw).stdin == stdin


@pytest.mark.parametrize(
    ("given", "fed"), [("h\u00e9\n", b"h\xc3\xa9\n"), (b"\xff\r\n", b"\xff\r\n")]
)
def test_the_client_takes_stdin_as_text_or_bytes(given: str | bytes, fed: bytes) -> None:
    assert parse_payload(command_spec(["cat"], stdin=given).payload).stdin == fed


def test_payload_is_as_large_as_the_text_it_holds() -> None:
    """Not escaped to ASCII: 800 kB of 'é' is an 800 kB payload, not a 2.4 MB one."""
    stdin = "\u00e9".encode() * 400_000
    assert len(CommandSpec("cat", stdin=stdin).to_payload()) < len(stdin) + 100


def test_validate_is_parse_payload() -> None:
    executor = CommandExecutor()
    executor.validate(payload(command="echo"))
    with pytest.raises(InvalidTaskSpec, match="must be a JSON object"):
        executor.validate(b"[]")


def test_command_executor_is_an_executor() -> None:
    executor = CommandExecutor()
    assert isinstance(executor, Executor)
    assert executor.name == "command"


@pytest.mark.parametrize(
    ("raw", "line"),
    [
        (payload(command="echo", args=["hello", "world"]), "echo hello world"),
        (payload(command="uptime"), "uptime"),
        (payload(command="echo $HOME | wc -c", shell=True), "echo $HOME | wc -c"),
        (payload(command="make", env={"A": "1"}, working_dir="/src"), "make"),
        (b"not json", "<invalid payload>"),
        (payload(command=""), "<invalid payload>"),
    ],
)
def test_describe(raw: bytes, line: str) -> None:
    assert describe(raw) == line


@pytest.mark.parametrize(
    "spec",
    [
        CommandSpec("echo"),
        CommandSpec("echo", ["a", "b c", ""]),
        CommandSpec("for i in 1 2; do echo $i; done", shell=True),
        CommandSpec("env", env={"A": "1", "EMPTY": ""}),
        CommandSpec("pwd", working_dir="/var/tmp"),
        CommandSpec("cat", stdin=b"x\ny\n"),
        CommandSpec("cat", stdin=b"\x80\xff"),
        CommandSpec("/bin/echo", ["\u2603"], False, {"K": "v"}, "/", b"in"),
    ],
)
def test_to_payload_round_trip(spec: CommandSpec) -> None:
    assert parse_payload(spec.to_payload()) == spec


def test_to_payload_leaves_out_defaults() -> None:
    assert json.loads(CommandSpec("echo").to_payload()) == {"command": "echo"}


def test_argv() -> None:
    assert CommandSpec("echo", ["a", "b"]).argv == ["echo", "a", "b"]
    assert CommandSpec("echo a | wc", shell=True).argv == ["/bin/sh", "-c", "echo a | wc"]


# --- running real processes ------------------------------------------------------------------


def group_members(pgid: int) -> dict[int, str]:
    """Processes (pid -> name) of process group ``pgid`` that still run; zombies are gone."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        state, _ppid, pgrp = stat[stat.rfind(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members[int(entry.name)] = name
    return members


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


@pytest.fixture
def process_groups() -> Iterator[list[int]]:
    """Process groups a test started; whatever is left of them is killed at teardown."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def request(spec: CommandSpec | bytes, timeout_s: float = 30.0) -> ExecRequest:
    raw = spec if isinstance(spec, bytes) else spec.to_payload()
    return ExecRequest(task_id="t-1", attempt=1, payload=raw, timeout_s=timeout_s)


async def run(
    spec: CommandSpec, executor: CommandExecutor | None = None
) -> tuple[ExecOutcome, RecordingSink]:
    sink = RecordingSink()
    async with asyncio.timeout(10):
        outcome = await (executor or CommandExecutor()).execute(request(spec), sink)
    return outcome, sink


async def test_health_check() -> None:
    assert await CommandExecutor().health_check() is True


async def test_success() -> None:
    outcome, sink = await run(CommandSpec("echo", ["hello", "world"]))
    assert outcome.status == ExecStatus.SUCCESS
    assert outcome.exit_code == 0
    assert outcome.error == ""
    assert outcome.duration_s > 0
    assert sink.stdout == b"hello world\n"
    assert sink.stderr == b""


async def test_the_payload_validated_last_is_not_parsed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    executor = CommandExecutor()
    parsed: list[bytes] = []
    real = command.parse_payload

    def counting(raw: bytes) -> CommandSpec:
        parsed.append(raw)
        return real(raw)

    monkeypatch.setattr(command, "parse_payload", counting)
    validated = request(CommandSpec("echo", ["validated"]))
    executor.validate(validated.payload)
    outcome = await executor.execute(validated, RecordingSink())
    assert outcome.status == ExecStatus.SUCCESS
    assert parsed == [validated.payload]  # once, by validate
    # A payload other than the one validated last (an equal one was) is parsed for itself.
    executor.validate(payload(command="echo", args=["other"]))
    sink = RecordingSink()
    other = request(CommandSpec("echo", ["other"]))
    await executor.execute(other, sink)
    assert sink.stdout == b"other\n"
    assert parsed[-1] is other.payload


async def test_stdout_and_stderr_are_kept_apart() -> None:
    outcome, sink = await run(
        CommandSpec(
            "printf out1; printf err1 >&2; printf out2; printf err2 >&2; exit 3", shell=True
        )
    )
    assert sink.stdout == b"out1out2"
    assert sink.stderr == b"err1err2"
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.exit_code == 3
    assert outcome.error == "command exited with status 3"


async def test_large_output_arrives_whole() -> None:
    _, sink = await run(CommandSpec("head", ["-c", "1000000", "/dev/zero"]))
    assert sink.stdout == bytes(1_000_000)


async def test_arguments_are_not_interpreted_by_a_shell() -> None:
    _, sink = await run(CommandSpec("echo", ["$HOME", "a;b", "*"]))
    assert sink.stdout == b"$HOME a;b *\n"


@pytest.mark.parametrize(
    ("sig", "name"), [(signal.SIGKILL, "SIGKILL"), (signal.SIGTERM, "SIGTERM")]
)
async def test_death_by_signal_is_128_plus_n(sig: signal.Signals, name: str) -> None:
    outcome, _ = await run(CommandSpec(f"kill -{int(sig)} $$", shell=True))
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.exit_code == 128 + sig
    assert outcome.error == f"command was killed by {name}"


@pytest.mark.parametrize("command", ["dist-exec-no-such-command", "/nonexistent/bin/tool"])
async def test_command_not_found_is_127(command: str) -> None:
    outcome, _ = await run(CommandSpec(command))
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.exit_code == 127
    assert outcome.error == f"command not found: {command}"


async def test_shell_command_not_found_is_127() -> None:
    outcome, sink = await run(CommandSpec("dist-exec-no-such-command", shell=True))
    assert outcome.exit_code == 127
    assert b"not found" in sink.stderr


@pytest.mark.parametrize(
    ("first_line", "message"),
    [
        (b"#!/no/such/interpreter -x\n", "its interpreter '/no/such/interpreter' was not found"),
        (b"#!/bin/sh-missing\n", "its interpreter '/bin/sh-missing' was not found"),
    ],
)
async def test_a_script_whose_interpreter_is_missing_says_so(
    tmp_path: Path, first_line: bytes, message: str
) -> None:
    """It said "command not found" of a script that is there."""
    script = tmp_path / "script.sh"
    script.write_bytes(first_line + b"echo never\n")
    script.chmod(0o755)
    outcome, _ = await run(CommandSpec(str(script)))
    assert (outcome.status, outcome.exit_code) == (ExecStatus.FAILURE, 127)
    assert outcome.error == f"cannot run {script}: {message}"


async def test_file_that_is_not_executable_is_126(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    outcome, _ = await run(CommandSpec(str(script)))
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.exit_code == 126
    assert outcome.error == f"permission denied: {script}"


async def test_missing_working_dir_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    outcome, _ = await run(CommandSpec("pwd", working_dir=str(missing)))
    assert outcome.status == ExecStatus.FAILURE
    assert outcome.exit_code is None
    assert outcome.error == f"working directory {missing} does not exist"


@pytest.mark.parametrize("under", ["", "/below"], ids=["a-file", "below-a-file"])
async def test_working_dir_that_is_a_file_is_an_error(tmp_path: Path, under: str) -> None:
    """Said as for a missing one, not as a command that cannot run (exit status 126)."""
    (tmp_path / "file").touch()
    where = f"{tmp_path}/file{under}"
    outcome, _ = await run(CommandSpec("pwd", working_dir=where))
    assert (outcome.status, outcome.exit_code) == (ExecStatus.FAILURE, None)
    assert outcome.error == f"working directory {where} is not a directory"


async def test_working_dir_is_used(tmp_path: Path) -> None:
    outcome, sink = await run(CommandSpec("pwd", working_dir=str(tmp_path)))
    assert outcome.exit_code == 0
    assert Path(sink.stdout.decode().strip()).resolve() == tmp_path.resolve()


async def test_environment_is_only_what_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIST_EXEC_SECRET_TEST", "s3cret")
    outcome, sink = await run(CommandSpec("env", env={"GIVEN": "yes"}))
    assert outcome.exit_code == 0
    env = dict(line.split("=", 1) for line in sink.stdout.decode().splitlines())
    assert "DIST_EXEC_SECRET_TEST" not in env
    assert env["GIVEN"] == "yes"
    assert "PATH" in env
    assert set(env) <= {*BASE_ENV_KEYS, "GIVEN", JOB_ENV, ATTEMPT_ENV, RUN_ENV}
    assert env[ATTEMPT_ENV] == "1"


async def test_secret_is_not_visible_to_a_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIST_EXEC_SECRET_TEST", "s3cret")
    _, sink = await run(CommandSpec('printf %s "${DIST_EXEC_SECRET_TEST-unset}"', shell=True))
    assert sink.stdout == b"unset"


async def test_inherit_env_passes_the_worker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIST_EXEC_SECRET_TEST", "s3cret")
    monkeypatch.setenv("DIST_EXEC_OVERRIDDEN_TEST", "worker")
    executor = CommandExecutor({"inherit_env": True})
    _, sink = await run(
        CommandSpec(
            'printf "%s %s" "$DIST_EXEC_SECRET_TEST" "$DIST_EXEC_OVERRIDDEN_TEST"',
            shell=True,
            env={"DIST_EXEC_OVERRIDDEN_TEST": "task"},
        ),
        executor,
    )
    assert sink.stdout == b"s3cret task"


async def test_inherit_env_leaves_out_dist_exec_own_grpc_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gRPC settings the worker made for itself are not the user's: a command (which may
    be a gRPC program of its own) does not get them. One the user changed is passed on."""
    monkeypatch.setenv("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    monkeypatch.setenv("GRPC_ENABLE_FORK_SUPPORT", "1")
    executor = CommandExecutor({"inherit_env": True})
    _, sink = await run(
        CommandSpec(
            'printf "%s %s" "${GRPC_EXPERIMENTS-unset}" "${GRPC_ENABLE_FORK_SUPPORT-unset}"',
            shell=True,
        ),
        executor,
    )
    assert sink.stdout == b"unset 1"


async def test_default_path_when_the_worker_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATH")
    outcome, sink = await run(CommandSpec("/usr/bin/env"))
    assert outcome.exit_code == 0
    assert b"PATH=/usr/local/sbin:" in sink.stdout


async def test_stdin_is_fed() -> None:
    outcome, sink = await run(CommandSpec("cat", stdin=b"line 1\r\nline 2\rend\xff\0"))
    assert outcome.exit_code == 0
    assert sink.stdout == b"line 1\r\nline 2\rend\xff\0"  # exactly the bytes


async def test_no_stdin_reads_empty() -> None:
    outcome, sink = await run(CommandSpec("cat"))
    assert outcome.exit_code == 0
    assert sink.stdout == b""


async def test_stdin_not_read_is_no_error() -> None:
    outcome, _ = await run(CommandSpec("true", stdin=b"x" * 1_000_000))
    assert outcome.status == ExecStatus.SUCCESS


async def test_invalid_payload_raises() -> None:
    with pytest.raises(InvalidTaskSpec, match="must be a JSON object"):
        await CommandExecutor().execute(request(b"[]"), RecordingSink())


async def test_background_child_does_not_hold_up_the_result(process_groups: list[int]) -> None:
    # The shell exits (on USR1) while execute waits for it, leaving a background sleep that
    # still holds stdout and stderr. The command is over: its result must come back now and
    # the leftover sleep must be killed with the rest of the group.
    executor = CommandExecutor({"kill_grace_s": 0.3})
    sink = RecordingSink()
    spec = CommandSpec("trap 'exit 0' USR1; sleep 300 & echo $$; wait", shell=True)
    task = asyncio.create_task(executor.execute(request(spec), sink))
    async with asyncio.timeout(20):
        await sink.first_stdout.wait()
    pgid = int(sink.stdout.split()[0])
    process_groups.append(pgid)
    await wait_until(lambda: sorted(group_members(pgid).values()) == ["sh", "sleep"], "start")

    os.kill(pgid, signal.SIGUSR1)
    done, _ = await asyncio.wait({task}, timeout=30)  # (the bug: until the sleep's 300 s)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        pytest.fail("execute did not return after the command exited (a child holds its pipes)")
    outcome = task.result()
    assert outcome.status == ExecStatus.SUCCESS
    assert outcome.exit_code == 0
    await wait_until(lambda: not group_members(pgid), "the background sleep to be gone")


async def start_and_cancel(
    shell: str, processes: list[str], kill_grace_s: float, process_groups: list[int]
) -> int:
    """Run ``shell`` (which prints its pid first), wait for ``processes``, cancel; -> pgid."""
    executor = CommandExecutor({"kill_grace_s": kill_grace_s})
    sink = RecordingSink()
    task = asyncio.create_task(executor.execute(request(CommandSpec(shell, shell=True)), sink))
    async with asyncio.timeout(20):
        await sink.first_stdout.wait()
    pgid = int(sink.stdout.split()[0])
    process_groups.append(pgid)
    await wait_until(
        lambda: sorted(group_members(pgid).values()) == processes, f"{processes} to start"
    )

    task.cancel()
    async with asyncio.timeout(10):
        with pytest.raises(asyncio.CancelledError):
            await task
    return pgid


async def test_cancel_kills_the_whole_group(process_groups: list[int]) -> None:
    pgid = await start_and_cancel(
        "echo $$; sleep 300 & sleep 300 & wait", ["sh", "sleep", "sleep"], 5.0, process_groups
    )
    # SIGTERM was enough, and the executor waited until the group was gone.
    assert group_members(pgid) == {}


async def test_cancel_kills_a_group_that_ignores_sigterm(process_groups: list[int]) -> None:
    pgid = await start_and_cancel(
        'trap "" TERM; echo $$; sleep 300 & sleep 300; wait',
        ["sh", "sleep", "sleep"],
        0.3,
        process_groups,
    )
    # SIGKILL is delivered asynchronously: allow the kernel a moment to finish the job.
    await wait_until(lambda: not group_members(pgid), "the group to be killed")


async def test_a_stop_after_the_command_ended_keeps_its_result_and_kills_what_it_left(
    process_groups: list[int], tmp_path: Path
) -> None:
    """A cancel (or timeout, or drain) that came while the group a command left behind was
    being stopped discarded the command's result, and cut the stop short: a leftover that
    ignores TERM lived on. Now the result stands and the stop only ends the grace at once.
    (The command ends once its leftover has its trap: a TERM before that killed it.)"""
    executor = CommandExecutor({"kill_grace_s": 60})
    sink = RecordingSink()
    armed = tmp_path / "armed"
    spec = CommandSpec(
        f"echo $$; (trap 'echo term' TERM; touch {armed}; while :; do sleep 0.05; done) & "
        f"while [ ! -e {armed} ]; do sleep 0.01; done; exit 3",
        shell=True,
    )
    task = asyncio.create_task(executor.execute(request(spec), sink))
    async with asyncio.timeout(20):
        await sink.first_stdout.wait()
    pgid = int(sink.stdout.split()[0])
    process_groups.append(pgid)
    await wait_until(lambda: b"term" in sink.stdout, "the leftover to be sent TERM", 10)

    task.cancel()
    async with asyncio.timeout(10):
        outcome = await task
    assert (outcome.status, outcome.exit_code) == (ExecStatus.FAILURE, 3)
    await wait_until(lambda: not group_members(pgid), "the leftover to be killed")


async def test_a_stopped_command_is_woken_to_take_its_term(process_groups: list[int]) -> None:
    """A process stopped (SIGSTOP) holds its TERM until woken: it waited the whole grace (30
    s here: start_and_cancel allows the cancel 10)."""
    pgid = await start_and_cancel("echo $$; kill -STOP $$", ["sh"], 30.0, process_groups)
    assert group_members(pgid) == {}


@pytest.mark.parametrize(
    ("task_type", "payload", "line", "shown"),
    [
        (
            "command",
            CommandSpec("echo a\n#fake row", shell=True).to_payload(),
            "echo a\n#fake row",
            "echo a\\n#fake row",
        ),
        (
            "command",
            CommandSpec("printf", ["\x1b[31mRED\x9b"]).to_payload(),
            "printf \x1b[31mRED\x9b",
            "printf \\x1b[31mRED\\x9b",
        ),
        ("command", CommandSpec("ls", ["-la", "été"]).to_payload(), "ls -la été", "ls -la été"),
        ("http", b'{"url": "http://h/p"}', "GET http://h/p", "GET http://h/p"),
    ],
)
def test_listings_keep_the_command_and_terminals_see_control_characters_escaped(
    task_type: str, payload: bytes, line: str, shown: str
) -> None:
    """JSON keeps the command as typed (it escapes what it must itself); what a terminal is
    shown is one line whoever's job it is: no forged rows, no escape sequences."""
    assert describe_task(task_type, payload) == line
    assert printable(line) == shown


@pytest.mark.parametrize("shell", [False, True])
async def test_an_allowed_name_is_the_program_on_the_standard_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shell: bool
) -> None:
    """Commands that run as the worker's own user got its PATH: a directory of it a job can
    write (~/.local/bin, a venv) let a job plant a program under an allowed name and run
    anything through it."""
    planted = tmp_path / "bin"
    planted.mkdir()
    (planted / "basename").write_text("#!/bin/sh\necho planted\n")
    (planted / "basename").chmod(0o755)
    monkeypatch.setenv("PATH", f"{planted}:{os.environ['PATH']}")
    allowed = {"allowed_commands": ["basename", "sh"]}
    for executor in (CommandExecutor(allowed), CommandExecutor({**allowed, "inherit_env": True})):
        spec = CommandSpec("basename x", shell=True) if shell else CommandSpec("basename", ["x"])
        outcome, sink = await run(spec, executor)
        assert (outcome.status, sink.stdout) == (ExecStatus.SUCCESS, b"x\n")
    outcome, sink = await run(spec)  # (no allow-list: the worker's PATH, as before)
    assert sink.stdout == b"planted\n"


async def test_what_a_command_left_outside_its_group_is_killed_after_it_ends(
    tmp_path: Path,
) -> None:
    """A `setsid` child leaves the process group that is stopped when the command exits: it
    ran on after a job that ended on its own (cancel and timeout killed it already)."""
    tags = {"DIST_EXEC_JOB_ID": "t-1", "DIST_EXEC_ATTEMPT": "1"}  # (what `request` gives)
    left = tmp_path / "left"  # (made once the child has its own session)
    spec = CommandSpec(
        f"setsid sh -c 'touch {left}; exec sleep 60' </dev/null >/dev/null 2>&1 & "
        f"while [ ! -e {left} ]; do sleep 0.01; done; echo started",
        shell=True,
    )
    try:
        outcome, sink = await run(spec)
        assert (outcome.status, sink.stdout) == (ExecStatus.SUCCESS, b"started\n")
        assert tagged(tags), "the setsid child should still run when the command has ended"
        await wait_until(lambda: not tagged(tags), "what the command left to be killed")
    finally:
        kill_tagged(tags)


async def test_the_sweep_after_an_end_leaves_another_run_of_the_same_attempt_alone() -> None:
    """The sweep looked for the job's and attempt's tags, which another run may have too (a
    second worker on the host, a parallel test run): a live command was SIGKILLed 1 s after
    an unrelated one of the same ids ended."""
    other = asyncio.create_task(run(CommandSpec("sleep 2.5; echo alive", shell=True)))
    outcome, _ = await run(CommandSpec("true"))  # (the same request ids: t-1, attempt 1)
    assert outcome.status == ExecStatus.SUCCESS
    alive, sink = await other
    assert (alive.status, sink.stdout) == (ExecStatus.SUCCESS, b"alive\n")


async def test_a_cancel_gives_what_left_the_group_its_signal_too(
    process_groups: list[int], tmp_path: Path
) -> None:
    """A `setsid` child got no TERM (nor the --signal asked for): only the KILL after the
    group's grace, so it never ran its cleanup. (A child started with & in a script ignores
    INT and QUIT, as it would locally: hence TERM here.)"""
    armed, cleaned = tmp_path / "armed", tmp_path / "cleaned"
    await start_and_cancel(
        f'setsid sh -c \'trap "touch {cleaned}; exit 0" TERM; touch {armed}; '
        f"while :; do sleep 0.05; done' & while [ ! -e {armed} ]; do sleep 0.01; done; "
        "echo $$; wait",
        ["sh"],
        30.0,
        process_groups,
    )
    await wait_until(cleaned.exists, "the setsid child's cleanup")
