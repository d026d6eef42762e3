"""run --all: once on every matching healthy node, output prefixed, a per-node summary."""

from __future__ import annotations

import json

import pytest

from dist_exec.client import (
    Client,
    InvalidTaskSpec,
    JobNotFound,
    JobStatus,
    TaskSpec,
    command_spec,
)
from tests.conftest import ClusterFactory, run_cli


def test_broadcast_runs_on_every_node_and_reports_each(cluster: ClusterFactory) -> None:
    master = cluster.master()
    for name, zone in (("w1", "a"), ("w2", "a"), ("w3", "b")):
        # w2 refuses the command, so one node fails.
        extra = ["--block-command", "*explode*"] if name == "w2" else []
        cluster.worker(master, worker_id=name, labels={"zone": zone}, extra=extra)
    addr = master.address

    result = run_cli("run", "--all", "echo explode; echo warn >&2", master=addr)
    assert result.code == 1
    assert sorted(result.stdout.splitlines()) == ["[w1] explode", "[w3] explode"]
    assert "[w1] warn" in result.stderr
    assert "on 3 node(s): 2 succeeded, 1 failed" in result.stderr
    assert "w2" in result.stderr
    assert "blocked by rule '*explode*'" in result.stderr

    zone_a = run_cli("run", "--all", "--selector", "zone=a", "--", "echo", "hi", master=addr)
    assert zone_a.code == 0
    assert sorted(zone_a.stdout.splitlines()) == ["[w1] hi", "[w2] hi"]
    assert "on 2 node(s): 2 succeeded, 0 failed" in zone_a.stderr
    ok = run_cli("run", "--all", "--selector", "zone=b", "--", "echo", "hi", master=addr)
    assert (ok.code, ok.stdout) == (0, "[w3] hi\n")

    as_json = run_cli("run", "--all", "--json", "--", "echo", "x", master=addr)
    body = json.loads(as_json.stdout)
    assert as_json.code == 0
    assert body["nodes"] == 3
    assert body["succeeded"] == 3
    assert sorted(r["node_id"] for r in body["results"]) == ["w1", "w2", "w3"]
    assert all(r["output"] == "x\n" and r["exit_code"] == 0 for r in body["results"])

    status = run_cli("status", body["broadcast_id"], "--json", master=addr)
    group = json.loads(status.stdout)
    assert group["broadcast_id"] == body["broadcast_id"]
    assert sorted(j["worker_id"] for j in group["jobs"]) == ["w1", "w2", "w3"]
    text = run_cli("status", body["broadcast_id"], master=addr)
    assert "3 node(s), 3 completed" in text.stdout
    listed = run_cli("list", "--broadcast", body["broadcast_id"], master=addr)
    assert listed.stdout.count("[broadcast") == 3

    nobody = run_cli("run", "--all", "--selector", "zone=z", "true", master=addr)
    assert nobody.code == 125
    assert "no healthy worker runs task type 'command' with labels zone=z" in nobody.stderr


def test_cancel_of_a_broadcast_cancels_its_jobs_that_run(cluster: ClusterFactory) -> None:
    """`cancel BROADCAST_ID` said "not found" (status and list take the id)."""
    master = cluster.master()
    for name in ("w1", "w2"):
        cluster.worker(master, worker_id=name)
    addr = master.address
    started = run_cli("run", "--all", "--detach", "--json", "sleep 300", master=addr)
    broadcast = json.loads(started.stdout)["broadcast_id"]
    result = run_cli("cancel", broadcast, master=addr)
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"broadcast {broadcast}: 2 node(s)"
    assert sorted(line.split(" (")[1].split(")")[0] for line in lines[1:]) == ["w1", "w2"]
    group = json.loads(run_cli("status", broadcast, "--json", master=addr).stdout)
    assert {j["status"] for j in group["jobs"]} == {"CANCELLED"}


async def test_the_client_cancels_a_broadcast_by_its_id(cluster: ClusterFactory) -> None:
    """Client.cancel(BROADCAST_ID) is JOB not found: only the CLI expanded it."""
    master = cluster.master()
    for name in ("w1", "w2"):
        cluster.worker(master, worker_id=name)
    async with Client(master.address) as client:
        broadcast, members = await client.submit_broadcast(command_spec(["sleep", "300"]))
        said = await client.cancel_broadcast(broadcast)
        assert sorted(job for job, _ in said) == sorted(job for job, _ in members)
        for job, _ in members:
            assert (await client.wait(job)).status == JobStatus.CANCELLED
        with pytest.raises(JobNotFound, match=r"broadcast .* not found"):
            await client.cancel_broadcast("00000000-0000-4000-8000-000000000000")


async def test_a_bad_broadcast_is_invalid_whichever_nodes_there_are(
    cluster: ClusterFactory,
) -> None:
    """It was FAILED_PRECONDITION ("no healthy worker runs task type 'nope'") where Submit
    says what is wrong with the job."""
    master = cluster.master()
    cluster.worker(master, worker_id="w1")
    async with Client(master.address) as client:
        with pytest.raises(InvalidTaskSpec, match="unknown task type 'nope'"):
            await client.submit_broadcast(TaskSpec("nope", b"{}", 10))
        with pytest.raises(InvalidTaskSpec, match="not valid JSON"):
            await client.submit_broadcast(TaskSpec("command", b"{", 10, selector={"zone": "z"}))
