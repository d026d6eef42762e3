"""Scheduler: the queue of pending tasks and which of them to place now. Pure.

Order: higher (effective) priority first; within one, first submitted first (FIFO).

Aging keeps low priorities from starving: a queued job gains one priority level for every
``aging_s`` it has waited, up to the top (10). So a job of priority p ranks with priority 10
after at most (10 - p) * aging_s, and from then on it goes before every priority-10 job
submitted after it. ``age(now)`` applies the rule; the master calls it about once a second.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

from dist_exec.master.balancer import Balancer
from dist_exec.models import MAX_PRIORITY, JobId, NodeId, NodeInfo, TaskLimits, TaskSpec


@dataclass(frozen=True, slots=True)
class Assignment:
    job_id: JobId
    node_id: NodeId


@dataclass(slots=True)
class _Queued:
    generation: int  # matches the job's live heap entry; older entries are skipped
    spec: TaskSpec
    seq: int
    since: float  # when it was queued (for aging)
    effective: int  # priority after aging


# What kind of node a task needs: its type, its selector, the node it is pinned to (a
# broadcast's), and the limits the node must allow.
_Kind = tuple[str, frozenset[tuple[str, str]], str, TaskLimits]


def _kind(spec: TaskSpec) -> _Kind:
    return (spec.task_type, frozenset(spec.selector.items()), spec.node_id, spec.limits)


class Scheduler:
    def __init__(self, balancer: Balancer, aging_s: float = 0.0) -> None:
        self.balancer = balancer
        self.aging_s = aging_s  # 0: no aging
        self._heap: list[tuple[int, int, int, JobId]] = []  # (-effective, seq, generation, id)
        self._queued: dict[JobId, _Queued] = {}
        self._generation = 0
        self._kinds: Counter[_Kind] = Counter()  # queued jobs per kind (none at 0)
        self._kinds_of: dict[str, set[_Kind]] = {}  # the kinds queued, per task type

    def __len__(self) -> int:
        return len(self._queued)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._queued

    def enqueue(self, job_id: JobId, seq: int, spec: TaskSpec, now: float = 0.0) -> None:
        if job_id in self._queued:
            self.remove(job_id)
        self._generation += 1
        self._queued[job_id] = _Queued(self._generation, spec, seq, now, spec.priority)
        kind = _kind(spec)
        self._kinds[kind] += 1
        self._kinds_of.setdefault(spec.task_type, set()).add(kind)
        heapq.heappush(self._heap, (-spec.priority, seq, self._generation, job_id))

    def remove(self, job_id: JobId) -> bool:
        """Take a job out of the queue (lazily: its heap entry is skipped later)."""
        queued = self._queued.pop(job_id, None)
        if queued is None:
            return False
        kind = _kind(queued.spec)
        self._kinds[kind] -= 1
        if not self._kinds[kind]:
            del self._kinds[kind]
            kinds = self._kinds_of[kind[0]]
            kinds.discard(kind)
            if not kinds:
                del self._kinds_of[kind[0]]
        return True

    def age(self, now: float) -> int:
        """Raise the effective priority of jobs that waited long enough; returns how many."""
        if self.aging_s <= 0:
            return 0
        raised = 0
        for job_id, queued in self._queued.items():
            if queued.effective >= MAX_PRIORITY:
                continue
            boost = int((now - queued.since) / self.aging_s)
            effective = min(MAX_PRIORITY, queued.spec.priority + boost)
            if effective > queued.effective:
                self._generation += 1
                queued.generation, queued.effective = self._generation, effective
                heapq.heappush(self._heap, (-effective, queued.seq, queued.generation, job_id))
                raised += 1
        return raised

    def ahead_of(self, job_id: JobId) -> int:
        """Queued jobs of the same task type that rank before this one (0 if not queued)."""
        queued = self._queued.get(job_id)
        if queued is None:
            return 0
        key = (-queued.effective, queued.seq)
        task_type = queued.spec.task_type
        return sum(
            1
            for q in self._queued.values()
            if q.spec.task_type == task_type and (-q.effective, q.seq) < key
        )

    def ordered(self) -> list[JobId]:
        return [j for _, _, gen, j in sorted(self._heap) if self._current(j, gen)]

    def _current(self, job_id: JobId, generation: int) -> bool:
        queued = self._queued.get(job_id)
        return queued is not None and queued.generation == generation

    def plan(
        self,
        eligible: Callable[[TaskSpec], list[NodeInfo]],
        reserve: Callable[[NodeId], None],
        isolated: Callable[[JobId], bool] = lambda job_id: False,
        isolating: Collection[NodeId] = (),
    ) -> list[Assignment]:
        """Place queued tasks in order while nodes have room; reserve each chosen slot.
        An ``isolated`` task never goes to a node that runs another one (``isolating``).

        A task that finds no room blocks the tasks behind it that need the same kind of node
        (type, selector, and the limits a node must allow), so a lower priority never
        overtakes a higher one for a slot. One that needs more of a node than any task type
        alone (labels, limits, a node of its own) blocks only its own kind: a task no node
        allows must not hold up the others."""
        assignments: list[Assignment] = []
        skipped: list[tuple[int, int, int, JobId]] = []
        full: set[tuple[_Kind, bool]] = set()  # (kind, isolated) that found no node
        # Kinds none of whose queued tasks can be placed now: once that is all of them, the
        # rest of the queue is not looked at (a large one would cost its size at every plan).
        blocked: set[_Kind] = set()
        taken = set(isolating)
        while self._heap and len(blocked) < len(self._kinds):
            entry = heapq.heappop(self._heap)
            job_id, generation = entry[3], entry[2]
            if not self._current(job_id, generation):
                continue  # removed (or queued again) since
            spec = self._queued[job_id].spec
            alone = isolated(job_id)
            kind = _kind(spec)
            node = None
            if (kind, alone) not in full:
                nodes = eligible(spec)
                if alone:
                    nodes = [n for n in nodes if n.id not in taken]
                node = self.balancer.select(spec, nodes)
            if node is None:
                full.add((kind, alone))
                if not alone:
                    blocked.add(kind)
                    if not spec.selector and not spec.node_id and not spec.limits.any:
                        # No node of its type has a free slot: no task of the type has one.
                        blocked |= self._kinds_of[spec.task_type]
                skipped.append(entry)
                continue
            reserve(node.id)
            if alone:
                taken.add(node.id)
            self.remove(job_id)
            assignments.append(Assignment(job_id, node.id))
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._queued) + 1024:
            # Removed and re-aged jobs leave dead entries; drop them before they pile up.
            self._heap = [e for e in self._heap if self._current(e[3], e[2])]
            heapq.heapify(self._heap)
        return assignments
