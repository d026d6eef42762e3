"""Idempotent submit: a client that retries never creates a second job."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from dist_exec.client import Client, command_spec
from dist_exec.config import split_address
from dist_exec.errors import AlreadyExists, InvalidTaskSpec
from tests.conftest import ClusterFactory, run_cli


async def test_same_key_gives_the_same_job_and_a_different_request_is_refused(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master()  # no worker: the jobs stay queued, keys held in memory
    spec = replace(command_spec(["echo", "once"]), idempotency_key="deploy-42")
    async with Client(master.address) as client:
        first = await client.submit(spec)
        # A client retrying after a lost response, several times at once.
        again = await asyncio.gather(*(client.submit(spec) for _ in range(5)))
        assert set(again) == {first}
        batch = await client.submit_many([spec, replace(spec, idempotency_key="other")])
        assert batch[0] == first
        assert batch[1] != first
        with pytest.raises(AlreadyExists, match="'deploy-42' was already used for a different"):
            await client.submit(
                replace(command_spec(["echo", "twice"]), idempotency_key="deploy-42")
            )
        with pytest.raises(InvalidTaskSpec, match="longer than 256"):
            await client.submit(replace(spec, idempotency_key="k" * 300))
        _, total = await client.list_jobs()
        assert total == 2

    cli = run_cli("run", "-d", "--idempotency-key", "deploy-42", "--", "echo", "once",
                  master=master.address)  # fmt: skip
    assert (cli.code, cli.stdout.strip()) == (0, first)
    clash = run_cli("run", "-d", "--idempotency-key", "deploy-42", "true", master=master.address)
    assert clash.code == 125
    assert "already used for a different request" in clash.stderr


async def test_keys_survive_the_end_of_the_job_and_a_master_restart(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master()
    _, port = split_address(master.address)
    cluster.worker(master)
    spec = replace(command_spec(["echo", "kept"]), idempotency_key="nightly-1")
    async with Client(master.address) as client:
        first = await client.submit(spec)
        assert (await client.wait(first)).stdout == b"kept\n"
        assert await client.submit(spec) == first  # ended: the store answers
    master.kill()
    restarted = cluster.master(data_dir=master.extra["data_dir"], listen=f"127.0.0.1:{port}")
    async with Client(restarted.address) as client:
        assert await client.submit(spec) == first
        _, total = await client.list_jobs()
        assert total == 1
