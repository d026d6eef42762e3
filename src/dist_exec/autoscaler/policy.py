"""The auto scaler's policy: a pure function from what the master sees to a scaling decision.

No I/O, no clock reads: time comes in with the observation. The rules:

- **Below the minimum**: scale up to the minimum (no cooldown).
- **Scale up** (work is pending), from the spec's EnsureCapacity:
  no free slot -> add ``pending // tasks_per_worker + 1`` workers; backlog above
  ``workers x scale_up_threshold`` -> add one. Capped at the maximum. What the spec misses:
  workers already asked for but not registered yet (*booting*: desired replicas minus
  registered workers) are capacity on the way and are subtracted, so a slow start does not
  make the scaler add more every cooldown; and scale-ups are ``scale_up_cooldown_s`` apart.
- **Scale down** (nothing pending): only workers that run nothing, have been idle for
  ``scale_down_delay_s`` and have lived for ``min_worker_lifetime_s``; never below the
  minimum or an HPA's minReplicas; not within ``scale_down_cooldown_s`` of any scale event;
  and only while the running tasks stay at or below ``scale_down_utilization`` of the slots
  that remain. Scale-up waits for a full cluster and scale-down for a half-empty one: that
  band (hysteresis) and the idle delay keep a load that comes and goes from flapping.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from dist_exec.config import AutoscalerConfig, format_duration
from dist_exec.models import NodeId


class Action(enum.StrEnum):
    NONE = "none"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """One registered worker of the scaled group, as the policy needs it."""

    id: NodeId
    active_tasks: int
    max_tasks: int
    draining: bool  # asked to drain (or draining by itself): takes no new tasks
    idle_since: float | None  # when it last became idle; None while it runs something
    registered_at: float


@dataclass(frozen=True, slots=True)
class Observation:
    now: float
    pending: int  # queued tasks a new worker could take
    desired: int  # replicas the backend was asked for, booting ones included
    nodes: Sequence[NodeLoad]  # registered workers of the group not already being removed
    floor: int = 0  # an HPA's minReplicas on the same workers
    last_scale_up: float | None = None
    last_scale_down: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    target: int  # replicas wanted (the current desired count for NONE)
    victims: tuple[NodeId, ...] = ()  # DOWN: the idle workers to drain and remove
    reason: str = ""


def decide(obs: Observation, config: AutoscalerConfig) -> Decision:
    """What to do now; see the module docstring for the rules."""
    if obs.desired < config.min_replicas:
        return Decision(
            Action.UP, config.min_replicas, reason=f"below the minimum of {config.min_replicas}"
        )
    if obs.pending > 0:
        return _scale_up(obs, config)
    return _scale_down(obs, config)


def _hold(obs: Observation, reason: str) -> Decision:
    return Decision(Action.NONE, obs.desired, reason=reason)


def _since(now: float, *times: float | None) -> float:
    known = [t for t in times if t is not None]
    return now - max(known) if known else float("inf")


def _scale_up(obs: Observation, config: AutoscalerConfig) -> Decision:
    serving = [n for n in obs.nodes if not n.draining]
    booting = max(0, obs.desired - len(obs.nodes))
    free = sum(max(0, n.max_tasks - n.active_tasks) for n in serving)
    workers = len(serving) + booting
    if free == 0:
        needed = obs.pending // config.tasks_per_worker + 1
        add = needed - booting
        if add <= 0:
            return _hold(
                obs, f"{booting} starting worker(s) will take the {obs.pending} pending task(s)"
            )
        reason = f"no free slot and {obs.pending} task(s) pending"
        reason += f" ({booting} worker(s) starting)" if booting else ""
    elif obs.pending > workers * config.scale_up_threshold:
        add = 1
        reason = (
            f"{obs.pending} task(s) pending, more than {workers} worker(s) x "
            f"{config.scale_up_threshold}"
        )
    else:
        return _hold(obs, f"{obs.pending} task(s) pending, within capacity")
    target = min(config.max_replicas, obs.desired + add)
    if target <= obs.desired:
        return _hold(obs, f"{reason}, but at the maximum of {config.max_replicas}")
    waited = _since(obs.now, obs.last_scale_up)
    if waited < config.scale_up_cooldown_s:
        left = format_duration(config.scale_up_cooldown_s - waited)
        return _hold(obs, f"{reason}; scale-up cooldown ({left} left)")
    return Decision(Action.UP, target, reason=reason)


def _scale_down(obs: Observation, config: AutoscalerConfig) -> Decision:
    waited = _since(obs.now, obs.last_scale_up, obs.last_scale_down)
    if waited < config.scale_down_cooldown_s:
        left = format_duration(config.scale_down_cooldown_s - waited)
        return _hold(obs, f"idle; scale-down cooldown ({left} left)")
    serving = [n for n in obs.nodes if not n.draining]
    candidates = sorted(
        (
            n
            for n in serving
            if n.active_tasks == 0
            and n.idle_since is not None
            and obs.now - n.idle_since >= config.scale_down_delay_s
            and obs.now - n.registered_at >= config.min_worker_lifetime_s
        ),
        key=lambda n: (n.idle_since, n.id),
    )
    if not candidates:
        return _hold(obs, "no worker idle long enough to remove")
    floor = max(config.min_replicas, obs.floor)
    # Workers draining still count in ``desired`` until they are removed: they are going.
    staying = obs.desired - sum(1 for n in obs.nodes if n.draining)
    room = staying - floor
    if room <= 0:
        who = "the HPA's minReplicas" if obs.floor > config.min_replicas else "the minimum"
        return _hold(obs, f"at {who} of {floor}")
    count = min(len(candidates), room)
    running = sum(n.active_tasks for n in serving)
    slots = sum(n.max_tasks for n in serving)
    while count > 0 and running > config.scale_down_utilization * (
        slots - sum(n.max_tasks for n in candidates[:count])
    ):
        count -= 1
    if count == 0:
        return _hold(obs, f"{running} running task(s) need the idle workers' slots")
    victims = tuple(n.id for n in candidates[:count])
    return Decision(
        Action.DOWN,
        staying - count,
        victims,
        f"{count} worker(s) idle for {format_duration(config.scale_down_delay_s)} or more",
    )
