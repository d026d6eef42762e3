"""Scheduler: the queue of pending tasks and which of them to place now. Pure.

Order: higher priority first; within a priority, first submitted first (FIFO by sequence).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from dist_exec.master.balancer import Balancer
from dist_exec.models import JobId, NodeId, NodeInfo, TaskSpec


@dataclass(frozen=True, slots=True)
class Assignment:
    job_id: JobId
    node_id: NodeId


class Scheduler:
    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        # Heap entries carry the enqueue generation: an entry whose job was removed (and maybe
        # queued again since) no longer matches and is skipped.
        self._heap: list[tuple[int, int, int, JobId]] = []
        self._queued: dict[JobId, tuple[int, TaskSpec]] = {}  # job -> (generation, spec)
        self._generation = 0
        self._types: Counter[str] = Counter()  # queued jobs per task type

    def __len__(self) -> int:
        return len(self._queued)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._queued

    def enqueue(self, job_id: JobId, seq: int, spec: TaskSpec) -> None:
        if job_id in self._queued:
            self.remove(job_id)
        self._generation += 1
        self._queued[job_id] = (self._generation, spec)
        self._types[spec.task_type] += 1
        heapq.heappush(self._heap, (-spec.priority, seq, self._generation, job_id))

    def remove(self, job_id: JobId) -> bool:
        """Take a job out of the queue (lazily: its heap entry is skipped later)."""
        queued = self._queued.pop(job_id, None)
        if queued is None:
            return False
        self._types[queued[1].task_type] -= 1
        return True

    def ahead_of(self, job_id: JobId) -> int:
        """Queued jobs of a higher priority than this one (0 if it is not queued)."""
        queued = self._queued.get(job_id)
        if queued is None:
            return 0
        priority = queued[1].priority
        return sum(1 for _, spec in self._queued.values() if spec.priority > priority)

    def ordered(self) -> list[JobId]:
        return [j for _, _, gen, j in sorted(self._heap) if self._current(j, gen)]

    def _current(self, job_id: JobId, generation: int) -> bool:
        queued = self._queued.get(job_id)
        return queued is not None and queued[0] == generation

    def plan(
        self,
        eligible: Callable[[TaskSpec], list[NodeInfo]],
        reserve: Callable[[NodeId], None],
    ) -> list[Assignment]:
        """Place queued tasks in order while nodes have room; reserve each chosen slot.

        A task that finds no room blocks the tasks behind it that need the same kind of node
        (type and selector), so a lower priority never overtakes a higher one for a slot."""
        assignments: list[Assignment] = []
        skipped: list[tuple[int, int, int, JobId]] = []
        full: set[tuple[str, frozenset[tuple[str, str]]]] = set()
        full_types: set[str] = set()  # types every one of whose queued tasks is blocked
        while self._heap and not full_types.issuperset(+self._types):
            entry = heapq.heappop(self._heap)
            job_id, generation = entry[3], entry[2]
            if not self._current(job_id, generation):
                continue  # removed (or queued again) since
            spec = self._queued[job_id][1]
            kind = (spec.task_type, frozenset(spec.selector.items()))
            node = None
            if kind not in full:
                node = self.balancer.select(spec, eligible(spec))
            if node is None:
                full.add(kind)
                if not spec.selector:
                    full_types.add(spec.task_type)
                skipped.append(entry)
                continue
            reserve(node.id)
            self.remove(job_id)
            assignments.append(Assignment(job_id, node.id))
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return assignments
