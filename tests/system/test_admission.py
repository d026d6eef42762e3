"""Every admission rule on a real cluster: the gRPC code, and the CLI's one-line message."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import grpc.aio
import pytest

from dist_exec.client import Client, RateLimited, ResourceExhausted, command_spec
from dist_exec.errors import PolicyDenied
from dist_exec.rpc.v1 import master_pb2, master_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import ClusterFactory, run_cli, worker_channel


def test_command_policy_on_the_master(cluster: ClusterFactory) -> None:
    master = cluster.master(extra=["--block-command", "rm", "--allow-command", "echo",
                                   "--allow-command", "rm"])  # fmt: skip
    cluster.worker(master)
    ok = run_cli("run", "--", "echo", "fine", master=master.address)
    assert (ok.code, ok.stdout) == (0, "fine\n")
    blocked = run_cli("run", "--", "rm", "-rf", "/tmp/nothing", master=master.address)
    assert blocked.code == 125
    assert blocked.stderr.strip() == "dist-exec: command 'rm' is blocked by rule 'rm'"
    shell = run_cli("run", "echo via a shell", master=master.address)
    assert shell.code == 125
    assert "'sh' is not in the allowed commands (echo, rm)" in shell.stderr


def test_an_allow_list_is_not_bypassed_by_path_or_environment(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    """The bypasses a review found: a planted program of an allowed name, a PATH leading to
    it, an exported shell function run by an allowed shell script; and a blocked program
    started by a shell string."""
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "ls").write_text("#!/bin/sh\necho planted\n")
    (evil / "ls").chmod(0o755)
    master = cluster.master(extra=["--allow-command", "ls", "--allow-command", "ldd",
                                   "--block-command", "rm", "--allow-env", "BUILD_*"])  # fmt: skip
    cluster.worker(master)
    allowed = run_cli("run", "--env", "BUILD_ID=7", "--", "ls", "-d", "/", master=master.address)
    assert (allowed.code, allowed.stdout) == (0, "/\n")
    for args, message in [
        (["--", str(evil / "ls")], "is not in the allowed commands (ls, ldd)"),
        (["--env", f"PATH={evil}", "--", "ls"], "environment variable 'PATH' may not be set"),
        (
            ["--env", "BASH_FUNC_printf%%=() { id; }", "--", "ldd", "--version"],
            "environment variable 'BASH_FUNC_printf%%' may not be set",
        ),
        (
            ["--env", "LESSOPEN=|id", "--", "ls"],
            "environment variable 'LESSOPEN' may not be set",
        ),
        (["--env", "DEBUG=1", "--", "ls"], "'DEBUG' is not in the allowed environment"),
    ]:
        refused = run_cli("run", *args, master=master.address)
        assert refused.code == 125, refused
        assert message in refused.stderr
        assert "planted" not in refused.stdout
    blocked = cluster.master(extra=["--block-command", "rm"])
    cluster.worker(blocked)
    victim = tmp_path / "victim"
    victim.write_text("x")
    shell = run_cli("run", f"rm {victim}", master=blocked.address)
    assert (shell.code, shell.stderr) == (125, "dist-exec: command 'rm' is blocked by rule 'rm'\n")
    assert victim.exists()


async def test_policy_is_enforced_on_the_worker_too(cluster: ClusterFactory) -> None:
    master = cluster.master()  # the master allows anything
    worker = cluster.worker(master, extra=["--block-command", "touch"])
    async with Client(master.address) as client:
        job_id = await client.submit(command_spec(["touch", "/tmp/never"]))
        job = await client.wait(job_id)
    assert job.status.value == "FAILED"
    assert job.error == "command 'touch' is blocked by rule 'touch'"
    # A forged request straight to the worker is refused as well.
    async with worker_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Execute(
                worker_pb2.ExecuteRequest(
                    task_id="forged",
                    task_type="command",
                    payload=json.dumps({"command": "touch", "args": ["/tmp/x"]}).encode(),
                )
            )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "blocked by rule 'touch'" in (info.value.details() or "")


async def test_rate_limit_refuses_with_a_retry_hint(cluster: ClusterFactory) -> None:
    # One job per 100 s after the burst: the CLI below starts well within that, however slow.
    master = cluster.master(extra=["--rate-limit", "0.01", "--rate-burst", "3"])
    async with grpc.aio.insecure_channel(master.address) as channel:
        stub = master_pb2_grpc.MasterServiceStub(channel)
        request = master_pb2.SubmitRequest(task_type="command", payload=b'{"command": "true"}')
        for _ in range(3):
            await stub.Submit(request)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Submit(request)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit exceeded for 127.0.0.1: 0.01 jobs/s, burst 3; retry in" in (
        info.value.details() or ""
    )
    trailing = dict(info.value.trailing_metadata() or ())
    assert 90_000 < int(trailing["retry-after-ms"]) <= 100_000
    cli = run_cli("run", "-d", "true", master=master.address)
    assert cli.code == 125
    assert cli.stderr.startswith("dist-exec: rate limit exceeded for 127.0.0.1")
    assert "retry in" in cli.stderr


async def test_full_queue_refuses_new_jobs_and_keeps_the_accepted(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master(extra=["--max-queued", "3"])  # no worker: everything waits
    async with Client(master.address) as client:
        accepted = await client.submit_many([command_spec(["true"])] * 3)
        with pytest.raises(ResourceExhausted, match=r"the queue is full \(3 jobs waiting"):
            await client.submit(command_spec(["true"]))
        cli = run_cli("run", "-d", "true", master=master.address)
        assert cli.code == 125
        assert "the queue is full" in cli.stderr
        cluster.worker(master)
        for job_id in accepted:
            assert (await client.wait(job_id)).status.value == "COMPLETED"
        # Room again once the queue drains.
        assert (await client.wait(await client.submit(command_spec(["true"])))).exit_code == 0


async def test_a_request_refused_as_the_queue_is_full_uses_none_of_the_rate(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master(
        extra=["--max-queued", "1", "--rate-limit", "0.01", "--rate-burst", "2"]
    )  # no worker: everything waits
    async with Client(master.address) as client:
        first = await client.submit(command_spec(["true"]))
        for _ in range(3):
            with pytest.raises(ResourceExhausted, match="the queue is full"):
                await client.submit(command_spec(["true"]))
        await client.cancel(first)
        await client.cancel(await client.submit(command_spec(["true"])))  # (the burst's 2nd)
        with pytest.raises(RateLimited):
            await client.submit(command_spec(["true"]))


async def test_a_broadcast_to_more_nodes_than_the_burst_costs_the_burst(
    cluster: ClusterFactory,
) -> None:
    """It was refused for good: "a request of 2 jobs is larger than the burst of 1; send
    smaller batches", which a broadcast cannot do."""
    master = cluster.master(extra=["--rate-limit", "0.01", "--rate-burst", "1"])
    for name in ("w1", "w2"):
        cluster.worker(master, worker_id=name)
    async with Client(master.address) as client:
        _, jobs = await client.submit_broadcast(command_spec(["true"]))
        assert len(jobs) == 2
        for job_id, _ in jobs:
            assert (await client.wait(job_id)).exit_code == 0
        with pytest.raises(RateLimited):
            await client.submit_broadcast(command_spec(["true"]))


async def test_batch_with_a_refused_command_names_it(cluster: ClusterFactory) -> None:
    master = cluster.master(extra=["--block-command", "reboot"])
    async with Client(master.address) as client:
        with pytest.raises(PolicyDenied, match="job 1 of the batch: command 'reboot'"):
            await client.submit_many([command_spec(["true"]), command_spec(["reboot"])])
        _, total = await client.list_jobs()
        assert total == 0


def test_aging_flag_is_validated() -> None:
    result = run_cli("master", "--priority-aging", "soon")
    assert result.code == 2
    assert "invalid duration 'soon'" in result.stderr
