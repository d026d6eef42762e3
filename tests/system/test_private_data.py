"""The data a master and a local cluster keep is their user's only, whatever the umask: the
job database (payloads with their environment and stdin, output), logs, cluster files."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import platformdirs
import pytest

from dist_exec.client import Client, command_spec
from dist_exec.models import JobStatus
from tests.conftest import ClusterFactory, detached_cluster, file_mode, run_cli, umask

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user"),
]
DB_FILES = ("master.db", "master.db-wal", "master.db-shm")


def read_as_nobody(path: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat", str(path)],
        capture_output=True,
        timeout=30,
    )


async def test_another_user_cannot_read_the_job_database(
    cluster: ClusterFactory, shared_dir: Path
) -> None:
    data = shared_dir / "data"  # where anyone may look, were it not private
    with umask(0o000):
        master = cluster.master(data_dir=data)
    cluster.worker(master, run_as=None)  # commands run as nobody
    secret = "s3cret-from-stdin"
    async with Client(master.address) as client:
        job = await client.wait(
            await client.submit(command_spec(["cat"], env={"API_KEY": "k3y"}, stdin=secret))
        )
        assert (job.status, job.stdout) == (JobStatus.COMPLETED, secret.encode())
        # A job is another local user too: it cannot read the database it is recorded in.
        snoop = await client.wait(
            await client.submit(command_spec(["cat", str(data / DB_FILES[1])]))
        )
        assert snoop.exit_code == 1
        assert b"Permission denied" in snoop.stderr
    assert any(secret.encode() in (data / name).read_bytes() for name in DB_FILES)
    assert file_mode(data) == 0o700
    for path in [*(data / name for name in DB_FILES), data / "audit.log"]:
        assert file_mode(path) == 0o600, path
    for name in DB_FILES:
        refused = read_as_nobody(data / name)
        assert refused.returncode != 0, name
        assert b"Permission denied" in refused.stderr
    assert master.stop() == 0


def test_an_open_data_dir_is_made_private_or_refused(cluster: ClusterFactory) -> None:
    data = cluster.tmp / "data"
    with umask(0o022):
        cluster.master(data_dir=data).stop()
    data.chmod(0o755)  # as an older version left it
    (data / "master.db").chmod(0o644)
    master = cluster.master(data_dir=data)
    assert (file_mode(data), file_mode(data / "master.db")) == (0o700, 0o600)
    assert f"{data} was open to other users (mode 0755); changed it to 0700" in master.log_text()
    assert "master.db was open to other users (mode 0644)" in master.log_text()
    master.stop()
    # Someone else's directory, open to others: its owner could open it up again. Refused.
    nobody = pwd.getpwnam("nobody")
    foreign = cluster.tmp / "foreign"
    foreign.mkdir(mode=0o755)
    os.chown(foreign, nobody.pw_uid, nobody.pw_gid)
    result = run_cli("master", "--listen", "127.0.0.1:0", "--data-dir", str(foreign))
    assert (result.code, result.stderr) == (
        2,
        f"dist-exec: cannot use --data-dir {foreign}: {foreign} is open to other users (mode "
        f"0755) and belongs to uid {nobody.pw_uid}, not to this user (uid 0); make it private "
        "(chmod go-rwx) or use another path\n",
    )
    assert file_mode(foreign) == 0o755


def test_a_link_in_place_of_the_job_database_is_refused(tmp_path: Path) -> None:
    """Whoever could write the data dir must not get the master to keep its jobs elsewhere."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.db"
    (data / "master.db").symlink_to(elsewhere)
    result = run_cli("master", "--listen", "127.0.0.1:0", "--data-dir", str(data))
    assert result.code == 1
    assert result.stderr.splitlines()[-1] == (
        f"dist-exec: {data / 'master.db'} is a symbolic link; dist-exec keeps its files "
        "private and does not follow links to them: remove it, or use another path"
    )
    assert not elsewhere.exists()


def test_the_local_cluster_keeps_its_files_private(tmp_path: Path) -> None:
    data = tmp_path / "cluster"
    with umask(0o000), detached_cluster(data, "--workers", "1") as (up, address):
        assert up.code == 0, up.stderr
        assert run_cli("run", "true", master=address).code == 0
        found = {p.relative_to(data).as_posix(): file_mode(p) for p in [data, *data.rglob("*")]}
        pointer = (
            Path(platformdirs.user_config_dir("dist-exec"))
            / "clusters"
            / (address.replace(":", "_") + ".json")
        )
        assert file_mode(pointer) == 0o600  # the CLI's way to the cluster's credentials
    private = ["master.db", "logs/up.log", "logs/master.log", "logs/worker-1.log", "cluster.pid",
               "cluster.json", "client.json", "admin.token", "tls/admin.key"]  # fmt: skip
    for name in private:
        assert found.get(name) == 0o600, name
    assert (found["."], found["logs"]) == (0o700, 0o700)
    # Certificates are public, but no one else may replace anything.
    open_to_others = {name: oct(m) for name, m in found.items() if m & 0o077}
    assert all(n.endswith(".crt") and m == "0o644" for n, m in open_to_others.items()), found
