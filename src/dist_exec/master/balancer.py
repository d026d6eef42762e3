"""Load balancing: pick one node for a task among the eligible ones. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from dist_exec.models import NodeId, NodeInfo, TaskSpec


class Balancer(Protocol):
    def select(self, task: TaskSpec, nodes: Sequence[NodeInfo]) -> NodeInfo | None:
        """Choose among ``nodes`` (all eligible: healthy, capable, with a free slot)."""
        ...


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
        ordered = sorted(nodes, key=lambda n: n.id)
        chosen = ordered[0]
        if self._last is not None:
            chosen = next((n for n in ordered if n.id > self._last), ordered[0])
        self._last = chosen.id
        return chosen
