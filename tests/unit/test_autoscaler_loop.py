"""The auto scaler loop over a real NodeRegistry, a fake clock and a scripted backend: victims
are drained before they are removed, a busy victim is never removed, failures are reported and
cleared, and a restarted master adopts the victims its predecessor chose."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from dist_exec.autoscaler.backend import Scale, ScaleError, ScaleForbidden
from dist_exec.autoscaler.loop import REMOVAL_GRACE_S, Autoscaler
from dist_exec.autoscaler.policy import Action
from dist_exec.config import AutoscalerConfig
from dist_exec.master.registry import NodeRegistry
from dist_exec.models import NodeId, NodeInfo, NodeStatus

CONFIG = AutoscalerConfig(
    backend="local",
    min_replicas=1,
    max_replicas=5,
    tasks_per_worker=2,
    scale_down_delay_s=10.0,
    scale_up_cooldown_s=5.0,
    scale_down_cooldown_s=5.0,
    min_worker_lifetime_s=0.0,
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def now(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.t)

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeCluster:
    """The master as the scaler sees it, over a real registry."""

    def __init__(self, registry: NodeRegistry) -> None:
        self.registry = registry
        self.pending = 0

    def scaling_demand(self) -> int:
        return self.pending

    def nodes(self) -> list[NodeInfo]:
        return self.registry.nodes()

    def request_drain(self, node_id: NodeId) -> bool:
        return self.registry.request_drain(node_id)


class FakeBackend:
    """Replicas as numbers; ``not_ready_yet`` victims are refused once, like Ready pods."""

    def __init__(self, desired: int) -> None:
        self.desired = desired
        self.fail: ScaleError | None = None
        self.fail_down: ScaleError | None = None  # scale_down only
        self.not_ready_yet: set[NodeId] = set()
        self.removed: list[NodeId] = []

    @property
    def description(self) -> str:
        return "fake workers"

    def owns(self, node_id: NodeId) -> bool:
        return node_id.startswith("w")

    async def current_scale(self) -> Scale:
        if self.fail is not None:
            raise self.fail
        return Scale(self.desired, self.desired)

    async def scale_up(self, replicas: int) -> None:
        self.desired = replicas

    async def scale_down(self, victims: Sequence[NodeId]) -> list[NodeId]:
        if self.fail_down is not None:
            raise self.fail_down
        ready = [v for v in victims if v not in self.not_ready_yet]
        self.not_ready_yet -= set(victims)
        self.removed += ready
        self.desired -= len(ready)
        return ready

    async def close(self) -> None:
        pass


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> NodeRegistry:
    return NodeRegistry(clock, heartbeat_timeout_s=15.0, removal_s=30.0)


def add(registry: NodeRegistry, *names: str) -> None:
    for name in names:
        registry.register(NodeId(name), f"{name}:1", ["command"], 2, {})


def scaler(
    registry: NodeRegistry, clock: FakeClock, desired: int
) -> tuple[Autoscaler, FakeCluster, FakeBackend]:
    cluster = FakeCluster(registry)
    backend = FakeBackend(desired)
    return Autoscaler(CONFIG, cluster, backend, clock), cluster, backend


async def test_backlog_scales_up_through_the_backend(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    add(registry, "w1")
    registry.reserve(NodeId("w1"))
    registry.reserve(NodeId("w1"))
    auto, cluster, backend = scaler(registry, clock, 1)
    cluster.pending = 5
    decision = await auto.step()
    assert decision is not None
    assert decision.action == Action.UP
    assert backend.desired == 1 + 5 // 2 + 1
    status = auto.status()
    assert status.desired == 1  # as read before acting
    assert status.last_event.startswith("scaled up to 4: no free slot and 5 task(s) pending")


async def test_idle_workers_are_drained_then_removed(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    add(registry, "w1", "w2", "w3")
    auto, _, backend = scaler(registry, clock, 3)
    clock.advance(11)
    decision = await auto.step()
    assert decision is not None
    assert decision.action == Action.DOWN
    assert set(decision.victims) == {"w1", "w2"}
    # Drain first: the master places nothing more on them, nothing is removed yet.
    assert all(registry.get(NodeId(v)).status == NodeStatus.DRAINING for v in decision.victims)  # type: ignore[union-attr]
    assert backend.removed == []
    assert auto.status().draining == ("w1", "w2")
    await auto.step()
    assert sorted(backend.removed) == ["w1", "w2"]
    assert backend.desired == 1
    assert "removed 2 drained idle worker(s)" in auto.status().last_event


async def test_a_victim_that_got_a_task_is_not_removed_until_it_is_idle(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    add(registry, "w1", "w2")
    auto, _, backend = scaler(registry, clock, 2)
    clock.advance(11)
    decision = await auto.step()
    assert decision is not None
    assert decision.victims == ("w1",)
    # A task placed just before the drain took effect still runs there.
    registry.reserve(NodeId("w1"), force=True)
    for _ in range(3):
        clock.advance(1)
        await auto.step()
    assert backend.removed == []
    registry.release(NodeId("w1"))
    await auto.step()
    assert backend.removed == ["w1"]


async def test_a_victim_not_ready_yet_is_asked_for_again(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    add(registry, "w1", "w2")
    auto, _, backend = scaler(registry, clock, 2)
    backend.not_ready_yet = {NodeId("w1")}
    clock.advance(11)
    await auto.step()  # chooses w1
    await auto.step()  # its pod is still Ready: not removed
    assert backend.removed == []
    await auto.step()
    assert backend.removed == ["w1"]


async def test_a_removed_victim_that_stays_is_removed_again(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    """The ReplicaSet may delete another pod (one still starting) instead of the victim."""
    add(registry, "w1", "w2")
    auto, _, backend = scaler(registry, clock, 2)
    clock.advance(11)
    await auto.step()
    await auto.step()
    assert backend.removed == ["w1"]
    clock.advance(REMOVAL_GRACE_S / 2)
    await auto.step()
    assert backend.removed == ["w1"], "not again while its removal may still be under way"
    clock.advance(REMOVAL_GRACE_S)
    await auto.step()  # still registered: drained again
    await auto.step()
    assert backend.removed == ["w1", "w1"]


async def test_backend_errors_are_reported_once_and_cleared(
    registry: NodeRegistry, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "dist_exec.autoscaler")
    add(registry, "w1")
    auto, _, backend = scaler(registry, clock, 1)
    backend.fail = ScaleForbidden("Kubernetes refused to read deployment ns/w (HTTP 403)")
    assert await auto.step() is None
    assert await auto.step() is None
    assert auto.status().error == "Kubernetes refused to read deployment ns/w (HTTP 403)"
    assert caplog.text.count("HTTP 403") == 1
    backend.fail = None
    assert await auto.step() is not None
    assert auto.status().error == ""
    assert "fake workers works again" in caplog.text


async def test_a_restarted_master_adopts_earlier_victims(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    """A worker drained by the previous master says so when it registers again."""
    add(registry, "w1", "w2")
    registry.request_drain(NodeId("w1"))
    auto, _, backend = scaler(registry, clock, 2)
    await auto.step()
    assert backend.removed == ["w1"]


async def test_workers_the_backend_does_not_own_are_left_alone(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    add(registry, "w1", "w2", "static-1")
    auto, _, _backend = scaler(registry, clock, 2)
    clock.advance(11)
    decision = await auto.step()
    assert decision is not None
    assert decision.victims == ("w1",)
    assert registry.get(NodeId("static-1")).status == NodeStatus.HEALTHY  # type: ignore[union-attr]


async def test_a_scale_in_that_fails_does_not_hold_up_a_scale_up(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    """A victim's removal refused (no rights on pods, the API down for it) is reported, and
    the backlog that came meanwhile still scales the group up."""
    add(registry, "w1", "w2")
    auto, cluster, backend = scaler(registry, clock, 2)
    clock.advance(11)
    decision = await auto.step()
    assert decision is not None
    assert decision.victims == ("w1",)
    backend.fail_down = ScaleForbidden("Kubernetes refused to delete pod ns/w1 (HTTP 403)")
    registry.reserve(NodeId("w2"))
    registry.reserve(NodeId("w2"))
    cluster.pending = 6
    clock.advance(11)
    decision = await auto.step()
    assert decision is not None
    assert decision.action == Action.UP
    assert backend.desired > 2
    assert auto.status().error == (
        "cannot remove drained workers: Kubernetes refused to delete pod ns/w1 (HTTP 403)"
    )


async def test_workers_gone_unhealthy_count_as_replaced_not_as_registered(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    """Their pods died and the Deployment starts replacements: those will take the backlog
    (their rescheduled tasks), so no more are added than the backlog needs beyond them."""
    add(registry, "w1", "w2", "w3")
    auto, cluster, backend = scaler(registry, clock, 3)
    clock.advance(16)  # no heartbeats: all three UNHEALTHY
    registry.sweep()
    assert {n.status for n in registry.nodes()} == {NodeStatus.UNHEALTHY}
    cluster.pending = 5  # (2 slots each: the three replacements take them)
    decision = await auto.step()
    assert decision is not None
    assert decision.action == Action.NONE, decision.reason
    assert backend.desired == 3
