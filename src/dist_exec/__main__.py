"""The ``dist-exec`` command (also ``python -m dist_exec``)."""

import signal

from dist_exec.tuning import tune_grpc


def main() -> None:
    # Ctrl-C ends a command as it ends a local program: killed by SIGINT (the shell shows 130),
    # never with a traceback from wherever Python happened to be (an import, asyncio's set-up).
    # What must act on it takes SIGINT for itself: `run` cancels its job, servers shut down.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not when ignored)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    tune_grpc()
    # Imported only now: gRPC reads its settings from the environment when it is imported.
    from dist_exec.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
