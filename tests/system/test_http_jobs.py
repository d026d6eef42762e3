"""HTTP jobs through the real cluster against a local HTTP server (127.0.0.1 only)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from dist_exec.client import Client
from dist_exec.executors.http import HttpSpec
from dist_exec.models import JobStatus, TaskSpec
from tests.conftest import ClusterFactory, SmallCluster, run_cli


async def hello(request: web.Request) -> web.Response:
    body = await request.text()
    return web.Response(
        text=f"{request.method} {request.path} {body}".strip(),
        headers={"X-Served-By": "test"},
    )


async def missing(request: web.Request) -> web.Response:
    return web.Response(status=404, text="no such thing")


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query["s"]))
    return web.Response(text="late")


async def big(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * int(request.query["n"]))


@pytest.fixture
async def http_server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/hello", hello)
    app.router.add_get("/missing", missing)
    app.router.add_get("/slow", slow)
    app.router.add_get("/big", big)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_http_job_prints_the_body_and_records_status_and_headers(
    small_cluster: SmallCluster, http_server: str
) -> None:
    addr = small_cluster.address
    ok = await asyncio.to_thread(
        run_cli, "run", "--type", "http", "--url", f"{http_server}/hello", master=addr
    )
    assert (ok.code, ok.stdout) == (0, "GET /hello")
    posted = await asyncio.to_thread(
        run_cli, "run", "--type", "http", "--method", "POST", "--data", "payload",
        "--header", "X-Test=1", "--url", f"{http_server}/hello", "--json", master=addr,
    )  # fmt: skip
    body = json.loads(posted.stdout)
    assert posted.code == 0
    assert body["output"] == "POST /hello payload"
    assert body["exit_code"] == 200
    assert body["metadata"]["http.status"] == "200"
    assert body["metadata"]["header.x-served-by"] == "test"
    assert body["command"].startswith("POST http://127.0.0.1")

    gone = await asyncio.to_thread(
        run_cli, "run", "--type", "http", "--url", f"{http_server}/missing", master=addr
    )
    assert gone.code == 22
    assert gone.stdout == "no such thing"
    assert "HTTP 404" in gone.stderr


def test_bad_http_jobs_are_refused_at_submit(small_cluster: SmallCluster) -> None:
    addr = small_cluster.address
    bad = run_cli("run", "--type", "http", "--url", "ftp://127.0.0.1/x", master=addr)
    assert bad.code == 125
    assert "ftp" in bad.stderr
    assert "Traceback" not in bad.stderr
    usage = run_cli("run", "--type", "http", master=addr)
    assert usage.code == 2
    assert "--type http takes --url URL" in usage.stderr
    mixed = run_cli("run", "--url", "http://127.0.0.1:1/", "true", master=addr)
    assert mixed.code == 2


async def test_a_worker_runs_only_its_task_types(cluster: ClusterFactory, http_server: str) -> None:
    """A worker left without http (say, one under a command allow-list, which HTTP jobs are not
    subject to) never gets an HTTP job: it waits, saying why."""
    master = cluster.master()
    worker = cluster.worker(master, extra=["--task-type", "command"])
    async with Client(master.address) as client:
        assert (await client.nodes())[0].capabilities == {"command"}
        spec = TaskSpec("http", HttpSpec(f"{http_server}/hello").to_payload(), 30.0)
        job_id = await client.submit(spec)
        job = await client.get(job_id)
        assert job.status == JobStatus.PENDING
        assert "no matching node" in (await asyncio.to_thread(
            run_cli, "status", job_id, master=master.address)).stdout  # fmt: skip
        assert await client.cancel(job_id)
    assert worker.alive()
    bad = await asyncio.to_thread(run_cli, "worker", "--task-type", "ftp", "--master", "x:1")
    assert (bad.code, bad.stderr) == (
        2,
        "dist-exec: unknown task type 'ftp'; installed: command, http\n",
    )


async def test_the_workers_http_limits_and_the_jobs_timeout(
    cluster: ClusterFactory, http_server: str
) -> None:
    """--http-timeout and --http-max-body reach the executor; run's --timeout bounds the
    request instead of the worker's default; a body cut at the limit is said, exit 63."""
    master = cluster.master()
    cluster.worker(master, extra=["--http-timeout", "1s", "--http-max-body", "1k"])

    def run(*args: str) -> tuple[int, str, str]:
        done = run_cli("run", "--type", "http", *args, master=master.address)
        return done.code, done.stdout, done.stderr

    code, _, err = await asyncio.to_thread(run, "--url", f"{http_server}/slow?s=2")
    assert code == 124
    assert "the http executor's timeout_s" in err
    code, out, _ = await asyncio.to_thread(
        run, "--timeout", "10s", "--url", f"{http_server}/slow?s=2"
    )
    assert (code, out) == (0, "late")
    code, out, err = await asyncio.to_thread(run, "--url", f"{http_server}/big?n=5000")
    assert (code, out) == (63, "x" * 1024)
    assert "response body truncated at 1024 bytes" in err
    code, _, err = await asyncio.to_thread(
        run, "--header", "X-A=1", "--header", "x-a=2", "--url", f"{http_server}/hello"
    )
    assert (code, err) == (2, "dist-exec: --header x-a is given twice (header names ignore case)\n")
    bad = await asyncio.to_thread(run_cli, "worker", "--master", "x:1", "--http-timeout", "0s")
    assert (bad.code, bad.stderr) == (
        2,
        "dist-exec: --http-timeout must be at least 1ms and at most 24h\n",
    )
