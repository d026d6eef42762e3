"""The audit log's rotation, on real files: every record lands whole in exactly one file, the
files are numbered newest first, at most ``keep`` old ones stay, and all are private."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import stat
from pathlib import Path

import pytest

from dist_exec.security import audit, private_files
from dist_exec.security.audit import AuditLog


def _records(path: Path) -> list[int]:
    """The ``n`` of each record in ``path``, in order (every line must be a whole record)."""
    return [json.loads(line)["n"] for line in path.read_text().splitlines()]


def _fill(log: AuditLog, first: int, count: int) -> None:
    for n in range(first, first + count):
        log.record("submit", None, "allowed", n=n, pad="x" * 100)


def _write(path: Path, max_bytes: int, keep: int, first: int, count: int) -> None:
    """Records ``first`` .. ``first + count - 1`` through an AuditLog of ``path``, closed."""
    log = AuditLog(path, max_bytes=max_bytes, keep=keep)
    try:
        _fill(log, first, count)
    finally:
        log.close()


def test_rotates_before_a_record_would_pass_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write(path, 2000, 3, 0, 40)
    files = [path, *(tmp_path / f"audit.log.{n}" for n in (1, 2, 3))]
    assert not (tmp_path / "audit.log.4").exists()
    for f in files:
        assert 0 < f.stat().st_size <= 2000
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    # Newest first: audit.log holds the last records; the files together hold a contiguous
    # run ending with the last one, each record once and whole.
    kept = [n for f in reversed(files) for n in _records(f)]
    assert kept == list(range(kept[0], 40))
    assert kept[0] > 0  # the oldest file went


def test_keeps_appending_to_an_existing_log_and_counts_its_size(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write(path, 10_000, 2, 0, 5)
    _write(path, path.stat().st_size + 10, 2, 5, 1)  # the next record does not fit
    assert _records(tmp_path / "audit.log.1") == [0, 1, 2, 3, 4]
    assert _records(path) == [5]


def test_zero_never_rotates(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write(path, 0, 1, 0, 50)
    assert _records(path) == list(range(50))
    assert not (tmp_path / "audit.log.1").exists()


def test_a_record_larger_than_the_limit_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=500, keep=2)
    try:
        _fill(log, 0, 1)
        log.record("submit", None, "allowed", n=1, pad="y" * 2000)
        _fill(log, 2, 1)
    finally:
        log.close()
    assert _records(tmp_path / "audit.log.2") == [0]
    assert _records(tmp_path / "audit.log.1") == [1]
    assert _records(path) == [2]


def test_the_periodic_sync_survives_rotations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The fsync that follows records runs in a thread; rotations while it runs must not make
    it fail or sync a closed descriptor."""
    monkeypatch.setattr(audit, "SYNC_EVERY_S", 0.0)

    async def main() -> None:
        log = AuditLog(tmp_path / "audit.log", max_bytes=1000, keep=2)
        try:
            for n in range(300):
                log.record("submit", None, "allowed", n=n, pad="x" * 100)
                await asyncio.sleep(0)
            syncer = log._syncer
            if syncer is not None:
                await asyncio.wait_for(syncer, timeout=10)
        finally:
            log.close()

    with caplog.at_level(logging.INFO, logger=audit.__name__):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert sum("rotated" in r.getMessage() for r in caplog.records) > 20
    assert _records(tmp_path / "audit.log")[-1] == 299


@pytest.mark.parametrize(("max_bytes", "keep"), [(-1, 1), (1000, 0)])
def test_bad_settings_are_refused(tmp_path: Path, max_bytes: int, keep: int) -> None:
    with pytest.raises(ValueError, match="audit log"):
        AuditLog(tmp_path / "audit.log", max_bytes=max_bytes, keep=keep)


def test_a_rotation_that_fails_keeps_the_log_going(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure halfway (no descriptor left for the new file) left no file open: every later
    record raised, and every submit with it, though its job was created."""
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=1000, keep=2)
    real_open = private_files.open_private
    fails = iter([True])

    def open_once_failing(where: Path, flags: int) -> int:
        if next(fails, False):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(where, flags)

    monkeypatch.setattr("dist_exec.security.audit.open_private", open_once_failing)
    try:
        with caplog.at_level(logging.ERROR, logger=audit.__name__):
            _fill(log, 0, 30)  # the first rotation fails, a later one works
    finally:
        log.close()
    assert any("cannot rotate the audit log" in r.getMessage() for r in caplog.records)
    kept = [n for f in (tmp_path / "audit.log.2", tmp_path / "audit.log.1", path)
            if f.exists() for n in _records(f)]  # fmt: skip
    assert kept == list(range(kept[0], 30))


def test_a_smaller_keep_deletes_the_files_a_larger_one_kept(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write(path, 1000, 5, 0, 40)
    assert (tmp_path / "audit.log.5").exists()
    _write(path, 1000, 2, 40, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log", "audit.log.1", "audit.log.2"]
