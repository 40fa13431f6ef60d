"""Spread groups (a deployment's replicas) in the scheduler, with the plan-recording harness."""

from __future__ import annotations

from lepton.coordinator.loops.scheduling import task_request
from lepton.coordinator.scheduler import Allocation, Harness, NodeView, Policy, TaskRequest
from lepton.v1 import tasks_pb2

GiB = 1 << 30


def node(nid: str, cpu: int = 4000) -> NodeView:
    return NodeView(nid, cpu, 16 * GiB)


def replica(task_id: str, group: str | None = "web", cpu: int = 1000) -> TaskRequest:
    return TaskRequest(task_id, cpu_millis=cpu, memory_bytes=GiB, spread_group=group)


def nodes_of(h: Harness, *task_ids: str) -> list[str]:
    return [h.running[t].node_id for t in task_ids]


def test_a_groups_tasks_take_distinct_nodes_even_where_binpacking_would_stack_them():
    h = Harness([node("n1"), node("n2"), node("n3")], policy=Policy(scoring="binpack"))
    h.submit(replica("r1"), replica("r2"), replica("r3"))
    h.step()
    assert sorted(nodes_of(h, "r1", "r2", "r3")) == ["n1", "n2", "n3"]
    # Without a group, binpack stacks them on one node: the group is what spreads them.
    plain = Harness([node("n1"), node("n2"), node("n3")], policy=Policy(scoring="binpack"))
    plain.submit(replica("p1", None), replica("p2", None), replica("p3", None))
    plain.step()
    assert set(nodes_of(plain, "p1", "p2", "p3")) == {"n1"}


def test_running_members_count_across_passes_and_groups_are_independent():
    h = Harness([node("n1"), node("n2")], policy=Policy(scoring="binpack"))
    h.submit(replica("r1"))
    h.step()
    h.submit(replica("r2"), replica("o1", "other"))
    h.step()
    assert nodes_of(h, "r1") != nodes_of(h, "r2")
    assert h.running["o1"].spread_group == "other"
    assert h.violations() == []


def test_more_replicas_than_nodes_share_rather_than_wait():
    h = Harness([node("n1"), node("n2")])
    h.submit(*(replica(f"r{i}") for i in range(3)))
    plan = h.step()
    assert len(plan.placements) == 3 and plan.unschedulable == {}
    assert set(nodes_of(h, "r0", "r1", "r2")) == {"n1", "n2"}


def test_a_full_free_node_is_not_required_a_fitting_one_is():
    # n2 is too small for a replica: the second one shares n1 instead of waiting.
    h = Harness([node("n1"), node("n2", cpu=500)])
    h.seed(Allocation("r1", "n1", cpu_millis=1000, memory_bytes=GiB, spread_group="web"))
    h.submit(replica("r2"))
    h.step()
    assert nodes_of(h, "r2") == ["n1"]


def test_task_requests_get_the_deployment_as_group_unless_packed():
    task = tasks_pb2.Task(id="t-1", spec=tasks_pb2.TaskSpec(
        argv=["x"], replica=tasks_pb2.ReplicaSpec(deployment="web", generation=1)))
    assert task_request(task).spread_group == "web"
    assert task_request(task, pack=True).spread_group is None
    assert task_request(tasks_pb2.Task(id="t-2", spec=tasks_pb2.TaskSpec(argv=["x"]))).spread_group is None
