"""Balancers: round robin, smooth weighted round robin, least connections, random."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import pytest

from dist_exec.master.balancer import (
    BALANCERS,
    DEFAULT_BALANCER,
    Balancer,
    LeastConnectionsBalancer,
    RandomBalancer,
    RoundRobinBalancer,
    WeightedRoundRobinBalancer,
    make_balancer,
)
from dist_exec.models import NodeId, NodeInfo, TaskSpec

TASK = TaskSpec("command", b"{}", 60.0)


def node(node_id: str, *, max_tasks: int = 4, weight: int = 0, active: int = 0) -> NodeInfo:
    return NodeInfo(
        id=NodeId(node_id),
        address=f"{node_id}:1",
        capabilities=frozenset({"command"}),
        max_tasks=max_tasks,
        labels={},
        last_seen=0.0,
        last_seen_wall=datetime(2026, 1, 1, tzinfo=UTC),
        active_tasks=active,
        weight=weight,
    )


def nodes(*ids: str) -> list[NodeInfo]:
    return [node(node_id) for node_id in ids]


def weighted(**weights: int) -> list[NodeInfo]:
    return [node(node_id, weight=w) for node_id, w in weights.items()]


def picks(balancer: Balancer, available: Iterable[NodeInfo], count: int) -> list[str]:
    pool = list(available)
    chosen: list[str] = []
    for _ in range(count):
        picked = balancer.select(TASK, pool)
        assert picked is not None
        chosen.append(picked.id)
    return chosen


def longest_run(chosen: Sequence[str], node_id: str) -> int:
    longest = current = 0
    for picked in chosen:
        current = current + 1 if picked == node_id else 0
        longest = max(longest, current)
    return longest


# RoundRobinBalancer


def test_no_nodes_gives_none() -> None:
    balancer = RoundRobinBalancer()
    assert balancer.select(TASK, []) is None


def test_no_nodes_does_not_disturb_the_cycle() -> None:
    balancer = RoundRobinBalancer()
    assert picks(balancer, nodes("a", "b", "c"), 1) == ["a"]
    assert balancer.select(TASK, []) is None
    assert picks(balancer, nodes("a", "b", "c"), 2) == ["b", "c"]


def test_single_node_is_always_chosen() -> None:
    balancer = RoundRobinBalancer()
    assert picks(balancer, nodes("only"), 3) == ["only", "only", "only"]


def test_cycles_in_id_order_whatever_the_input_order() -> None:
    balancer = RoundRobinBalancer()
    assert picks(balancer, nodes("c", "a", "b"), 7) == ["a", "b", "c", "a", "b", "c", "a"]


def test_returns_one_of_the_given_nodes() -> None:
    balancer = RoundRobinBalancer()
    pool = nodes("a", "b")
    chosen = balancer.select(TASK, pool)
    assert chosen is not None
    assert any(chosen is n for n in pool)


def test_node_joining_ahead_is_not_skipped() -> None:
    balancer = RoundRobinBalancer()
    assert picks(balancer, nodes("a", "b", "d"), 2) == ["a", "b"]
    # "c" joins between the last pick and the next one in id order.
    assert picks(balancer, nodes("a", "b", "c", "d"), 5) == ["c", "d", "a", "b", "c"]


def test_node_joining_behind_waits_its_turn() -> None:
    balancer = RoundRobinBalancer()
    assert picks(balancer, nodes("a", "c", "e"), 2) == ["a", "c"]
    # "b" joins behind the cursor: "e" is not repeated or skipped, "b" comes next lap.
    assert picks(balancer, nodes("a", "b", "c", "e"), 5) == ["e", "a", "b", "c", "e"]


def test_last_chosen_node_leaving_does_not_skip_the_next() -> None:
    balancer = RoundRobinBalancer()
    assert picks(balancer, nodes("a", "b", "c"), 2) == ["a", "b"]
    assert picks(balancer, nodes("a", "c"), 3) == ["c", "a", "c"]


def test_next_node_leaving_moves_on_to_the_one_after() -> None:
    balancer = RoundRobinBalancer()
    assert picks(balancer, nodes("a", "b", "c", "d"), 1) == ["a"]
    assert picks(balancer, nodes("a", "c", "d"), 3) == ["c", "d", "a"]


@pytest.mark.parametrize("last", ["a", "b", "c"])
def test_wraps_when_nothing_follows_the_last_pick(last: str) -> None:
    balancer = RoundRobinBalancer()
    order = ["a", "b", "c"]
    picks(balancer, nodes(*order), order.index(last) + 1)
    remaining = [n for n in order if n <= last]
    # Only nodes at or before the last pick remain: wrap to the first of them.
    assert picks(balancer, nodes(*remaining), 1) == [remaining[0]]


def test_every_node_gets_an_equal_share() -> None:
    balancer = RoundRobinBalancer()
    chosen = picks(balancer, nodes("n3", "n1", "n2", "n4"), 400)
    assert {n: chosen.count(n) for n in set(chosen)} == {"n1": 100, "n2": 100, "n3": 100, "n4": 100}


# WeightedRoundRobinBalancer


def test_weighted_no_nodes_gives_none() -> None:
    assert WeightedRoundRobinBalancer().select(TASK, []) is None


def test_weighted_single_node_is_always_chosen() -> None:
    assert picks(WeightedRoundRobinBalancer(), weighted(only=5), 3) == ["only"] * 3


def test_weighted_one_cycle_gives_each_node_its_exact_share_interleaved() -> None:
    chosen = picks(WeightedRoundRobinBalancer(), weighted(a=1, b=2, c=3), 6)
    assert chosen == ["c", "b", "a", "c", "b", "c"]


@pytest.mark.parametrize("order", ["abc", "cba", "bca"])
def test_weighted_every_cycle_is_exact_whatever_the_input_order(order: str) -> None:
    weights = {"a": 1, "b": 2, "c": 3}
    pool = [node(n, weight=weights[n]) for n in order]
    chosen = picks(WeightedRoundRobinBalancer(), pool, 600)
    assert Counter(chosen) == {"a": 100, "b": 200, "c": 300}
    for start in range(0, 600, 6):
        assert Counter(chosen[start : start + 6]) == weights


def test_weighted_is_smooth_for_1_2_3() -> None:
    chosen = picks(WeightedRoundRobinBalancer(), weighted(a=1, b=2, c=3), 600)
    # A plain weighted round robin would run "c" three times in a row.
    assert longest_run(chosen, "c") == 2
    assert longest_run(chosen, "b") == 1
    assert longest_run(chosen, "a") == 1


@pytest.mark.parametrize(
    "weights",
    [{"a": 5, "b": 1, "c": 1}, {"a": 1, "b": 1, "c": 8}, {"a": 2, "b": 3, "c": 5, "d": 7}],
)
def test_weighted_heaviest_node_runs_are_bounded(weights: dict[str, int]) -> None:
    total = sum(weights.values())
    chosen = picks(WeightedRoundRobinBalancer(), weighted(**weights), total * 50)
    assert Counter(chosen) == {n: w * 50 for n, w in weights.items()}
    heaviest = max(weights, key=lambda n: weights[n])
    heaviest_weight = weights[heaviest]
    ideal = math.ceil(heaviest_weight / (total - heaviest_weight))
    assert longest_run(chosen, heaviest) <= ideal + 2
    assert longest_run(chosen, heaviest) < heaviest_weight
    for other in weights.keys() - {heaviest}:
        assert longest_run(chosen, other) == 1


def test_weighted_equal_weights_cycle_like_round_robin() -> None:
    chosen = picks(WeightedRoundRobinBalancer(), weighted(b=2, a=2, c=2), 6)
    assert chosen == ["a", "b", "c", "a", "b", "c"]


def test_weighted_weight_defaults_to_max_tasks() -> None:
    pool = [node("a", max_tasks=1), node("b", max_tasks=2), node("c", max_tasks=3)]
    chosen = picks(WeightedRoundRobinBalancer(), pool, 600)
    assert Counter(chosen) == {"a": 100, "b": 200, "c": 300}


def test_weighted_explicit_weight_overrides_max_tasks() -> None:
    pool = [node("a", max_tasks=8, weight=1), node("b", max_tasks=1, weight=3)]
    chosen = picks(WeightedRoundRobinBalancer(), pool, 400)
    assert Counter(chosen) == {"a": 100, "b": 300}


@pytest.mark.parametrize("before", range(6))
def test_weighted_node_joining_gets_its_share_straight_away(before: int) -> None:
    balancer = WeightedRoundRobinBalancer()
    picks(balancer, weighted(a=1, b=2), before)
    chosen = picks(balancer, weighted(a=1, b=2, c=3), 600)
    weights = {"a": 1, "b": 2, "c": 3}
    for count in range(1, 601):
        prefix = Counter(chosen[:count])
        for node_id, weight in weights.items():
            assert abs(prefix[node_id] - count * weight / 6) <= 1


def test_weighted_node_leaving_leaves_the_rest_proportional() -> None:
    balancer = WeightedRoundRobinBalancer()
    picks(balancer, weighted(a=1, b=2, c=3), 4)
    chosen = picks(balancer, weighted(a=1, c=3), 400)
    assert abs(chosen.count("a") - 100) <= 1
    assert abs(chosen.count("c") - 300) <= 1
    assert longest_run(chosen, "c") <= 3


@pytest.mark.parametrize("absent_picks", [1, 5, 50, 999, 1000, 5000])
@pytest.mark.parametrize("before", range(6))
def test_weighted_node_back_from_full_does_not_burst(before: int, absent_picks: int) -> None:
    balancer = WeightedRoundRobinBalancer()
    everyone = weighted(a=1, b=2, c=3)
    picks(balancer, everyone, before)
    # "c" is at capacity: the scheduler leaves it out of the eligible list for a while.
    picks(balancer, everyone[:2], absent_picks)
    chosen = picks(balancer, everyone, 60)
    assert chosen[:6].count("c") <= 3
    assert longest_run(chosen, "c") <= 2
    for count in range(1, 61):
        assert abs(chosen[:count].count("c") - count / 2) <= 1


def test_weighted_forgets_nodes_absent_for_long() -> None:
    balancer = WeightedRoundRobinBalancer(forget_after_picks=10)
    picks(balancer, weighted(a=1, b=2, c=3), 5)
    picks(balancer, weighted(a=1, b=2), 9)
    assert set(balancer._current) == {"a", "b", "c"}  # absent for 9 picks: still remembered
    picks(balancer, weighted(a=1, b=2), 1)
    assert set(balancer._current) == {"a", "b"}
    # Back after being forgotten: it starts afresh, like a new node.
    chosen = picks(balancer, weighted(a=1, b=2, c=3), 600)
    assert Counter(chosen) == {"a": 100, "b": 200, "c": 300}


def test_weighted_no_nodes_does_not_count_as_a_pick() -> None:
    balancer = WeightedRoundRobinBalancer()
    assert picks(balancer, weighted(a=1, b=2, c=3), 2) == ["c", "b"]
    assert balancer.select(TASK, []) is None
    assert picks(balancer, weighted(a=1, b=2, c=3), 4) == ["a", "c", "b", "c"]


def test_weighted_rejects_a_forget_horizon_below_one() -> None:
    with pytest.raises(ValueError, match="forget_after_picks"):
        WeightedRoundRobinBalancer(forget_after_picks=0)


# LeastConnectionsBalancer


def test_least_connections_no_nodes_gives_none() -> None:
    assert LeastConnectionsBalancer().select(TASK, []) is None


def test_least_connections_single_node_is_always_chosen() -> None:
    balancer = LeastConnectionsBalancer()
    assert picks(balancer, [node("only", active=3)], 3) == ["only"] * 3


def test_least_connections_picks_the_lowest_ratio() -> None:
    pool = [
        node("a", max_tasks=8, active=4),  # 0.5
        node("b", max_tasks=4, active=1),  # 0.25
        node("c", max_tasks=4, active=3),  # 0.75
    ]
    assert picks(LeastConnectionsBalancer(), pool, 1) == ["b"]


def test_least_connections_ratio_beats_absolute_count() -> None:
    pool = [node("a", max_tasks=10, active=3), node("b", max_tasks=2, active=1)]
    assert picks(LeastConnectionsBalancer(), pool, 1) == ["a"]


def test_least_connections_equal_ratio_goes_to_fewer_active_tasks() -> None:
    pool = [node("a", max_tasks=4, active=2), node("b", max_tasks=2, active=1)]
    assert picks(LeastConnectionsBalancer(), pool, 3) == ["b", "b", "b"]


def test_least_connections_ratios_compare_exactly() -> None:
    # 1/3 and 2/6 tie on ratio; the tie then goes to fewer active tasks.
    pool = [node("a", max_tasks=6, active=2), node("b", max_tasks=3, active=1)]
    assert picks(LeastConnectionsBalancer(), pool, 1) == ["b"]


def test_least_connections_ties_rotate_in_id_order() -> None:
    pool = [node("c"), node("a"), node("b")]
    assert picks(LeastConnectionsBalancer(), pool, 7) == ["a", "b", "c", "a", "b", "c", "a"]


def test_least_connections_rotation_skips_nodes_no_longer_tied() -> None:
    balancer = LeastConnectionsBalancer()
    assert picks(balancer, nodes("a", "b", "c"), 1) == ["a"]
    pool = [node("a"), node("b", active=1), node("c")]
    assert picks(balancer, pool, 2) == ["c", "a"]


def test_least_connections_spreads_reserved_work_evenly() -> None:
    balancer = LeastConnectionsBalancer()
    pool = [node("a", max_tasks=2), node("b", max_tasks=4), node("c", max_tasks=2)]
    order: list[str] = []
    for _ in range(8):
        chosen = balancer.select(TASK, [n for n in pool if n.free_slots > 0])
        assert chosen is not None
        chosen.active_tasks += 1
        order.append(chosen.id)
    # Ratios first (b has twice the room), then fewer active tasks, then the next id in turn.
    assert order == ["a", "b", "c", "b", "c", "a", "b", "b"]
    assert all(n.free_slots == 0 for n in pool)


# RandomBalancer


def test_random_no_nodes_gives_none() -> None:
    assert RandomBalancer(random.Random(1)).select(TASK, []) is None


def test_random_single_node_is_always_chosen() -> None:
    assert picks(RandomBalancer(random.Random(1)), nodes("only"), 3) == ["only"] * 3


def test_random_is_uniform() -> None:
    pool = nodes("a", "b", "c", "d", "e", "f")
    chosen = Counter(picks(RandomBalancer(random.Random(20260101)), pool, 6000))
    assert set(chosen) == {n.id for n in pool}
    chi_square = sum((count - 1000) ** 2 / 1000 for count in chosen.values())
    # 5 degrees of freedom: P(chi-square > 20.52) = 0.001 for a uniform choice.
    assert chi_square < 20.52


def test_random_same_seed_same_picks_whatever_the_input_order() -> None:
    first = picks(RandomBalancer(random.Random(7)), nodes("a", "b", "c", "d"), 50)
    second = picks(RandomBalancer(random.Random(7)), nodes("d", "b", "a", "c"), 50)
    assert first == second


# Registry


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("round-robin", RoundRobinBalancer),
        ("weighted", WeightedRoundRobinBalancer),
        ("least-connections", LeastConnectionsBalancer),
        ("random", RandomBalancer),
    ],
)
def test_make_balancer_builds_a_fresh_balancer(name: str, kind: type[object]) -> None:
    first = make_balancer(name)
    assert isinstance(first, kind)
    assert make_balancer(name) is not first


def test_registry_lists_the_four_strategies_and_the_default() -> None:
    assert set(BALANCERS) == {"round-robin", "weighted", "least-connections", "random"}
    assert DEFAULT_BALANCER in BALANCERS
    assert isinstance(make_balancer(DEFAULT_BALANCER), RoundRobinBalancer)


@pytest.mark.parametrize("name", ["", "roundrobin", "Round-Robin", "least_connections"])
def test_make_balancer_rejects_unknown_names_listing_the_choices(name: str) -> None:
    with pytest.raises(ValueError, match="unknown balancer") as caught:
        make_balancer(name)
    message = str(caught.value)
    assert repr(name) in message
    for known in BALANCERS:
        assert known in message


# Every strategy under a simulated scheduler


@pytest.mark.parametrize("name", sorted(BALANCERS))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_node_is_ever_over_capacity(name: str, seed: int) -> None:
    rng = random.Random(seed)
    balancer = make_balancer(name)
    if isinstance(balancer, RandomBalancer):
        balancer = RandomBalancer(random.Random(seed))
    pool = [
        node(f"n{i}", max_tasks=rng.randint(1, 5), weight=rng.choice([0, 1, 3])) for i in range(6)
    ]
    spare = node("late", max_tasks=2, weight=2)
    picked = 0
    for step in range(3000):
        if step == 1000:
            pool.append(spare)  # a node joins
        if step == 2000:
            del pool[0]  # a node leaves (its running tasks go with it)
        running = [n for n in pool if n.active_tasks > 0]
        if running and rng.random() < 0.45:
            rng.choice(running).active_tasks -= 1  # a task completes
            continue
        # What the scheduler passes: healthy, capable nodes with a free slot.
        eligible = [n for n in pool if n.free_slots > 0]
        chosen = balancer.select(TASK, eligible)
        if not eligible:
            assert chosen is None
            continue
        assert chosen is not None
        assert any(chosen is n for n in eligible)
        chosen.active_tasks += 1  # the scheduler reserves the slot
        picked += 1
        for n in pool:
            assert 0 <= n.active_tasks <= n.max_tasks
    assert picked > 1000
