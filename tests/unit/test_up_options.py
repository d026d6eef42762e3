"""`up` hands its command policy and task options to its workers: the arguments it builds mean
to `worker` (and to `up` itself, when it restarts in the background) what they meant to `up`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from dist_exec.cli.servers import policy_args, task_args, up, worker
from dist_exec.cluster import ClusterOptions

TASK_KEYS = (
    "task_types", "labels", "inherit_env", "task_memory_limit", "task_cpu_time_limit",
    "task_max_procs", "task_max_file_size", "containment", "run_as", "run_as_pool",
    "http_timeout", "http_max_body",
)  # fmt: skip


def parsed(command: click.Command, args: list[str]) -> dict[str, Any]:
    with command.make_context(command.name or "", args) as ctx:
        return dict(ctx.params)


def test_default_task_options_give_no_arguments() -> None:
    defaults = {k: v for k, v in parsed(worker, []).items() if k in TASK_KEYS}
    assert task_args(**defaults) == []


@pytest.mark.parametrize(
    "given",
    [
        ["--label", "zone=a", "--label", "arch=x86", "--inherit-env"],
        ["--task-type", "command", "--task-type", "http"],
        ["--label", "k=a=b,c", "--label", "empty="],
        ["--run-as", "nobody", "--containment", "rlimit"],
        ["--run-as-pool", "61000-61999"],
        ["--task-memory-limit", "256M", "--task-cpu-time-limit", "1.5s"],
        ["--task-cpu-time-limit", "0.00001s"],  # (not '1e-05', which a worker refuses)
        ["--task-max-procs", "7", "--task-max-file-size", "1k"],
        ["--http-timeout", "1m30s", "--http-max-body", "64k"],
        ["--http-timeout", "0.25s"],
    ],
)
def test_task_options_mean_the_same_to_a_worker(given: list[str]) -> None:
    values = {k: v for k, v in parsed(up, given).items() if k in TASK_KEYS}
    on_worker = parsed(worker, task_args(**values))
    assert {k: on_worker[k] for k in TASK_KEYS} == values


def test_the_policy_goes_to_the_master_and_every_worker_and_survives_a_restart() -> None:
    rules = policy_args(("echo", "ls*"), ("rm*",), ("BUILD_*",))
    tasks = task_args(**{k: v for k, v in parsed(up, ["--label", "a=b"]).items() if k in TASK_KEYS})
    options = ClusterOptions(Path("/data"), "127.0.0.1:5", 2, 3, None, tuple(rules), tuple(tasks))
    master = options.master_args()
    assert master[master.index("--allow-command") :] == rules
    assert parsed(worker, options.worker_args())["blocked_commands"] == ("rm*",)
    again = parsed(up, options.up_args()[1:])  # (without the command's own name)
    assert again["allowed_commands"] == ("echo", "ls*")
    assert again["allowed_env"] == ("BUILD_*",)
    assert parsed(worker, options.worker_args())["allowed_env"] == ("BUILD_*",)
    assert again["labels"] == (("a", "b"),)
    assert (again["worker_count"], again["max_concurrent_tasks"]) == (2, 3)


def test_autoscaled_workers_get_them_through_the_master() -> None:
    options = ClusterOptions(
        Path("/data"), "127.0.0.1:5", 1, 4, (1, 3), ("--block-command", "rm*"), ("--inherit-env",)
    )
    local = [a.removeprefix("--local-worker-arg=") for a in options.master_args() if "=" in a]
    assert local == ["--block-command", "rm*", "--inherit-env"]


def test_each_worker_gets_a_range_of_the_uid_pool_of_its_own() -> None:
    """All of them got the whole range: jobs on two workers ran as one uid, read each other's
    environment, and each one's end killed the other."""
    options = ClusterOptions(Path("/data"), "127.0.0.1:5", 3, 4, None, (), (), "61000-61999")
    shares = [parsed(worker, options.pool_args(i))["run_as_pool"] for i in (1, 2, 3)]
    assert shares == ["61000-61332", "61333-61665", "61666-61998"]
    assert "--run-as-pool" not in options.worker_args()
    assert parsed(up, options.up_args()[1:])["run_as_pool"] == "61000-61999"  # (a restart)
    assert ClusterOptions(Path("/data"), "127.0.0.1:5", 3, 4).pool_args(1) == []


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["--workers", "2", "--max-concurrent-tasks", "8", "--run-as-pool", "61000-61009"],
         "10 uids for 2 workers of 8 tasks; each worker gets a range of its own (at least 2), so "
         "it needs at least 16"),
        (["--workers", "2", "--max-concurrent-tasks", "1", "--run-as-pool", "61000-61002"],
         "3 uids for 2 workers of 1 tasks; each worker gets a range of its own (at least 2), so "
         "it needs at least 4"),
        (["--autoscale", "--run-as-pool", "61000-61999"],
         "--run-as-pool does not go with --autoscale"),
    ],
)  # fmt: skip
def test_up_refuses_a_uid_pool_it_cannot_share_out(
    tmp_path: Path, given: list[str], message: str
) -> None:
    result = CliRunner().invoke(up, [*given, "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert message in result.output
