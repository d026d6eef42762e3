"""Directories and files only their owner may open: job data, logs, cluster files.

The master's database holds every job's payload (environment, stdin) and output, and logs and
credentials sit beside it, so dist-exec makes these directories 0700 and these files 0600,
whatever the umask. One found open to other users is made private, with a warning, when it is
ours; one that belongs to another user is refused (its owner could open it up again).

A file is never reached through a symbolic link: one in its place is refused, so nobody who can
write the directory can have dist-exec write (or open up) a file elsewhere. Each file is
checked and changed through the descriptor it was opened as, not by its name again. A
directory may be a link (a data directory moved to another disk): the user chose that path.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)
OPEN_BITS = 0o077  # anything for the group or other users


class NotPrivate(OSError):
    """A path other users may open, which this process may not make private (not its owner),
    or a symbolic link where a private file should be."""


def private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 (missing parents as usual), or make it private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
    try:
        _make_private(fd, path)
    finally:
        os.close(fd)


def private_file(path: Path) -> None:
    """Take the group's and other users' access away from ``path``, if it exists."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        _make_private(fd, path)
    finally:
        os.close(fd)


def open_private(path: Path, flags: int) -> int:
    """``os.open`` that creates ``path`` with mode 0600 and makes an existing one private. A
    file that is refused is left as it was (O_TRUNC is applied once the file is taken)."""
    try:
        fd = os.open(path, flags & ~os.O_TRUNC | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link(path) from None
        raise
    try:
        _make_private(fd, path)
        if flags & os.O_TRUNC:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, text: str) -> None:
    """Replace the contents of ``path`` (mode 0600)."""
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_TRUNC), "w") as f:
        f.write(text)


def _make_private(fd: int, path: Path) -> None:
    """What ``fd`` (``path``) is open as: refused if a link or another user's and open,
    else made private."""
    st = os.fstat(fd)
    if stat.S_ISLNK(st.st_mode):
        raise _link(path)
    mode = stat.S_IMODE(st.st_mode)
    if not mode & OPEN_BITS:
        return
    if st.st_uid != os.geteuid():
        raise NotPrivate(
            f"{path} is open to other users (mode {mode:04o}) and belongs to uid {st.st_uid}, "
            f"not to this user (uid {os.geteuid()}); make it private (chmod go-rwx) or use "
            "another path"
        )
    try:
        os.fchmod(fd, mode & ~OPEN_BITS)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
        # An O_PATH descriptor takes no fchmod; its /proc/self/fd link reaches the same inode.
        os.chmod(f"/proc/self/fd/{fd}", mode & ~OPEN_BITS)
    log.warning(
        "%s was open to other users (mode %04o); changed it to %04o",
        path,
        mode,
        mode & ~OPEN_BITS,
    )


def _link(path: Path) -> NotPrivate:
    return NotPrivate(
        f"{path} is a symbolic link; dist-exec keeps its files private and does not follow "
        "links to them: remove it, or use another path",
    )
