"""The seam between the auto scaler and what it scales: the ScaleBackend protocol and its errors.

A backend owns a group of workers (a Deployment's pods, or processes on this machine). The
spec's ``ScaleUp(count)`` / ``ScaleDown(count)`` / ``GetCurrentScale()``, with two changes:
``scale_up`` takes the replica count wanted, not a difference, so a retried call never adds
twice; ``scale_down`` names the idle workers to remove, so the backend can make exactly those
its victims, and reports which ones it removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dist_exec.models import NodeId


class ScaleError(Exception):
    """A backend call failed; the message says what to fix."""


class ScaleTargetMissing(ScaleError):
    """The thing to scale does not exist (e.g. no such Deployment)."""


class ScaleForbidden(ScaleError):
    """The backend refused the call (e.g. RBAC)."""


@dataclass(frozen=True, slots=True)
class Scale:
    desired: int  # replicas asked for, booting ones included
    ready: int  # replicas up and ready
    floor: int = 0  # an HPA's minReplicas on the same workers (0: none)


class ScaleBackend(Protocol):
    @property
    def description(self) -> str:
        """What is scaled, for logs and ``dist-exec nodes``."""
        ...

    def owns(self, node_id: NodeId) -> bool:
        """Whether this registered worker belongs to the scaled group."""
        ...

    async def current_scale(self) -> Scale: ...

    async def scale_up(self, replicas: int) -> None:
        """Ask for ``replicas`` workers (more than now)."""
        ...

    async def scale_down(self, victims: Sequence[NodeId]) -> list[NodeId]:
        """Remove these drained, idle workers; returns those removed now (the others are not
        ready to go yet and are asked for again later)."""
        ...

    async def close(self) -> None: ...
