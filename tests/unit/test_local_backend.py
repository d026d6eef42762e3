"""The local scaler backend with real worker processes that cannot start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dist_exec.autoscaler.backend import ScaleError
from dist_exec.autoscaler.local import LocalBackend


async def test_a_worker_that_cannot_start_is_not_restarted_in_a_tight_loop(
    tmp_path: Path,
) -> None:
    """It exits at once (a bad --local-worker-arg): the scaler is told why, and the next start
    waits (1 s, then twice as long each time), instead of a start and a log file per look."""
    backend = LocalBackend("127.0.0.1:1", tmp_path / "logs", 2, ["--no-such-flag"])
    try:
        await backend.scale_up(1)
        async with asyncio.timeout(30):
            while (await backend.current_scale()).desired:
                await asyncio.sleep(0.05)
        with pytest.raises(ScaleError) as info:
            await backend.scale_up(1)
        assert str(info.value).startswith("local worker auto-1 exited with status 2 ")
        assert f"(see {tmp_path / 'logs' / 'auto-1.log'}); the next start in " in str(info.value)
        assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["auto-1.log"]
    finally:
        await backend.close()
