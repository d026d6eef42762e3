"""The auto scaler's policy: a decision table over every branch, and oscillating load."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from dist_exec.autoscaler.policy import Action, Decision, NodeLoad, Observation, decide
from dist_exec.config import AutoscalerConfig
from dist_exec.models import NodeId

CONFIG = AutoscalerConfig(
    backend="local",
    min_replicas=1,
    max_replicas=10,
    tasks_per_worker=4,
    scale_up_threshold=2,
    scale_down_delay_s=60.0,
    scale_up_cooldown_s=10.0,
    scale_down_cooldown_s=30.0,
    min_worker_lifetime_s=120.0,
    scale_down_utilization=0.5,
)
NOW = 10_000.0


def node(
    name: str,
    active: int = 0,
    max_tasks: int = 4,
    draining: bool = False,
    idle_for: float | None = 600.0,
    age: float = 600.0,
) -> NodeLoad:
    """A worker; ``idle_for`` None means it runs something (then ``active`` should be > 0)."""
    return NodeLoad(
        NodeId(name),
        active,
        max_tasks,
        draining,
        None if idle_for is None else NOW - idle_for,
        NOW - age,
    )


def busy(name: str, active: int = 4, max_tasks: int = 4) -> NodeLoad:
    return node(name, active=active, max_tasks=max_tasks, idle_for=None)


def obs(
    pending: int = 0,
    desired: int | None = None,
    nodes: tuple[NodeLoad, ...] = (),
    floor: int = 0,
    last_up: float | None = None,
    last_down: float | None = None,
) -> Observation:
    """``last_up``/``last_down``: seconds ago."""
    return Observation(
        now=NOW,
        pending=pending,
        desired=len(nodes) if desired is None else desired,
        nodes=nodes,
        floor=floor,
        last_scale_up=None if last_up is None else NOW - last_up,
        last_scale_down=None if last_down is None else NOW - last_down,
    )


@dataclass(frozen=True)
class Row:
    name: str
    observation: Observation
    action: Action
    target: int
    victims: tuple[str, ...] = ()
    reason: str = ""
    config: AutoscalerConfig = field(default=CONFIG)


ROWS = [
    # ---- minimum
    Row("below the minimum: up to it", obs(desired=0), Action.UP, 1, reason="minimum of 1"),
    Row(
        "below the minimum ignores the cooldown",
        obs(desired=0, last_up=1),
        Action.UP,
        1,
    ),
    # ---- rule 1: no free slot and work pending
    Row(
        "no free slot: pending // tasks_per_worker + 1",
        obs(pending=9, nodes=(busy("a"), busy("b"))),
        Action.UP,
        2 + 9 // 4 + 1,
        reason="no free slot and 9 task(s) pending",
    ),
    Row(
        "no free slot, from zero workers",
        obs(pending=1, desired=0),
        Action.UP,
        1,
        config=replace(CONFIG, min_replicas=0),
    ),
    Row(
        "no free slot: booting workers are subtracted",
        obs(pending=9, desired=4, nodes=(busy("a"), busy("b"))),
        Action.UP,
        4 + (9 // 4 + 1) - 2,
        reason="2 worker(s) starting",
    ),
    Row(
        "no free slot: booting workers cover it -> hold",
        obs(pending=5, desired=4, nodes=(busy("a"), busy("b"))),
        Action.NONE,
        4,
        reason="2 starting worker(s) will take the 5 pending",
    ),
    Row(
        "no free slot: capped at the maximum",
        obs(pending=100, nodes=(busy("a"), busy("b"))),
        Action.UP,
        10,
    ),
    Row(
        "no free slot: at the maximum -> hold",
        obs(pending=100, nodes=tuple(busy(f"n{i}") for i in range(10))),
        Action.NONE,
        10,
        reason="at the maximum of 10",
    ),
    Row(
        "no free slot: within the scale-up cooldown -> hold",
        obs(pending=9, nodes=(busy("a"),), last_up=3),
        Action.NONE,
        1,
        reason="scale-up cooldown (7s left)",
    ),
    Row(
        "no free slot: a recent scale-down does not delay a scale-up",
        obs(pending=9, nodes=(busy("a"),), last_up=11, last_down=1),
        Action.UP,
        1 + 9 // 4 + 1,
    ),
    Row(
        "draining workers' slots are not free",
        obs(pending=1, nodes=(busy("a"), node("b", draining=True))),
        Action.UP,
        3,
    ),
    # ---- rule 2: backlog above workers x threshold
    Row(
        "backlog above workers x threshold: add one",
        obs(pending=5, nodes=(node("a", active=1, idle_for=None), node("b", idle_for=None))),
        Action.UP,
        3,
        reason="5 task(s) pending, more than 2 worker(s) x 2",
    ),
    Row(
        "backlog at workers x threshold: hold",
        obs(pending=4, nodes=(node("a", active=1, idle_for=None), node("b", idle_for=None))),
        Action.NONE,
        2,
        reason="within capacity",
    ),
    Row(
        "backlog rule counts booting workers as workers",
        obs(pending=5, desired=3, nodes=(node("a", active=1, idle_for=None), node("b"))),
        Action.NONE,
        3,
    ),
    Row(
        "backlog rule within the cooldown: hold",
        obs(pending=5, nodes=(node("a", active=1, idle_for=None), node("b")), last_up=9.5),
        Action.NONE,
        2,
        reason="cooldown",
    ),
    Row(
        "pending work never scales down, however idle the others",
        obs(pending=1, nodes=(node("a", active=1, idle_for=None), node("b"), node("c"))),
        Action.NONE,
        3,
    ),
    # ---- scale down
    Row(
        "idle past the delay: remove, longest idle first",
        obs(nodes=(node("a", idle_for=100), node("b", idle_for=500), busy("c", active=1))),
        Action.DOWN,
        1,
        victims=("b", "a"),
        reason="2 worker(s) idle for 60s or more",
    ),
    Row(
        "idle, but not for the delay: hold",
        obs(nodes=(node("a", idle_for=59), node("b", idle_for=59))),
        Action.NONE,
        2,
        reason="no worker idle long enough",
    ),
    Row(
        "idle long enough, but younger than the minimum lifetime: hold",
        obs(nodes=(node("a", age=100), node("b", age=100))),
        Action.NONE,
        2,
        reason="no worker idle long enough",
    ),
    Row(
        "a busy worker is never a victim",
        obs(nodes=(busy("a", active=1), busy("b", active=1), node("c"))),
        Action.DOWN,
        2,
        victims=("c",),
    ),
    Row(
        "draining workers are not chosen again, and leave no room above the minimum",
        obs(nodes=(node("a", draining=True), node("b"))),
        Action.NONE,
        2,
    ),
    Row(
        "never below the minimum",
        obs(nodes=(node("a"), node("b"), node("c"))),
        Action.DOWN,
        2,
        victims=("a",),
        config=replace(CONFIG, min_replicas=2),
    ),
    Row(
        "at the minimum: hold",
        obs(nodes=(node("a"),)),
        Action.NONE,
        1,
        reason="at the minimum of 1",
    ),
    Row(
        "never below an HPA's minReplicas",
        obs(nodes=(node("a"), node("b"), node("c")), floor=3),
        Action.NONE,
        3,
        reason="at the HPA's minReplicas of 3",
    ),
    Row(
        "an HPA floor below ours changes nothing",
        obs(nodes=(node("a"), node("b")), floor=0),
        Action.DOWN,
        1,
        victims=("a",),
    ),
    Row(
        "within the down cooldown of a scale-up: hold",
        obs(nodes=(node("a"), node("b")), last_up=29),
        Action.NONE,
        2,
        reason="scale-down cooldown (1s left)",
    ),
    Row(
        "within the down cooldown of a scale-down: hold",
        obs(nodes=(node("a"), node("b")), last_down=5),
        Action.NONE,
        2,
        reason="scale-down cooldown",
    ),
    Row(
        "after the down cooldown: remove",
        obs(nodes=(node("a"), node("b")), last_up=31, last_down=31),
        Action.DOWN,
        1,
        victims=("a",),
    ),
    Row(
        "hysteresis: keep idle workers the running tasks need",
        # 3 running on 4 nodes x 4 slots: removing 2 leaves 8 slots (3 <= 4), 3 leaves 4 (3 > 2).
        obs(nodes=(busy("a", active=3), node("b"), node("c"), node("d"))),
        Action.DOWN,
        2,
        victims=("b", "c"),
    ),
    Row(
        "hysteresis: no victim at all when the load needs every slot",
        obs(nodes=(busy("a", active=4), busy("b", active=3), node("c"))),
        Action.NONE,
        3,
        reason="7 running task(s) need the idle workers' slots",
    ),
    Row(
        "booting workers do not block removing idle ones",
        obs(desired=3, nodes=(node("a"), node("b"))),
        Action.DOWN,
        1,
        victims=("a", "b"),
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_decision_table(row: Row) -> None:
    decision = decide(row.observation, row.config)
    assert decision.action == row.action, decision.reason
    assert decision.target == row.target, decision.reason
    assert decision.victims == tuple(NodeId(v) for v in row.victims)
    assert row.reason in decision.reason


def test_holding_keeps_the_desired_count() -> None:
    decision = decide(obs(pending=1, nodes=(node("a"),)), CONFIG)
    assert decision == Decision(Action.NONE, 1, (), decision.reason)


# ---- oscillating load -----------------------------------------------------------------------


@dataclass
class SimNode:
    load: NodeLoad
    running: int = 0


class Simulation:
    """A cluster driven by ``decide`` once a second: workers register ``boot_s`` after a
    scale-up, victims leave at once (they are idle), tasks fill the lowest-named nodes."""

    def __init__(self, config: AutoscalerConfig, boot_s: float = 8.0) -> None:
        self.config = config
        self.boot_s = boot_s
        self.now = 0.0
        self.desired = config.min_replicas
        self.booting: list[float] = []  # when each booting worker registers
        self.nodes: dict[str, SimNode] = {}
        self.serial = 0
        self.last_up: float | None = None
        self.last_down: float | None = None
        self.events: list[tuple[float, Action, int]] = []
        for _ in range(self.desired):
            self._add_node()

    def _add_node(self) -> None:
        self.serial += 1
        name = NodeId(f"w{self.serial:03d}")
        self.nodes[name] = SimNode(
            NodeLoad(name, 0, self.config.tasks_per_worker, False, self.now, self.now)
        )

    def step(self, demand: int) -> None:
        """One second with ``demand`` tasks in the system (running or pending)."""
        while self.booting and self.booting[0] <= self.now:
            self.booting.pop(0)
            self._add_node()
        left = demand
        for name in sorted(self.nodes):
            sim = self.nodes[name]
            take = min(left, sim.load.max_tasks)
            left -= take
            idle_since = sim.load.idle_since if take == 0 else None
            if take == 0 and idle_since is None:
                idle_since = self.now
            sim.load = replace(sim.load, active_tasks=take, idle_since=idle_since)
        decision = decide(
            Observation(
                self.now,
                left,
                self.desired,
                [n.load for n in self.nodes.values()],
                0,
                self.last_up,
                self.last_down,
            ),
            self.config,
        )
        if decision.action == Action.UP:
            self.booting += [self.now + self.boot_s] * (decision.target - self.desired)
            self.desired = decision.target
            self.last_up = self.now
            self.events.append((self.now, Action.UP, decision.target))
        elif decision.action == Action.DOWN:
            for victim in decision.victims:
                assert self.nodes[victim].load.active_tasks == 0, "removed a busy worker"
                del self.nodes[victim]
            self.desired = decision.target
            self.last_down = self.now
            self.events.append((self.now, Action.DOWN, decision.target))
        self.now += 1.0


def square_wave(high: int, period_s: int, t: float) -> int:
    return high if int(t) % period_s < period_s // 2 else 0


def test_load_that_comes_and_goes_faster_than_the_delay_scales_once() -> None:
    """Bursts of 40 tasks every other 30 s for 30 minutes: the scaler grows once to carry the
    burst and keeps the workers through the gaps (shorter than the idle delay)."""
    sim = Simulation(CONFIG)
    for _ in range(1800):
        sim.step(square_wave(40, 60, sim.now))
    ups = [e for e in sim.events if e[1] == Action.UP]
    downs = [e for e in sim.events if e[1] == Action.DOWN]
    assert downs == [], sim.events
    assert len(ups) == 1, sim.events
    assert sim.desired <= 40 // CONFIG.tasks_per_worker + 1


def test_load_that_comes_and_goes_slower_than_the_delay_is_bounded() -> None:
    """Bursts every other 10 minutes: one scale-up and at most two scale-downs per burst (the
    spare worker goes first). Without the booting count the scaler would add workers every
    cooldown while the first ones boot."""
    sim = Simulation(replace(CONFIG, max_replicas=50), boot_s=30.0)
    for _ in range(3600):
        sim.step(square_wave(40, 1200, sim.now))
    bursts = 3
    assert len(sim.events) <= bursts * 3, sim.events
    assert max(target for _, _, target in sim.events) <= 40 // CONFIG.tasks_per_worker + 1


def test_load_at_the_edge_of_capacity_does_not_flap() -> None:
    """A load flipping every second between exactly the capacity of two workers and one task
    more: one scale-up, and the extra worker is never removed, because it keeps getting work
    before it has been idle for the delay."""
    sim = Simulation(replace(CONFIG, min_replicas=2))
    for _ in range(600):
        sim.step(2 * CONFIG.tasks_per_worker + int(sim.now) % 2)
    assert [(action, target) for _, action, target in sim.events] == [(Action.UP, 3)]


def test_workers_already_draining_leave_no_room_above_the_minimum() -> None:
    """One victim is still draining (desired has not come down yet) and two more are idle:
    with a minimum of 1, at most one more may go, not both (which left none serving)."""
    decision = decide(
        obs(desired=3, nodes=(node("a", draining=True), node("b"), node("c"))), CONFIG
    )
    assert (decision.action, decision.target, decision.victims) == (Action.DOWN, 1, ("b",))
