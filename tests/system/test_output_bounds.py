"""Output that cannot hurt: a command printing a gigabyte keeps worker and master memory
bounded; the job keeps the head and the tail, counts every byte and says it was truncated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import ClusterFactory, Proc, run_cli, wait_for

GIB = 1 << 30
MIB = 1 << 20


def peak_rss_mib(proc: Proc) -> float:
    """The process's high-water resident set size (VmHWM), in MiB."""
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_a_gigabyte_of_output_keeps_memory_bounded_and_keeps_head_and_tail(
    cluster: ClusterFactory,
) -> None:
    master = cluster.master(extra=["--max-output", "1M", "--output-tail", "64K"])
    worker = cluster.worker(master, worker_id="w1")
    # 1 GiB of stdout: a first line, then zeros, then a last line; a little stderr too.
    script = (
        "echo first-line; head -c 1073741824 /dev/zero; echo; echo last-line; echo to-stderr >&2"
    )
    submitted = run_cli("run", "--detach", script, master=master.address)
    assert submitted.code == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    def ended() -> dict[str, object] | None:
        shown = run_cli("status", "--json", job_id, master=master.address)
        job: dict[str, object] = json.loads(shown.stdout)
        return job if job["status"] not in ("PENDING", "RUNNING") else None

    job = wait_for(ended, 240, "the gigabyte job to end", poll=0.5)
    assert job["status"] == "COMPLETED", job["error"]
    produced = len("first-line\n") + GIB + len("\nlast-line\n")
    assert job["stdout_bytes"] == produced
    assert job["output_truncated"] is True
    output = job["output"]
    assert isinstance(output, str)
    assert output.startswith("first-line\n")
    assert output.endswith("\nlast-line\n")  # the last line always arrives
    assert f"[... {produced - MIB - 64 * 1024} bytes omitted ...]" in output
    assert job["stderr"] == "to-stderr\n"

    # Neither process held the gigabyte (or a large part of it) in memory at any time.
    assert peak_rss_mib(worker) < 200, peak_rss_mib(worker)
    assert peak_rss_mib(master) < 200, peak_rss_mib(master)

    logs = run_cli("logs", job_id, master=master.address)
    assert logs.code == 0, logs.stderr
    assert logs.stdout.startswith("first-line\n")
    assert logs.stdout.endswith("\nlast-line\n")
    assert len(logs.stdout) == MIB + 64 * 1024
    assert f"[{produced - MIB - 64 * 1024} bytes of stdout not kept]" in logs.stderr


def test_a_follower_that_comes_after_the_head_still_gets_the_tail_and_the_gap(
    cluster: ClusterFactory, tmp_path: Path
) -> None:
    """It got the kept head only, and ended there with exit 0 and no word of the rest."""
    master = cluster.master(extra=["--max-output", "64K", "--output-tail", "16K"])
    cluster.worker(master, worker_id="w1")
    gate = tmp_path / "gate"
    script = f"seq 1 100000; while [ ! -e {gate} ]; do sleep 0.05; done; echo last-line"
    submitted = run_cli("run", "--detach", script, master=master.address)
    job_id = submitted.stdout.strip()

    def printed() -> bool:  # (`logs` of the running job: the head, and the end so far)
        shown = run_cli("logs", job_id, master=master.address)
        return len(shown.stdout) == 80 * 1024 and shown.stdout.endswith("\n100000\n")

    wait_for(printed, 30, "seq to end, its head and tail kept")
    follower = subprocess.Popen(
        [sys.executable, "-m", "dist_exec", "logs", "--follow", job_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "DIST_EXEC_MASTER": master.address},
    )
    try:
        assert follower.stdout is not None
        with ThreadPoolExecutor(1) as pool:  # (it follows once it has printed the head)
            head = pool.submit(follower.stdout.read, 64 * 1024).result(timeout=60)
        gate.touch()
        rest, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    out = (head + rest).decode()
    seq = "".join(f"{i}\n" for i in range(1, 100001))
    assert follower.returncode == 0, err
    # The kept head, the end kept so far when it came, then what followed live.
    assert out == seq[: 64 * 1024] + seq[-16 * 1024 :] + "last-line\n"
    assert f"[{len(seq) - 80 * 1024} bytes of stdout not kept]" in err.decode()


def test_more_output_kept_than_a_status_can_carry_is_refused_at_start(tmp_path: Path) -> None:
    """With 100M + 10M kept, `status` of a big job failed: 'Sent message larger than max'."""
    result = run_cli(
        "master", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path),
        "--max-output", "100M", "--output-tail", "10M",
    )  # fmt: skip
    assert result.code == 2
    assert result.stderr == (
        "dist-exec: --max-output plus --output-tail may be at most 30M (a job's status carries "
        "what is kept of its stdout and stderr in one gRPC message of at most 64 MiB); got "
        "110M\n"
    )
