"""Entry point of a worker started by the local scaler backend: ``dist-exec worker`` that gets
SIGTERM (so it drains and exits) when the master that started it dies, even by SIGKILL, so a
killed master leaves no orphaned workers behind.

Usage (by LocalBackend): python -m dist_exec.autoscaler.local_worker PARENT_PID WORKER_ARGS...
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def main(argv: list[str]) -> None:
    parent = int(argv[0])
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the worker outlives a killed master
        pass
    if os.getppid() != parent:  # the master died before the signal was armed
        sys.exit(0)
    from dist_exec.cli import main as cli_main

    cli_main(["worker", *argv[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
