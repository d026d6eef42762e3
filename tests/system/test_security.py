"""Transport security, identities, roles and the audit log, with real processes and real TLS."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import pytest

from dist_exec import wire
from dist_exec.client import AccessDenied, Client, Credentials, Unauthenticated, command_spec
from dist_exec.models import JobStatus, NodeStatus
from dist_exec.rpc.v1 import common_pb2, master_pb2, master_pb2_grpc, worker_pb2, worker_pb2_grpc
from dist_exec.security.certs import init_ca, issue
from dist_exec.security.identity import Role
from dist_exec.security.tls import INSECURE_FLAG
from dist_exec.security.tokens import add_token
from tests.conftest import ClusterFactory, Proc, detached_cluster, run_cli, wait_for, wait_until

if TYPE_CHECKING:
    from dist_exec.rpc.v1.master_pb2_grpc import MasterServiceAsyncStub

pytestmark = pytest.mark.system


def _tokens(master: Proc) -> Path:
    return Path(master.extra["data_dir"]) / "tokens.json"


def _token_master(cluster: ClusterFactory, *extra: str) -> tuple[Proc, dict[str, str]]:
    """A plain loopback master with a tokens file: every caller must bring a token."""
    data = cluster.tmp / "token-master"
    tokens = {
        name: add_token(data / "tokens.json", name, role)
        for name, role in [
            ("alice", Role.SUBMIT), ("bob", Role.SUBMIT), ("reader", Role.READ),
            ("root", Role.ADMIN), ("w1", Role.WORKER),
        ]
    }  # fmt: skip
    master = cluster.master(data_dir=data, extra=list(extra))
    return master, tokens


def _audit(master: Proc) -> list[dict[str, object]]:
    path = Path(master.extra["data_dir"]) / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_token_master_refuses_missing_and_wrong_tokens(cluster: ClusterFactory) -> None:
    master, _ = _token_master(cluster)
    for credentials in (None, Credentials(token="dxt_not-a-real-token")):
        async with Client(master.address, credentials=credentials) as client:
            with pytest.raises(Unauthenticated) as info:
                await client.submit(command_spec(["true"]))
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    none = run_cli("run", "true", master=master.address)
    assert (none.code, none.stderr) == (
        3,
        "dist-exec: not authenticated: no credentials: pass a token (--token or "
        "DIST_EXEC_TOKEN) or a client certificate (--cert/--key)\n",
    )
    wrong = run_cli("list", "--token", "dxt_wrong", master=master.address)
    assert wrong.code == 3
    assert "invalid token" in wrong.stderr
    assert "Traceback" not in wrong.stderr + none.stderr
    denied = [e for e in _audit(master) if e["decision"] == "denied"]
    assert {e["reason"] for e in denied} >= {
        "invalid token: it is not (or no longer) known to the master"
    }


async def test_roles_and_owners(cluster: ClusterFactory) -> None:
    master, tokens = _token_master(cluster)
    cluster.worker(master, worker_id="w1", extra=["--token", tokens["w1"]])

    def as_(name: str) -> Client:
        return Client(master.address, credentials=Credentials(token=tokens[name]))

    async with as_("alice") as alice, as_("bob") as bob, as_("reader") as reader:
        job = await alice.submit(command_spec(["sleep", "30"]))
        assert (await alice.get(job)).spec.owner == "alice"
        # A read identity sees every job but may not run one.
        assert (await reader.get(job)).spec.owner == "alice"
        with pytest.raises(AccessDenied, match="reader has the role read; Submit needs"):
            await reader.submit(command_spec(["true"]))
        with pytest.raises(AccessDenied, match="reader has the role read; RunSession needs"):
            async for _ in reader.run(command_spec(["true"])):
                pass
        request = master_pb2.RunJobsRequest(jobs=[wire.submit_request(command_spec(["true"]))])
        with pytest.raises(grpc.aio.AioRpcError, match="RunJobs needs") as refused:
            await reader.stub.RunJobs(request).read()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(AccessDenied):
            await reader.cancel(job)
        # Another submitter can neither see nor cancel it, nor list it.
        with pytest.raises(AccessDenied, match="belongs to another identity") as info:
            await bob.cancel(job)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(AccessDenied):
            await bob.get(job)
        with pytest.raises(AccessDenied):
            async for _ in bob.stream_output(job, follow=False):
                pass
        mine = await bob.submit(command_spec(["true"]))
        listed, total = await bob.list_jobs()
        assert ([j.id for j, _ in listed], total) == ([mine], 1)
        with pytest.raises(AccessDenied):
            await bob.list_jobs(owner="alice")
        assert {j.spec.owner for j, _ in (await reader.list_jobs())[0]} == {"alice", "bob"}
    cli = run_cli("cancel", job, "--token", tokens["bob"], master=master.address)
    assert cli.code == 4
    assert cli.stderr.startswith("dist-exec: permission denied: job ")
    admin = run_cli("cancel", job, "--json", "--token", tokens["root"], master=master.address)
    assert admin.code == 0, admin.stderr
    assert json.loads(admin.stdout)["status"] == JobStatus.CANCELLED.value
    status = json.loads(run_cli("status", job, "--json", "--token", tokens["root"],
                                master=master.address).stdout)  # fmt: skip
    assert status["owner"] == "alice"
    log = _audit(master)
    cancels = [(e["identity"], e["decision"]) for e in log if e["action"] == "cancel"]
    assert cancels == [("bob", "denied"), ("bob", "denied"), ("root", "allowed")]
    looks = [(e["action"], e["identity"]) for e in log if e["action"] in ("status", "output")]
    assert looks == [("status", "bob"), ("output", "bob")]


async def test_the_read_role_sees_a_job_without_its_data(cluster: ClusterFactory) -> None:
    """A read identity (monitoring) saw every job's raw payload: the environment values,
    stdin and so on of every submitter. It sees what runs; the owner and admins see all."""
    master, tokens = _token_master(cluster)
    cluster.worker(master, worker_id="w1", extra=["--token", tokens["w1"]])
    spec = command_spec(
        "wc -c", shell=True, env={"DB_PASSWORD": "hunter2", "MODE": "fast"}, stdin=b"secret input"
    )

    def as_(name: str) -> Client:
        return Client(master.address, credentials=Credentials(token=tokens[name]))

    async with as_("alice") as alice, as_("reader") as reader, as_("root") as root:
        job = await alice.submit(spec)
        ended = await asyncio.wait_for(alice.wait(job), 30)
        assert (await alice.get(ended.id)).stdout.strip() == b"12"
        for whole in (await alice.get(job), await root.get(job)):
            assert whole.spec.payload == spec.payload
        seen = json.loads((await reader.get(job)).spec.payload)
        assert seen == {
            "command": "wc -c",
            "shell": True,
            "env": {"DB_PASSWORD": "<redacted>", "MODE": "<redacted>"},
            "stdin": "<redacted>",
        }
        async for item in reader.watch(job):  # (its final state too)
            if not isinstance(item, tuple):
                assert json.loads(item.spec.payload) == seen
    shown = run_cli("status", job, "--json", "--token", tokens["reader"], master=master.address)
    assert shown.code == 0
    assert "hunter2" not in shown.stdout


async def test_secure_cluster_runs_jobs_over_mutual_tls(cluster: ClusterFactory) -> None:
    master = cluster.master(secure=True)
    cluster.worker(master, worker_id="node-a", secure=True)
    pki = cluster.pki
    async with Client(master.address, credentials=pki.credentials("carol", "submit")) as carol:
        job = await carol.wait(
            await carol.submit(
                command_spec("printf ok", shell=True, env={"API_TOKEN": "hunter2", "MODE": "x"})
            )
        )
        assert (job.status, job.stdout, job.worker_id, job.spec.owner) == (
            JobStatus.COMPLETED, b"ok", "node-a", "carol",
        )  # fmt: skip
        assert await carol.whoami() == ("carol", "submit", "cert")
    submit = next(e for e in _audit(master) if e["action"] == "submit")
    assert submit["identity"] == "carol"
    assert submit["decision"] == "allowed"
    assert submit["tasks"] == [
        {"type": "command", "command": "printf ok", "shell": True,
         "env": {"API_TOKEN": "<redacted>", "MODE": "x"}},
    ]  # fmt: skip
    assert "hunter2" not in (Path(master.extra["data_dir"]) / "audit.log").read_text()
    cli = run_cli(
        "run", "echo via-cli", "--ca", str(pki.ca),
        "--cert", str(pki.issue("carol", "submit").cert),
        "--key", str(pki.issue("carol", "submit").key), master=master.address,
    )  # fmt: skip
    assert (cli.code, cli.stdout) == (0, "via-cli\n"), cli.stderr


def test_a_stopped_master_is_not_taken_for_a_refusal_of_the_credentials(
    cluster: ClusterFactory,
) -> None:
    """The kernel takes the connection, the master never answers the handshake: that read
    'not authenticated: ... certificate is missing, expired ...' (exit 3)."""
    master = cluster.master(secure=True)
    pki = cluster.pki
    admin = pki.issue("root", "admin")
    args = ["--ca", str(pki.ca), "--cert", str(admin.cert), "--key", str(admin.key)]
    assert run_cli("nodes", *args, master=master.address).code == 0
    master.signal(signal.SIGSTOP)
    try:
        stalled = run_cli("nodes", *args, master=master.address)
    finally:
        master.signal(signal.SIGCONT)
    assert stalled.code == 1, stalled.stderr
    assert "took the connection but did not answer" in stalled.stderr
    assert "not authenticated" not in stalled.stderr


async def test_expired_foreign_and_roleless_certificates_are_refused(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master(secure=True)
    pki = cluster.pki
    expired = pki.issue("old", "admin", days=-1)
    foreign_dir = cluster.tmp / "foreign"
    init_ca(foreign_dir)
    foreign = issue(foreign_dir, "mallory", "admin", foreign_dir)
    ca = pki.ca.read_bytes()
    for cert in (expired, foreign):
        credentials = Credentials(ca, cert.cert.read_bytes(), cert.key.read_bytes())
        async with Client(master.address, timeout_s=10, credentials=credentials) as client:
            # gRPC refuses a bad client certificate in the TLS handshake: UNAVAILABLE on the wire,
            # reported by the client as unauthenticated.
            with pytest.raises(Unauthenticated, match="refused the TLS connection"):
                await client.submit(command_spec(["true"]))
        cli = run_cli(
            "list", "--ca", str(pki.ca), "--cert", str(cert.cert), "--key", str(cert.key),
            master=master.address,
        )  # fmt: skip
        assert cli.code == 3
        assert "refused the TLS connection" in cli.stderr
    # A transport-only certificate needs a token to say who it is.
    async with Client(master.address, credentials=pki.credentials("cli", "client")) as client:
        with pytest.raises(Unauthenticated, match="carries no role"):
            await client.list_jobs()
    # A worker's certificate is no client's.
    async with Client(master.address, credentials=pki.credentials("w9", "worker")) as client:
        with pytest.raises(AccessDenied, match="w9 has the role worker"):
            await client.submit(command_spec(["true"]))


async def test_a_worker_accepts_calls_only_from_the_master(cluster: ClusterFactory) -> None:
    master = cluster.master(secure=True)
    worker = cluster.worker(master, worker_id="node-a", secure=True)
    pki = cluster.pki
    request = worker_pb2.ExecuteRequest(
        task_id="00000000-0000-0000-0000-000000000001", task_type="command",
        payload=b'{"command": "touch", "args": ["/tmp/rogue"]}',
    )  # fmt: skip
    # No client certificate at all: refused in the handshake.
    rogue = Credentials(pki.ca.read_bytes())
    async with rogue.channel(worker.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await worker_pb2_grpc.WorkerServiceStub(channel).Execute(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # Certificates of the right CA but not the master's role: PERMISSION_DENIED.
    for name, role in (("root", "admin"), ("node-b", "worker")):
        creds = pki.credentials(name, role)
        options = [("grpc.ssl_target_name_override", "node-a")]
        async with creds.channel(worker.address, options) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Execute(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "needs master" in (info.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # The Dispatch stream too, refused when it opens, before any request is read.
            # (Nothing is sent on it: a client whose send races the refusal gets gRPC's
            # "Internal error from Core" instead of the server's status.)
            dispatch = stub.Dispatch(iter(()), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in dispatch:
                    pass
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "needs master" in (info.value.details() or "")
    assert not Path("/tmp/rogue").exists()
    assert worker.alive()


async def test_a_worker_without_tls_serves_only_its_master(cluster: ClusterFactory) -> None:
    """A plain worker takes calls only with the token it gave its master when it registered
    (a new random one at each start): a stranger on the same host cannot run a command on it,
    watch another job's output or cancel it, whatever the master requires of its callers."""
    master, tokens = _token_master(cluster)
    worker = cluster.worker(master, call_token=None, env={"DIST_EXEC_TOKEN": tokens["w1"]},
                            worker_id="w1")  # fmt: skip
    alice = Credentials(token=tokens["alice"])
    async with Client(master.address, credentials=alice) as client:
        job = await client.wait(await client.submit(command_spec(["echo", "through the master"])))
        assert (job.status, job.stdout) == (JobStatus.COMPLETED, b"through the master\n")
    forged = worker_pb2.ExecuteRequest(
        task_id="forged", task_type="command", payload=b'{"command": "true"}'
    )
    async with grpc.aio.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        for metadata in [(), (("authorization", f"Bearer {tokens['root']}"),),
                         (("authorization", "Bearer not-the-token"),)]:  # fmt: skip
            for call in (
                stub.Execute(forged, metadata=metadata, timeout=10),
                stub.GetWorkerStatus(
                    worker_pb2.GetWorkerStatusRequest(), metadata=metadata, timeout=10
                ),
                stub.CancelTask(
                    worker_pb2.CancelTaskRequest(task_id="forged"), metadata=metadata, timeout=10
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "a worker serves its master only" in (info.value.details() or "")


async def test_workers_register_only_as_their_certificate_says(cluster: ClusterFactory) -> None:
    master = cluster.master(secure=True)
    pki = cluster.pki
    # A worker certificate for w1 claiming to be w2: PERMISSION_DENIED.
    async with pki.credentials("w1", "worker").channel(master.address) as channel:
        stub = worker_pb2_grpc.RegistrationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Register(
                worker_pb2.RegisterRequest(
                    worker_id="w2", address="127.0.0.1:1", capabilities=["command"],
                    max_concurrent_tasks=1,
                ),
                timeout=10,
            )  # fmt: skip
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "credentials name 'w1'" in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Heartbeat(worker_pb2.HeartbeatRequest(worker_id="w2"), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A client certificate may not register at all.
    async with pki.credentials("root", "admin").channel(master.address) as channel:
        stub = worker_pb2_grpc.RegistrationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Deregister(worker_pb2.DeregisterRequest(worker_id="root"), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    refusals = [(e["action"], e["identity"], e["decision"]) for e in _audit(master)]
    assert refusals == [("register", "w1", "denied"), ("Deregister", "root", "denied")]


async def test_a_pool_certificate_serves_a_deployment_of_workers(cluster: ClusterFactory) -> None:
    master = cluster.master(secure=True)
    pki = cluster.pki
    pool = pki.tls_args("dist-exec-worker", "workers")
    for pod in ("dist-exec-worker-7f9c-abcde", "dist-exec-worker-7f9c-fghij"):
        cluster.worker(master, worker_id=pod, max_tasks=1, extra=pool)
    async with Client(master.address, credentials=pki.credentials("root", "admin")) as root:
        assert len(await root.nodes()) == 2
        ids = await root.submit_many([command_spec(["sleep", "0.3"]) for _ in range(4)])
        jobs = [await root.wait(j) for j in ids]
        assert {j.status for j in jobs} == {JobStatus.COMPLETED}
        assert {j.worker_id for j in jobs} == {
            "dist-exec-worker-7f9c-abcde", "dist-exec-worker-7f9c-fghij"
        }  # fmt: skip
    async with pki.credentials("dist-exec-worker", "workers").channel(master.address) as channel:
        stub = worker_pb2_grpc.RegistrationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Heartbeat(worker_pb2.HeartbeatRequest(worker_id="dist-exec-workerX"))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'dist-exec-worker' or dist-exec-worker-*" in (info.value.details() or "")


def test_a_worker_with_a_foreign_certificate_never_registers(cluster: ClusterFactory) -> None:
    master = cluster.master(secure=True)
    pki = cluster.pki
    foreign_dir = cluster.tmp / "foreign"
    init_ca(foreign_dir)
    cert = issue(foreign_dir, "intruder", "worker", foreign_dir)
    log = cluster.tmp / "intruder.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dist_exec", "worker", "--master", master.address,
             "--worker-id", "intruder", "--tls-cert", str(cert.cert), "--tls-key", str(cert.key),
             "--tls-ca", str(pki.ca)],
            stdout=subprocess.DEVNULL, stderr=out, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_for(lambda: log.read_text().count("cannot register") >= 2, 20, "refused registers")
    finally:
        proc.kill()
        proc.wait()
    root = pki.issue("root", "admin")
    nodes = run_cli(
        "nodes", "--json", "--ca", str(pki.ca), "--cert", str(root.cert), "--key", str(root.key),
        master=master.address,
    )  # fmt: skip
    assert (nodes.code, json.loads(nodes.stdout)) == (0, [])


async def test_admin_drains_a_node(cluster: ClusterFactory) -> None:
    master, tokens = _token_master(cluster)
    worker = cluster.worker(master, worker_id="w1", extra=["--token", tokens["w1"]])
    refused = run_cli("drain", "w1", "--token", tokens["alice"], master=master.address)
    assert refused.code == 4
    done = run_cli("drain", "w1", "--token", tokens["root"], master=master.address)
    assert done.code == 0, done.stderr
    async with Client(master.address, credentials=Credentials(token=tokens["root"])) as root:
        assert [n.status for n in await root.nodes()] == [NodeStatus.DRAINING]
        job = await root.submit(command_spec(["true"]))
        got = await root.get(job)
        assert got.status == JobStatus.PENDING
        # (not "no healthy worker runs task type 'command'": one does, and it drains)
        assert got.pending_reason == (
            "no matching node takes work now: the workers that run task type 'command' are "
            "w1 DRAINING"
        )
    wait_for(lambda: "asked this node to drain" in worker.log_text(), 10, "the worker to drain")
    # Taken back (there was no way to): the node takes new tasks, the waiting job first.
    assert run_cli("drain", "--undo", "w1", "--token", tokens["alice"],
                   master=master.address).code == 4  # fmt: skip
    undone = run_cli("drain", "--undo", "w1", "--token", tokens["root"], master=master.address)
    assert undone.code == 0, undone.stderr
    assert undone.stdout.startswith("node w1 is told to take new tasks again, at its next")
    async with Client(master.address, credentials=Credentials(token=tokens["root"])) as root:
        done_job = await root.wait(job)
        assert (done_job.status, done_job.worker_id) == (JobStatus.COMPLETED, "w1")
        assert [n.status for n in await root.nodes()] == [NodeStatus.HEALTHY]
    assert "the master took this node's drain back" in worker.log_text()
    drains = [(e["action"], e["identity"], e["decision"]) for e in _audit(master)
              if e["action"] in ("drain", "undrain", "AuthDrainNode")]  # fmt: skip
    assert drains == [
        ("AuthDrainNode", "alice", "denied"), ("drain", "root", "allowed"),
        ("AuthDrainNode", "alice", "denied"), ("undrain", "root", "allowed"),
    ]  # fmt: skip


async def test_rate_limits_key_on_the_identity(cluster: ClusterFactory) -> None:
    master, tokens = _token_master(cluster, "--rate-limit", "0.01", "--rate-burst", "1")
    async with (
        Client(master.address, credentials=Credentials(token=tokens["alice"])) as alice,
        Client(master.address, credentials=Credentials(token=tokens["bob"])) as bob,
    ):
        await alice.submit(command_spec(["true"]))
        with pytest.raises(Exception, match="rate limit exceeded for alice"):
            await alice.submit(command_spec(["true"]))
        await bob.submit(command_spec(["true"]))  # same address, another identity


async def test_the_audit_log_is_rotated_and_its_old_files_pruned(
    cluster: ClusterFactory,
) -> None:
    """Each record goes whole into one file, newest in audit.log; two old files are kept."""
    master = cluster.master(extra=["--audit-max-size", "64K", "--audit-keep", "2"])
    data = Path(master.extra["data_dir"])
    async with Client(master.address) as client:  # (no worker: the jobs wait)
        for n in range(60):  # about 5 KB of record each: 4-5 rotations
            await client.submit(command_spec(["echo", str(n), *["a" * 100] * 48]))
    files = [data / "audit.log.2", data / "audit.log.1", data / "audit.log"]
    assert not (data / "audit.log.3").exists()
    submitted = [
        json.loads(line)["tasks"][0]["args"][0]
        for path in files
        for line in path.read_text().splitlines()
    ]
    assert submitted == [str(n) for n in range(60 - len(submitted), 60)]
    for path in files:
        assert 0 < path.stat().st_size <= 64 * 1024
        assert path.stat().st_mode & 0o077 == 0, path


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--audit-max-size", "10K", "--audit-max-size must be 0 (never rotate) or at least 64K"),
        ("--audit-keep", "0", "Invalid value for '--audit-keep'"),
    ],
)
def test_bad_audit_rotation_settings_are_refused(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    result = run_cli("master", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path), option,
                     value)  # fmt: skip
    assert result.code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_local_cluster_is_not_open(tmp_path: Path) -> None:
    data = tmp_path / "cluster"
    with detached_cluster(data, "--workers", "1") as (up, address):
        assert up.code == 0, up.stderr
        me = run_cli("whoami", master=address)
        assert (me.code, me.stdout) == (0, "admin (admin, authenticated by token)\n")
        by_name = run_cli("whoami", master=address.replace("127.0.0.1", "localhost"))
        assert (by_name.code, by_name.stdout) == (0, me.stdout), by_name.stderr

        async def as_library() -> tuple[str, str, str]:
            async with Client(address) as client:  # (found as the CLI finds it)
                return await client.whoami()

        assert asyncio.run(as_library())[:2] == ("admin", "admin")
        # Someone without this user's config directory has no credentials: refused.
        other = run_cli("run", "true", master=address, env={"HOME": str(tmp_path / "other"),
                                                            "XDG_CONFIG_HOME": ""})  # fmt: skip
        assert other.code == 3
        assert "it requires TLS" in other.stderr
        token = (data / "admin.token").read_text().strip()
        assert token not in (data / "tokens.json").read_text()
        for secret in (data / "admin.token", data / "tls" / "ca.key", data / "tls" / "admin.key"):
            assert secret.stat().st_mode & 0o077 == 0, secret
    assert not (data / "client.json").exists()


def test_tokens_added_or_revoked_take_effect_without_a_restart(cluster: ClusterFactory) -> None:
    master, _ = _token_master(cluster)
    data = str(master.extra["data_dir"])
    token = run_cli("tokens", "add", "late", "--role", "read", "--data-dir", data).stdout.strip()

    def whoami() -> str:
        result = run_cli("whoami", "--token", token, master=master.address)
        return result.stdout if result.code == 0 else ""

    assert wait_for(whoami, 10, "the new token to work") == "late (read, authenticated by token)\n"
    assert run_cli("tokens", "revoke", "late", "--data-dir", data).code == 0
    wait_for(lambda: not whoami(), 10, "the revoked token to be refused")


def test_a_tokens_file_locks_a_running_master_and_keeps_it_locked(
    cluster: ClusterFactory,
) -> None:
    """A master started without tokens is open on loopback; a tokens file locks it within a
    second or so, before anyone sends a token, and removing the file does not open it again."""
    data = cluster.tmp / "late-lock"
    master = cluster.master(data_dir=data)

    def anonymous() -> int:
        return run_cli("whoami", master=master.address).code

    assert anonymous() == 0  # the local admin
    token = run_cli("tokens", "add", "a1", "--role", "admin", "--data-dir", str(data)).stdout
    wait_for(lambda: anonymous() == 3, 10, "the tokens file to lock the master")
    assert run_cli("whoami", "--token", token.strip(), master=master.address).code == 0
    (data / "tokens.json").rename(data / "tokens.json.bak")
    wait_for(
        lambda: run_cli("whoami", "--token", token.strip(), master=master.address).code == 3,
        10,
        "the token to go with its file",
    )
    assert anonymous() == 3  # still locked
    assert f"tokens file {data / 'tokens.json'} is gone" in master.log_text()


def test_servers_refuse_plain_non_loopback_listeners(tmp_path: Path) -> None:
    for args in (
        ["master", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path / "m")],
        ["worker", "--listen", ":0", "--master", "127.0.0.1:1"],
    ):
        result = run_cli(*args)
        assert result.code == 2
        assert "refusing to listen on" in result.stderr
        assert INSECURE_FLAG in result.stderr
        assert "Traceback" not in result.stderr


def test_tokens_are_stored_hashed_and_shown_once(tmp_path: Path) -> None:
    added = run_cli("tokens", "add", "ci", "--role", "submit", "--data-dir", str(tmp_path))
    assert added.code == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("dxt_")
    assert len(token) > 40
    stored = (tmp_path / "tokens.json").read_text()
    assert token not in stored
    assert oct(os.stat(tmp_path / "tokens.json").st_mode & 0o777) == "0o600"
    listed = run_cli("tokens", "list", "--data-dir", str(tmp_path))
    assert listed.stdout.startswith("ci ")
    assert token not in listed.stdout
    again = run_cli("tokens", "add", "ci", "--role", "read", "--data-dir", str(tmp_path))
    assert again.code == 1
    assert run_cli("tokens", "revoke", "ci", "--data-dir", str(tmp_path)).code == 0
    assert json.loads((tmp_path / "tokens.json").read_text()) == {"tokens": []}


async def test_a_refused_bidi_call_is_unauthenticated_even_when_the_client_half_closes(
    cluster: ClusterFactory,
) -> None:
    """A RunSession refused while its client half-closed (a client that sends its runs and
    closes its side, unlike ours) was answered INTERNAL "Internal error from Core" about one
    time in ten: gRPC's race between the refusal and the half-close. The master now takes
    what such a client sends until it half-closes (a moment at most), then refuses."""
    master, _ = _token_master(cluster)
    request = master_pb2.RunSessionRequests(
        requests=[
            master_pb2.RunSessionRequest(
                tag=1,
                run=master_pb2.RunJobsRequest(jobs=[wire.submit_request(command_spec(["true"]))]),
            )
        ]
    )

    async def one(stub: MasterServiceAsyncStub, send: bool) -> grpc.StatusCode:
        async def requests() -> AsyncIterator[master_pb2.RunSessionRequests]:
            if send:
                yield request

        try:
            async for _ in stub.RunSession(requests(), timeout=30):
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    async with grpc.aio.insecure_channel(master.address) as channel:
        stub: MasterServiceAsyncStub = master_pb2_grpc.MasterServiceStub(channel)
        codes = await asyncio.gather(*(one(stub, i % 2 == 0) for i in range(300)))
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}


@pytest.mark.parametrize(
    "args",
    [
        ["whoami", "--master", "192.0.2.7:50051", "--token", "dxt_secret"],
        ["worker", "--master", "192.0.2.7:50051", "--token", "dxt_secret"],
    ],
    ids=["client", "worker"],
)
def test_a_token_is_not_sent_unencrypted_beyond_this_machine(args: list[str]) -> None:
    """Without --ca a client sent its bearer token in clear to any address: read on the way,
    or collected by whatever took a master's port (a security review caught it with a fake
    listener)."""
    result = run_cli(*args)
    assert result.code == 2
    assert "a token would go unencrypted to 192.0.2.7:50051: give the CA" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_token_for_a_master_on_this_machine_needs_no_tls() -> None:
    credentials = Credentials(token="dxt_secret")
    credentials.check_target("127.0.0.1:50051")
    credentials.check_target("localhost:50051")
    credentials.check_target(":50051")
    Credentials(ca=b"pem", token="dxt_secret").check_target("192.0.2.7:50051")
    Credentials().check_target("192.0.2.7:50051")  # (no token: nothing to give away)


def test_tls_files_that_are_not_what_they_should_be_are_one_usage_error(tmp_path: Path) -> None:
    """A CA that is no certificate, a key that is not the certificate's, the two swapped:
    gRPC logged lines of its own and the client said "not authenticated" (exit 3), as if
    the master had refused it; a server failed at its first connection."""
    ca = init_ca(tmp_path)
    alice = issue(tmp_path, "alice", "admin", tmp_path)
    bob = issue(tmp_path, "bob", "admin", tmp_path)
    cases = {
        ("--ca", "/etc/hostname"): "--ca /etc/hostname is not a PEM certificate (",
        ("--ca", str(ca.cert), "--cert", str(alice.cert), "--key", str(bob.key)):
            f"--key {bob.key} is not the key of --cert {alice.cert}",
        ("--ca", str(ca.cert), "--cert", str(alice.key), "--key", str(alice.cert)):
            f"--cert {alice.key} is not a PEM certificate (",
    }  # fmt: skip
    for args, message in cases.items():
        result = run_cli("whoami", *args, master="127.0.0.1:1")
        assert result.code == 2, result.stderr
        assert result.stderr.startswith(f"dist-exec: {message}"), result.stderr
        assert len(result.stderr.splitlines()) == 1
    server = run_cli(
        "worker", "--master", "127.0.0.1:1", "--tls-ca", str(ca.cert),
        "--tls-cert", str(alice.cert), "--tls-key", str(bob.key),
    )  # fmt: skip
    assert server.code == 2
    assert f"--tls-key {bob.key} is not the key of --tls-cert {alice.cert}" in server.stderr


def test_an_allow_list_of_commands_leaves_http_requests_off_unless_asked_for(
    cluster: ClusterFactory,
) -> None:
    """Under --allow-command a job could still have the worker make HTTP requests (to its
    loopback services, a cloud's metadata address): the list says what jobs may do."""
    master = cluster.master()
    cluster.worker(master, worker_id="listed", extra=["--allow-command", "echo"])
    cluster.worker(
        master,
        worker_id="asked",
        extra=["--allow-command", "echo", "--task-type", "command", "--task-type", "http"],
    )
    cluster.worker(master, worker_id="open")
    nodes = json.loads(run_cli("nodes", "--json", master=master.address).stdout)
    assert {n["id"]: n["capabilities"] for n in nodes} == {
        "listed": ["command"],
        "asked": ["command", "http"],
        "open": ["command", "http"],
    }


async def test_each_owner_has_idempotency_keys_of_its_own(cluster: ClusterFactory) -> None:
    """Keys were one namespace: bob could take alice's (predictable) key first; her submit
    was then refused (ALREADY_EXISTS), naming his job."""
    master, tokens = _token_master(cluster)
    key = "deploy-42"
    spec = replace(command_spec(["echo", "alice"]), idempotency_key=key)

    def as_(name: str) -> Client:
        return Client(master.address, credentials=Credentials(token=tokens[name]))

    async with as_("alice") as alice, as_("bob") as bob:
        theirs = await bob.submit(replace(command_spec(["echo", "bob"]), idempotency_key=key))
        mine = await alice.submit(spec)
        assert mine != theirs
        assert await alice.submit(spec) == mine  # (still idempotent for her)
        assert (await alice.get(mine)).spec.owner == "alice"
    # And so after the jobs ended, from the store (a restarted master, say).
    master.stop()
    restarted = cluster.master(data_dir=Path(master.extra["data_dir"]))
    async with Client(restarted.address, credentials=Credentials(token=tokens["alice"])) as alice:
        assert await alice.submit(spec) == mine


class _Impostor:
    """A WorkerService on a dead worker's port, as another local user could bind it: records
    what it is sent, says UNIMPLEMENTED to the first Dispatch (which had the master fall back
    to ExecuteStream calls, each with its job), gives a wrong answer to the master's proof on
    the next, and forges a finished result for any task it is asked about."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.received: list[bytes] = []
        self.dispatches = 0
        self.calls: list[str] = []

    def _called(self, method: str, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        self.calls.append(method)
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})

    async def dispatch(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        self._called("Dispatch", context)
        self.dispatches += 1
        if self.dispatches == 1:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        await context.send_initial_metadata((("x-dist-exec-worker-proof", "0" * 64),))
        async for request in requests:
            self.received.append(request)
            yield b""  # (a DispatchResponse without events)

    async def execute_stream(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        self._called("ExecuteStream", context)
        self.received.append(request)
        asked = worker_pb2.ExecuteRequest.FromString(request)
        forged = worker_pb2.ExecuteProgress(
            task_id=asked.task_id, attempt=asked.attempt, type=worker_pb2.PROGRESS_COMPLETED,
            final_result=worker_pb2.ExecuteResponse(
                task_id=asked.task_id, status=common_pb2.EXECUTION_STATUS_SUCCESS,
                exit_code=0, has_exit_code=True, output=b"forged\n", attempt=asked.attempt,
            ),
        )  # fmt: skip
        yield forged.SerializeToString()

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self._called("unary", context)
        self.received.append(request)
        return worker_pb2.CancelTaskResponse(cancelled=True).SerializeToString()

    async def serve(self, address: str) -> grpc.aio.Server:
        handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            "Dispatch": grpc.stream_stream_rpc_method_handler(self.dispatch),
            "ExecuteStream": grpc.unary_stream_rpc_method_handler(self.execute_stream),
            "Execute": grpc.unary_unary_rpc_method_handler(self.unary),
            "CancelTask": grpc.unary_unary_rpc_method_handler(self.unary),
            "GetWorkerStatus": grpc.unary_unary_rpc_method_handler(self.unary),
        }
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("distexec.v1.WorkerService", handlers),)
        )
        assert server.add_insecure_port(address)
        await server.start()
        return server


async def test_a_process_on_a_dead_workers_port_gets_neither_its_token_nor_its_jobs(
    cluster: ClusterFactory,
) -> None:
    """Without TLS the master used to send the worker's call token as a bearer token: whoever
    bound a dead worker's port before the master noticed (missed heartbeats) got the token,
    then the jobs (environment, stdin), and could answer with forged results. Now the master
    proves the token and sends a job only once the worker has proved it back."""
    # (w1 must stay HEALTHY to the master until both jobs were placed on it: 6 s, not 2)
    master, tokens = _token_master(cluster, "--heartbeat-timeout", "6s")
    call_token = "the-dead-workers-call-token"
    dead = cluster.worker(master, worker_id="w1", call_token=call_token,
                          env={"DIST_EXEC_TOKEN": tokens["w1"]})  # fmt: skip
    alice = Credentials(token=tokens["alice"])
    async with Client(master.address, credentials=alice) as client:
        job = await client.wait(await client.submit(command_spec(["echo", "warm"])))
        assert job.worker_id == "w1"
        dead.kill()
        impostor = _Impostor()
        server = await impostor.serve(dead.address)
        try:
            spec = command_spec("echo $SECRET; cat", shell=True, env={"SECRET": "s3cret-env"},
                                stdin=b"s3cret-stdin", metadata={"key": "s3cret-meta"})  # fmt: skip
            first = await client.submit(spec)
            await wait_until(lambda: impostor.dispatches, what="the master dials w1's port")
            second = await client.submit(spec)  # (on a new Dispatch stream)
            await wait_until(lambda: impostor.dispatches > 1, what="a second Dispatch")
            # A real worker takes the job once w1 has missed its heartbeats.
            w2_token = add_token(_tokens(master), "w2", Role.WORKER)
            cluster.worker(master, worker_id="w2", env={"DIST_EXEC_TOKEN": w2_token})
            done = [await asyncio.wait_for(client.wait(j), 60) for j in (first, second)]
        finally:
            await server.stop(None)
    for job in done:
        assert (job.status, job.worker_id) == (JobStatus.COMPLETED, "w2"), job
        assert job.stdout == b"s3cret-env\ns3cret-stdin"
    for metadata in impostor.metadata:
        assert "authorization" not in metadata
        assert not any(call_token in value for value in metadata.values())
    assert not any(b"s3cret" in request for request in impostor.received)
    assert "ExecuteStream" in impostor.calls  # (its forged results were offered, not taken)
    assert "did not prove it is the worker that registered" in master.log_text()


def _closed_by_peer(sockets: list[socket.socket]) -> int:
    closed = 0
    for sock in sockets:
        try:
            closed += sock.recv(1, socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


async def test_idle_connections_cannot_take_the_masters_last_descriptors(
    cluster: ClusterFactory,
) -> None:
    """gRPC keeps a connection that never sends anything for ever: 256 of them took every
    descriptor of a master allowed 256, after which nobody could connect and the master could
    open nothing (its database's files, pipes, sockets to workers). It now accepts connections
    with three quarters of its descriptors only, and closes the rest at once."""
    limit = 256
    master = cluster.master(prefix=["prlimit", f"--nofile={limit}:{limit}"])
    cluster.worker(master)
    flood: list[socket.socket] = []
    async with Client(master.address) as client:
        assert (await client.wait(await client.submit(command_spec(["true"])))).exit_code == 0
        own = len(os.listdir(f"/proc/{master.pid}/fd"))  # (with the client's and the worker's)
        try:
            host, port = master.address.rsplit(":", 1)
            for _ in range(limit + 100):
                flood.append(socket.create_connection((host, int(port))))
            cap = int(limit * 0.75)
            await wait_until(lambda: _closed_by_peer(flood) >= len(flood) - cap,
                             what="the master to close the connections beyond its cap")  # fmt: skip
            assert len(os.listdir(f"/proc/{master.pid}/fd")) <= own + cap < limit
            # Those connected before keep working: this client, and the worker's heartbeats.
            job = await client.wait(await client.submit(command_spec(["echo", "still here"])))
            assert job.stdout == b"still here\n"
        finally:
            for sock in flood:
                sock.close()
    async with Client(master.address) as late:
        job = await late.wait(await late.submit(command_spec(["echo", "and new ones"])))
        assert job.stdout == b"and new ones\n"
