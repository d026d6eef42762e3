"""The auto scaler loop in the master: observe, ask the policy, act through the backend.

Scale-in never takes away a worker that runs a task: the policy picks idle workers, the master
stops placing tasks on them and tells them to drain (heartbeat action DRAIN; a draining worker
reports NOT_SERVING, so its pod turns NotReady), and only once the master counts no task on a
victim is the backend asked to remove it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from dist_exec.autoscaler.backend import Scale, ScaleBackend, ScaleError
from dist_exec.autoscaler.policy import Action, Decision, NodeLoad, Observation, decide
from dist_exec.clock import Clock
from dist_exec.config import AutoscalerConfig
from dist_exec.models import NodeId, NodeInfo, NodeStatus, ScalerStatus

log = logging.getLogger(__name__)
REMOVAL_GRACE_S = 120.0  # a removed victim still registered after this is removed again


class ClusterView(Protocol):
    """What the scaler reads from and asks of the master."""

    def scaling_demand(self) -> int: ...
    def nodes(self) -> list[NodeInfo]: ...
    def request_drain(self, node_id: NodeId) -> bool: ...


@dataclass(slots=True)
class _State:
    last_up: float | None = None
    last_down: float | None = None
    scale: Scale | None = None
    decision: str = ""
    event: str = ""
    event_at: datetime | None = None
    error: str = ""


class Autoscaler:
    def __init__(
        self,
        config: AutoscalerConfig,
        cluster: ClusterView,
        backend: ScaleBackend,
        clock: Clock,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.backend = backend
        self.clock = clock
        self._state = _State()
        self._draining: set[NodeId] = set()  # chosen victims, drain requested
        self._removing: dict[NodeId, float] = {}  # victims the backend removed, not gone yet
        self._closed = False

    async def run(self) -> None:
        log.info(
            "auto scaler on %s: %d-%d workers",
            self.backend.description,
            self.config.min_replicas,
            self.config.max_replicas,
        )
        while True:
            try:
                await self.step()
            except Exception:  # a bug here must not take the master down
                log.exception("auto scaler step failed")
            await asyncio.sleep(self.config.interval_s)

    async def close(self) -> None:
        """Release the backend (the local one stops its workers, which drain first)."""
        if not self._closed:
            self._closed = True
            await self.backend.close()

    def status(self) -> ScalerStatus:
        state = self._state
        scale = state.scale or Scale(0, 0)
        return ScalerStatus(
            backend=self.backend.description,
            desired=scale.desired,
            ready=scale.ready,
            min_replicas=self.config.min_replicas,
            max_replicas=self.config.max_replicas,
            floor=scale.floor,
            draining=tuple(sorted(self._draining | set(self._removing))),
            last_decision=state.decision,
            last_event=state.event,
            last_event_at=state.event_at,
            error=state.error,
        )

    async def step(self) -> Decision | None:
        """One look: finish scale-ins whose victims are idle, then decide and act."""
        try:
            scale = await self.backend.current_scale()
            self._state.scale = scale
            now = self.clock.monotonic()
            nodes = {n.id: n for n in self.cluster.nodes() if self.backend.owns(n.id)}
            self._forget_gone(nodes, now)
            removal_error = ""
            try:
                if await self._remove_drained(nodes, now):
                    return None  # the scale changed; look again next time
            except ScaleError as exc:  # (a scale-in refused must not hold up a scale-up)
                removal_error = f"cannot remove drained workers: {exc}"
            decision = decide(self._observe(scale, nodes, now), self.config)
            self._state.decision = decision.reason
            await self._act(decision, now)
        except ScaleError as exc:
            self._failed(str(exc))
            return None
        if removal_error:
            self._failed(removal_error)
        else:
            self._succeeded()
        return decision

    def _forget_gone(self, nodes: dict[NodeId, NodeInfo], now: float) -> None:
        self._draining &= set(nodes)
        # Victims chosen before a master restart (their workers say so when they register).
        self._draining |= {
            n.id for n in nodes.values() if n.drain_requested and n.id not in self._removing
        }
        for node_id, since in list(self._removing.items()):
            if node_id not in nodes:
                del self._removing[node_id]
            elif now - since > REMOVAL_GRACE_S:
                # Another pod went instead (say, one that had not started): remove it again.
                log.warning("node %s is still here after its removal; removing it again", node_id)
                del self._removing[node_id]
                self._draining.add(node_id)

    async def _remove_drained(self, nodes: dict[NodeId, NodeInfo], now: float) -> bool:
        idle = [v for v in sorted(self._draining) if nodes[v].active_tasks == 0]
        if not idle:
            return False
        removed = await self.backend.scale_down(idle)
        for node_id in removed:
            self._draining.discard(node_id)
            self._removing[node_id] = now
        if removed:
            self._event(f"removed {len(removed)} drained idle worker(s): {', '.join(removed)}")
        return bool(removed)

    def _observe(self, scale: Scale, nodes: dict[NodeId, NodeInfo], now: float) -> Observation:
        return Observation(
            now=now,
            pending=self.cluster.scaling_demand(),
            desired=scale.desired,
            nodes=[
                NodeLoad(
                    n.id,
                    n.active_tasks,
                    n.max_tasks,
                    n.status != NodeStatus.HEALTHY,
                    n.idle_since,
                    n.registered_at,
                )
                for n in nodes.values()
                # (an UNHEALTHY one is gone: its pod's replacement is starting, not it)
                if n.id not in self._removing and n.status != NodeStatus.UNHEALTHY
            ],
            floor=scale.floor,
            last_scale_up=self._state.last_up,
            last_scale_down=self._state.last_down,
        )

    async def _act(self, decision: Decision, now: float) -> None:
        if decision.action == Action.UP:
            await self.backend.scale_up(decision.target)
            self._state.last_up = now
            self._event(f"scaled up to {decision.target}: {decision.reason}")
        elif decision.action == Action.DOWN:
            for node_id in decision.victims:
                if self.cluster.request_drain(node_id):
                    self._draining.add(node_id)
            self._state.last_down = now
            self._event(
                f"draining {', '.join(decision.victims)} to scale down to {decision.target}: "
                f"{decision.reason}"
            )

    def _event(self, text: str) -> None:
        log.info("auto scaler: %s", text)
        self._state.event = text
        self._state.event_at = self.clock.now()

    def _failed(self, message: str) -> None:
        if message != self._state.error:
            log.error("auto scaler: %s", message)
        self._state.error = message

    def _succeeded(self) -> None:
        if self._state.error:
            log.info("auto scaler: %s works again", self.backend.description)
        self._state = replace(self._state, error="")
