"""Scheduler: queue order and placement against a fake set of nodes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from dist_exec.master.balancer import RoundRobinBalancer
from dist_exec.master.scheduler import Assignment, Scheduler
from dist_exec.models import JobId, NodeId, NodeInfo, TaskLimits, TaskSpec


def spec(priority: int = 0, task_type: str = "command") -> TaskSpec:
    return TaskSpec(task_type, b"{}", 60.0, priority)


class FakeNodes:
    """eligible/reserve over a fixed set of nodes, recording every reservation."""

    def __init__(self, *nodes: tuple[str, int, set[str]]) -> None:
        self.nodes = {
            NodeId(node_id): NodeInfo(
                id=NodeId(node_id),
                address=f"{node_id}:1",
                capabilities=frozenset(caps),
                max_tasks=slots,
                labels={},
                last_seen=0.0,
                last_seen_wall=datetime(2026, 1, 1, tzinfo=UTC),
            )
            for node_id, slots, caps in nodes
        }
        self.reserved: list[NodeId] = []
        self.eligible_calls: list[str] = []

    def eligible(self, spec: TaskSpec) -> list[NodeInfo]:
        self.eligible_calls.append(spec.task_type)
        return [
            n
            for n in sorted(self.nodes.values(), key=lambda n: n.id)
            if n.matches(spec) and n.free_slots > 0
        ]

    def reserve(self, node_id: NodeId) -> None:
        node = self.nodes[node_id]
        assert node.free_slots > 0, f"reserved a full node {node_id}"
        node.active_tasks += 1
        self.reserved.append(node_id)

    def release(self, node_id: NodeId) -> None:
        self.nodes[node_id].active_tasks -= 1


def enqueue_all(scheduler: Scheduler, *jobs: tuple[str, TaskSpec]) -> None:
    for seq, (job_id, job_spec) in enumerate(jobs, start=1):
        scheduler.enqueue(JobId(job_id), seq, job_spec)


def placed(assignments: list[Assignment]) -> list[tuple[str, str]]:
    return [(a.job_id, a.node_id) for a in assignments]


@pytest.fixture
def scheduler() -> Scheduler:
    return Scheduler(RoundRobinBalancer())


def test_empty_scheduler_plans_nothing(scheduler: Scheduler) -> None:
    nodes = FakeNodes(("n1", 4, {"command"}))
    assert len(scheduler) == 0
    assert scheduler.ordered() == []
    assert scheduler.plan(nodes.eligible, nodes.reserve) == []
    assert nodes.reserved == []


def test_higher_priority_first_fifo_within_priority(scheduler: Scheduler) -> None:
    enqueue_all(
        scheduler,
        ("low-1", spec(0)),
        ("high-1", spec(9)),
        ("mid-1", spec(5)),
        ("low-2", spec(0)),
        ("high-2", spec(9)),
        ("mid-2", spec(5)),
        ("top", spec(10)),
    )
    expected = ["top", "high-1", "high-2", "mid-1", "mid-2", "low-1", "low-2"]
    assert scheduler.ordered() == expected
    assert len(scheduler) == 7

    nodes = FakeNodes(("n1", 10, {"command"}))
    assert [a.job_id for a in scheduler.plan(nodes.eligible, nodes.reserve)] == expected
    assert len(scheduler) == 0
    assert scheduler.ordered() == []


def test_fifo_follows_seq_not_enqueue_order(scheduler: Scheduler) -> None:
    # Recovery enqueues jobs with their stored sequence numbers, in any order.
    scheduler.enqueue(JobId("c"), 30, spec())
    scheduler.enqueue(JobId("a"), 10, spec())
    scheduler.enqueue(JobId("b"), 20, spec())
    assert scheduler.ordered() == ["a", "b", "c"]


def test_contains_and_len(scheduler: Scheduler) -> None:
    enqueue_all(scheduler, ("a", spec()), ("b", spec()))
    assert JobId("a") in scheduler
    assert JobId("zzz") not in scheduler
    assert len(scheduler) == 2


def test_remove(scheduler: Scheduler) -> None:
    enqueue_all(scheduler, ("a", spec()), ("b", spec(5)), ("c", spec()))
    assert scheduler.remove(JobId("b")) is True
    assert scheduler.remove(JobId("b")) is False
    assert scheduler.remove(JobId("never-queued")) is False
    assert JobId("b") not in scheduler
    assert len(scheduler) == 2
    assert scheduler.ordered() == ["a", "c"]

    nodes = FakeNodes(("n1", 10, {"command"}))
    assert [a.job_id for a in scheduler.plan(nodes.eligible, nodes.reserve)] == ["a", "c"]
    assert len(nodes.reserved) == 2


def test_requeued_job_returns_to_its_place(scheduler: Scheduler) -> None:
    # The master re-enqueues a retried job with its original sequence number.
    enqueue_all(scheduler, ("a", spec()), ("b", spec()))
    nodes = FakeNodes(("n1", 1, {"command"}))
    assert placed(scheduler.plan(nodes.eligible, nodes.reserve)) == [("a", "n1")]
    assert scheduler.ordered() == ["b"]

    nodes.release(NodeId("n1"))
    scheduler.enqueue(JobId("a"), 1, spec())
    assert scheduler.ordered() == ["a", "b"]
    assert placed(scheduler.plan(nodes.eligible, nodes.reserve)) == [("a", "n1")]
    assert scheduler.ordered() == ["b"]


def test_removed_then_enqueued_again_uses_its_new_place(scheduler: Scheduler) -> None:
    scheduler.enqueue(JobId("a"), 1, spec(priority=10))
    assert scheduler.remove(JobId("a"))
    scheduler.enqueue(JobId("b"), 2, spec(priority=5))
    scheduler.enqueue(JobId("a"), 3, spec(priority=0))

    assert len(scheduler) == 2
    assert scheduler.ordered() == ["b", "a"]
    nodes = FakeNodes(("n1", 1, {"command"}))
    assert placed(scheduler.plan(nodes.eligible, nodes.reserve)) == [("b", "n1")]
    assert scheduler.ordered() == ["a"]


def test_plan_without_nodes_keeps_everything_queued(scheduler: Scheduler) -> None:
    enqueue_all(scheduler, ("a", spec()), ("b", spec(3)))
    nodes = FakeNodes()
    assert scheduler.plan(nodes.eligible, nodes.reserve) == []
    assert scheduler.ordered() == ["b", "a"]
    assert len(scheduler) == 2
    # Once a type has no room it is not asked about again in the same plan.
    assert nodes.eligible_calls == ["command"]


def test_plan_stops_when_slots_run_out_and_keeps_the_rest_in_order(
    scheduler: Scheduler,
) -> None:
    enqueue_all(scheduler, *[(f"j{i}", spec()) for i in range(1, 6)])
    nodes = FakeNodes(("n1", 1, {"command"}), ("n2", 1, {"command"}))

    assert placed(scheduler.plan(nodes.eligible, nodes.reserve)) == [
        ("j1", "n1"),
        ("j2", "n2"),
    ]
    assert scheduler.ordered() == ["j3", "j4", "j5"]
    assert [n.active_tasks for n in nodes.nodes.values()] == [1, 1]

    # No room: nothing moves.
    assert scheduler.plan(nodes.eligible, nodes.reserve) == []
    assert scheduler.ordered() == ["j3", "j4", "j5"]

    # A slot frees up: the next job in order takes it.
    nodes.release(NodeId("n2"))
    assert placed(scheduler.plan(nodes.eligible, nodes.reserve)) == [("j3", "n2")]
    assert scheduler.ordered() == ["j4", "j5"]


def test_task_type_no_node_runs_stays_queued_without_blocking_others(
    scheduler: Scheduler,
) -> None:
    enqueue_all(
        scheduler,
        ("gpu-1", spec(10, "gpu")),
        ("cmd-1", spec(0)),
        ("gpu-2", spec(10, "gpu")),
        ("cmd-2", spec(0)),
    )
    nodes = FakeNodes(("n1", 1, {"command"}), ("n2", 1, {"command"}))

    assert placed(scheduler.plan(nodes.eligible, nodes.reserve)) == [
        ("cmd-1", "n1"),
        ("cmd-2", "n2"),
    ]
    assert scheduler.ordered() == ["gpu-1", "gpu-2"]
    assert len(scheduler) == 2


def test_a_task_whose_limits_no_node_allows_blocks_no_one(scheduler: Scheduler) -> None:
    """It blocked every task of its type behind it, for good (the queue stalled)."""
    big = replace(spec(10), limits=TaskLimits(memory_bytes=1 << 30))
    fits = replace(spec(5), limits=TaskLimits(memory_bytes=1 << 20))
    enqueue_all(scheduler, ("big", big), ("small", spec(0)), ("fits", fits), ("big-2", big))
    nodes = FakeNodes(("n1", 2, {"command"}))
    nodes.nodes[NodeId("n1")].task_limits = TaskLimits(memory_bytes=256 << 20)

    assert placed(scheduler.plan(nodes.eligible, nodes.reserve)) == [
        ("fits", "n1"),
        ("small", "n1"),
    ]
    assert scheduler.ordered() == ["big", "big-2"]


def test_a_plan_stops_once_every_kind_of_task_queued_is_blocked(scheduler: Scheduler) -> None:
    """Tasks with limits kept a full queue from being cut short: every plan (at every result
    and node change) went through all of it."""
    limited = replace(spec(), limits=TaskLimits(memory_bytes=1 << 30))
    enqueue_all(scheduler, *[(f"j{i}", limited) for i in range(1000)])
    enqueue_all(scheduler, *[(f"k{i}", spec(0, "other")) for i in range(1000)])
    nodes = FakeNodes(("n1", 1, {"command", "other"}))
    nodes.nodes[NodeId("n1")].active_tasks = 1
    looked_at: list[JobId] = []

    def isolated(job_id: JobId) -> bool:
        looked_at.append(job_id)
        return False

    assert scheduler.plan(nodes.eligible, nodes.reserve, isolated) == []
    assert looked_at == ["j0", "k0"]
    assert len(scheduler) == 2000


def test_full_type_does_not_block_a_type_with_room(scheduler: Scheduler) -> None:
    enqueue_all(
        scheduler,
        ("a-1", spec(5, "a")),
        ("a-2", spec(5, "a")),
        ("a-3", spec(5, "a")),
        ("b-1", spec(0, "b")),
        ("b-2", spec(0, "b")),
    )
    nodes = FakeNodes(("na", 1, {"a"}), ("nb", 5, {"b"}))

    assert placed(scheduler.plan(nodes.eligible, nodes.reserve)) == [
        ("a-1", "na"),
        ("b-1", "nb"),
        ("b-2", "nb"),
    ]
    assert scheduler.ordered() == ["a-2", "a-3"]


def test_plan_spreads_round_robin_and_reserves_each_slot(scheduler: Scheduler) -> None:
    enqueue_all(scheduler, *[(f"j{i}", spec()) for i in range(1, 5)])
    nodes = FakeNodes(("n1", 2, {"command"}), ("n2", 2, {"command"}))

    assignments = scheduler.plan(nodes.eligible, nodes.reserve)

    assert placed(assignments) == [("j1", "n1"), ("j2", "n2"), ("j3", "n1"), ("j4", "n2")]
    assert nodes.reserved == ["n1", "n2", "n1", "n2"]
    assert all(n.free_slots == 0 for n in nodes.nodes.values())


def test_plan_only_uses_capable_nodes(scheduler: Scheduler) -> None:
    enqueue_all(scheduler, ("a", spec(0, "gpu")), ("b", spec(0, "command")))
    nodes = FakeNodes(("cpu", 4, {"command"}), ("gpu", 4, {"command", "gpu"}))

    assert sorted(placed(scheduler.plan(nodes.eligible, nodes.reserve))) == [
        ("a", "gpu"),
        ("b", "cpu"),
    ]


def test_isolated_tasks_never_share_a_node_and_block_no_one(scheduler: Scheduler) -> None:
    enqueue_all(
        scheduler,
        ("s1", spec(priority=9)), ("s2", spec(priority=9)), ("s3", spec(priority=9)),
        ("a", spec()), ("b", spec()),
    )  # fmt: skip
    nodes = FakeNodes(("n1", 2, {"command"}), ("n2", 2, {"command"}), ("n3", 2, {"command"}))
    isolated = {"s1", "s2", "s3"}
    # n3 already runs an isolated task: s1 and s2 take n1 and n2, s3 waits; a and b may share.
    plan = scheduler.plan(nodes.eligible, nodes.reserve, isolated.__contains__, [NodeId("n3")])
    assignments = placed(plan)
    isolated_nodes = [node for job, node in assignments if job in isolated]
    assert sorted(isolated_nodes) == ["n1", "n2"]
    assert sorted(job for job, _ in assignments) == ["a", "b", "s1", "s2"]
    assert scheduler.ordered() == ["s3"]
