"""Ctrl-C (and SIGTERM, SIGHUP) on the real ``dist-exec`` process at the moments a real master
cannot be held at: while the master is still accepting the job. The master here is scripted
(real gRPC on 127.0.0.1) so that the test decides when the job is accepted. Signals during a
running job, on a real cluster, are in test_cli.py."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from dist_exec.interrupts import BURST_S
from dist_exec.rpc.v1 import common_pb2, master_pb2, master_pb2_grpc

DEADLINE_S = 20.0
HOLD_LINE = "the job is cancelled once the master has accepted it"


class HeldMaster(master_pb2_grpc.MasterServiceServicer):
    """Holds every submission until ``release`` is set; a job is RUNNING until cancelled."""

    def __init__(self) -> None:
        self.received = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled: list[str] = []
        self.unavailable = 0  # cancels answered UNAVAILABLE first (a master restarting)
        self.break_runs = False  # a run's stream fails (INTERNAL) once its job is accepted

    async def _hold(self) -> None:
        self.received.set()
        await self.release.wait()

    async def Submit(
        self, request: master_pb2.SubmitRequest, context: object
    ) -> master_pb2.SubmitResponse:
        await self._hold()
        return master_pb2.SubmitResponse(job_id="j1")

    async def SubmitBroadcast(
        self, request: master_pb2.SubmitBroadcastRequest, context: object
    ) -> master_pb2.SubmitBroadcastResponse:
        await self._hold()
        tasks = [master_pb2.BroadcastTask(job_id=f"j{i}", node_id=f"n{i}") for i in (1, 2)]
        return master_pb2.SubmitBroadcastResponse(broadcast_id="b1", tasks=tasks)

    async def RunSession(
        self,
        request_iterator: AsyncIterator[master_pb2.RunSessionRequests],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[master_pb2.RunSessionEvents]:
        await context.send_initial_metadata(())  # the client sends once it knows we serve it
        async for batch in request_iterator:
            for request in batch.requests:
                if request.HasField("run"):
                    await self._hold()
                    accepted = master_pb2.JobEvent(job_id="j1", accepted=True)
                    event = master_pb2.RunSessionEvent(tag=request.tag, event=accepted)
                    yield master_pb2.RunSessionEvents(events=[event])
                    if self.break_runs:
                        await context.abort(grpc.StatusCode.INTERNAL, "the stream broke")

    async def Cancel(
        self, request: master_pb2.CancelRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> master_pb2.CancelResponse:
        if self.unavailable:
            self.unavailable -= 1
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "failed to connect: Connection refused"
            )
        self.cancelled.append(request.job_id)
        return master_pb2.CancelResponse(cancelled=True, message="cancelled")

    async def GetStatus(
        self, request: master_pb2.GetStatusRequest, context: object
    ) -> master_pb2.GetStatusResponse:
        ended = request.job_id in self.cancelled
        return master_pb2.GetStatusResponse(
            job_id=request.job_id,
            task_type="command",
            status=common_pb2.JOB_STATUS_CANCELLED if ended else common_pb2.JOB_STATUS_RUNNING,
        )


@pytest.fixture
async def held() -> AsyncIterator[tuple[HeldMaster, str]]:
    master = HeldMaster()  # type: ignore[abstract]  # (the other RPCs: UNIMPLEMENTED)
    server = grpc.aio.server()
    master_pb2_grpc.add_MasterServiceServicer_to_server(master, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield master, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def cli_processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()  # reaps it and closes its pipes


async def start_cli(
    started: list[asyncio.subprocess.Process], *args: str
) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dist_exec",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    started.append(proc)
    return proc


async def read_line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stderr is not None
    async with asyncio.timeout(DEADLINE_S):
        return (await proc.stderr.readline()).decode()


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    async with asyncio.timeout(DEADLINE_S):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def signalled_while_accepted(
    started: list[asyncio.subprocess.Process],
    master: HeldMaster,
    address: str,
    args: list[str],
    sig: signal.Signals = signal.SIGINT,
) -> asyncio.subprocess.Process:
    """A CLI signalled while the master holds its submission, once it said it waits."""
    proc = await start_cli(started, *args, "--master", address)
    async with asyncio.timeout(DEADLINE_S):
        await master.received.wait()
    proc.send_signal(sig)
    assert HOLD_LINE in await read_line(proc)
    return proc


COMMANDS = {
    "run": ["run", "sleep 300"],
    "run --detach": ["run", "--detach", "sleep 300"],
    "run --all": ["run", "--all", "sleep 300"],
}


@pytest.mark.parametrize("command", COMMANDS)
async def test_ctrl_c_before_the_job_is_accepted_cancels_it_once_it_is(
    held: tuple[HeldMaster, str], cli_processes: list[asyncio.subprocess.Process], command: str
) -> None:
    """Giving up at the press would leave the job the master is accepting running unseen."""
    master, address = held
    proc = await signalled_while_accepted(cli_processes, master, address, COMMANDS[command])
    master.release.set()
    code, out, err = await finish(proc)
    assert code == -signal.SIGINT, err  # then it dies of it, as a local command would
    expected = ["j1", "j2"] if command == "run --all" else ["j1"]
    assert master.cancelled == expected
    assert out == ""  # a detached run prints no id for a job it cancelled
    assert "Traceback" not in err


@pytest.mark.parametrize("command", COMMANDS)
async def test_a_second_ctrl_c_stops_waiting_for_the_master(
    held: tuple[HeldMaster, str], cli_processes: list[asyncio.subprocess.Process], command: str
) -> None:
    master, address = held
    proc = await signalled_while_accepted(cli_processes, master, address, COMMANDS[command])
    await asyncio.sleep(BURST_S)  # what the test is about: a person's second Ctrl-C, not a burst
    proc.send_signal(signal.SIGINT)
    code, _, err = await finish(proc)
    assert code == -signal.SIGINT
    assert err.strip().splitlines() == [
        f"dist-exec: stopped waiting for the master: if it accepted the "
        f"{'jobs, they run' if command == 'run --all' else 'job, it runs'}; "
        "see 'dist-exec list'"
    ]
    assert master.cancelled == []


async def test_sigterm_and_sighup_keep_waiting_for_the_job_to_cancel(
    held: tuple[HeldMaster, str], cli_processes: list[asyncio.subprocess.Process]
) -> None:
    """A supervisor's or a closed terminal's signals mean "stop the job", never "leave it"."""
    master, address = held
    proc = await signalled_while_accepted(
        cli_processes, master, address, COMMANDS["run"], signal.SIGTERM
    )
    for sig in (signal.SIGHUP, signal.SIGTERM):
        proc.send_signal(sig)
        assert HOLD_LINE in await read_line(proc)  # taken, and waited on
    master.release.set()
    code, _, err = await finish(proc)
    assert (code, master.cancelled) == (-signal.SIGTERM, ["j1"]), err


async def test_a_cancel_the_master_cannot_take_yet_is_tried_again(
    held: tuple[HeldMaster, str], cli_processes: list[asyncio.subprocess.Process]
) -> None:
    """A master restarting when Ctrl-C came: run exited 125 at once ("cannot reach the
    master"), and the job ran on once the master was back."""
    master, address = held
    master.release.set()
    master.unavailable = 3
    proc = await start_cli(cli_processes, *COMMANDS["run"], "--master", address)
    async with asyncio.timeout(DEADLINE_S):
        await master.received.wait()
    proc.send_signal(signal.SIGINT)  # (before the job id is back too: it is waited for)
    code, _, err = await finish(proc)
    assert (code, master.cancelled, master.unavailable) == (-signal.SIGINT, ["j1"], 0), err
    assert "dist-exec: cannot cancel job j1 yet" in err
    assert "trying again until the master answers" in err


async def test_a_run_that_loses_its_accepted_job_names_it(
    held: tuple[HeldMaster, str], cli_processes: list[asyncio.subprocess.Process]
) -> None:
    """run said only why it could not follow the job (exit 125, "could not run it"), not that
    the job was accepted and runs on, nor its id."""
    master, address = held
    master.release.set()
    master.break_runs = True
    proc = await start_cli(cli_processes, *COMMANDS["run"], "--master", address)
    code, _, err = await finish(proc)
    assert code == 125
    assert err.endswith("; job j1 was accepted and may still run: see 'dist-exec status j1'\n"), err


async def test_ctrl_c_while_the_modules_load_ends_the_command_as_a_local_one(
    cli_processes: list[asyncio.subprocess.Process],
) -> None:
    """The press lands inside an import (a finder sends it when dist_exec.cli is imported): the
    process is killed by SIGINT, as a local program would be, without a traceback."""
    script = (
        "import os, signal, sys\n"
        "class Finder:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'dist_exec.cli':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Finder())\n"
        "sys.argv = ['dist-exec', 'list']\n"
        "from dist_exec.__main__ import main\n"
        "main()\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    cli_processes.append(proc)
    code, out, err = await finish(proc)
    assert (code, out, err) == (-signal.SIGINT, "", "")
