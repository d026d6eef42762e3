"""Private directories and files, on real files under a permissive umask."""

from __future__ import annotations

import logging
import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from dist_exec.security.private_files import (
    NotPrivate,
    private_dir,
    private_file,
    write_private,
)
from tests.conftest import file_mode, umask


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """umask 0: whatever is private is so because dist-exec asked for it."""
    with umask(0):
        yield


def test_a_new_directory_and_file_are_private(tmp_path: Path) -> None:
    private_dir(tmp_path / "a" / "data")
    write_private(tmp_path / "a" / "data" / "f", "secret")
    assert file_mode(tmp_path / "a" / "data") == 0o700
    assert file_mode(tmp_path / "a" / "data" / "f") == 0o600
    assert (tmp_path / "a" / "data" / "f").read_text() == "secret"


def test_an_open_directory_and_file_of_ours_are_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "f").write_text("old")
    (data / "f").chmod(0o664)
    with caplog.at_level(logging.WARNING):
        private_dir(data)
        write_private(data / "f", "new")
    assert (file_mode(data), file_mode(data / "f")) == (0o700, 0o600)
    assert [r.getMessage() for r in caplog.records] == [
        f"{data} was open to other users (mode 0755); changed it to 0700",
        f"{data / 'f'} was open to other users (mode 0664); changed it to 0600",
    ]
    caplog.clear()
    private_dir(data)  # already private: nothing to say
    assert caplog.records == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_an_open_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chown(data, nobody.pw_uid, nobody.pw_gid)
    (data / "f").write_text("theirs")
    (data / "f").chmod(0o666)
    os.chown(data / "f", nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(NotPrivate):
        write_private(data / "f", "ours")
    assert (data / "f").read_text() == "theirs"  # refused before it was emptied
    with pytest.raises(NotPrivate) as info:
        private_dir(data)
    assert str(info.value) == (
        f"{data} is open to other users (mode 0755) and belongs to uid {nobody.pw_uid}, not to "
        "this user (uid 0); make it private (chmod go-rwx) or use another path"
    )
    assert file_mode(data) == 0o755
    data.chmod(0o700)  # private, though not ours: the owner's business
    private_dir(data)


def test_a_missing_file_is_left_alone(tmp_path: Path) -> None:
    private_file(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_a_link_in_place_of_a_private_file_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    """Whoever could write the directory must not get dist-exec to write, or open up, a file
    elsewhere through a link."""
    target = tmp_path / "elsewhere"
    target.write_text("theirs")
    target.chmod(0o644)
    link = tmp_path / "data" / "f"
    private_dir(link.parent)
    link.symlink_to(target)
    expected = (
        f"{link} is a symbolic link; dist-exec keeps its files private and does not follow "
        "links to them: remove it, or use another path"
    )
    with pytest.raises(NotPrivate) as info:
        write_private(link, "ours")
    assert str(info.value) == expected
    with pytest.raises(NotPrivate) as info:
        private_file(link)
    assert str(info.value) == expected
    assert (target.read_text(), file_mode(target)) == ("theirs", 0o644)


def test_a_dangling_link_creates_nothing(tmp_path: Path) -> None:
    link = tmp_path / "f"
    link.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(NotPrivate):
        write_private(link, "ours")
    assert not (tmp_path / "would-be-created").exists()


def test_a_linked_directory_is_followed_and_made_private(tmp_path: Path) -> None:
    """A data directory moved to another disk and linked back is the user's choice."""
    real = tmp_path / "disk" / "data"
    real.mkdir(parents=True, mode=0o755)
    (tmp_path / "data").symlink_to(real)
    private_dir(tmp_path / "data")
    write_private(tmp_path / "data" / "f", "ours")
    assert (file_mode(real), file_mode(real / "f")) == (0o700, 0o600)
