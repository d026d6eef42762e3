"""The command spawner: a real spawner process starting real commands as nobody."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dist_exec import procfs
from dist_exec.executors import ExecRequest
from dist_exec.executors.child import Child
from dist_exec.executors.command import CommandExecutor, CommandSpec
from dist_exec.executors.containment import Containment, Mode
from dist_exec.executors.guardian import tagged
from dist_exec.executors.spawner import Spawner, SpawnerError, SpawnerGone
from dist_exec.models import ExecStatus, TaskLimits
from tests.conftest import RecordingSink, pid_alive, wait_for, wait_until
from tests.unit.test_child import run_child as run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs commands as nobody: needs root")
NOBODY = pwd.getpwnam("nobody")
ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture
async def spawner() -> AsyncIterator[Spawner]:
    found = Spawner(NOBODY.pw_uid, NOBODY.pw_gid)
    try:
        yield found
    finally:
        found.close()
    assert not pid_alive(found.pid)


async def test_commands_run_as_the_user_with_exactly_their_environment(spawner: Spawner) -> None:
    child = await spawner.spawn(
        ["/bin/sh", "-c", 'id -u; id -g; id -G; pwd; echo "$ONLY"; env | wc -l; cat; exit 3'],
        stdin=True,
        cwd="/tmp",
        env={**ENV, "ONLY": "this"},
    )
    assert os.getsid(child.pid) == child.pid  # its own session
    code, out, err = await run(child, b"from stdin\n")
    uid, gid = str(NOBODY.pw_uid), str(NOBODY.pw_gid)
    # sh sets PWD; env also counts PATH and ONLY
    assert out.decode().split("\n") == [uid, gid, gid, "/tmp", "this", "3", "from stdin", ""]
    assert (code, err) == (3, b"")


async def test_stdout_and_stderr_apart_and_a_signal_death(spawner: Spawner) -> None:
    child = await spawner.spawn(
        ["/bin/sh", "-c", "echo out; echo err >&2; kill -TERM $$"], stdin=False, cwd=None, env=ENV
    )
    assert await run(child) == (-signal.SIGTERM, b"out\n", b"err\n")


async def test_what_cannot_start_raises_what_popen_raises(
    spawner: Spawner, shared_dir: Path
) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        await spawner.spawn(["no-such-command-here"], stdin=False, cwd=None, env=ENV)
    assert missing.value.filename == "no-such-command-here"
    with pytest.raises(FileNotFoundError) as no_dir:
        await spawner.spawn(["true"], stdin=False, cwd=str(shared_dir / "gone"), env=ENV)
    assert no_dir.value.filename == str(shared_dir / "gone")
    private = shared_dir / "private"
    private.mkdir(mode=0o700)  # root's: nobody may not enter it
    with pytest.raises(PermissionError) as denied:
        await spawner.spawn(["true"], stdin=False, cwd=str(private), env=ENV)
    assert denied.value.filename == str(private)
    # and it goes on serving
    assert await run(await spawner.spawn(["echo", "ok"], stdin=False, cwd=None, env=ENV)) == (
        0,
        b"ok\n",
        b"",
    )


async def test_many_at_once_each_gets_its_own_output_and_exit(spawner: Spawner) -> None:
    async def one(i: int) -> tuple[int, bytes, bytes]:
        argv = ["/bin/sh", "-c", f"echo {i}; exit {i % 7}"]
        return await run(await spawner.spawn(argv, stdin=False, cwd=None, env=ENV))

    results = await asyncio.gather(*(one(i) for i in range(60)))
    assert results == [(i % 7, f"{i}\n".encode(), b"") for i in range(60)]


async def test_a_large_environment_goes_through_whole(spawner: Spawner) -> None:
    # 800 KB, many socket buffers' worth: the frame is sent in parts (a single variable may
    # hold at most 128 KiB, the whole environment about 2 MB)
    big = {f"BIG{i}": str(i) * 100_000 for i in range(8)}
    child = await spawner.spawn(
        ["/bin/sh", "-c", "env | grep ^BIG | sort | md5sum"],
        stdin=False,
        cwd=None,
        env={**ENV, **big},
    )
    expected = "".join(sorted(f"{k}={v}\n" for k, v in big.items())).encode()
    assert await run(child) == (0, hashlib.md5(expected).hexdigest().encode() + b"  -\n", b"")


async def test_commands_get_only_the_users_ids_and_cannot_reach_the_spawner(
    spawner: Spawner,
) -> None:
    """The spawner stays root: the commands, all of the same user, can neither signal it nor
    read it; they run with the user's real, effective and saved ids and no capabilities."""
    me = spawner.pid
    script = (
        "grep -E '^(Uid|Gid|Groups|CapPrm|CapEff):' /proc/self/status; "
        f"kill -0 {me} || echo no-signal; "
        f"cat /proc/{me}/environ || echo no-environ; head -c 1 /proc/{me}/mem || echo no-mem"
    )
    code, out, _ = await run(
        await spawner.spawn(["/bin/sh", "-c", script], stdin=False, cwd=None, env=ENV)
    )
    uid, gid = NOBODY.pw_uid, NOBODY.pw_gid
    assert code == 0
    assert out.decode().split("\n") == [
        f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}",
        f"Gid:\t{gid}\t{gid}\t{gid}\t{gid}",
        "Groups:\t ",
        "CapPrm:\t0000000000000000",
        "CapEff:\t0000000000000000",
        "no-signal",
        "no-environ",
        "no-mem",
        "",
    ]
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{me}/status").read_text().splitlines()
    )
    assert status["Uid"].split() == ["0"] * 4  # root again after the start
    assert status["Groups"].split() == []
    assert status["Name"].strip() == "dist-exec-spawn"


async def test_a_caller_that_goes_away_leaves_no_command_running(spawner: Spawner) -> None:
    os.kill(spawner.pid, signal.SIGSTOP)  # the request is sent; its answer waits
    try:
        spawning = asyncio.create_task(
            spawner.spawn(
                ["sleep", "60"], stdin=False, cwd=None, env={**ENV, "DIST_EXEC_T": "gone-caller"}
            )
        )
        await wait_until(lambda: spawner._waiting, 10, "the request sent")
        spawning.cancel()
        with pytest.raises(asyncio.CancelledError):
            await spawning
    finally:
        os.kill(spawner.pid, signal.SIGCONT)
    # the answer comes and the command is killed at once
    await wait_until(lambda: not spawner._waiting, 10, "the answer")
    await wait_until(lambda: not tagged({"DIST_EXEC_T": "gone-caller"}), 10, "no sleep left")


async def test_when_the_spawner_dies_waiters_fail_and_running_exits_are_lost(
    spawner: Spawner, caplog: pytest.LogCaptureFixture
) -> None:
    running = await spawner.spawn(["sleep", "60"], stdin=False, cwd=None, env=ENV)
    os.kill(spawner.pid, signal.SIGSTOP)
    waiting = asyncio.create_task(spawner.spawn(["true"], stdin=False, cwd=None, env=ENV))
    await wait_until(lambda: len(spawner._waiting) == 1, 10, "the request sent")
    os.kill(spawner.pid, signal.SIGKILL)
    with pytest.raises(SpawnerGone) as sent:
        await waiting
    assert sent.value.sent  # it had the request: whether it started the command is unknown
    async with asyncio.timeout(10):
        assert await running.wait() == 255  # its exit status went with the spawner
    assert f"command spawner {spawner.pid} ended (" in caplog.text
    assert not spawner.alive
    with pytest.raises(SpawnerGone) as unsent:
        await spawner.spawn(["true"], stdin=False, cwd=None, env=ENV)
    assert not unsent.value.sent  # nothing started: the worker may start it itself
    os.killpg(running.pid, signal.SIGKILL)  # an orphan now: the worker's own stop would do this
    assert await run(running) == (255, b"", b"")  # and its pipes end


def test_the_spawner_ends_with_its_worker() -> None:
    """A worker killed outright: its end of the socket closes, and the spawner ends."""
    code = (
        "import os, pwd, sys, time\n"
        "from dist_exec.executors.spawner import Spawner\n"
        "s = Spawner(65534, 65534)\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert worker.stdout is not None
        spawner_pid = int(worker.stdout.readline())
        assert pid_alive(spawner_pid)
    finally:
        worker.kill()
        worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()
    wait_for(lambda: not pid_alive(spawner_pid), 10, "the spawner gone")


def test_a_spawner_that_cannot_start_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/no/such/python")
    with pytest.raises(SpawnerError, match="cannot start the command spawner"):
        Spawner(NOBODY.pw_uid, NOBODY.pw_gid)
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(SpawnerError, match="did not start: it exited with status 1"):
        Spawner(NOBODY.pw_uid, NOBODY.pw_gid)


# ---- through the command executor -------------------------------------------------------------


def _request(spec: CommandSpec, task_id: str = "t1") -> ExecRequest:
    return ExecRequest(task_id, 1, spec.to_payload(), 10.0)


async def test_the_executor_starts_unlimited_commands_through_the_spawner() -> None:
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), "nobody")
    try:
        assert containment.spawner is not None
        executor = CommandExecutor({"containment": containment})
        sink = RecordingSink()
        spec = CommandSpec("/bin/sh", ["-c", "echo $PPID; id -u"])
        outcome = await executor.execute(_request(spec), sink)
        assert outcome.status == ExecStatus.SUCCESS
        parent, uid = sink.stdout.decode().split()
        assert (int(parent), uid) == (containment.spawner.pid, str(NOBODY.pw_uid))
        # under a limit the worker starts it itself (a step between fork and exec), still nobody
        limited = await executor.execute(
            ExecRequest("t2", 1, spec.to_payload(), 10.0, limits=TaskLimits(cpu_time_s=5)),
            sink := RecordingSink(),
        )
        assert limited.status == ExecStatus.SUCCESS
        parent, uid = sink.stdout.decode().split()
        assert (int(parent), uid) == (os.getpid(), str(NOBODY.pw_uid))
    finally:
        containment.close()


async def test_the_executor_forks_itself_once_the_spawner_is_gone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), "nobody")
    try:
        spawner = containment.spawner
        assert spawner is not None
        executor = CommandExecutor({"containment": containment})
        os.kill(spawner.pid, signal.SIGSTOP)
        spec = CommandSpec("/bin/sh", ["-c", "id -u"])
        starting = asyncio.create_task(executor.execute(_request(spec), RecordingSink()))
        await wait_until(lambda: spawner._waiting, 10, "the request sent")
        os.kill(spawner.pid, signal.SIGKILL)
        lost = await starting
        assert lost.status == ExecStatus.FAILURE
        assert lost.error == "cannot run /bin/sh: the command spawner ended while starting it"
        sink = RecordingSink()
        outcome = await executor.execute(_request(spec, "t2"), sink)
        assert outcome.status == ExecStatus.SUCCESS
        assert sink.stdout == f"{NOBODY.pw_uid}\n".encode()
    finally:
        containment.close()


async def test_a_start_the_spawner_never_got_is_forked_by_the_worker() -> None:
    """A start still waiting for its turn to send when the spawner ends was never seen by it:
    the worker starts that command itself instead of failing it."""
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), "nobody")
    try:
        spawner = containment.spawner
        assert spawner is not None
        executor = CommandExecutor({"containment": containment})
        os.kill(spawner.pid, signal.SIGSTOP)
        # A request larger than the socket's buffer: its send waits, holding the socket.
        big = CommandSpec("/bin/sh", ["-c", "true"], env={"BIG": "x" * (4 << 20)})
        first = asyncio.create_task(executor.execute(_request(big), RecordingSink()))
        await wait_until(lambda: spawner._waiting, 10, "the big request being sent")
        sink = RecordingSink()
        spec = CommandSpec("/bin/sh", ["-c", "echo $PPID; id -u"])
        second = asyncio.create_task(executor.execute(_request(spec, "t2"), sink))
        await wait_until(lambda: spawner._sending._waiters, 10, "the second start waiting")
        os.kill(spawner.pid, signal.SIGKILL)
        async with asyncio.timeout(20):
            lost, outcome = await asyncio.gather(first, second)
        assert lost.status == ExecStatus.FAILURE  # partly sent: whether it started is unknown
        assert lost.error.startswith("cannot run /bin/sh: the command spawner ")
        assert outcome.status == ExecStatus.SUCCESS, outcome
        parent, uid = sink.stdout.decode().split()
        assert (int(parent), uid) == (os.getpid(), str(NOBODY.pw_uid))
    finally:
        containment.close()


async def test_a_working_directory_nobody_may_not_enter_is_said_so(tmp_path: Path) -> None:
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), "nobody")
    try:
        private = tmp_path / "private"
        private.mkdir(mode=0o700)
        executor = CommandExecutor({"containment": containment})
        outcome = await executor.execute(
            _request(CommandSpec("true", working_dir=str(private))), RecordingSink()
        )
        assert outcome.status == ExecStatus.FAILURE
        assert outcome.error == f"cannot enter working directory {private}: permission denied"
    finally:
        containment.close()


async def test_a_command_whose_spawner_dies_fails_saying_so_and_is_stopped() -> None:
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), "nobody")
    try:
        spawner = containment.spawner
        assert spawner is not None
        executor = CommandExecutor({"containment": containment, "kill_grace_s": 1.0})
        sink = RecordingSink()
        spec = CommandSpec("/bin/sh", ["-c", "echo $$; exec sleep 60"])
        running = asyncio.create_task(executor.execute(_request(spec), sink))
        async with asyncio.timeout(10):
            await sink.first_stdout.wait()
        pid = int(sink.stdout)
        os.kill(spawner.pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            outcome = await running
        assert outcome.status == ExecStatus.FAILURE
        assert outcome.exit_code is None
        assert outcome.error == (
            "its exit status was lost (the worker's command spawner ended while it ran); what "
            "was left of it was stopped"
        )
        await wait_until(lambda: not pid_alive(pid), 10, "the command stopped")
    finally:
        containment.close()


async def test_a_stopped_spawner_is_killed_as_soon_as_an_answer_is_late(
    spawner: Spawner, caplog: pytest.LogCaptureFixture
) -> None:
    """Not after ANSWER_TIMEOUT_S (10 s): the starts waiting on it fail at once, and the
    worker forks commands itself meanwhile (see the replacement test below)."""
    first = await run(await spawner.spawn(["true"], stdin=False, cwd=None, env=ENV))
    assert first == (0, b"", b"")
    os.kill(spawner.pid, signal.SIGSTOP)  # as a command of the same user might, at the wrong time
    with pytest.raises(SpawnerGone):
        async with asyncio.timeout(2):
            await spawner.spawn(["true"], stdin=False, cwd=None, env=ENV)
    assert (
        f"command spawner {spawner.pid} was stopped by a signal (a command of its user can send "
        "one while it starts another); killing it"
    ) in caplog.text
    assert not spawner.alive


async def test_a_stuck_spawner_is_killed_when_an_answer_is_overdue(
    spawner: Spawner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("dist_exec.executors.spawner.ANSWER_TIMEOUT_S", 0.5)
    # Stuck, not stopped: what /proc says of a stopped process is hidden from the check.
    real_stat = procfs.stat
    monkeypatch.setattr(
        "dist_exec.executors.spawner.procfs.stat",
        lambda pid: ["S", *(real_stat(pid) or [])[1:]],
    )
    os.kill(spawner.pid, signal.SIGSTOP)
    with pytest.raises(SpawnerGone):
        async with asyncio.timeout(10):
            await spawner.spawn(["true"], stdin=False, cwd=None, env=ENV)
    assert f"command spawner {spawner.pid} has not answered for 0 s; killing it" in caplog.text
    assert not spawner.alive


async def test_a_spawner_that_ended_is_replaced_and_the_worker_forks_meanwhile() -> None:
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), "nobody")
    try:
        first = containment.spawner
        assert first is not None
        executor = CommandExecutor({"containment": containment})
        spec = CommandSpec("/bin/sh", ["-c", "echo $PPID"])

        async def parent() -> int:
            sink = RecordingSink()
            outcome = await executor.execute(_request(spec), sink)
            assert outcome.status == ExecStatus.SUCCESS, outcome
            return int(sink.stdout)

        assert await parent() == first.pid
        os.kill(first.pid, signal.SIGKILL)
        await wait_until(lambda: not first.alive, 10, "the spawner's end noticed")
        assert await parent() == os.getpid()  # forked by the worker while a new one starts
        await wait_until(
            lambda: containment.spawner is not first and containment.spawner, 30, "a new spawner"
        )
        second = containment.spawner
        assert second is not None
        assert await parent() == second.pid
        assert not pid_alive(first.pid)  # reaped
    finally:
        containment.close()


async def test_closing_does_not_wait_for_a_slow_replacement_spawner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker ends while a new spawner is still starting: close() returns at once, and the
    spawner, once started, is closed too."""
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), "nobody")
    release = threading.Event()
    made: list[Spawner] = []

    class SlowSpawner(Spawner):
        def __init__(self, uid: int, gid: int, last_uid: int | None = None) -> None:
            release.wait(30)
            super().__init__(uid, gid, last_uid)
            made.append(self)

    try:
        first = containment.spawner
        assert first is not None
        monkeypatch.setattr("dist_exec.executors.containment.Spawner", SlowSpawner)
        os.kill(first.pid, signal.SIGKILL)
        await wait_until(lambda: not first.alive, 10, "the spawner's end noticed")
        containment.jail("t", TaskLimits()).close()  # asks for a new one, in the background
        starting = containment._starting
        assert starting is not None
    finally:
        async with asyncio.timeout(5):  # (the start would take up to 30 s)
            await asyncio.to_thread(containment.close)
    release.set()
    await asyncio.to_thread(starting.join, 30)
    assert len(made) == 1
    await wait_until(lambda: not pid_alive(made[0].pid), 10, "the late spawner closed")
    assert containment.spawner is first


async def test_a_caller_cancelled_as_its_answer_arrives_leaves_no_command(
    spawner: Spawner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer is in, but the caller is cancelled before it resumes (a timeout firing in the
    same turn of the loop): the command is killed, not left running unseen."""
    spawning: asyncio.Task[Child] | None = None
    handle = spawner._handle

    def then_cancel(message: dict[str, object]) -> None:
        handle(message)
        if "pid" in message and spawning is not None:
            spawning.cancel()

    monkeypatch.setattr(spawner, "_handle", then_cancel)
    env = {**ENV, "DIST_EXEC_T": "cancelled-late"}
    spawning = asyncio.create_task(spawner.spawn(["sleep", "60"], stdin=False, cwd=None, env=env))
    with pytest.raises(asyncio.CancelledError):
        await spawning
    await wait_until(lambda: not tagged({"DIST_EXEC_T": "cancelled-late"}), 10, "no sleep left")


def test_the_spawner_process_refuses_a_malformed_request_and_goes_on(shared_dir: Path) -> None:
    """The process's side of the protocol, driven by hand: a request that is not JSON gets an
    error answer; the next one is served."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-m",
            "dist_exec.executors.spawner",
            str(theirs.fileno()),
            str(NOBODY.pw_uid),
            str(NOBODY.pw_gid),
        ],
        pass_fds=(theirs.fileno(),),
        cwd="/",
    )
    theirs.close()
    ours.settimeout(10)
    reader = ours.makefile("rb")
    try:

        def answer() -> dict[str, object]:
            (size,) = struct.unpack(">I", reader.read(4))
            message = json.loads(reader.read(size))
            assert isinstance(message, dict)
            return message

        def send(body: bytes) -> None:
            r, w = os.pipe()
            try:
                ours.sendmsg(
                    [struct.pack(">I", len(body)) + body],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("2i", w, w))],
                )
            finally:
                os.close(r)
                os.close(w)

        assert answer() == {"ready": proc.pid}
        send(b"{not json")
        refused = answer()
        assert list(refused) == ["error"]
        assert "JSONDecodeError" in str(refused["error"])
        request = {"argv": ["true"], "cwd": None, "env": ENV, "stdin": False}
        send(json.dumps(request).encode())
        started = answer()
        assert list(started) == ["pid"]
        assert answer() == {"exit": started["pid"], "status": 0}
    finally:
        reader.close()
        ours.close()
        assert proc.wait(timeout=10) == 0  # the end of its socket ends it


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_ambient_capabilities_of_the_worker_do_not_reach_commands() -> None:
    """A worker started with an ambient capability: its spawner (saved uid root) must not pass
    it on, as a plain setuid would not."""
    code = (
        "import asyncio\n"
        "from dist_exec.executors.spawner import Spawner\n"
        "from dist_exec.executors.child import read_pipe\n"
        "async def main():\n"
        "    s = Spawner(65534, 65534)\n"
        "    c = await s.spawn(['grep', '^Cap', '/proc/self/status'], stdin=False, cwd=None,"
        " env={'PATH': '/usr/bin:/bin'})\n"
        "    out = bytearray()\n"
        "    async def keep(d): out.extend(d)\n"
        "    async def drop(d): pass\n"
        "    await asyncio.gather(read_pipe(c.stdout, keep), read_pipe(c.stderr, drop))\n"
        "    await c.wait()\n"
        "    s.close()\n"
        "    print(out.decode(), end='')\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [
            "setpriv",
            "--inh-caps",
            "+dac_override",
            "--ambient-caps",
            "+dac_override",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        timeout=30,
        check=True,
    )
    caps = dict(line.split(":\t") for line in done.stdout.decode().splitlines())
    assert caps["CapAmb"] == caps["CapPrm"] == caps["CapEff"] == "0000000000000000", caps


async def test_commands_of_another_user_start_in_its_home_whichever_way_they_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Through the spawner, and forked by the worker (under a limit), from a worker whose own
    directory is somewhere else."""
    monkeypatch.chdir(tmp_path)
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), "nobody")
    try:
        assert containment.run_as is not None
        executor = CommandExecutor({"containment": containment})
        spec = CommandSpec("pwd")
        for limits in (TaskLimits(), TaskLimits(cpu_time_s=5)):
            sink = RecordingSink()
            request = ExecRequest("t1", 1, spec.to_payload(), 10.0, limits=limits)
            outcome = await executor.execute(request, sink)
            assert outcome.status == ExecStatus.SUCCESS, outcome
            assert sink.stdout == f"{containment.run_as.home}\n".encode()
    finally:
        containment.close()


async def test_a_spawner_that_dies_idle_is_noticed_and_nothing_fails() -> None:
    containment = Containment.start(Mode.RLIMIT, TaskLimits(), "nobody")
    try:
        spawner = containment.spawner
        assert spawner is not None
        os.kill(spawner.pid, signal.SIGKILL)
        await wait_until(lambda: not spawner.alive, 10, "its end noticed while idle")
        sink = RecordingSink()
        outcome = await CommandExecutor({"containment": containment}).execute(
            _request(CommandSpec("/bin/sh", ["-c", "echo $PPID"])), sink
        )
        assert outcome.status == ExecStatus.SUCCESS, outcome
        assert int(sink.stdout) == os.getpid()  # forked by the worker while a new one starts
    finally:
        containment.close()
