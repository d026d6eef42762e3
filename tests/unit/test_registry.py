"""NodeRegistry: membership, liveness (against a fake clock) and slot bookkeeping."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest

from dist_exec.errors import AddressInUse
from dist_exec.master.registry import NodeRegistry
from dist_exec.models import NodeEndpoint, NodeId, NodeInfo, NodeStatus, TaskSpec

HEARTBEAT_TIMEOUT_S = 15.0
REMOVAL_S = 30.0
EPOCH = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """A clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def now(self) -> datetime:
        return EPOCH + timedelta(seconds=self.t)

    def advance(self, seconds: float) -> None:
        self.t += seconds


def spec(task_type: str, **selector: str) -> TaskSpec:
    return TaskSpec(task_type, b"{}", 1.0, selector=selector)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> NodeRegistry:
    return NodeRegistry(clock, HEARTBEAT_TIMEOUT_S, REMOVAL_S)


def add(
    registry: NodeRegistry,
    node_id: str,
    max_tasks: int = 2,
    capabilities: Iterable[str] = ("command",),
    address: str = "",
) -> None:
    address = address or f"{node_id}:7000"
    registry.register(NodeId(node_id), address, capabilities, max_tasks, {"zone": "a"})


def ids(nodes: Iterable[NodeInfo]) -> list[str]:
    return [n.id for n in nodes]


def swept(registry: NodeRegistry) -> tuple[list[str], list[str]]:
    """One sweep, as (ids turned unhealthy, ids removed)."""
    result = registry.sweep()
    return list(result.unhealthy), [n.id for n in result.removed]


def status(registry: NodeRegistry, node_id: str) -> NodeStatus:
    node = registry.get(NodeId(node_id))
    assert node is not None
    return node.status


def test_register(registry: NodeRegistry, clock: FakeClock) -> None:
    labels = {"zone": "eu-1"}
    node = registry.register(NodeId("w1"), "10.0.0.1:7000", ["command", "http"], 4, labels)
    labels["zone"] = "changed later"

    assert node.id == "w1"
    assert node.address == "10.0.0.1:7000"
    assert node.capabilities == frozenset({"command", "http"})
    assert node.max_tasks == 4
    assert node.labels == {"zone": "eu-1"}
    assert node.status == NodeStatus.HEALTHY
    assert node.active_tasks == 0
    assert node.free_slots == 4
    assert node.last_seen == clock.monotonic()
    assert node.last_seen_wall == clock.now()
    assert registry.get(NodeId("w1")) is node


def test_an_address_a_live_node_holds_is_refused_to_another(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    """Address squatting: a worker credential passing another node's address off as its own
    would have the master dial that node under the wrong name (and its jobs fail)."""
    registry.register(NodeId("local-1"), "127.0.0.1:7001", ["command"], 2, {}, tls_name="local-1")
    for holder_status in ("HEALTHY", "SUSPECT", "DRAINING"):
        if holder_status == "SUSPECT":
            clock.advance(HEARTBEAT_TIMEOUT_S / 3)
            registry.sweep()
        elif holder_status == "DRAINING":
            registry.request_drain(NodeId("local-1"))
        assert status(registry, "local-1") == holder_status
        with pytest.raises(AddressInUse) as info:
            registry.register(NodeId("node-x"), "127.0.0.1:7001", ["command"], 2, {})
        assert info.value.message == (
            f"address 127.0.0.1:7001 is held by node local-1 ({holder_status}); another node "
            "may take it once local-1 is UNHEALTHY or gone"
        )
        assert ids(registry.nodes()) == ["local-1"]
    # The same node registering again (a restart) keeps its address, and says how to dial it.
    node = registry.register(NodeId("local-1"), "127.0.0.1:7001", ["command"], 2, {}, tls_name="c")
    assert node.endpoint == NodeEndpoint(NodeId("local-1"), "127.0.0.1:7001", "c")


def test_an_address_passes_on_once_its_node_is_unhealthy_or_gone(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    where = "10.0.0.5:7000"
    add(registry, "old", address=where)
    clock.advance(HEARTBEAT_TIMEOUT_S)
    assert swept(registry) == (["old"], [])
    # A new worker started at the address of one that died: its tasks were retried already.
    add(registry, "new", address=where)
    assert status(registry, "new") == NodeStatus.HEALTHY
    # The old one comes back (its heartbeat is refused: it registers again): the address is
    # the new one's now.
    with pytest.raises(AddressInUse, match="held by node new"):
        add(registry, "old", address=where)
    registry.deregister(NodeId("new"))
    add(registry, "old", address=where)
    assert status(registry, "old") == NodeStatus.HEALTHY
    clock.advance(REMOVAL_S)
    assert swept(registry) == (["old"], ["old"])
    add(registry, "newer", address=where)  # forgotten: free


def test_nodes_in_id_order(registry: NodeRegistry) -> None:
    for node_id in ("w3", "w1", "w2"):
        add(registry, node_id)
    assert ids(registry.nodes()) == ["w1", "w2", "w3"]
    assert registry.get(NodeId("nope")) is None


def test_heartbeat_of_unknown_node_is_none(registry: NodeRegistry) -> None:
    assert registry.heartbeat(NodeId("ghost"), draining=False) is None


def test_heartbeat_records_time(registry: NodeRegistry, clock: FakeClock) -> None:
    add(registry, "w1")
    clock.advance(4.0)
    node = registry.heartbeat(NodeId("w1"), draining=False)

    assert node is not None
    assert node.last_seen == clock.monotonic()
    assert node.last_seen_wall == clock.now()
    assert node.active_tasks == 0  # the master's own reservations are not overwritten


def test_heartbeat_draining_and_back(registry: NodeRegistry) -> None:
    add(registry, "w1")
    registry.heartbeat(NodeId("w1"), draining=True)
    assert status(registry, "w1") == NodeStatus.DRAINING
    assert registry.eligible(spec("command")) == []
    registry.heartbeat(NodeId("w1"), draining=False)
    assert status(registry, "w1") == NodeStatus.HEALTHY


def test_a_node_that_says_it_is_unwell_gets_no_task_until_it_says_it_is_well(
    registry: NodeRegistry,
) -> None:
    add(registry, "w1")
    registry.heartbeat(NodeId("w1"), draining=False, unwell=True)
    assert status(registry, "w1") == NodeStatus.DEGRADED
    assert registry.eligible(spec("command")) == []
    registry.heartbeat(NodeId("w1"), draining=True, unwell=True)
    assert status(registry, "w1") == NodeStatus.DRAINING  # (draining says more)
    registry.heartbeat(NodeId("w1"), draining=False)
    assert status(registry, "w1") == NodeStatus.HEALTHY
    assert ids(registry.eligible(spec("command"))) == ["w1"]


def test_deregister(registry: NodeRegistry) -> None:
    add(registry, "w1")
    add(registry, "w2")
    removed = registry.deregister(NodeId("w1"))
    assert removed is not None
    assert removed.id == "w1"
    assert registry.get(NodeId("w1")) is None
    assert ids(registry.nodes()) == ["w2"]
    assert registry.deregister(NodeId("w1")) is None
    assert registry.heartbeat(NodeId("w1"), draining=False) is None


def test_sweep_leaves_fresh_nodes_alone(registry: NodeRegistry, clock: FakeClock) -> None:
    add(registry, "w1")
    clock.advance(registry.suspect_s - 0.001)
    assert swept(registry) == ([], [])
    assert status(registry, "w1") == NodeStatus.HEALTHY
    clock.advance(HEARTBEAT_TIMEOUT_S - registry.suspect_s)
    assert swept(registry) == ([], [])  # suspect, not yet declared dead
    assert status(registry, "w1") == NodeStatus.SUSPECT


def test_sweep_marks_unhealthy_then_removes(registry: NodeRegistry, clock: FakeClock) -> None:
    add(registry, "w1")

    clock.advance(HEARTBEAT_TIMEOUT_S)
    assert swept(registry) == (["w1"], [])
    assert status(registry, "w1") == NodeStatus.UNHEALTHY
    assert registry.eligible(spec("command")) == []

    # Reported once, not on every sweep.
    clock.advance(1.0)
    assert swept(registry) == ([], [])

    clock.advance(REMOVAL_S - HEARTBEAT_TIMEOUT_S - 1.0)
    assert swept(registry) == ([], ["w1"])
    assert registry.get(NodeId("w1")) is None
    assert registry.nodes() == []
    assert registry.heartbeat(NodeId("w1"), draining=False) is None


def test_sweep_of_a_long_silent_node_reports_both(registry: NodeRegistry, clock: FakeClock) -> None:
    add(registry, "w1")
    clock.advance(REMOVAL_S + 100)
    assert swept(registry) == (["w1"], ["w1"])
    assert registry.get(NodeId("w1")) is None


def test_sweep_of_a_silent_draining_node(registry: NodeRegistry, clock: FakeClock) -> None:
    add(registry, "w1")
    registry.heartbeat(NodeId("w1"), draining=True)
    clock.advance(HEARTBEAT_TIMEOUT_S)
    assert swept(registry) == (["w1"], [])
    assert status(registry, "w1") == NodeStatus.UNHEALTHY


def test_heartbeats_keep_a_node_healthy(registry: NodeRegistry, clock: FakeClock) -> None:
    add(registry, "w1")
    for _ in range(10):
        clock.advance(HEARTBEAT_TIMEOUT_S - 1)
        registry.heartbeat(NodeId("w1"), draining=False)
        assert swept(registry) == ([], [])
    assert status(registry, "w1") == NodeStatus.HEALTHY


def test_sweep_only_touches_silent_nodes(registry: NodeRegistry, clock: FakeClock) -> None:
    add(registry, "old")
    clock.advance(HEARTBEAT_TIMEOUT_S - 1.0)
    add(registry, "new")
    clock.advance(1.0)
    assert swept(registry) == (["old"], [])
    assert status(registry, "new") == NodeStatus.HEALTHY


def test_heartbeat_revives_an_unhealthy_node(registry: NodeRegistry, clock: FakeClock) -> None:
    add(registry, "w1")
    clock.advance(HEARTBEAT_TIMEOUT_S)
    registry.sweep()
    assert status(registry, "w1") == NodeStatus.UNHEALTHY

    registry.heartbeat(NodeId("w1"), draining=False)
    assert status(registry, "w1") == NodeStatus.HEALTHY
    assert ids(registry.eligible(spec("command"))) == ["w1"]
    clock.advance(REMOVAL_S - 1)
    assert swept(registry) == (["w1"], [])


def test_eligible_filters_status_capability_and_slots(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    add(registry, "stale")
    clock.advance(HEARTBEAT_TIMEOUT_S)
    add(registry, "e-full", max_tasks=1)
    add(registry, "d-http", capabilities=("http",))
    add(registry, "c-draining")
    add(registry, "b-both", capabilities=("command", "http"))
    add(registry, "a-cmd")
    registry.sweep()  # "stale" turns UNHEALTHY
    registry.heartbeat(NodeId("c-draining"), draining=True)
    registry.reserve(NodeId("e-full"))

    assert ids(registry.eligible(spec("command"))) == ["a-cmd", "b-both"]
    assert ids(registry.eligible(spec("http"))) == ["b-both", "d-http"]
    assert registry.eligible(spec("gpu")) == []


def test_matching_ignores_free_slots_but_not_health_or_labels(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    assert registry.matching(spec("command")) == []
    add(registry, "w1", max_tasks=1)
    registry.register(NodeId("w2"), "w2:1", ["command"], 1, {"zone": "b", "gpu": "yes"})
    registry.reserve(NodeId("w1"))
    # Full, but it can take the task later.
    assert ids(registry.matching(spec("command"))) == ["w1", "w2"]
    assert ids(registry.matching(spec("command", gpu="yes"))) == ["w2"]
    assert ids(registry.eligible(spec("command", zone="b", gpu="yes"))) == ["w2"]
    assert registry.matching(spec("command", zone="c")) == []
    assert registry.matching(spec("gpu")) == []
    clock.advance(HEARTBEAT_TIMEOUT_S)
    registry.sweep()
    assert registry.matching(spec("command")) == []


def test_reserve_and_release(registry: NodeRegistry) -> None:
    add(registry, "w1", max_tasks=2)
    w1 = NodeId("w1")
    registry.reserve(w1)
    registry.reserve(w1)
    node = registry.get(w1)
    assert node is not None
    assert (node.active_tasks, node.free_slots) == (2, 0)
    assert registry.eligible(spec("command")) == []

    with pytest.raises(ValueError, match="node w1 has no free slot"):
        registry.reserve(w1)
    assert node.active_tasks == 2

    registry.release(w1)
    assert (node.active_tasks, node.free_slots) == (1, 1)
    assert ids(registry.eligible(spec("command"))) == ["w1"]


def test_release_never_goes_negative(registry: NodeRegistry) -> None:
    add(registry, "w1")
    registry.release(NodeId("w1"))
    node = registry.get(NodeId("w1"))
    assert node is not None
    assert node.active_tasks == 0
    assert node.free_slots == 2


def test_release_of_unknown_node_is_a_no_op(registry: NodeRegistry) -> None:
    registry.release(NodeId("ghost"))
    assert registry.nodes() == []


def test_reserve_of_unknown_node_fails(registry: NodeRegistry) -> None:
    with pytest.raises(KeyError):
        registry.reserve(NodeId("ghost"))


def test_forced_reserve_counts_past_max(registry: NodeRegistry) -> None:
    add(registry, "w1", max_tasks=1)
    w1 = NodeId("w1")
    registry.reserve(w1)
    registry.reserve(w1, force=True)
    registry.reserve(w1, force=True)
    node = registry.get(w1)
    assert node is not None
    assert node.active_tasks == 3
    assert node.free_slots == 0

    registry.release(w1)
    registry.release(w1)
    assert node.free_slots == 0  # still at max: 1 of 1 in use
    registry.release(w1)
    assert node.free_slots == 1


def test_reregister_preserves_reservations(registry: NodeRegistry, clock: FakeClock) -> None:
    add(registry, "w1", max_tasks=3)
    w1 = NodeId("w1")
    registry.reserve(w1)
    registry.reserve(w1)
    clock.advance(HEARTBEAT_TIMEOUT_S)
    registry.sweep()
    assert status(registry, "w1") == NodeStatus.UNHEALTHY

    node = registry.register(w1, "10.9.9.9:7001", ["command", "http"], 5, {"zone": "b"})

    assert registry.get(w1) is node
    assert node.active_tasks == 2
    assert node.free_slots == 3
    assert node.status == NodeStatus.HEALTHY
    assert node.address == "10.9.9.9:7001"
    assert node.capabilities == frozenset({"command", "http"})
    assert node.labels == {"zone": "b"}
    assert node.last_seen == clock.monotonic()
    assert ids(registry.nodes()) == ["w1"]
    registry.release(w1)
    assert node.active_tasks == 1


def test_register_after_removal_starts_fresh(registry: NodeRegistry, clock: FakeClock) -> None:
    add(registry, "w1")
    registry.reserve(NodeId("w1"))
    clock.advance(REMOVAL_S)
    assert swept(registry) == (["w1"], ["w1"])

    add(registry, "w1")
    node = registry.get(NodeId("w1"))
    assert node is not None
    assert node.active_tasks == 0


def test_a_node_missing_heartbeats_turns_suspect_before_unhealthy(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    add(registry, "w1")
    clock.advance(registry.suspect_s)
    result = registry.sweep()
    assert (result.suspect, result.unhealthy) == (["w1"], [])
    assert status(registry, "w1") == NodeStatus.SUSPECT
    assert registry.eligible(spec("command")) == []  # no new tasks while suspect
    assert registry.sweep().suspect == []  # reported once
    registry.heartbeat(NodeId("w1"), draining=False)  # it was only slow
    assert status(registry, "w1") == NodeStatus.HEALTHY
    assert ids(registry.eligible(spec("command"))) == ["w1"]
    clock.advance(HEARTBEAT_TIMEOUT_S)
    result = registry.sweep()
    assert (result.suspect, result.unhealthy) == ([], ["w1"])


def test_a_draining_node_is_not_made_suspect(registry: NodeRegistry, clock: FakeClock) -> None:
    add(registry, "w1")
    registry.heartbeat(NodeId("w1"), draining=True)
    clock.advance(registry.suspect_s)
    assert registry.sweep().suspect == []
    assert status(registry, "w1") == NodeStatus.DRAINING


def test_excused_silence_does_not_count(registry: NodeRegistry, clock: FakeClock) -> None:
    add(registry, "w1")
    clock.advance(HEARTBEAT_TIMEOUT_S + 5)  # the master was stopped all this time
    registry.excuse(HEARTBEAT_TIMEOUT_S + 5)
    assert swept(registry) == ([], [])
    assert status(registry, "w1") == NodeStatus.HEALTHY
    registry.excuse(1000)  # never into the future
    node = registry.get(NodeId("w1"))
    assert node is not None
    assert node.last_seen == clock.monotonic()


def node(registry: NodeRegistry, node_id: str) -> NodeInfo:
    found = registry.get(NodeId(node_id))
    assert found is not None
    return found


def test_idle_since_follows_reservations(registry: NodeRegistry, clock: FakeClock) -> None:
    add(registry, "w1")
    assert node(registry, "w1").registered_at == clock.t
    assert node(registry, "w1").idle_since == clock.t
    clock.advance(5)
    registry.reserve(NodeId("w1"))
    registry.reserve(NodeId("w1"))
    assert node(registry, "w1").idle_since is None
    clock.advance(5)
    registry.release(NodeId("w1"))
    assert node(registry, "w1").idle_since is None, "one task still runs"
    clock.advance(5)
    registry.release(NodeId("w1"))
    assert node(registry, "w1").idle_since == clock.t


def test_drain_request_stops_placement_and_outlives_heartbeats(
    registry: NodeRegistry, clock: FakeClock
) -> None:
    add(registry, "w1")
    add(registry, "w2")
    assert registry.request_drain(NodeId("w1"))
    assert not registry.request_drain(NodeId("unknown"))
    assert status(registry, "w1") == NodeStatus.DRAINING
    assert ids(registry.eligible(spec("command"))) == ["w2"]
    # The worker's own heartbeat (not draining yet) does not undo the request ...
    registry.heartbeat(NodeId("w1"), draining=False)
    assert status(registry, "w1") == NodeStatus.DRAINING
    # ... nor does registering again, which keeps its reservations' idle time too.
    registry.reserve(NodeId("w1"), force=True)
    clock.advance(3)
    registry.register(NodeId("w1"), "w1:7001", ["command"], 2, {})
    assert status(registry, "w1") == NodeStatus.DRAINING
    assert node(registry, "w1").drain_requested
    assert node(registry, "w1").idle_since is None
    assert node(registry, "w1").registered_at == clock.t
