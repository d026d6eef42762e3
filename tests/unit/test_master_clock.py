"""The worker's view of the master's clock (what start deadlines are checked against)."""

from __future__ import annotations

import time

import pytest

from dist_exec.worker.server import MasterClock


def test_unknown_until_sampled_and_after_a_reset() -> None:
    clock = MasterClock()
    assert clock.now() is None
    clock.sample(master_s=1000.0, sent=10.0, received=10.2)
    assert clock.offset == pytest.approx(1000.0 - 10.1)
    clock.reset()
    assert (clock.now(), clock.offset) == (None, None)


def test_the_shortest_round_trip_of_the_recent_samples_counts() -> None:
    clock = MasterClock(keep=3)
    clock.sample(master_s=500.0, sent=0.0, received=0.01)  # quick: offset 499.995
    clock.sample(master_s=500.9, sent=0.1, received=1.1)  # slow answer: offset 500.3
    assert clock.offset == pytest.approx(499.995)
    clock.sample(master_s=501.0, sent=1.0, received=1.5)  # offset 499.75
    clock.sample(master_s=502.1, sent=2.0, received=2.6)  # the quick one ages out
    assert clock.offset == pytest.approx(499.75)


def test_now_follows_this_host_monotonic_clock() -> None:
    clock = MasterClock()
    t = time.monotonic()
    clock.sample(master_s=t + 100.0, sent=t, received=t)
    now = clock.now()
    assert now is not None
    assert 100.0 <= now - t < 101.0
