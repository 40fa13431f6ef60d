"""The leader's endpoint table: node restriction, what the set holds, drops, watches."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from lepton.common.errors import InvalidArgument, NotLeader
from lepton.common.states import NodeState, TaskState
from lepton.coordinator.api.endpoints import EndpointTable
from lepton.v1 import common_pb2, serving_pb2, tasks_pb2

READY, PENDING, UNHEALTHY = serving_pb2.REPLICA_READY, serving_pb2.REPLICA_PENDING, serving_pb2.REPLICA_UNHEALTHY


class FakeState:
    """What the table reads of the replicated state: tasks, nodes, deployment records."""

    def __init__(self) -> None:
        self.nodes = {n: common_pb2.Node(id=n, address=f"10.0.0.{i}:7000", state=NodeState.READY.proto)
                      for i, n in enumerate(("n1", "n2"), 1)}
        self.tasks = SimpleNamespace(tasks={}, listeners=[])
        self.deployments = SimpleNamespace(records={}, changes=0, listeners=[])
        self.node_listeners: list = []

    def add_listener(self, listener) -> None:
        self.node_listeners.append(listener)

    def replica(self, task_id: str, node: str, deployment: str = "web", generation: int = 1,
                state: TaskState = TaskState.RUNNING) -> tasks_pb2.Task:
        task = tasks_pb2.Task(id=task_id, node_id=node, state=state.proto)
        task.spec.replica.deployment = deployment
        task.spec.replica.generation = generation
        self.tasks.tasks[task_id] = task
        rec = self.deployments.records.setdefault(deployment, SimpleNamespace(task_ids=[], draining=[]))
        rec.task_ids.append(task_id)
        self.bump_deployments()
        return task

    def bump_deployments(self) -> None:
        # As DeploymentTable does on every change: count it, then tell each listener.
        self.deployments.changes += 1
        for listener in self.deployments.listeners:
            listener()

    def change_task(self, task_id: str, **fields) -> None:
        task = self.tasks.tasks[task_id]
        old = task.node_id
        for k, val in fields.items():
            setattr(task, k, val)
        for listener in self.tasks.listeners:
            listener(task, old)

    def set_node(self, node_id: str, state: NodeState) -> None:
        self.nodes[node_id].state = state.proto
        for listener in self.node_listeners:
            listener(SimpleNamespace(node=self.nodes[node_id]))


class FakeConsensus:
    def __init__(self) -> None:
        self.listeners: list = []
        self.leader = True

    def add_leadership_listener(self, listener) -> None:
        self.listeners.append(listener)

    def require_leader(self) -> None:
        if not self.leader:
            raise NotLeader("not the leader")


def report(node: str, *entries: tuple[str, int], deployment: str = "web", stats=()) -> serving_pb2.ReportReplicasRequest:
    return serving_pb2.ReportReplicasRequest(node_id=node, stats=list(stats), replicas=[
        serving_pb2.ReplicaReport(task_id=t, deployment=deployment, state=s) for t, s in entries])


def endpoints(table: EndpointTable, deployment: str = "web") -> list[tuple[str, str]]:
    return [(e.task_id, e.node_id) for e in table.endpoint_set().deployments[deployment].endpoints]


@pytest.fixture
def setup():
    state, consensus = FakeState(), FakeConsensus()
    table = EndpointTable(state, require_leader=consensus.require_leader, poll_s=0.05)
    table.listen(state, consensus)
    return state, consensus, table


def test_only_ready_running_listed_replicas_are_endpoints(setup):
    state, _, table = setup
    state.replica("a", "n1", generation=2)
    state.replica("b", "n1")
    state.replica("c", "n2", state=TaskState.ASSIGNED)
    table.report("n1", report("n1", ("a", READY), ("b", PENDING)))
    table.report("n2", report("n2", ("c", READY)))
    assert endpoints(table) == [("a", "n1")]
    e = table.endpoint_set().deployments["web"].endpoints[0]
    assert (e.node_address, e.generation) == ("10.0.0.1:7000", 2)
    state.change_task("c", state=TaskState.RUNNING.proto)  # started: now it counts
    assert endpoints(table) == [("a", "n1"), ("c", "n2")]
    assert [(r.task_id, r.state) for r in table.replicas("web")] == [("a", READY), ("b", PENDING), ("c", READY)]


def test_a_node_cannot_report_replicas_that_are_not_its_own(setup):
    state, _, table = setup
    state.replica("a", "n1")
    state.replica("other", "n1", deployment="api")
    plain = tasks_pb2.Task(id="plain", node_id="n2", state=TaskState.RUNNING.proto)  # not a replica
    state.tasks.tasks["plain"] = plain
    state.replica("unlisted", "n2")
    state.deployments.records["web"].task_ids.remove("unlisted")
    table.report("n2", report("n2", ("a", READY), ("plain", READY), ("unlisted", READY), ("ghost", READY)))
    table.report("n2", report("n2", ("other", READY)))  # the wrong deployment, the wrong node
    assert endpoints(table, "web") == [] and endpoints(table, "api") == []
    assert table.replicas("web") == [] and table.replicas("api") == []


def test_draining_and_unhealthy_replicas_leave_the_set_and_the_version_grows(setup):
    state, _, table = setup
    state.replica("a", "n1")
    state.replica("b", "n2")
    table.report("n1", report("n1", ("a", READY)))
    table.report("n2", report("n2", ("b", READY)))
    v1 = table.endpoint_set().version
    assert endpoints(table) == [("a", "n1"), ("b", "n2")]
    assert table.endpoint_set().version == v1  # nothing changed: same set, same version
    state.deployments.records["web"].draining.append("a")
    state.bump_deployments()
    assert endpoints(table) == [("b", "n2")]
    table.report("n2", report("n2", ("b", UNHEALTHY)))
    assert endpoints(table) == []
    assert table.endpoint_set().version > v1


def test_entries_go_when_the_task_stops_or_moves_or_the_node_goes_down(setup):
    state, _, table = setup
    state.replica("a", "n1")
    state.replica("b", "n2")
    state.replica("c", "n2")
    table.report("n1", report("n1", ("a", READY)))
    table.report("n2", report("n2", ("b", READY), ("c", READY)))
    state.change_task("a", state=TaskState.FAILED.proto)
    assert [r.task_id for r in table.replicas("web")] == ["b", "c"]
    state.set_node("n2", NodeState.SUSPECT)  # kept, but not routed to
    assert endpoints(table) == []
    state.set_node("n2", NodeState.READY)
    assert endpoints(table) == [("b", "n2"), ("c", "n2")]
    state.change_task("b", node_id="n1", state=TaskState.ASSIGNED.proto)  # requeued elsewhere
    assert endpoints(table) == [("c", "n2")]
    state.set_node("n2", NodeState.DOWN)
    assert table.replicas("web") == [] and endpoints(table) == []
    state.set_node("n2", NodeState.READY)
    assert endpoints(table) == []  # a report must come again


def test_losing_leadership_clears_the_table(setup):
    state, consensus, table = setup
    state.replica("a", "n1")
    table.report("n1", report("n1", ("a", READY)))
    for listener in consensus.listeners:
        listener(False, 3)
    assert table.replicas("web") == [] and endpoints(table) == []


def test_malformed_reports_are_invalid_argument(setup):
    _, _, table = setup
    with pytest.raises(InvalidArgument, match="not a replica state"):
        table.report("n1", report("n1", ("a", 99)))
    with pytest.raises(InvalidArgument):
        table.report("n1", report("n1", ("a", READY), deployment="Bad Name"))
    with pytest.raises(InvalidArgument, match="pair up"):
        table.report("n1", report("n1", stats=[serving_pb2.RouterStats(deployment="web", bucket_le_ms=[1.0])]))


def test_router_stats_go_to_the_sink(setup):
    state, _, table = setup
    state.replica("a", "n1")
    assert table.stats("web").requests == 0
    table.report("n1", report("n1", stats=[serving_pb2.RouterStats(deployment="web", requests=7)]))
    table.report("n2", report("n2", stats=[serving_pb2.RouterStats(deployment="web", requests=5)]))
    assert table.stats("web").requests == 12


def test_a_removed_deployments_stats_go_and_its_namesake_starts_from_zero(setup):
    state, _, table = setup
    state.replica("a", "n1")
    table.report("n1", report("n1", stats=[serving_pb2.RouterStats(deployment="web", requests=7)]))
    del state.deployments.records["web"]  # serve rm: the deployment leaves the state
    state.bump_deployments()
    assert table.stats("web").requests == 0
    # A late report under the removed name is not kept (nor does it hold memory).
    table.report("n2", report("n2", stats=[serving_pb2.RouterStats(deployment="web", requests=5)]))
    assert table.stats_sink.deployments() == set()
    state.replica("b", "n2")  # made again under the same name
    table.report("n2", report("n2", stats=[serving_pb2.RouterStats(deployment="web", requests=1)]))
    table.report("n1", report("n1", stats=[serving_pb2.RouterStats(deployment="web", requests=9)]))
    assert table.stats("web").requests == 3  # n1's router ran on from its old 7


async def test_watch_sends_the_whole_set_then_each_change_and_ends_off_leader(setup):
    state, consensus, table = setup
    state.replica("a", "n1")
    state.replica("b", "n2")
    stream = table.watch()
    first = await asyncio.wait_for(stream.__anext__(), 10)
    assert list(first.deployments) == ["web"]  # listed with no endpoint: known, none ready
    assert not first.deployments["web"].endpoints
    table.report("n1", report("n1", ("a", READY)))
    second = await asyncio.wait_for(stream.__anext__(), 10)
    assert [e.task_id for e in second.deployments["web"].endpoints] == ["a"]
    assert second.version > first.version
    # A drain is only in the state: the watch finds it by polling the change counter.
    state.deployments.records["web"].draining.append("a")
    state.bump_deployments()
    third = await asyncio.wait_for(stream.__anext__(), 10)
    assert not third.deployments["web"].endpoints
    consensus.leader = False
    for listener in consensus.listeners:
        listener(False, 2)
    with pytest.raises(NotLeader):
        await asyncio.wait_for(stream.__anext__(), 10)


async def test_a_new_leader_sends_no_set_until_agents_had_time_to_report(setup):
    state, consensus, _ = setup
    clock = [50.0]
    table = EndpointTable(state, require_leader=consensus.require_leader, poll_s=0.01, rebuild_s=2.5,
                          clock=lambda: clock[0])
    table.listen(state, consensus)
    state.replica("a", "n1")
    table.on_leadership(True, 4)
    stream = table.watch()
    first = asyncio.ensure_future(stream.__anext__())
    clock[0] += 1.0
    table.report("n1", report("n1", ("a", READY)))
    await asyncio.sleep(0.1)
    assert not first.done()  # routers keep their last set meanwhile
    clock[0] += 2.0
    got = await asyncio.wait_for(first, 10)
    assert [e.task_id for e in got.deployments["web"].endpoints] == ["a"]  # whole, not empty


async def test_every_watch_hears_a_drain_at_once_without_a_timer(setup):
    state, _, table = setup
    state.replica("a", "n1")
    table.report("n1", report("n1", ("a", READY)))
    streams = [table.watch() for _ in range(3)]
    for s in streams:
        got = await asyncio.wait_for(s.__anext__(), 10)
        assert [e.task_id for e in got.deployments["web"].endpoints] == ["a"]
    nexts = [asyncio.ensure_future(s.__anext__()) for s in streams]
    await asyncio.sleep(0.2)
    assert not any(n.done() for n in nexts)  # nothing changed: nothing sent
    state.deployments.records["web"].draining.append("a")
    state.bump_deployments()
    for n in nexts:
        assert not (await asyncio.wait_for(n, 10)).deployments["web"].endpoints
    for s in streams:
        await s.aclose()
    assert not table._watchers  # a closed watch leaves nothing behind to wake
