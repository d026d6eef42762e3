"""Containment on a real cluster: limits end hostile jobs and the worker keeps serving, commands
run as an unprivileged user, the worker's environment stays out of commands, and a request sent
straight to a worker gets the worker's limits all the same."""

from __future__ import annotations

import asyncio
import json
import os
import pwd as pwd_module
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import grpc.aio
import pytest

from dist_exec import wire
from dist_exec.client import Client, TaskLimits, command_spec
from dist_exec.models import JobStatus
from dist_exec.rpc.v1 import common_pb2, master_pb2, master_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import ClusterFactory, run_cli, wait_for, worker_channel
from tests.unit.test_containment import FORK_BOMB, HOG, SPIN, world_python

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="runs commands as nobody: needs root"),
]
MiB = 1024 * 1024
JOB_TIMEOUT_S = 20.0  # the outer bound of every hostile job, should its limit not hold


@pytest.mark.parametrize("mode", ["cgroup", "rlimit"])
async def test_hostile_jobs_fail_with_their_limit_and_the_worker_keeps_serving(
    cluster: ClusterFactory, shared_dir: Path, mode: str
) -> None:
    master = cluster.master()
    cluster.worker(
        master,
        run_as=None,  # the default: nobody, as the worker runs as root
        extra=["--containment", mode, "--task-memory-limit", "256M", "--task-max-file-size", "1M"],
    )
    fill = shared_dir / "fill"
    jobs = {
        "procs": command_spec(
            FORK_BOMB, shell=True, timeout_s=JOB_TIMEOUT_S, limits=TaskLimits(max_procs=32)
        ),
        "memory": command_spec(
            [world_python(), "-c", HOG],
            timeout_s=JOB_TIMEOUT_S,
            limits=TaskLimits(memory_bytes=64 * MiB),
        ),
        "cpu-time": command_spec(
            f"{SPIN} & {SPIN}", shell=True, timeout_s=JOB_TIMEOUT_S, limits=TaskLimits(cpu_time_s=1)
        ),
        # No limit of its own: the worker's 1 MiB applies.
        "file-size": command_spec(
            f"head -c 50000000 /dev/zero > {fill}", shell=True, timeout_s=JOB_TIMEOUT_S
        ),
    }
    errors = {
        "procs": "killed: process limit 32 reached",
        "memory": "killed: memory limit 64 MiB exceeded",
        "cpu-time": "killed: CPU time limit 1s exceeded",
        "file-size": "killed: file size limit 1 MiB exceeded",
    }
    async with Client(master.address) as client:
        ids = {kind: await client.submit(spec) for kind, spec in jobs.items()}
        done = dict(zip(ids, await asyncio.gather(*map(client.wait, ids.values())), strict=True))
        for kind, job in done.items():
            assert (job.status, job.error) == (JobStatus.FAILED, errors[kind]), job
            assert job.result_metadata == {"limit_exceeded": kind}
        assert fill.stat().st_size <= MiB
        ok = await client.wait(await client.submit(command_spec(["echo", "still serving"])))
    assert (ok.status, ok.stdout) == (JobStatus.COMPLETED, b"still serving\n")


def test_cli_limits_error_and_status(cluster: ClusterFactory) -> None:
    master = cluster.master()
    cluster.worker(master, run_as=None)
    python = world_python()
    hog = run_cli("run", "--memory", "64M", "--timeout", "20s", "--", python, "-c", HOG,
                  master=master.address)  # fmt: skip
    assert hog.code == 137
    assert hog.stderr.strip().endswith("dist-exec: killed: memory limit 64 MiB exceeded")
    listed = run_cli("list", "--json", master=master.address)
    job_id = json.loads(listed.stdout)[0]["id"]
    status = run_cli("status", job_id, master=master.address)
    assert "limits:    memory limit 64 MiB\n" in status.stdout
    assert "error:     killed: memory limit 64 MiB exceeded\n" in status.stdout
    as_json = json.loads(run_cli("status", "--json", job_id, master=master.address).stdout)
    assert as_json["metadata"] == {"limit_exceeded": "memory"}
    assert as_json["limits"]["memory_bytes"] == 64 * MiB
    bad = run_cli("run", "--memory", "lots", "true", master=master.address)
    assert bad.code == 2
    assert "invalid size 'lots'" in bad.stderr


async def test_more_than_the_worker_allows_waits_for_a_worker_that_allows_it(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master()
    small = cluster.worker(master, extra=["--task-memory-limit", "256M"])
    nodes = json.loads(run_cli("nodes", "--json", master=master.address).stdout)
    assert nodes[0]["task_limits"]["memory_bytes"] == 256 * MiB
    big = command_spec(["echo", "big"], limits=TaskLimits(memory_bytes=2**30))
    async with Client(master.address) as client:
        job_id = await client.submit(big)
        pending = await client.get(job_id)
        assert pending.status == JobStatus.PENDING
        assert pending.pending_reason == (
            "no matching node: no healthy worker runs task type 'command' "
            "allowing memory limit 1 GiB"
        )
        cluster.worker(master, extra=["--task-memory-limit", "2G"])
        done = await client.wait(job_id)
    assert (done.status, done.stdout) == (JobStatus.COMPLETED, b"big\n")
    assert done.worker_id != small.extra["id"]
    # Sent straight to the small worker, the same request is refused there.
    async with worker_channel(small.address) as channel:
        reply = await worker_pb2_grpc.WorkerServiceStub(channel).Execute(
            worker_pb2.ExecuteRequest(
                task_id="forged",
                task_type="command",
                payload=b'{"command": "true"}',
                limits=wire.limits_to_pb(big.limits),
            ),
            timeout=JOB_TIMEOUT_S,
        )
    assert reply.status == common_pb2.EXECUTION_STATUS_FAILURE
    assert (
        reply.error == "memory limit 1 GiB is more than this worker allows (memory limit 256 MiB)"
    )


async def test_bad_limits_are_refused_at_submit(cluster: ClusterFactory) -> None:
    master = cluster.master()
    async with grpc.aio.insecure_channel(master.address) as channel:
        stub = master_pb2_grpc.MasterServiceStub(channel)
        for request, message in [
            (
                master_pb2.SubmitRequest(
                    task_type="command",
                    payload=b'{"command": "true"}',
                    limits=common_pb2.Limits(cpu_time=wire.duration(-1)),
                ),
                "CPU time limit must not be negative",
            ),
            (
                master_pb2.SubmitRequest(
                    task_type="http",
                    payload=b'{"url": "http://127.0.0.1:1/"}',
                    limits=common_pb2.Limits(memory_bytes=MiB),
                ),
                "resource limits apply to command jobs only",
            ),
            (
                master_pb2.SubmitRequest(
                    task_type="command",
                    payload=b'{"command": "true"}',
                    limits=common_pb2.Limits(memory_bytes=2**63),
                ),
                "memory limit is too large; at most 4 EiB",
            ),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Submit(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == message


async def test_forged_request_to_a_worker_gets_the_worker_limits(
    cluster: ClusterFactory, shared_dir: Path
) -> None:
    master = cluster.master()
    worker = cluster.worker(master, extra=["--task-max-file-size", "1M"])
    fill = shared_dir / "forged"
    async with worker_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        reply = await stub.Execute(
            worker_pb2.ExecuteRequest(
                task_id="forged",
                task_type="command",
                payload=json.dumps(
                    {"command": f"head -c 5000000 /dev/zero > {fill}", "shell": True}
                ).encode(),
                timeout=wire.duration(JOB_TIMEOUT_S),
            ),
            timeout=JOB_TIMEOUT_S + 10,
        )
    assert reply.status == common_pb2.EXECUTION_STATUS_FAILURE
    assert reply.error == "killed: file size limit 1 MiB exceeded"
    assert fill.stat().st_size <= MiB


async def test_commands_run_as_nobody_without_the_worker_environment(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    master = cluster.master()
    cluster.worker(master, run_as=None, env={"DIST_EXEC_WORKER_SECRET": "s3cret"})
    # A program only root may run stays closed to the user commands run as (a setpriv-style
    # switch that keeps root's DAC override until exec would run it).
    root_only = tmp_path / "root-only-echo"
    shutil.copy("/bin/echo", root_only)
    root_only.chmod(0o700)
    tmp_path.chmod(0o755)
    async with Client(master.address) as client:
        ids = [
            await client.submit(command_spec(["id", "-u"])),
            await client.submit(command_spec(["env"], env={"GIVEN": "yes"})),
            await client.submit(command_spec(["cat"], stdin="fed\n", working_dir="/tmp")),
            await client.submit(command_spec(["pwd"], working_dir="/tmp")),
            await client.submit(command_spec(["id", "-G"])),
            await client.submit(command_spec(["grep", "^CapEff", "/proc/self/status"])),
            await client.submit(command_spec(["no-such-command-here"])),
            await client.submit(command_spec([str(root_only), "secret"])),
        ]
        uid, env, cat, pwd, groups, caps, missing, denied = [await client.wait(i) for i in ids]
    assert uid.stdout.decode().strip() == "65534"
    assert groups.stdout.decode().split() == [str(pwd_module.getpwnam("nobody").pw_gid)]
    assert caps.stdout.decode().split() == ["CapEff:", "0000000000000000"]
    assert (missing.exit_code, missing.error) == (127, "command not found: no-such-command-here")
    assert (denied.exit_code, denied.error) == (126, f"permission denied: {root_only}")
    assert b"secret" not in denied.stdout
    variables = dict(line.split("=", 1) for line in env.stdout.decode().splitlines())
    assert "DIST_EXEC_WORKER_SECRET" not in variables
    assert "s3cret" not in env.stdout.decode()
    assert variables["GIVEN"] == "yes"
    assert variables["USER"] == "nobody"
    assert variables["HOME"] != os.environ.get("HOME")
    assert (cat.stdout, pwd.stdout) == (b"fed\n", b"/tmp\n")


def test_worker_refuses_an_unknown_run_as_user_in_one_line(cluster: ClusterFactory) -> None:
    master = cluster.master()
    done = subprocess.run(
        [sys.executable, "-m", "dist_exec", "worker", "--master", master.address,
         "--run-as", "no-such-user-here"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "dist-exec: --run-as: no user 'no-such-user-here' on this host"
    )
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="switches users: needs root")
def test_a_worker_with_a_uid_pool_runs_each_job_as_its_own_user(cluster: ClusterFactory) -> None:
    master = cluster.master()
    cluster.worker(master, run_as=None, extra=["--run-as-pool", "61000-61009"])
    first = run_cli("run", "--env", "SECRET=one", "echo $$ $(id -u); sleep 30",
                    "--detach", master=master.address)  # fmt: skip
    assert first.code == 0, first.stderr
    job_id = first.stdout.strip()

    def started() -> str:
        return run_cli("logs", job_id, master=master.address).stdout

    pid, uid = wait_for(started, 20, "the first job's output").split()
    second = run_cli("run", f"id -u; cat /proc/{pid}/environ", master=master.address)
    assert second.code == 1
    assert int(second.stdout) != int(uid)
    assert {int(uid), int(second.stdout)} <= set(range(61000, 61010))
    assert "Permission denied" in second.stderr
    assert run_cli("cancel", job_id, master=master.address).code == 0
    both = run_cli("worker", "--run-as", "nobody", "--run-as-pool", "61000-61009",
                   "--master", master.address)  # fmt: skip
    assert (both.code, both.stderr) == (
        2,
        "dist-exec: --run-as-pool replaces --run-as: give one of them\n",
    )
