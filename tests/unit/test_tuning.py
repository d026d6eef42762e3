"""The gRPC settings dist-exec makes for its own processes (dist_exec.tuning)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

from dist_exec.tuning import (
    GC_THRESHOLDS,
    GRPC_EXPERIMENTS,
    OWN_SETTINGS,
    TESTED_GRPC,
    tune_grpc,
    without_own_settings,
)

TESTED = "{}.{}.3".format(*TESTED_GRPC[0])


def test_a_measured_grpc_version_gets_the_setting() -> None:
    env: dict[str, str] = {}
    assert tune_grpc(env, TESTED)
    assert env == {"GRPC_EXPERIMENTS": GRPC_EXPERIMENTS}


@pytest.mark.parametrize("value", ["", "-event_engine_dns", GRPC_EXPERIMENTS])
def test_a_value_already_set_stands(value: str) -> None:
    env = {"GRPC_EXPERIMENTS": value}
    assert not tune_grpc(env, TESTED)
    assert env == {"GRPC_EXPERIMENTS": value}


@pytest.mark.parametrize("version", ["1.84.2", "1.86.0", "2.0.0", "1", "dev"])
def test_other_grpc_versions_keep_their_defaults(version: str) -> None:
    env: dict[str, str] = {}
    assert not tune_grpc(env, version)
    assert env == {}


def test_the_installed_grpcio_is_looked_up() -> None:
    installed = tuple(int(p) for p in importlib.metadata.version("grpcio").split(".")[:2])
    env: dict[str, str] = {}
    assert tune_grpc(env) == (installed in TESTED_GRPC)


def test_importing_the_client_library_changes_nothing() -> None:
    """Library users keep gRPC's defaults: only the dist-exec command tunes its process."""
    code = "import os, dist_exec.client; print(os.environ.get('GRPC_EXPERIMENTS', 'unset'))"
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert done.stdout == "unset\n"


def test_commands_do_not_inherit_dist_exec_own_settings() -> None:
    env = {
        "PATH": "/bin",
        "GRPC_EXPERIMENTS": GRPC_EXPERIMENTS,
        "GRPC_ENABLE_FORK_SUPPORT": OWN_SETTINGS["GRPC_ENABLE_FORK_SUPPORT"],
    }
    assert without_own_settings(env) == {"PATH": "/bin"}
    chosen = {"GRPC_EXPERIMENTS": "-event_engine_dns", "GRPC_ENABLE_FORK_SUPPORT": "1"}
    assert without_own_settings(chosen) == chosen


def test_servers_tune_the_garbage_collector_and_run_on_uvloop() -> None:
    """The master and the worker run in ``serve``: by then the startup heap is frozen, the
    collector's thresholds are raised, and the event loop is uvloop's (in a child process: this
    one keeps its own)."""
    code = """
import asyncio, gc
from dist_exec.cli import serve
seen = []
async def start(stop):
    loop = type(asyncio.get_running_loop())
    seen.append((gc.get_threshold(), gc.get_freeze_count() > 0, loop.__module__))
serve(start)
print(*seen[0])
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout == f"{GC_THRESHOLDS} True uvloop\n"


def test_client_commands_do_not_import_uvloop() -> None:
    """Only the servers need it: a client command does not pay for loading it."""
    code = "import sys, dist_exec.cli; print('uvloop' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout == "False\n"


def test_the_command_takes_ctrl_c_over_before_anything_slow_is_imported() -> None:
    """Until ``__main__.main`` runs, Ctrl-C ends ``dist-exec`` with a traceback: what it imports
    before then must be quick (importlib.metadata alone took 50 ms)."""
    slow = "{'importlib.metadata', 'grpc'}"
    code = f"import sys, dist_exec.__main__; print(sorted({slow} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"
