"""Process-wide settings for dist-exec's own processes: gRPC's, and the event loop's and the
garbage collector's in the master and the workers.

gRPC reads its settings from the environment once, when it is first imported, so they are made
before anything imports grpc: the ``dist-exec`` command (``dist_exec.__main__``) calls
``tune_grpc()`` first. Library users keep gRPC's defaults unless they call it themselves, just
as early.

The gRPC setting turns off two of its EventEngine experiments, the client and the
listener. With them on (grpcio 1.85's default), each message that arrives is read by an
EventEngine pool thread, handed to the completion queue's poller thread, and from there to the
asyncio loop. With them off, the poller thread reads the socket itself: one thread hand-off less
per message. Measured on 2 CPUs (README.md, Benchmark): a bare bidi round trip 0.27 ms ->
0.12 ms, a job's p50 latency 0.15-0.2 ms lower, and 5-15% less CPU in each process. The whole
test suite passes either way.

Experiments come and go between gRPC releases, and gRPC logs an error for a name it does not
know, so the setting applies only to the gRPC versions it was measured on.

The servers run on uvloop (``run_server``): each job costs the master about 20 turns of the
event loop and 36 callbacks, the worker about 14 and 21, and asyncio's own loop spends several
microseconds of Python on each. Measured on 2 CPUs (README.md, Benchmark): CPU per job in the
master and the workers 5-12 % lower. A job's command is spawned by ``subprocess.Popen`` and
watched through a pidfd, not through the loop, so the loop does not change how a command
starts; the few processes started through the loop (the executor's health check, the local
scaler's workers) go through uvloop's subprocess support. Client commands keep asyncio's loop:
a run's own work is small next to its start-up.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Coroutine, MutableMapping
from typing import Any

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"
# Young objects are collected every 20,000 allocations (Python's default: 700); the middle and
# oldest generations 5 and 10 times less often than by default, relative to that (see tune_gc).
GC_THRESHOLDS = (20_000, 50, 100)
TESTED_GRPC = ((1, 85),)  # grpcio (major, minor) versions the experiments were measured on

# What dist-exec sets in its own environment for gRPC. Commands that inherit the worker's
# environment (--inherit-env) do not get these: they are dist-exec's choice, not the user's.
OWN_SETTINGS = {"GRPC_ENABLE_FORK_SUPPORT": "0", "GRPC_EXPERIMENTS": GRPC_EXPERIMENTS}


def tune_grpc(
    environ: MutableMapping[str, str] = os.environ, grpc_version: str | None = None
) -> bool:
    """Set GRPC_EXPERIMENTS for this process (and the processes it starts), unless it is set
    already (an empty value keeps gRPC's defaults) or the installed grpcio was not measured.
    Must run before grpc is imported. Whether it set anything."""
    if "GRPC_EXPERIMENTS" in environ:
        return False
    if grpc_version is None:
        import importlib.metadata  # (here: 50 ms that every dist-exec command would wait for)

        try:
            grpc_version = importlib.metadata.version("grpcio")
        except importlib.metadata.PackageNotFoundError:
            return False
    if _major_minor(grpc_version) not in TESTED_GRPC:
        return False
    environ["GRPC_EXPERIMENTS"] = GRPC_EXPERIMENTS
    return True


def tune_gc() -> None:
    """For a long-running server, once it has imported what it needs: the objects that exist
    now (modules, classes, configuration) are left out of every later collection, and
    collections run less often. A job's messages, tasks and records are freed by reference
    counting, not by the collector; with Python's defaults the collector still ran several
    times per job, scanning the same survivors again. Measured (sequential jobs, 2,000 each,
    alternating): the master's CPU per job -0.06 ms, p50 -0.01 to -0.1 ms; the master's and the
    workers' memory after 6,850 jobs unchanged."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_server(main: Coroutine[Any, Any, None]) -> None:
    """Run a server's main coroutine to its end on a new uvloop event loop. (uvloop is imported
    here: every ``dist-exec`` command imports this module, and only the servers need it.)"""
    import uvloop

    uvloop.run(main)


def without_own_settings(env: dict[str, str]) -> dict[str, str]:
    """``env`` less the gRPC settings dist-exec made for itself (a value the user changed
    stays)."""
    return {k: v for k, v in env.items() if OWN_SETTINGS.get(k) != v}


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None
