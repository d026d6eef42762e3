"""Configuration, scheduling order, bounded output and the embedded local cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dist_exec.config import split_address
from dist_exec.tuning import GRPC_EXPERIMENTS, tune_grpc
from tests.conftest import (
    ClusterFactory,
    detached_cluster,
    pid_alive,
    run_cli,
    up_address,
    wait_for,
)
from tests.faults.proxy import CuttableProxy


def test_worker_reads_the_spec_environment_and_flags_win(cluster: ClusterFactory) -> None:
    master = cluster.master()
    cluster.worker(
        master,
        worker_id="from-flag",
        env={
            "WORKER_ID": "from-env",
            "MAX_CONCURRENT_TASKS": "3",
            "WORKER_LABELS": "zone=a,arch=x86",
            "HEARTBEAT_INTERVAL_SECONDS": "1",
            "LOG_LEVEL": "DEBUG",
        },
        extra=["--label", "zone=b"],
        max_tasks=3,
    )
    env_only = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "worker"],
        env={
            "PATH": "/usr/bin:/bin",
            "MASTER_ADDRESS": master.address,
            "WORKER_ID": "env-worker",
            "WORKER_ADDRESS": "127.0.0.1:0",
            "MAX_CONCURRENT_TASKS": "7",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert env_only.stdout is not None
        assert "dist-exec worker env-worker listening on 127.0.0.1:" in env_only.stdout.readline()
        nodes = {
            n["id"]: n for n in json.loads(run_cli("nodes", "--json", master=master.address).stdout)
        }
        assert nodes["from-flag"]["labels"] == {"zone": "b", "arch": "x86"}
        assert nodes["from-flag"]["max_tasks"] == 3
        assert nodes["env-worker"]["max_tasks"] == 7
    finally:
        env_only.kill()
        env_only.communicate()


def test_higher_priority_runs_first_fifo_within_a_priority(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    master = cluster.master()
    cluster.worker(master, worker_id="solo", max_tasks=1)
    addr = master.address
    gate, order = tmp_path / "gate", tmp_path / "order"
    blocker = run_cli("run", "-d", f"while [ ! -e {gate} ]; do sleep 0.05; done", master=addr)
    blocker_id = blocker.stdout.strip()
    wait_for(
        lambda: (
            json.loads(run_cli("status", blocker_id, "--json", master=addr).stdout)["status"]
            == "RUNNING"
        ),
        20,
        "the blocker to run",
    )
    for name, priority in [("p0", 0), ("p5a", 5), ("p9", 9), ("p5b", 5), ("p10", 10)]:
        run_cli("run", "-d", "--priority", str(priority), f"echo {name} >> {order}", master=addr)
    gate.touch()
    wait_for(lambda: order.exists() and len(order.read_text().split()) == 5, 30, "all five jobs")
    assert order.read_text().split() == ["p10", "p9", "p5a", "p5b", "p0"]


def test_big_output_is_streamed_whole_but_stored_bounded(cluster: ClusterFactory) -> None:
    master = cluster.master(extra=["--max-output", "64k"])
    cluster.worker(master, extra=["--max-output", "64k"])
    size = 5_000_000
    result = run_cli(
        "run", f"head -c {size} /dev/zero | tr '\\0' a; echo tail >&2", master=master.address
    )
    assert result.code == 0
    assert len(result.stdout) == size
    assert "stored output is truncated" in result.stderr
    body = json.loads(run_cli("list", "--json", "--limit", "1", master=master.address).stdout)[0]
    assert body["output_truncated"] is True
    assert body["stdout_bytes"] == size
    # The first 64 KiB and the last MiB (--output-tail) are kept, and the gap is marked.
    head, tail = 64 * 1024, 1024 * 1024
    gap = f"\n[... {size - head - tail} bytes omitted ...]\n"
    assert body["output"] == "a" * head + gap + "a" * tail
    assert body["stderr"] == "tail\n"


def test_up_detached_runs_jobs_and_down_stops_everything(tmp_path: Path) -> None:
    data = tmp_path / "cluster"
    up = run_cli("up", "-d", "--workers", "2", "--listen", "127.0.0.1:0", "--data-dir", str(data))
    try:  # (everything that may fail from here on stops the cluster first)
        assert up.code == 0, up.stderr
        pid = int((data / "cluster.pid").read_text())
        address = up_address(up.stdout)
        assert re.search(r"master at 127\.0\.0\.1:[1-9]\d*, 2 workers", up.stdout), up.stdout
        note = "(commands run as nobody; --run-as USER to change)"  # said when it is so
        assert (note in up.stdout) == (os.geteuid() == 0)
        # The cluster runs with dist-exec's gRPC settings (dist_exec.tuning), where measured.
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        tuned = GRPC_EXPERIMENTS if tune_grpc({}) else None
        expected = os.environ.get("GRPC_EXPERIMENTS", tuned)
        found = [e for e in environ if e.startswith(b"GRPC_EXPERIMENTS=")]
        assert found == ([] if expected is None else [f"GRPC_EXPERIMENTS={expected}".encode()])
        again = run_cli("up", "-d", "--listen", address, "--data-dir", str(data))
        assert again.code == 1
        assert "already running" in again.stderr
        result = run_cli("run", "echo via-up", master=address)
        assert (result.code, result.stdout) == (0, "via-up\n")
        nodes = json.loads(run_cli("nodes", "--json", master=address).stdout)
        assert sorted(n["id"] for n in nodes) == ["local-1", "local-2"]
    finally:
        down = run_cli("down", "--data-dir", str(data))
    assert down.code == 0, down.stderr
    assert "stopped" in down.stdout
    assert not pid_alive(pid)
    assert run_cli("run", "true", master=address).code == 125
    assert "no cluster was running" in run_cli("down", "--data-dir", str(data)).stdout


def test_down_signals_only_its_own_cluster(tmp_path: Path) -> None:
    """A pid file that names another process (a pid reused since) or is not a pid at all
    never gets a signal sent: not to that process, and never to -1 (every process)."""
    data = tmp_path / "cluster"
    data.mkdir()
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        (data / "cluster.pid").write_text(str(bystander.pid))
        result = run_cli("down", "--data-dir", str(data))
        assert (result.code, result.stdout) == (0, "no cluster was running\n")
        assert bystander.poll() is None
        assert not (data / "cluster.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()
    for text in ("abc", "0", "1"):
        (data / "cluster.pid").write_text(text)
        result = run_cli("down", "--data-dir", str(data))
        assert (result.code, result.stderr) == (
            1,
            f"dist-exec: {data / 'cluster.pid'} does not hold a process id ({text!r}); remove it\n",
        )


def test_a_detached_cluster_whose_up_was_killed_stops_and_can_start_again(
    tmp_path: Path,
) -> None:
    """Its servers end with it (they drain), and down clears what it left; the same data dir
    and port then start a new cluster."""
    data = tmp_path / "cluster"
    up = run_cli("up", "-d", "--workers", "1", "--listen", "127.0.0.1:0", "--data-dir", str(data))
    servers: list[int] = []
    try:
        assert up.code == 0, up.stderr
        address = up_address(up.stdout)
        servers = [pid for pid, _ in json.loads((data / "cluster.json").read_text())["servers"]]
        assert len(servers) == 2
        os.kill(int((data / "cluster.pid").read_text()), signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in servers), 60, "the servers to end")
        down = run_cli("down", "--data-dir", str(data))
        assert down.code == 0, down.stderr
        assert not (data / "cluster.json").exists()
        again = run_cli("up", "-d", "--workers", "1", "--listen", address, "--data-dir", str(data))
        assert again.code == 0, again.stderr
        assert run_cli("run", "echo again", master=address).stdout == "again\n"
    finally:
        for pid in servers:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        assert run_cli("down", "--data-dir", str(data)).code == 0


def test_a_worker_of_a_local_cluster_that_dies_is_started_again(tmp_path: Path) -> None:
    """It took the whole cluster down with it (master and the other workers)."""
    data = tmp_path / "cluster"
    with detached_cluster(data, "--workers", "2") as (up, address):
        assert up.code == 0, up.stderr

        def servers() -> list[int]:
            return [pid for pid, _ in json.loads((data / "cluster.json").read_text())["servers"]]

        master, first, second = servers()
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: servers()[1] != first, 30, "worker local-1 to be started again")
        assert servers()[::2] == [master, second]  # (the others untouched)

        def healthy() -> list[str]:
            nodes = json.loads(run_cli("nodes", "--json", master=address).stdout)
            found = {n["id"]: n["status"] for n in nodes}
            return [] if found != {"local-1": "HEALTHY", "local-2": "HEALTHY"} else list(found)

        wait_for(healthy, 30, "both workers registered")
        assert run_cli("run", "echo still", master=address).stdout == "still\n"
        assert (
            "worker local-1 exited (-9); starting it again"
            in (data / "logs" / "up.log").read_text()
        )


def test_a_master_a_few_slow_round_trips_away_is_reached(tmp_path: Path) -> None:
    """TCP, TLS and HTTP/2 handshakes over a 300 ms round trip take about a second: a client
    must wait for them (gRPC's connect timeout once was 200 ms here)."""
    data = tmp_path / "cluster"
    with detached_cluster(data, "--workers", "1") as (up, address):
        assert up.code == 0, up.stderr
        proxy = CuttableProxy(*split_address(address), delay_s=0.15).start()
        try:
            far = run_cli(
                "nodes", "--json", "--client-config", str(data / "client.json"),
                master=proxy.address,
            )  # fmt: skip
            assert far.code == 0, far.stderr
            assert [n["id"] for n in json.loads(far.stdout)] == ["local-1"]
        finally:
            proxy.close()


def test_up_passes_the_command_policy_and_task_options_to_its_workers(tmp_path: Path) -> None:
    """A local cluster is set up like a fleet: labels, the user and environment commands get,
    the command policy, limits. As root, commands would run as 'nobody' without --run-as."""
    data = tmp_path / "cluster"
    user = "root" if os.geteuid() == 0 else str(os.geteuid())
    with detached_cluster(
        data, "--workers", "1", "--label", "zone=lab", "--run-as", user, "--inherit-env",
        "--block-command", "rm*", "--task-max-file-size", "1k",
        env={"DIST_EXEC_TEST_MARK": "from-up"},
    ) as (up, address):  # fmt: skip
        assert up.code == 0, up.stderr
        assert f"master at {address}, 1 workers\n" in up.stdout  # (no note on the user)
        nodes = json.loads(run_cli("nodes", "--json", master=address).stdout)
        assert [(n["id"], n["labels"]) for n in nodes] == [("local-1", {"zone": "lab"})]
        result = run_cli("run", 'id -u; echo "$DIST_EXEC_TEST_MARK"', master=address)
        assert (result.code, result.stdout) == (0, f"{os.geteuid()}\nfrom-up\n"), result.stderr
        blocked = run_cli("run", "--", "rm", "-f", str(tmp_path / "x"), master=address)
        assert blocked.code == 125
        assert "blocked by rule 'rm*'" in blocked.stderr
        big = run_cli("run", f"head -c 4096 /dev/zero > {tmp_path / 'big'}", master=address)
        assert big.code != 0  # stopped at 1 KiB (SIGXFSZ)
        assert (tmp_path / "big").stat().st_size == 1024


@pytest.mark.parametrize(
    ("option", "error"),
    [
        (["--run-as", "no-such-user-here"], "--run-as: no user 'no-such-user-here' on this host"),
        (
            ["--task-cpu-time-limit", "100000d"],
            "worker task limits: CPU time limit is too large; at most 366d",
        ),
    ],
    ids=["run-as", "limit"],
)
def test_up_refuses_task_options_a_worker_would_refuse_in_one_line(
    tmp_path: Path, option: list[str], error: str
) -> None:
    data = tmp_path / "cluster"
    result = run_cli("up", "-d", "--data-dir", str(data), *option)
    assert (result.code, result.stderr) == (2, f"dist-exec: {error}\n")
    assert not (data / "cluster.pid").exists()


@pytest.mark.parametrize("stop", ["ctrl-c", "down"])
def test_up_in_the_foreground_stops_cleanly(tmp_path: Path, stop: str) -> None:
    """On Ctrl-C, or when `down` is given its data dir (it finds up by the pid up records)."""
    data = tmp_path / "fg"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "up", "--workers", "1", "--listen", "127.0.0.1:0",
         "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        address = up_address(proc.stdout.readline())
        assert address
        assert run_cli("run", "echo fg", master=address).stdout == "fg\n"
        if stop == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            down = run_cli("down", "--data-dir", str(data))
            assert (down.code, down.stdout) == (0, "dist-exec cluster stopped\n"), down.stderr
        assert proc.wait(timeout=60) == 0, proc.communicate()
    finally:
        proc.kill()
        proc.communicate()
    assert run_cli("nodes", master=address).code == 1


def test_a_second_server_on_a_used_port_refuses_to_start(cluster: ClusterFactory) -> None:
    master = cluster.master()
    data = ["--data-dir", str(master.extra["data_dir"]) + "-2"]
    for args in (["master", *data], ["worker", "--master", master.address]):
        result = run_cli(*args, "--listen", master.address)
        assert result.code == 1
        assert (
            result.stderr
            == f"dist-exec: cannot listen on {master.address}: Address already in use\n"
        )
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("detach", [False, True], ids=["up", "up -d"])
def test_up_on_a_used_port_says_why_in_one_line(cluster: ClusterFactory, detach: bool) -> None:
    """It printed the master's last log lines, the background one with literal \\n."""
    master = cluster.master()
    data = cluster.tmp / f"up-{detach}"
    args = ["up", *(["-d"] if detach else []), "--workers", "1", "--data-dir", str(data)]
    result = run_cli(*args, "--listen", master.address)
    assert result.code == 1
    because = (
        f"master did not start: cannot listen on {master.address}: Address already in use "
        f"(log: {data / 'logs' / 'master.log'})"
    )
    wanted = f"cluster did not start: {because}" if detach else because
    assert result.stderr == f"dist-exec: {wanted}\n"


def test_an_unusable_data_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli("master", "--listen", "127.0.0.1:0", "--data-dir", str(blocker / "sub"))
    assert result.code == 2
    assert result.stderr.startswith(f"dist-exec: cannot use --data-dir {blocker / 'sub'}: ")
    assert "Traceback" not in result.stderr
