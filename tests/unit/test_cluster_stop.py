"""`down` signals only processes of its own cluster, whatever its files say (dist_exec.cluster),
with real processes standing in for a cluster's servers and os.kill watched."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dist_exec import cluster, procfs


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def start_time(pid: int) -> int:
    fields = procfs.stat(pid)
    assert fields is not None
    return int(fields[19])


@pytest.mark.parametrize(
    "text",
    [b"-1", b"0", b"1", b"-7", b"12x", b"", "\u00b2".encode(), b"9" * 30, b"4194305", b"\xff"],
)
def test_a_pid_file_that_holds_no_process_id_gets_no_signal_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: bytes
) -> None:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr("dist_exec.cluster.os.kill", lambda pid, sig: sent.append((pid, sig)))
    (tmp_path / cluster.PID_FILE).write_bytes(text)
    with pytest.raises(cluster.ClusterError, match="does not hold a process id"):
        cluster.stop_background(tmp_path)
    assert sent == []


def test_recorded_servers_still_running_are_stopped_when_their_up_is_gone(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    ended = subprocess.Popen(["true"])
    ended.wait()
    (tmp_path / cluster.PID_FILE).write_text(str(ended.pid))  # (no such process any more)
    state = {"master": "127.0.0.1:1", "servers": [[sleeper.pid, start_time(sleeper.pid)]]}
    (tmp_path / cluster.STATE_FILE).write_text(json.dumps(state))
    assert cluster.stop_background(tmp_path)
    assert sleeper.wait(timeout=10) == -signal.SIGTERM
    assert not (tmp_path / cluster.STATE_FILE).exists()
    assert not (tmp_path / cluster.PID_FILE).exists()


def test_a_recorded_pid_that_is_another_process_now_is_left_alone(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """The pid was reused since: its start time is not the recorded one."""
    state = {"master": "127.0.0.1:1", "servers": [[sleeper.pid, start_time(sleeper.pid) - 1]]}
    (tmp_path / cluster.STATE_FILE).write_text(json.dumps(state))
    assert not cluster.stop_background(tmp_path)
    assert sleeper.poll() is None
    assert not (tmp_path / cluster.STATE_FILE).exists()


def test_a_live_pid_that_is_not_this_clusters_up_is_left_alone(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    (tmp_path / cluster.PID_FILE).write_text(str(sleeper.pid))
    assert not cluster.stop_background(tmp_path)
    assert sleeper.poll() is None


def test_a_server_that_never_says_it_is_ready_is_given_up_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`up` read its stdout with no deadline: a worker that could not register (TLS refused
    it) held `up` for good, deaf to Ctrl-C and to `down`."""
    monkeypatch.setattr(cluster, "READY_TIMEOUT_S", 0.5)
    log = tmp_path / "worker.log"
    log.write_text("dist-exec: cannot register: certificate verify failed\n")
    silent = subprocess.Popen(["sleep", "300"], stdout=subprocess.PIPE, text=True)
    try:
        with pytest.raises(
            cluster.ClusterError, match=r"did not start within 0\.5s: cannot register"
        ):
            cluster._wait_ready(silent, "worker local-1", log)
        monkeypatch.setattr(cluster, "READY_TIMEOUT_S", 300.0)
        with pytest.raises(cluster.ClusterError, match="stopped while worker local-1 was"):
            cluster._wait_ready(silent, "worker local-1", log, stopping=lambda: True)
    finally:
        silent.kill()
        silent.wait()
        if silent.stdout is not None:
            silent.stdout.close()


def test_the_ready_line_is_found_across_reads(tmp_path: Path) -> None:
    talker = subprocess.Popen(
        ["sh", "-c", "printf 'starting\\nw1 listen'; sleep 0.2; printf 'ing on 127.0.0.1:9\\n'"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert cluster._wait_ready(talker, "w1", tmp_path / "none.log") == "127.0.0.1:9"
    finally:
        talker.wait()
        if talker.stdout is not None:
            talker.stdout.close()
