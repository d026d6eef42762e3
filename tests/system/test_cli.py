"""The real `dist-exec` command line against a real master and two workers."""

from __future__ import annotations

import array
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import termios
import time
import uuid
from pathlib import Path

import pytest

from dist_exec.interrupts import BURST_S
from tests.conftest import ClusterFactory, SmallCluster, pid_alive, run_cli, wait_for

JOB_KEYS = {
    "id", "status", "exit_code", "output", "stderr", "error", "worker_id", "priority",
    "created_at", "started_at", "completed_at",
}  # fmt: skip


def test_shell_string_streams_and_returns_exit_code(small_cluster: SmallCluster) -> None:
    result = run_cli("run", "echo out; echo err >&2; exit 3", master=small_cluster.address)
    assert (result.code, result.stdout, result.stderr) == (3, "out\n", "err\n")


def test_argv_after_double_dash_runs_without_shell(small_cluster: SmallCluster) -> None:
    result = run_cli("run", "--", "echo", "$HOME", "a  b", master=small_cluster.address)
    assert result.code == 0
    assert result.stdout == "$HOME a  b\n"


def test_double_dash_as_an_option_value_keeps_the_shell_string(
    small_cluster: SmallCluster,
) -> None:
    result = run_cli(
        "run", "--idempotency-key", "--", "echo hi; echo there", master=small_cluster.address
    )
    assert (result.code, result.stdout) == (0, "hi\nthere\n"), result.stderr


def test_env_cwd_and_stdin(small_cluster: SmallCluster, tmp_path: Path) -> None:
    result = run_cli(
        "run", "--env", "GREETING=hi", "--cwd", str(tmp_path), "--stdin", "-",
        'echo "$GREETING"; pwd; cat',
        master=small_cluster.address, input_text="from stdin\n",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert result.stdout == f"hi\n{tmp_path}\nfrom stdin\n"


def test_stdin_reaches_the_command_byte_for_byte(small_cluster: SmallCluster) -> None:
    """Not decoded (bytes that are not UTF-8), not translated (CR, CRLF), and UTF-8 text counts
    its own size against the job's limit (800 kB of 'é'), not that of its JSON escapes."""
    for data in (b"\xff\x00\n", b"a\r\nb\rc\n", "\u00e9".encode() * 400_000):
        done = subprocess.run(
            [sys.executable, "-m", "dist_exec", "run", "--stdin", "-", "cat"],
            env={**os.environ, "DIST_EXEC_MASTER": small_cluster.address},
            input=data,
            capture_output=True,
            timeout=60,
        )
        assert (done.returncode, done.stdout == data) == (0, True), done.stderr


def test_without_stdin_run_leaves_its_own_alone(small_cluster: SmallCluster) -> None:
    """The command reads /dev/null, and `run` reads nothing of its stdin: a `while read` loop
    around it sees every line (ssh without -n would eat them)."""
    loop = (
        'printf "a\\nb\\nc\\n" | while read x; do '
        f'"{sys.executable}" -m dist_exec run -- sh -c \'echo "$0:$(cat | wc -c)"\' "$x"; done'
    )
    done = subprocess.run(
        ["sh", "-c", loop],
        env={**os.environ, "DIST_EXEC_MASTER": small_cluster.address},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "a:0\nb:0\nc:0\n"), done.stderr


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"x" * 70_000_000, "--stdin is more than 1 MiB, the most a master accepts for a whole"),
        (b"\xff" * 900_000, "the job is 1200053 bytes as sent (its command, environment and"),
    ],
    ids=["70MB", "900kB-in-base64"],
)
def test_stdin_larger_than_a_job_can_be_is_refused_before_it_is_sent(
    data: bytes, message: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dist_exec", "run", "--stdin", "-", "cat"],
        env={**os.environ, "DIST_EXEC_MASTER": "127.0.0.1:1"},  # (never reached)
        input=data,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 125
    assert done.stderr.decode().startswith(f"dist-exec: {message}")
    assert len(done.stderr.splitlines()) == 1


def test_dist_exec_notes_start_on_a_line_of_their_own(small_cluster: SmallCluster) -> None:
    """Not glued to a command's stderr that does not end with a newline."""
    addr = small_cluster.address
    partial = run_cli("run", "printf partial >&2; kill -TERM $$", master=addr)
    assert (partial.code, partial.stderr) == (
        128 + signal.SIGTERM,
        "partial\ndist-exec: command was killed by SIGTERM\n",
    )
    whole = run_cli("run", "echo whole >&2; kill -TERM $$", master=addr)
    assert whole.stderr == "whole\ndist-exec: command was killed by SIGTERM\n"
    # An exit code of the command's own adds nothing, as locally.
    own = run_cli("run", "echo own >&2; exit 255", master=addr)
    assert (own.code, own.stderr) == (255, "own\n")
    timed_out = run_cli("run", "--timeout", "1s", "printf partial >&2; sleep 60", master=addr)
    assert timed_out.code == 124
    assert timed_out.stderr.startswith("partial\ndist-exec: job ")


def test_command_not_found_and_signals_map_like_a_shell(small_cluster: SmallCluster) -> None:
    missing = run_cli("run", "--", "no-such-command-xyz", master=small_cluster.address)
    assert missing.code == 127
    assert "command not found: no-such-command-xyz" in missing.stderr
    killed = run_cli("run", "kill -KILL $$", master=small_cluster.address)
    assert killed.code == 128 + signal.SIGKILL


def test_timeout_exits_124_and_kills_grandchildren(
    small_cluster: SmallCluster, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    result = run_cli(
        "run", "--timeout", "1s", f"sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; wait",
        master=small_cluster.address,
    )  # fmt: skip
    assert result.code == 124, result.stderr
    assert "timed out" in result.stderr
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2
    wait_for(lambda: not any(pid_alive(p) for p in started), 10, "the process group to be gone")


def test_detach_then_status_list_and_logs(small_cluster: SmallCluster) -> None:
    addr = small_cluster.address
    detached = run_cli(
        "run", "--detach", "--priority", "7", "echo hello; echo oops >&2", master=addr
    )
    assert detached.code == 0
    job_id = detached.stdout.strip()
    assert str(uuid.UUID(job_id)) == job_id

    def finished() -> dict[str, object] | None:
        body: dict[str, object] = json.loads(
            run_cli("status", job_id, "--json", master=addr).stdout
        )
        return body if body["status"] == "COMPLETED" else None

    body = wait_for(finished, 20, "the job to complete")
    assert body.keys() >= JOB_KEYS
    assert body["output"] == "hello\n"
    assert body["stderr"] == "oops\n"
    assert body["exit_code"] == 0
    assert body["priority"] == 7
    assert body["worker_id"] in {"w1", "w2"}
    assert str(body["completed_at"]).endswith("Z")

    text = run_cli("status", job_id, master=addr)
    assert text.code == 0
    assert "COMPLETED" in text.stdout

    listed = run_cli("list", "--limit", "5", "--json", master=addr)
    jobs = json.loads(listed.stdout)
    assert isinstance(jobs, list)
    assert jobs[0]["id"] == job_id
    assert jobs[0].keys() >= JOB_KEYS
    assert run_cli("list", "--status", "completed", master=addr).stdout.count(job_id) == 1
    assert job_id not in run_cli("list", "--status", "FAILED", master=addr).stdout

    logs = run_cli("logs", job_id, master=addr)
    assert (logs.code, logs.stdout, logs.stderr) == (0, "hello\n", "oops\n")


def test_logs_json_keeps_characters_cut_between_pieces_whole(small_cluster: SmallCluster) -> None:
    """Large output arrives in pieces cut anywhere, also inside a character: each JSON line's
    text is whole characters, and the lines join into exactly what the command printed."""
    addr = small_cluster.address
    script = (
        "import sys; sys.stdout.write('x' + 'é' * 300000); sys.stderr.buffer.write(b'bad\\xff')"
    )
    job = json.loads(run_cli("run", "--json", "--", "python3", "-c", script, master=addr).stdout)
    assert job["status"] == "COMPLETED", job
    result = run_cli("logs", "--json", job["id"], master=addr)
    assert result.code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    out = [line for line in lines if line["stream"] == "stdout"]
    assert len(out) > 1  # (in pieces)
    assert "".join(line["data"] for line in out) == "x" + "é" * 300000
    offsets = [line["offset"] for line in out]
    sizes = [len(line["data"].encode()) for line in out]
    assert offsets == [sum(sizes[:i]) for i in range(len(out))]
    assert {line["attempt"] for line in lines} == {1}
    assert "".join(line["data"] for line in lines if line["stream"] == "stderr") == "bad\ufffd"


def test_logs_follow_streams_until_the_job_ends(
    small_cluster: SmallCluster, tmp_path: Path
) -> None:
    addr = small_cluster.address
    gate = tmp_path / "gate"
    job_id = run_cli(
        "run", "-d", f"echo first; while [ ! -e {gate} ]; do sleep 0.05; done; echo second",
        master=addr,
    ).stdout.strip()  # fmt: skip
    follower = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "logs", "--follow", job_id, "--master", addr],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "first\n"
        gate.touch()
        rest = follower.communicate(timeout=20)[0]
        assert rest == "second\n"
        assert follower.returncode == 0
    finally:
        follower.kill()
        follower.communicate()


def test_cancel_running_job_kills_the_whole_group(
    small_cluster: SmallCluster, tmp_path: Path
) -> None:
    addr = small_cluster.address
    pids = tmp_path / "pids"
    job_id = run_cli(
        "run", "-d", f"sh -c 'sleep 300' & echo $! >> {pids}; echo $$ >> {pids}; wait",
        master=addr,
    ).stdout.strip()  # fmt: skip
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, 20, "job to start")
    started = [int(p) for p in pids.read_text().split()]
    result = run_cli("cancel", job_id, master=addr)
    assert result.code == 0, result.stderr
    body = json.loads(run_cli("status", job_id, "--json", master=addr).stdout)
    assert body["status"] == "CANCELLED"
    wait_for(lambda: not any(pid_alive(p) for p in started), 10, "the process group to be gone")
    again = run_cli("cancel", job_id, master=addr)
    assert again.code == 1
    assert "already ended (CANCELLED)" in again.stderr


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT], ids=str
)
def test_ctrl_c_sigterm_sighup_or_sigquit_on_run_cancels_the_job(
    small_cluster: SmallCluster, tmp_path: Path, sig: signal.Signals
) -> None:
    """As they would stop a local command in the foreground (the user, a CI runner's timeout,
    a closed terminal)."""
    addr = small_cluster.address
    marker = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "run", "--master", addr, f"touch {marker}; sleep 300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(marker.exists, 20, "the command to start")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -sig  # then it dies of it, as the local command would
        assert "cancelled" in err
    finally:
        proc.kill()
        proc.communicate()
    jobs = json.loads(run_cli("list", "--json", "--limit", "1", master=addr).stdout)
    assert jobs[0]["status"] == "CANCELLED"


def test_ctrl_c_on_run_prints_what_the_command_says_while_it_stops(
    small_cluster: SmallCluster,
) -> None:
    """A local command's trap prints its cleanup on the terminal; `run` stopped reading at the
    Ctrl-C, so that output was never shown. And the command gets INT, as from a terminal (it
    got TERM, and its shell said 'Terminated' for the killed sleep)."""
    script = (
        "trap 'echo cleaning up; echo cleanup-error >&2; sleep 0.3; echo cleaned; exit 3' INT; "
        "trap 'echo wrong signal: TERM; exit 4' TERM; echo ready; while :; do sleep 0.05; done"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "run", "--master", small_cluster.address, script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    assert out == "cleaning up\ncleaned\n"
    assert re.fullmatch(r"cleanup-error\ndist-exec: job \S+ was cancelled\n", err), err
    assert proc.returncode == -signal.SIGINT


def test_a_second_ctrl_c_while_the_job_stops_ends_run_at_once(small_cluster: SmallCluster) -> None:
    """The job holds out against INT (the worker kills it after its grace): a further Ctrl-C
    stops waiting, as it says. It died of a traceback ('aclose(): asynchronous generator is
    already running'): the follow still read the stream being closed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "run", "--master", small_cluster.address,
         "trap 'echo got INT' INT; trap '' TERM; echo ready; while :; do sleep 0.05; done"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline() == "got INT\n"  # (run took it, and cancelled the job)
        time.sleep(BURST_S)  # a person's second Ctrl-C, not a copy of the first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGINT, err
    assert "Traceback" not in err
    assert "stopped waiting for the master" in err


def test_a_job_without_a_timeout_gets_the_masters_default(cluster: ClusterFactory) -> None:
    """It was an hour, fixed: a long build was killed, and nothing said so or could change it."""
    master = cluster.master(extra=["--default-timeout", "1s"])
    cluster.worker(master)
    result = run_cli("run", "sleep 30", master=master.address)
    assert result.code == 124, result.stderr
    assert "timed out after 1s" in result.stderr
    assert run_cli(
        "run", "--timeout", "20s", "sleep 2; echo own", master=master.address
    ).stdout == ("own\n")


def test_cancel_sends_the_signal_asked_for_and_a_further_one_at_once(
    small_cluster: SmallCluster,
) -> None:
    """`cancel --signal INT` (scancel -s): a command that handles TERM and keeps going gets the
    INT of a second cancel while the first one waits out the grace."""
    addr = small_cluster.address
    job_id = run_cli(
        "run", "-d", "trap 'echo got-TERM' TERM; trap 'echo got-INT; exit 5' INT; echo ready; "
        "while :; do sleep 0.05; done",
        master=addr,
    ).stdout.strip()  # fmt: skip

    def output() -> str:
        return run_cli("logs", job_id, master=addr).stdout

    wait_for(lambda: output() == "ready\n", 20, "the command to start")
    first = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "cancel", job_id, "--master", addr],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: output() == "ready\ngot-TERM\n", 20, "the TERM to be handled")
        second = run_cli("cancel", job_id, "--signal", "int", master=addr)
        assert second.code == 0, second.stderr
        assert first.wait(timeout=30) == 0
    finally:
        first.kill()
        first.communicate()
    body = json.loads(run_cli("status", job_id, "--json", master=addr).stdout)
    assert (body["status"], body["output"]) == ("CANCELLED", "ready\ngot-TERM\ngot-INT\n")
    audit = [
        json.loads(line)
        for line in (Path(small_cluster.master.extra["data_dir"]) / "audit.log")
        .read_text()
        .splitlines()
    ]
    signals = sorted(str(e.get("signal")) for e in audit if e["action"] == "cancel")
    assert signals == ["None", "SIGINT"]  # (both end when the job does: in either order)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("USR1", "'USR1' is not a signal a cancel can send: TERM, INT, HUP, QUIT, KILL"),
        ("", "'' is not a signal a cancel can send"),
        ("19", "'19' is not a signal"),
    ],
)
def test_cancel_refuses_a_signal_it_cannot_send(
    small_cluster: SmallCluster, value: str, message: str
) -> None:
    result = run_cli("cancel", str(uuid.uuid4()), "--signal", value, master=small_cluster.address)
    assert result.code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_on_run_cancels_the_job_also_while_its_output_is_not_read(
    small_cluster: SmallCluster, tmp_path: Path
) -> None:
    """A write to a reader that does not read (a full pipe, a terminal paused with Ctrl-S)
    blocked the event loop, and with it the signal: the job ran on until the pipe closed."""
    addr = small_cluster.address
    marker = tmp_path / "started"
    unread, write_end = os.pipe()
    capacity = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "run", "--master", addr, f"touch {marker}; yes"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write_end)
    try:
        wait_for(marker.exists, 20, "the command to start")
        queued = array.array("i", [0])

        def full() -> bool:
            fcntl.ioctl(unread, termios.FIONREAD, queued)
            return queued[0] >= capacity

        wait_for(full, 20, "run's stdout to fill up")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGINT, err
        assert "cancelled" in err
    finally:
        os.close(unread)
        proc.kill()
        proc.communicate()
    jobs = json.loads(run_cli("list", "--json", "--limit", "1", master=addr).stdout)
    assert jobs[0]["status"] == "CANCELLED"


def signal_set(pid: int, field: str) -> set[signal.Signals]:
    """The signals in a mask of /proc/PID/status (SigIgn, SigCgt, ...)."""
    line = next(
        x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field)
    )
    mask = int(line.split()[1], 16)
    return {signal.Signals(n) for n in range(1, 32) if mask >> (n - 1) & 1}


@pytest.mark.parametrize("limited", [False, True], ids=["spawned", "forked under limits"])
def test_commands_do_not_inherit_the_signals_a_worker_was_started_ignoring(
    cluster: ClusterFactory, limited: bool
) -> None:
    """A worker started with SIGHUP and SIGQUIT ignored (nohup, a script's background job)
    gave its commands those signals ignored too: Ctrl-\\ or a hangup did nothing to them."""
    master = cluster.master()
    ignoring = ["/bin/sh", "-c", 'trap "" HUP QUIT; exec "$@"', "sh"]
    cluster.worker(master, worker_id="w1", run_as="nobody", prefix=ignoring)
    limits = ["--max-procs", "64"] if limited else []
    result = run_cli("run", *limits, "grep SigIgn /proc/self/status", master=master.address)
    assert result.code == 0, result.stderr
    mask = int(result.stdout.split()[1], 16)
    ignored = {signal.Signals(n) for n in range(1, 32) if mask >> (n - 1) & 1}
    assert not ignored & {signal.SIGHUP, signal.SIGQUIT, signal.SIGINT, signal.SIGTERM}


def test_run_says_why_its_job_waits(cluster: ClusterFactory) -> None:
    """A job no worker could take (labels no node has) left run silent for ever."""
    master = cluster.master()
    cluster.worker(master, worker_id="w1", labels={"zone": "a"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "run", "--master", master.address,
         "--selector", "zone=b", "true"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # (run says nothing else before it)
        assert " is waiting: " in line
        assert "zone=b" in line
        assert line.rstrip().endswith("(Ctrl-C cancels it)")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGINT
    finally:
        proc.kill()
        proc.communicate()


def test_run_keeps_a_signal_it_was_started_ignoring_ignored(
    small_cluster: SmallCluster, tmp_path: Path
) -> None:
    """A shell's background job ignores SIGINT (nohup: SIGHUP); so does run, and its job goes on."""
    addr = small_cluster.address
    marker = tmp_path / "started"
    run = [sys.executable, "-m", "dist_exec", "run", "--master", addr, f"touch {marker}; sleep 300"]
    proc = subprocess.Popen(
        ["sh", "-c", 'trap "" INT HUP; exec "$@"', "sh", *run],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(marker.exists, 20, "the command to start")
        # What the kernel does with each signal, read once run follows the job: ignored or not.
        ignored, caught = (signal_set(proc.pid, field) for field in ("SigIgn", "SigCgt"))
        assert {signal.SIGINT, signal.SIGHUP} <= ignored
        assert signal.SIGTERM in caught
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGTERM, err
    finally:
        proc.kill()
        proc.communicate()


def test_run_whose_reader_exits_stops_the_job(small_cluster: SmallCluster, tmp_path: Path) -> None:
    """'dist-exec run CMD | head -1': as the local command would die of SIGPIPE, the job is
    cancelled and run dies of SIGPIPE, with no traceback."""
    addr = small_cluster.address
    pid_file = tmp_path / "pid"
    command = f"echo $$ > {pid_file}; while :; do echo line; sleep 0.05; done"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "run", "--master", addr, command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "line\n"
        proc.stdout.close()  # the reader exits
        assert proc.stderr is not None
        err = proc.stderr.read()  # to its end: run has exited
        assert proc.wait(timeout=30) == -signal.SIGPIPE, err
        assert "Traceback" not in err
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    jobs = json.loads(run_cli("list", "--json", "--limit", "1", master=addr).stdout)
    assert jobs[0]["status"] == "CANCELLED"
    pid = int(pid_file.read_text())
    wait_for(lambda: not pid_alive(pid), 10, "the command to be stopped")


def test_a_reader_slower_than_the_command_still_gets_every_byte(
    small_cluster: SmallCluster,
) -> None:
    """'run seq 1 3000000 | slow': nothing of its 23 MB read until the job has ended (the
    master keeps only the start and the end of such an output): run still prints all of it,
    in order, and exits 0, as the command would locally."""
    addr = small_cluster.address
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "run", "--master", addr, "seq 1 3000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def ended() -> bool:
            listed = run_cli("list", "--json", "--limit", "1", master=addr)
            jobs = json.loads(listed.stdout) if listed.code == 0 else []
            return bool(jobs) and jobs[0]["status"] == "COMPLETED"

        wait_for(ended, 60, "the job to end, nothing of its output read yet")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert b"not kept" not in err  # (only that the master's stored copy is truncated)
    assert out == b"".join(b"%d\n" % i for i in range(1, 3000001))


def _with_stdout_closed(
    addr: str, *args: str, stderr_too: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the command with a stdout whose reader has already exited (and, with
    ``stderr_too``, stderr on the same pipe: ``2>&1 | head -0``)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "dist_exec", *args],
            env={**os.environ, "DIST_EXEC_MASTER": addr},
            stdout=write_end,
            stderr=write_end if stderr_too else subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args",
    [
        ["list", "--limit", "5"],
        ["list", "--json", "--limit", "5"],
        ["nodes"],
        ["run", "--json", "echo hi"],
        ["--version"],
        ["list", "--help"],
    ],
    ids=["list", "list-json", "nodes", "run-json", "version", "help"],
)
def test_a_command_whose_reader_is_gone_dies_of_sigpipe(
    small_cluster: SmallCluster, args: list[str]
) -> None:
    """'dist-exec list | head -0' ends as 'ls | head -0' does (click used to exit 1 in
    silence)."""
    run_cli("run", "echo something to list", master=small_cluster.address)
    done = _with_stdout_closed(small_cluster.address, *args)
    assert (done.returncode, done.stderr) == (-signal.SIGPIPE, "")


BIG_OUTPUT = "head -c 3000000 /dev/zero | tr '\\0' a"


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--json", "JOB"],
        ["list", "--json", "--limit", "1"],
        ["run", "--json", BIG_OUTPUT],
    ],
    ids=["status", "list", "run"],
)
def test_json_whose_reader_exits_early_dies_of_sigpipe(
    small_cluster: SmallCluster, args: list[str]
) -> None:
    """'dist-exec status --json JOB | head -c 10': a JSON object larger than the pipe holds is
    written in part, then the reader exits; that must not go unnoticed (exit status 0)."""
    addr = small_cluster.address
    job_id = run_cli("run", "--detach", BIG_OUTPUT, master=addr).stdout.strip()
    run_cli("logs", "--follow", job_id, master=addr)  # (until it has ended)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", *[job_id if a == "JOB" else a for a in args]],
        env={**os.environ, "DIST_EXEC_MASTER": addr},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert os.read(proc.stdout.fileno(), 10)
        proc.stdout.close()  # the reader exits
        _, err = proc.communicate(timeout=60)
        assert (proc.returncode, err) == (-signal.SIGPIPE, b"")
    finally:
        proc.kill()
        proc.communicate()


def test_run_all_whose_reader_is_gone_dies_of_sigpipe(small_cluster: SmallCluster) -> None:
    """'dist-exec run --all CMD 2>&1 | head -1': the report at the end has nowhere to go
    either; run used to exit 1 through click."""
    done = _with_stdout_closed(small_cluster.address, "run", "--all", "echo hi", stderr_too=True)
    assert done.returncode == -signal.SIGPIPE


def test_ctrl_c_on_run_all_cancels_every_node_job(
    small_cluster: SmallCluster, tmp_path: Path
) -> None:
    """And what each command prints while it stops is printed, as for one job (it was not);
    the summary counts them cancelled, not failed."""
    addr = small_cluster.address
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "run", "--all", "--master", addr,
         "trap 'echo cleaned; exit 5' INT; "
         f"echo $$ > {tmp_path}/pid.$$; while :; do sleep 0.05; done"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: len(list(tmp_path.glob("pid.*"))) == 2, 20, "both nodes' commands")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGINT, err
        assert sorted(out.splitlines()) == ["[w1] cleaned", "[w2] cleaned"]
        assert "2 node(s): 0 succeeded, 0 failed, 2 cancelled" in err
        assert "Traceback" not in err
    finally:
        proc.kill()
        proc.communicate()
    jobs = json.loads(run_cli("list", "--json", "--limit", "2", master=addr).stdout)
    assert [j["status"] for j in jobs] == ["CANCELLED", "CANCELLED"]
    pids = [int(f.name.removeprefix("pid.")) for f in tmp_path.glob("pid.*")]
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "the commands to be stopped")


def test_ctrl_c_on_logs_follow_ends_it_as_a_local_program(small_cluster: SmallCluster) -> None:
    addr = small_cluster.address
    job_id = run_cli("run", "--detach", "echo started; sleep 300", master=addr).stdout.strip()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "logs", "--follow", "--master", addr, job_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "started\n"  # following, past the modules' loading
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert (proc.returncode, err) == (-signal.SIGINT, "")  # the shell shows 130
    finally:
        proc.kill()
        proc.communicate()
    assert run_cli("cancel", job_id, master=addr).code == 0  # the job itself was left running


def test_run_json_prints_one_object(small_cluster: SmallCluster) -> None:
    result = run_cli("run", "--json", "echo hi; exit 2", master=small_cluster.address)
    assert result.code == 2
    body = json.loads(result.stdout)
    assert body["status"] == "FAILED"
    assert body["exit_code"] == 2
    assert body["output"] == "hi\n"


def test_run_detach_json_prints_the_job_as_status_json_does(small_cluster: SmallCluster) -> None:
    addr = small_cluster.address
    result = run_cli("run", "--detach", "--json", "echo hi", master=addr)
    assert result.code == 0, result.stderr
    job = json.loads(result.stdout)
    assert job.keys() >= JOB_KEYS
    assert str(uuid.UUID(job["id"])) == job["id"]
    assert job["status"] in {"PENDING", "RUNNING", "COMPLETED"}
    broadcast = run_cli("run", "--all", "--detach", "--json", "true", master=addr)
    assert broadcast.code == 0, broadcast.stderr
    body = json.loads(broadcast.stdout)
    assert len(body["jobs"]) == 2
    assert all(j.keys() >= JOB_KEYS for j in body["jobs"])
    status = json.loads(run_cli("status", "--json", body["broadcast_id"], master=addr).stdout)
    assert sorted(j["id"] for j in status["jobs"]) == sorted(j["id"] for j in body["jobs"])


def test_nodes_lists_workers(small_cluster: SmallCluster) -> None:
    result = run_cli("nodes", "--json", master=small_cluster.address)
    nodes = json.loads(result.stdout)
    assert [n["id"] for n in nodes] == ["w1", "w2"]
    for node in nodes:
        assert {"id", "address", "status", "capabilities", "max_tasks", "active_tasks",
                "labels", "last_seen"} <= node.keys()  # fmt: skip
        assert node["status"] == "HEALTHY"
        assert node["capabilities"] == ["command", "http"]
        assert node["max_tasks"] == 4
    assert "w1" in run_cli("nodes", master=small_cluster.address).stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["run"], 2, "Missing argument"),
        (["run", "--timeout", "abc", "true"], 2, "invalid duration 'abc'"),
        (["run", "--timeout", "0s", "true"], 2, "'--timeout': '0s' is shorter than 1ms"),
        (["run", "--priority", "11", "true"], 2, "11 is not in the range 0<=x<=10"),
        (["run", "--env", "NOEQUALS", "true"], 2, "expected KEY=VALUE"),
        (["run", "--cwd", "relative/dir", "true"], 125, "'working_dir' must be an absolute path"),
        (["run", "--cwd", "/etc/passwd", "pwd"], 125, "working directory /etc/passwd is not a"),
        (["status", "not-a-uuid"], 1, "invalid job id 'not-a-uuid'"),
        (["status", "3f2c0d6e-0000-4000-8000-000000000000"], 1, "not found"),
        (["cancel", "3f2c0d6e-0000-4000-8000-000000000000"], 1, "not found"),
        (["logs", "3f2c0d6e-0000-4000-8000-000000000000"], 1, "not found"),
        (["list", "--status", "BOGUS"], 2, "Invalid value for '--status'"),
        (["list", "--limit", "0"], 2, "Invalid value for '--limit'"),
        (["list", "--broadcast", "nope"], 1, "invalid broadcast id 'nope'"),
    ],
)
def test_bad_input_gets_one_clear_line(
    small_cluster: SmallCluster, args: list[str], code: int, message: str
) -> None:
    result = run_cli(*args, master=small_cluster.address)
    assert result.code == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_or_a_broken_client_config_is_named_as_such(
    small_cluster: SmallCluster, tmp_path: Path
) -> None:
    worker = small_cluster.workers[0].address
    result = run_cli("status", str(uuid.uuid4()), master=worker)
    assert (result.code, result.stderr) == (
        1,
        f"dist-exec: {worker} does not serve this call: it is not a dist-exec master (point to "
        "the master with --master or DIST_EXEC_MASTER), or an older one than this client\n",
    )
    for text, says in (("{}", "it has no 'master' field"), ("[]", "not a JSON object")):
        config = tmp_path / "client.json"
        config.write_text(text)
        result = run_cli("nodes", "--client-config", str(config), master=small_cluster.address)
        assert result.code != 0
        assert result.stderr == f"dist-exec: cannot use client config {config}: {says}\n"


NOT_UTF8 = os.fsdecode(b"\xff")  # what an argument that is not UTF-8 arrives as


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["list", "--offset", "2147483648"], {}, "'--offset': 2147483648 is not in the range"),
        (["run", "--memory", "18446744073709551616", "true"], {}, "'--memory'"),
        (["run", "--max-file-size", "99999999999999999999", "true"], {}, "'--max-file-size'"),
        (["run", "--timeout", "9" * 30 + "h", "true"], {}, "longer than 10000 years"),
        (["run", "--cpu-time", "9" * 400, "true"], {}, "longer than 10000 years"),
        (["status", NOT_UTF8], {}, "'JOB_ID': not valid UTF-8"),
        (["drain", NOT_UTF8], {}, "'NODE_ID': not valid UTF-8"),
        (["list", "--broadcast", NOT_UTF8], {}, "'--broadcast': not valid UTF-8"),
        (["run", "--selector", f"a={NOT_UTF8}", "true"], {}, "'--selector': not valid UTF-8"),
        (["run", "--idempotency-key", NOT_UTF8, "true"], {}, "'--idempotency-key': not valid"),
        (["run", "--", "echo", NOT_UTF8], {}, "'[COMMAND]...': not valid UTF-8"),
        (["run", "--master", f"{NOT_UTF8}:1", "true"], {}, "'--master': not valid UTF-8"),
        (["run", "--token", NOT_UTF8, "true"], {}, "'--token': a token is visible ASCII"),
        (["run", "--token", "a\nb", "true"], {}, "'--token': a token is visible ASCII"),
        (["run", "true"], {"DIST_EXEC_TOKEN": "a b"}, "'--token': a token is visible ASCII"),
    ],
)
def test_values_the_wire_cannot_carry_are_usage_errors(
    args: list[str], env: dict[str, str], message: str
) -> None:
    """Integers out of their protobuf field's range, text that is not UTF-8, a token that is
    no header value: refused by the command line, never a traceback from protobuf or gRPC."""
    result = run_cli(*args, master="127.0.0.1:1", env=env)
    assert (result.code, "Traceback" in result.stderr) == (2, False), result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("option", ["--timeout", "--queue-timeout"])
def test_timeouts_under_1ms_are_usage_errors(option: str) -> None:
    """The least a master accepts: refused before the job is sent, not run for 0ms."""
    result = run_cli("run", option, "0.001ms", "true", master="127.0.0.1:1")
    assert result.code == 2
    assert f"'{option}': '0.001ms' is shorter than 1ms" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["run", "true"],
        ["status", str(uuid.uuid4())],
        ["nodes"],
        ["logs", str(uuid.uuid4())],
        ["logs", "--follow", str(uuid.uuid4())],
    ],
)
def test_unreachable_master_is_one_line(args: list[str]) -> None:
    """At once: an output stream is resumed only once a master has taken it."""
    result = run_cli(*args, "--master", "127.0.0.1:1", timeout=10)
    assert result.code in (1, 125)
    assert "cannot reach the master at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["worker", "--worker-id", "\udcff", "--master", "127.0.0.1:1"], "--worker-id"),
        (["worker", "--run-as", "\udcff", "--master", "127.0.0.1:1"], "--run-as"),
        (["worker", "--token", "a b", "--master", "127.0.0.1:1"], "--token"),
        (["worker", "--call-token", "a\nb", "--master", "127.0.0.1:1"], "--call-token"),
        (["master", "--block-command", "\udcff", "--listen", "127.0.0.1:1"], "--block-command"),
    ],
)
def test_server_options_the_wire_cannot_carry_are_usage_errors(
    args: list[str], option: str
) -> None:
    result = run_cli(*args)  # ("\udcff": the byte 0xff, as the shell would pass it)
    assert result.code == 2, result.stderr
    assert f"Invalid value for '{option}'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--worker-id", "a b"], "worker_id 'a b' is not an id"),
        (["--label", "zone=a\x1bb"], "label zone='a\\x1bb': the value has control characters"),
        (
            ["--advertise", "[host]:80"],
            "address '[host]:80' cannot be dialled: 'host' is not an IPv6",
        ),
        (["--advertise", "10.0.0.1:0"], "address '10.0.0.1:0' cannot be dialled: its port is 0"),
    ],
)
def test_a_worker_the_master_would_refuse_says_why_at_once(args: list[str], message: str) -> None:
    result = run_cli("worker", "--master", "127.0.0.1:1", *args, timeout=30)
    assert result.code == 2, result.stderr
    assert f"the master would refuse this worker: {message}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["status", "x"], ["run", "--", "true"], ["list"]])
def test_a_client_command_with_stdout_closed_says_so_and_fails(
    small_cluster: SmallCluster, args: list[str]
) -> None:
    """Python leaves sys.stdout None when fd 1 is closed, and click then writes nothing: the
    command printed nothing and exited 0 (a run even ran its job, its output lost)."""
    done = subprocess.run(
        ["/bin/sh", "-c", '"$@" >&-', "sh", sys.executable, "-m", "dist_exec", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DIST_EXEC_MASTER": small_cluster.address},
    )
    assert done.returncode == 1
    assert done.stderr == (
        "dist-exec: standard output is closed: nothing could be written (redirect it to a file "
        "or /dev/null)\n"
    )


def test_run_with_stderr_closed_drops_the_jobs_stderr_and_goes_on(
    small_cluster: SmallCluster,
) -> None:
    """As a command run locally with `2>&-` loses what it writes there: the first stderr of
    the job ended `run` (a hidden AttributeError, exit 1), its stdout lost, the job left
    running."""
    script = "echo out; echo err >&2; sleep 0.2; echo out2; exit 3"
    done = subprocess.run(
        ["/bin/sh", "-c", '"$@" 2>&-', "sh", sys.executable, "-m", "dist_exec", "run", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DIST_EXEC_MASTER": small_cluster.address},
    )
    assert (done.returncode, done.stdout) == (3, "out\nout2\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", ""], "dist-exec: the command is empty: give a shell string or argv\n"),
        (["run", "--token", "", "true"], "Error: Invalid value for '--token': the token is empty"),
    ],
)
def test_empty_commands_and_tokens_are_usage_errors(args: list[str], message: str) -> None:
    result = run_cli(*args, master="127.0.0.1:1")
    assert result.code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_stdin_from_a_closed_standard_input_is_a_usage_error() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_exec",
            "run",
            "--master",
            "127.0.0.1:1",
            "--stdin",
            "-",
            "cat",
        ],
        stdin=None,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.close(0),
    )
    assert done.returncode == 2
    assert "standard input is closed: there is nothing to read" in done.stderr
    assert "Traceback" not in done.stderr
