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
