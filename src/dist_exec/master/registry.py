"""NodeRegistry: which workers exist, whether they are alive, and their reserved slots.

Pure bookkeeping (no I/O); time comes from an injected Clock.

An address belongs to one live node at a time: a node registers again at its own address (a
restart), or at an address whose node is UNHEALTHY (it missed heartbeats for the timeout: its
tasks were retried) or gone (deregistered, forgotten). Else it is refused (AddressInUse), so a
worker credential cannot pass another node's address off as its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dist_exec.clock import Clock
from dist_exec.errors import AddressInUse
from dist_exec.models import NodeId, NodeInfo, NodeStatus, TaskLimits, TaskSpec

REFUSED_PAUSE_S = 1.0


@dataclass(frozen=True, slots=True)
class Sweep:
    unhealthy: list[NodeId]  # turned UNHEALTHY now: their tasks must be retried
    suspect: list[NodeId]  # turned SUSPECT now: no new tasks until they are heard from
    removed: list[NodeInfo]  # forgotten now: they must register again


class NodeRegistry:
    def __init__(
        self,
        clock: Clock,
        heartbeat_timeout_s: float,
        removal_s: float,
        suspect_s: float | None = None,
    ) -> None:
        """A node silent for ``suspect_s`` (default: a third of the timeout) is SUSPECT, for
        ``heartbeat_timeout_s`` UNHEALTHY, for ``removal_s`` forgotten."""
        self.clock = clock
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.removal_s = removal_s
        self.suspect_s = heartbeat_timeout_s / 3 if suspect_s is None else suspect_s
        self._nodes: dict[NodeId, NodeInfo] = {}

    def register(
        self,
        node_id: NodeId,
        address: str,
        capabilities: Iterable[str],
        max_tasks: int,
        labels: Mapping[str, str],
        weight: int = 0,
        task_limits: TaskLimits | None = None,
        tls_name: str = "",
        instance: str = "",
    ) -> NodeInfo:
        """Add a node, or replace one with the same id (a restarted worker). ``tls_name``: the
        name its certificate must carry when the master dials it; ``instance``: its process's
        (see NodeInfo)."""
        holder = next(
            (
                n
                for n in self._nodes.values()
                if n.address == address and n.id != node_id and n.status != NodeStatus.UNHEALTHY
            ),
            None,
        )
        if holder is not None:
            raise AddressInUse(
                f"address {address} is held by node {holder.id} ({holder.status}); another "
                f"node may take it once {holder.id} is UNHEALTHY or gone"
            )
        node = NodeInfo(
            id=node_id,
            address=address,
            capabilities=frozenset(capabilities),
            max_tasks=max_tasks,
            labels=dict(labels),
            last_seen=self.clock.monotonic(),
            last_seen_wall=self.clock.now(),
            weight=weight,
            task_limits=task_limits or TaskLimits(),
            tls_name=tls_name,
            instance=instance,
        )
        node.registered_at = node.last_seen
        node.idle_since = node.last_seen
        old = self._nodes.get(node_id)
        if old is not None:
            node.active_tasks = old.active_tasks  # reservations of attempts that live on
            node.idle_since = old.idle_since
            node.drain_requested = old.drain_requested
            if old.drain_requested:
                node.status = NodeStatus.DRAINING
        self._nodes[node_id] = node
        return node

    def heartbeat(self, node_id: NodeId, draining: bool, unwell: bool = False) -> NodeInfo | None:
        """Record a heartbeat; None when the node is unknown (it must register again).
        ``unwell``: the worker says it is DEGRADED or UNHEALTHY."""
        node = self._nodes.get(node_id)
        if node is None:
            return None
        node.last_seen = self.clock.monotonic()
        node.last_seen_wall = self.clock.now()
        if draining or node.drain_requested:
            node.status = NodeStatus.DRAINING
        else:
            node.status = NodeStatus.DEGRADED if unwell else NodeStatus.HEALTHY
        return node

    def request_drain(self, node_id: NodeId) -> bool:
        """No new tasks for this node from now on (the auto scaler will remove it)."""
        node = self._nodes.get(node_id)
        if node is None:
            return False
        node.drain_requested = True
        if node.status != NodeStatus.UNHEALTHY:
            node.status = NodeStatus.DRAINING
        return True

    def deregister(self, node_id: NodeId) -> NodeInfo | None:
        return self._nodes.pop(node_id, None)

    def sweep(self) -> Sweep:
        now = self.clock.monotonic()
        unhealthy, suspect, removed = [], [], []
        for node in list(self._nodes.values()):
            silent = now - node.last_seen
            if silent >= self.removal_s:
                del self._nodes[node.id]
                removed.append(node)
                if node.status != NodeStatus.UNHEALTHY:
                    unhealthy.append(node.id)
            elif silent >= self.heartbeat_timeout_s and node.status != NodeStatus.UNHEALTHY:
                node.status = NodeStatus.UNHEALTHY
                unhealthy.append(node.id)
            elif silent >= self.suspect_s and node.status == NodeStatus.HEALTHY:
                node.status = NodeStatus.SUSPECT
                suspect.append(node.id)
        return Sweep(unhealthy, suspect, removed)

    def excuse(self, seconds: float) -> None:
        """Do not count the last ``seconds`` of silence against any node (the master was not
        running to hear them)."""
        now = self.clock.monotonic()
        for node in self._nodes.values():
            node.last_seen = min(now, node.last_seen + seconds)

    def get(self, node_id: NodeId) -> NodeInfo | None:
        return self._nodes.get(node_id)

    def nodes(self) -> list[NodeInfo]:
        return sorted(self._nodes.values(), key=lambda n: n.id)

    def eligible(self, spec: TaskSpec) -> list[NodeInfo]:
        """Healthy nodes that can run ``spec`` and have a free slot, in id order."""
        now = self.clock.monotonic()
        return [
            n
            for n in self.nodes()
            if n.status == NodeStatus.HEALTHY
            and n.free_slots > 0
            and n.refused_until <= now
            and n.matches(spec)
        ]

    def refused(self, node_id: NodeId) -> float:
        """The node refused a start it had room for in the master's count (it is full with
        an attempt the master no longer counts, or it drains): no starts for it for a
        moment, so a job is not sent back to it in a loop. Returns the moment, in seconds."""
        node = self._nodes.get(node_id)
        if node is not None:
            node.refused_until = self.clock.monotonic() + REFUSED_PAUSE_S
        return REFUSED_PAUSE_S

    def matching(self, spec: TaskSpec) -> list[NodeInfo]:
        """Healthy nodes that can run ``spec``, busy or not."""
        return [n for n in self.nodes() if n.status == NodeStatus.HEALTHY and n.matches(spec)]

    def reserve(self, node_id: NodeId, force: bool = False) -> None:
        """Take a slot. ``force``: count an attempt already running there, even past max."""
        node = self._nodes[node_id]
        if node.free_slots <= 0 and not force:
            raise ValueError(f"node {node_id} has no free slot")
        node.active_tasks += 1
        node.idle_since = None

    def release(self, node_id: NodeId) -> None:
        node = self._nodes.get(node_id)
        if node is not None and node.active_tasks > 0:
            node.active_tasks -= 1
            if node.active_tasks == 0:
                node.idle_since = self.clock.monotonic()
