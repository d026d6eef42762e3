"""What the client commands' parameters accept: only what the wire can carry; and how they
print JSON."""

from __future__ import annotations

import json
import signal

import click
import pytest

from dist_exec.cli import jobs, run
from dist_exec.cli.common import SIGNAL, JsonArrayPrinter, print_json
from dist_exec.models import OutputChunk, Stream

CLIENT_COMMANDS = [
    run.run, jobs.status, jobs.list_jobs, jobs.logs, jobs.cancel, jobs.nodes, jobs.drain,
    jobs.whoami,
]  # fmt: skip


@pytest.mark.parametrize("command", CLIENT_COMMANDS, ids=lambda c: c.name)
def test_every_parameter_is_checked_against_the_wire(command: click.Command) -> None:
    """A plain string (maybe not UTF-8) or an unbounded integer reaches protobuf unchecked,
    which answers with a traceback: each parameter has a type that refuses those."""
    for param in command.params:
        kind = param.type
        assert type(kind) is not click.types.StringParamType, param.name
        if isinstance(kind, click.types.IntParamType):
            assert isinstance(kind, click.IntRange), param.name
            assert kind.max is not None, param.name


@pytest.mark.parametrize(
    ("args", "argv_mode", "command"),
    [
        (["--", "ls", "-la"], True, ("ls", "-la")),
        # After the command's first word, a '--' is the command's own (`ls -- -d` as locally).
        (["echo", "--", "x"], True, ("echo", "--", "x")),
        (["ls", "--timeout", "5s", "--", "-d"], True, ("ls", "--", "-d")),
        (["-d", "--", "echo", "--"], True, ("echo", "--")),
        (["echo hi"], False, ("echo hi",)),
        # A '--' that is an option's value does not end the options.
        (["--idempotency-key", "--", "echo hi; echo there"], False, ("echo hi; echo there",)),
        (["--cwd", "--", "--data", "--", "pwd"], False, ("pwd",)),
        (["--data", "--", "--", "ls"], True, ("ls",)),
        (["--idempotency-key=--", "pwd"], False, ("pwd",)),
    ],
)
def test_run_takes_argv_only_after_a_double_dash_that_ends_the_options(
    args: list[str], argv_mode: bool, command: tuple[str, ...]
) -> None:
    ctx = run.run.make_context("run", args)
    assert (ctx.meta["argv_mode"], ctx.params["command"]) == (argv_mode, command)


@pytest.mark.parametrize(
    "items", [[], [{"a": 1, "b": "x\ny"}], [{"a": 1}, {"b": [1, {"c": None}]}, "s"]]
)
def test_a_json_array_printed_an_element_at_a_time_is_the_same_text(
    items: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    """list --json prints each job as it gets it (never all of them in memory at once)."""
    print_json(items)
    whole = capsys.readouterr().out
    printer = JsonArrayPrinter()
    for item in items:
        printer.add(item)
    printer.end()
    assert capsys.readouterr().out == whole
    assert json.loads(whole) == items


def test_logs_json_does_not_join_bytes_across_a_gap(capsys: pytest.CaptureFixture[str]) -> None:
    """The master keeps a long output's head and tail: the bytes on either side of what it
    did not keep are no character together."""
    lines = jobs._JsonLines()
    lines.add(1, OutputChunk(Stream.STDOUT, 0, b"head\xc3"))
    lines.add(1, OutputChunk(Stream.STDOUT, 1000, b"\xa9tail\xc3"))
    lines.add(1, OutputChunk(Stream.STDOUT, 1006, b"\xa9!"))
    lines.flush()
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["offset"], p["data"]) for p in printed] == [
        (0, "head"),
        (4, "\ufffd"),
        (1000, "\ufffdtail"),
        (1005, "\u00e9!"),  # (a character cut between two pieces with no gap stays whole)
    ]


def test_a_broadcasts_prefixer_keeps_lines_whole_and_bounds_a_long_one(
    monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """Each chunk was joined to the unfinished line before it (copied again each time, all
    of it held): a 300 MB line without a newline printed nothing in two minutes."""
    monkeypatch.setattr(run._Prefixer, "MAX_LINE", 10)
    prefixer = run._Prefixer(2)
    for chunk in (b"ab", b"c\nde", b"f" * 8, b"g" * 8, b"\nh"):
        prefixer.write("n1", Stream.STDOUT, chunk)
        assert all(len(held) <= 10 for held in prefixer.partial.values())
    prefixer.write("n2", Stream.STDOUT, b"other\n")
    prefixer.flush("n1")
    assert capsysbinary.readouterr().out.splitlines() == [
        b"[n1] abc",
        b"[n1] de" + b"f" * 8,  # (ten bytes held, more came: a piece of its own)
        b"[n1] " + b"g" * 8,
        b"[n2] other",
        b"[n1] h",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("INT", signal.SIGINT), ("sigint", signal.SIGINT), ("2", signal.SIGINT),
        ("term", signal.SIGTERM), ("SIGHUP", signal.SIGHUP), ("Quit", signal.SIGQUIT),
        (" KILL ", signal.SIGKILL), ("9", signal.SIGKILL),
    ],
)  # fmt: skip
def test_cancel_takes_a_signal_by_name_or_number(text: str, expected: signal.Signals) -> None:
    assert SIGNAL.convert(text, None, None) is expected


@pytest.mark.parametrize("text", ["USR1", "SIGSTOP", "15x", "", "SIG", "0", "-2"])
def test_cancel_refuses_any_other_signal(text: str) -> None:
    with pytest.raises(click.BadParameter, match="is not a signal a cancel can send"):
        SIGNAL.convert(text, None, None)
