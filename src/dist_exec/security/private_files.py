"""Directories and files only their owner may open: job data, logs, cluster files.

The master's database holds every job's payload (environment, stdin) and output, and logs and
credentials sit beside it, so dist-exec makes these directories 0700 and these files 0600,
whatever the umask. One found open to other users is made private, with a warning, when it is
ours; one that belongs to another user is refused (its owner could open it up again).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)
OPEN_BITS = 0o077  # anything for the group or other users


class NotPrivate(OSError):
    """A path other users may open, which this process may not make private (not its owner)."""


def private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 (missing parents as usual), or make it private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_file(path)


def private_file(path: Path) -> None:
    """Take the group's and other users' access away from ``path``, if it exists."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if not mode & OPEN_BITS:
        return
    if st.st_uid != os.geteuid():
        raise NotPrivate(
            f"{path} is open to other users (mode {mode:04o}) and belongs to uid {st.st_uid}, "
            f"not to this user (uid {os.geteuid()}); make it private (chmod go-rwx) or use "
            "another path"
        )
    path.chmod(mode & ~OPEN_BITS)
    log.warning(
        "%s was open to other users (mode %04o); changed it to %04o",
        path,
        mode,
        mode & ~OPEN_BITS,
    )


def open_private(path: Path, flags: int) -> int:
    """``os.open`` that creates ``path`` with mode 0600 and makes an existing one private."""
    private_file(path)
    return os.open(path, flags | os.O_CREAT, 0o600)


def write_private(path: Path, text: str) -> None:
    """Replace the contents of ``path`` (mode 0600)."""
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_TRUNC), "w") as f:
        f.write(text)
