"""A separately installed package adds a task type without touching dist-exec.

The plugin project in tests/fixtures/reverse_executor is really installed with pip, into a
directory of its own (never into the venv), and only processes that get that directory on their
PYTHONPATH see its ``dist_exec.executors`` entry point.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import grpc
import pytest

from dist_exec.client import Client, InvalidTaskSpec, JobStatus, TaskSpec
from dist_exec.executors import ENTRY_POINT_GROUP
from tests.conftest import ClusterFactory, Proc, run_cli, wait_for

pytestmark = pytest.mark.system

PLUGIN_PROJECT = Path(__file__).resolve().parents[1] / "fixtures" / "reverse_executor"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Install the plugin with pip into a temporary target; the environment that finds it."""
    root = tmp_path_factory.mktemp("reverse-plugin")
    try:
        # Build from a copy: setuptools writes build/ and *.egg-info next to its sources, which
        # must not land in the repository (mypy would see the module twice).
        source = root / "src"
        shutil.copytree(
            PLUGIN_PROJECT, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
        target = root / "site"
        done = subprocess.run(
            [
                sys.executable, "-m", "pip", "install",
                "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
                "--disable-pip-version-check", "--quiet",
                "--target", str(target), str(source),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
        assert (target / "dist_exec_reverse" / "__init__.py").is_file()
        assert list(target.glob("dist_exec_reverse-*.dist-info/entry_points.txt"))
        path = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
        yield {"PYTHONPATH": path}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def node_capabilities(master: Proc) -> dict[str, list[str]]:
    result = run_cli("nodes", "--json", master=master.address)
    assert result.code == 0, result.stderr
    return {n["id"]: n["capabilities"] for n in json.loads(result.stdout)}


def wait_registered(master: Proc, worker_id: str) -> list[str]:
    return wait_for(
        lambda: node_capabilities(master).get(worker_id),
        timeout=20,
        what=f"worker {worker_id} to register",
    )


def test_the_plugin_is_not_installed_where_the_tests_run() -> None:
    # Whatever passes below comes from the pip-installed copy, not from this environment.
    assert "reverse" not in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}


async def test_installed_plugin_adds_a_task_type(
    cluster: ClusterFactory, plugin_env: dict[str, str]
) -> None:
    master = cluster.master(env=plugin_env)
    cluster.worker(master, worker_id="rev", env=plugin_env)
    capabilities = await asyncio.to_thread(wait_registered, master, "rev")
    assert "reverse" in capabilities
    assert "command" in capabilities  # the built-in executors are still there

    async with Client(master.address) as client:
        job_id = await client.submit(TaskSpec("reverse", b'{"text": "hello"}', 10.0))
        async with asyncio.timeout(30):
            job = await client.wait(job_id)
        assert job.status == JobStatus.COMPLETED, job.error
        assert job.exit_code == 0
        assert job.stdout == b"olleh"
        assert job.stderr == b""
        assert job.worker_id == "rev"

        # The master validates with the plugin's own code and passes its message on.
        with pytest.raises(InvalidTaskSpec, match=r"'text' must be a string") as bad_type:
            await client.submit(TaskSpec("reverse", b'{"text": 42}', 10.0))
        with pytest.raises(InvalidTaskSpec, match=r"reverse payload must be a JSON object"):
            await client.submit(TaskSpec("reverse", b'{"words": "hello"}', 10.0))
        with pytest.raises(InvalidTaskSpec, match=r"reverse payload is not valid JSON"):
            await client.submit(TaskSpec("reverse", b"hello", 10.0))
    assert bad_type.value.code == grpc.StatusCode.INVALID_ARGUMENT

    # The command line shows the plugin's job like any other.
    shown = await asyncio.to_thread(run_cli, "status", job_id, "--json", master=master.address)
    assert shown.code == 0, shown.stderr
    body = json.loads(shown.stdout)
    assert body["task_type"] == "reverse"
    assert body["status"] == "COMPLETED"
    assert body["output"] == "olleh"


async def test_master_without_the_plugin_rejects_its_type(cluster: ClusterFactory) -> None:
    master = cluster.master()
    async with Client(master.address) as client:
        with pytest.raises(InvalidTaskSpec, match=r"unknown task type 'reverse'") as rejected:
            await client.submit(TaskSpec("reverse", b'{"text": "hello"}', 10.0))
    assert rejected.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "known types:" in rejected.value.message
    assert "reverse" not in rejected.value.message.split("known types:", 1)[1]


async def test_job_waits_when_no_worker_has_the_plugin(
    cluster: ClusterFactory, plugin_env: dict[str, str]
) -> None:
    master = cluster.master(env=plugin_env)  # knows the type ...
    cluster.worker(master, worker_id="plain")  # ... but its only worker cannot run it
    capabilities = await asyncio.to_thread(wait_registered, master, "plain")
    assert "reverse" not in capabilities

    async with Client(master.address) as client:
        job_id = await client.submit(TaskSpec("reverse", b'{"text": "hello"}', 10.0))
        # A job submitted after it runs to the end: the scheduler has passed over this one.
        later = await client.submit(TaskSpec("command", b'{"command": "true"}', 10.0))
        assert (await client.wait(later)).status == JobStatus.COMPLETED
        shown = await asyncio.to_thread(run_cli, "status", job_id, "--json", master=master.address)
        assert shown.code == 0, shown.stderr
        body = json.loads(shown.stdout)
        assert body["status"] == "PENDING"
        assert body["worker_id"] is None
        assert "no matching node" in body["pending_reason"]
        assert "'reverse'" in body["pending_reason"]
        assert (await client.get(job_id)).status == JobStatus.PENDING
