from __future__ import annotations

from tests.conftest import SmallCluster, run_cli


def test_run_streams_output_and_returns_exit_code(small_cluster: SmallCluster) -> None:
    result = run_cli("run", "echo out; echo err >&2; exit 3", master=small_cluster.address)
    assert result.code == 3
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
