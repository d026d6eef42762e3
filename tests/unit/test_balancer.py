"""RoundRobinBalancer: id-ordered cycling that survives membership changes."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import pytest

from dist_exec.master.balancer import RoundRobinBalancer
from dist_exec.models import NodeId, NodeInfo, TaskSpec

TASK = TaskSpec("command", b"{}", 60.0)


def nodes(*ids: str) -> list[NodeInfo]:
    return [
        NodeInfo(
            id=NodeId(node_id),
            address=f"{node_id}:1",
            capabilities=frozenset({"command"}),
            max_tasks=4,
            labels={},
            last_seen=0.0,
            last_seen_wall=datetime(2026, 1, 1, tzinfo=UTC),
        )
        for node_id in ids
    ]


def picks(balancer: RoundRobinBalancer, available: Iterable[NodeInfo], count: int) -> list[str]:
    pool = list(available)
    chosen: list[str] = []
    for _ in range(count):
        node = balancer.select(TASK, pool)
        assert node is not None
        chosen.append(node.id)
    return chosen


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
