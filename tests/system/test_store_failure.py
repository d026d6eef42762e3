"""A master whose database cannot be written (a full or failing disk) keeps serving: it
refuses new jobs with an error that says why, keeps the state of the jobs it runs in memory
until the disk takes writes again, and loses none of them.

The disk fails for real: the master's files may not grow past a size (RLIMIT_FSIZE, set on
the running master), so SQLite's writes get EFBIG, as they would get ENOSPC from a full disk.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest

from dist_exec.client import Client, JobStatus, command_spec
from dist_exec.errors import StoreUnavailable
from tests.conftest import ClusterFactory, Proc, run_cli, wait_until
from tests.system.test_recovery import wait_job

OUTPUT_BYTES = 300_000  # written while the disk fails: more than it may grow
GROWTH = 64 * 1024  # how much any of the master's files may still grow


def fail_disk(master: Proc) -> None:
    data: Path = master.extra["data_dir"]
    biggest = max(f.stat().st_size for f in [*data.rglob("*"), master.log] if f.is_file())
    resource.prlimit(master.pid, resource.RLIMIT_FSIZE, (biggest + GROWTH, resource.RLIM_INFINITY))


async def run_into_outage(client: Client, master: Proc, gate: Path, then: str) -> str:
    """Submit a job that prints a line, waits for ``gate`` and then runs ``then`` (output
    the disk cannot take); fail the disk once the line is stored, open the gate, and wait
    until the master finds its database cannot be written. Returns the job's id."""
    command = f"echo started; while [ ! -e {gate} ]; do sleep 0.05; done; {then}"
    job_id = await client.submit(command_spec(command, shell=True))
    await wait_until(lambda: _started(client, job_id), what="the job to start")
    fail_disk(master)
    gate.touch()
    await wait_until(
        lambda: "cannot write the database" in master.log_text(),
        what="the master to find its database cannot be written",
    )
    return job_id


async def _started(client: Client, job_id: str) -> bool:
    job = await client.get(job_id)
    return job.status == JobStatus.RUNNING and job.stdout == b"started\n"


def mend_disk(master: Proc) -> None:
    resource.prlimit(
        master.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    )


async def test_a_master_whose_disk_fails_keeps_serving_and_loses_no_job(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    master = cluster.master()
    cluster.worker(master, worker_id="w1")
    async with Client(master.address) as client:
        old = await client.submit(command_spec(["echo", "old output"]))
        await wait_job(client, old)
        running = await run_into_outage(
            client,
            master,
            tmp_path / "gate",
            f"head -c {OUTPUT_BYTES} /dev/zero | tr '\\0' x; echo; echo done",
        )

        # New jobs are refused, with the reason, through the library and the command line.
        with pytest.raises(StoreUnavailable, match=r"cannot write its database .*I/O error"):
            await client.submit(command_spec(["echo", "refused"]))
        refused = run_cli("run", "--", "echo", "refused", master=master.address)
        assert refused.code == 125, refused
        assert len(refused.stderr.splitlines()) == 1, refused.stderr
        assert "cannot write its database" in refused.stderr
        assert "Traceback" not in refused.stderr

        # The job has ended on its worker; its end waits in the master, which says so.
        with pytest.raises(
            StoreUnavailable, match=r"has ended \(COMPLETED\), but .* cannot record"
        ):
            await client.get(running)
        # Reads go on: a job ended before, its output too; a job whose end waits says so.
        logs = run_cli("logs", old, master=master.address)
        assert (logs.code, logs.stdout) == (0, "old output\n"), logs
        logs = run_cli("logs", running, master=master.address)
        assert logs.code == 1, logs
        assert "cannot record that yet" in logs.stderr
        listed = run_cli("list", master=master.address)
        assert listed.code == 0, listed
        assert "RUNNING" in listed.stdout  # (as written)
        # list --json fails on that job, and its output stays one JSON array.
        as_json = run_cli("list", "--json", master=master.address)
        assert as_json.code == 1, as_json
        assert json.loads(as_json.stdout) == []  # (the newest job first)
        assert "cannot record that yet" in as_json.stderr
        assert master.alive()

        mend_disk(master)
        job = await wait_job(client, running)
        assert job.status == JobStatus.COMPLETED, job.error
        assert job.stdout == b"started\n" + b"x" * OUTPUT_BYTES + b"\ndone\n"
        later = await client.submit(command_spec(["echo", "later"]))
        assert (await wait_job(client, later)).stdout == b"later\n"
    assert "can be written again" in master.log_text()


async def test_a_master_killed_while_its_disk_fails_finishes_the_job_after_a_restart(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    """What waited in memory is lost with the master, and recovered from the store and the
    worker (which holds the result until the master has written it)."""
    master = cluster.master()
    cluster.worker(master, worker_id="w1")
    async with Client(master.address) as client:
        job_id = await run_into_outage(
            client, master, tmp_path / "gate", f"head -c {OUTPUT_BYTES} /dev/zero | tr '\\0' y"
        )
        master.kill()
        restarted = cluster.master(data_dir=master.extra["data_dir"], listen=master.address)
        async with Client(restarted.address) as again:
            job = await wait_job(again, job_id)
    assert job.status == JobStatus.COMPLETED, job.error
    assert job.stdout == b"started\n" + b"y" * OUTPUT_BYTES


def test_a_damaged_database_is_one_line_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "master.db").write_bytes(b"\x00not a database" * 1000)
    started = run_cli("master", "--listen", "127.0.0.1:0", "--data-dir", str(data), timeout=30)
    assert started.code == 1, started
    last = started.stderr.strip().splitlines()[-1]
    assert last == (
        f"dist-exec: cannot open the job database {data / 'master.db'}: file is not a database "
        "(a damaged file: restore it from a backup, or move it and its -wal file away to start "
        "empty)"
    )
    assert "Traceback" not in started.stderr
