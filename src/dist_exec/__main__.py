"""The ``dist-exec`` command (also ``python -m dist_exec``)."""

import signal
import sys
from types import FrameType

from dist_exec.tuning import tune_grpc

EXIT_INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C


def main() -> None:
    # Loading the modules is a good part of a short command's life: Ctrl-C meanwhile ends it as
    # quietly as later (nothing was sent yet), not with a traceback from inside an import.
    signal.signal(signal.SIGINT, _interrupted)
    tune_grpc()
    # Imported only now: gRPC reads its settings from the environment when it is imported.
    from dist_exec.cli import main as cli_main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli_main()


def _interrupted(signum: int, frame: FrameType | None) -> None:
    sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
