"""Entry point of a server that another dist-exec process starts and looks after (``up``'s
master and workers, the local scaler's workers): it gets SIGTERM, so it drains and exits, when
that parent dies, even by SIGKILL, so a killed parent leaves no servers behind.

Usage: python -m dist_exec.supervised PARENT_PID COMMAND [ARGS...]  (``dist-exec COMMAND ...``)
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def argv(args: Sequence[str]) -> list[str]:
    """What runs ``dist-exec ARGS`` as a server this process looks after."""
    return [sys.executable, "-m", __name__, str(os.getpid()), *args]


def main() -> None:
    parent = int(sys.argv[1])
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the server outlives a killed parent
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        sys.exit(0)
    sys.argv = ["dist-exec", *sys.argv[2:]]
    from dist_exec.__main__ import main as dist_exec

    dist_exec()


if __name__ == "__main__":
    main()
