"""The ``dist-exec`` command (also ``python -m dist_exec``)."""

from dist_exec.tuning import tune_grpc


def main() -> None:
    tune_grpc()
    # Imported only now: gRPC reads its settings from the environment when it is imported.
    from dist_exec.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
