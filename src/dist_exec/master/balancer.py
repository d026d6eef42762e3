"""Load balancing: pick one node for a task among the eligible ones. Pure.

Strategies (``make_balancer(name)`` builds one by its ``BALANCERS`` key):

- ``round-robin`` (RoundRobinBalancer): the default; equal nodes, short tasks of similar cost.
- ``weighted`` (WeightedRoundRobinBalancer): unequal nodes; shares follow each node's weight
  (``max_tasks`` unless set), interleaved rather than in bursts.
- ``least-connections`` (LeastConnectionsBalancer): tasks of uneven length; sends work to the
  node with the most spare capacity right now.
- ``random`` (RandomBalancer): several masters or schedulers sharing nodes, where uncoordinated
  round robins would move in lockstep; no state to keep.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Protocol

from dist_exec.models import NodeId, NodeInfo, TaskSpec


class Balancer(Protocol):
    def select(self, task: TaskSpec, nodes: Sequence[NodeInfo]) -> NodeInfo | None:
        """Choose among ``nodes`` (all eligible: healthy, capable, with a free slot)."""
        ...


def _by_id(node: NodeInfo) -> NodeId:
    return node.id


def _next_after(ordered: Sequence[NodeInfo], last: NodeId | None) -> NodeInfo:
    """The first node (in id order) after ``last``, wrapping; ``ordered`` is non-empty."""
    if last is None:
        return ordered[0]
    return next((n for n in ordered if n.id > last), ordered[0])


class RoundRobinBalancer:
    """Cycles through nodes in id order, resuming after the last node chosen.

    Keyed on the id rather than a list index, so nodes joining or leaving do not make it skip
    or repeat one.
    """

    def __init__(self) -> None:
        self._last: NodeId | None = None

    def select(self, task: TaskSpec, nodes: Sequence[NodeInfo]) -> NodeInfo | None:
        if not nodes:
            return None
        chosen = _next_after(sorted(nodes, key=_by_id), self._last)
        self._last = chosen.id
        return chosen


class WeightedRoundRobinBalancer:
    """Smooth weighted round robin (nginx's): shares follow ``effective_weight``, interleaved.

    Each pick adds every eligible node's weight to its *current* weight, chooses the highest
    (the lowest id on a tie) and takes the eligible nodes' total weight off the winner. While
    the eligible set stays the same, every run of ``total`` picks gives each node exactly its
    weight's share, with one node's picks spread out instead of bunched.

    A node absent from a call (full, unhealthy or gone: the balancer cannot tell) keeps its
    current weight frozen. It earns no credit while away, so it cannot burst when it returns,
    and a node that fills up right after a pick keeps that debt instead of having it wiped.
    A node absent from ``forget_after_picks`` picks in a row is forgotten; if it comes back it
    starts from zero, like a node that has just joined.
    """

    def __init__(self, forget_after_picks: int = 1000) -> None:
        if forget_after_picks < 1:
            raise ValueError(f"forget_after_picks must be at least 1, not {forget_after_picks}")
        self._forget_after = forget_after_picks
        self._current: dict[NodeId, int] = {}
        self._seen_at: dict[NodeId, int] = {}  # node -> number of the last pick it was in
        self._picks = 0

    def select(self, task: TaskSpec, nodes: Sequence[NodeInfo]) -> NodeInfo | None:
        if not nodes:
            return None
        self._picks += 1
        ordered = sorted(nodes, key=_by_id)  # so ties go the same way whatever the input order
        total = 0
        for node in ordered:
            weight = node.effective_weight
            self._current[node.id] = self._current.get(node.id, 0) + weight
            self._seen_at[node.id] = self._picks
            total += weight
        chosen = max(ordered, key=lambda n: self._current[n.id])  # first maximum: lowest id
        self._current[chosen.id] -= total
        if len(self._current) > len(ordered):
            self._forget_absent()
        return chosen

    def _forget_absent(self) -> None:
        stale = [
            node_id
            for node_id, seen_at in self._seen_at.items()
            if self._picks - seen_at >= self._forget_after
        ]
        for node_id in stale:
            del self._current[node_id]
            del self._seen_at[node_id]


class LeastConnectionsBalancer:
    """Picks the node with the lowest ``active_tasks / max_tasks``.

    Ties go to the node with fewer active tasks, then round robin in id order among the nodes
    still tied, so equally loaded nodes take turns instead of the lowest id taking everything.
    """

    def __init__(self) -> None:
        self._last: NodeId | None = None

    def select(self, task: TaskSpec, nodes: Sequence[NodeInfo]) -> NodeInfo | None:
        if not nodes:
            return None
        loads = [(_load(n), n) for n in nodes]
        lightest = min(load for load, _ in loads)
        tied = sorted((n for load, n in loads if load == lightest), key=_by_id)
        chosen = _next_after(tied, self._last)
        self._last = chosen.id
        return chosen


def _load(node: NodeInfo) -> tuple[Fraction, int]:
    # Exact ratios: 1/3 and 2/6 must tie. An eligible node has max_tasks >= 1; max() guards.
    return Fraction(node.active_tasks, max(node.max_tasks, 1)), node.active_tasks


class RandomBalancer:
    """Picks uniformly at random; pass a seeded ``random.Random`` for repeatable picks."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def select(self, task: TaskSpec, nodes: Sequence[NodeInfo]) -> NodeInfo | None:
        if not nodes:
            return None
        # Sorted so that a given seed picks the same nodes whatever order they arrive in.
        return self._rng.choice(sorted(nodes, key=_by_id))


BALANCERS: dict[str, Callable[[], Balancer]] = {
    "round-robin": RoundRobinBalancer,
    "weighted": WeightedRoundRobinBalancer,
    "least-connections": LeastConnectionsBalancer,
    "random": RandomBalancer,
}
DEFAULT_BALANCER = "round-robin"


def make_balancer(name: str) -> Balancer:
    """A new balancer of the strategy ``name`` (a ``BALANCERS`` key)."""
    factory = BALANCERS.get(name)
    if factory is None:
        known = ", ".join(sorted(BALANCERS))
        raise ValueError(f"unknown balancer {name!r}; choose one of: {known}")
    return factory()
