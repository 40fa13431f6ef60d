"""Assignments by change, the leader's half (issue 15): the hub's per-node change log (numbers,
floor, trimming, the whole-set fallback) and WatchAssignments on a real state machine: a whole
set first, then only what changed, whole again on a new term or a stream too far behind, and
whole sets always for an agent that did not ask for deltas. Plus ReportTaskEvents: one log
entry per report."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from lepton.coordinator.api import assignment_stream
from lepton.coordinator.api.service import CoordinatorService
from lepton.coordinator.api.task_hub import NodeChanges, TaskHub
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import common_pb2, coordinator_pb2, state_pb2, tasks_pb2

KIND = tasks_pb2.TaskEvent
WAIT_S = 20.0


# -- the change log --------------------------------------------------------------------------
def test_changes_are_numbered_and_each_id_comes_once_oldest_first():
    log = NodeChanges(limit=100)
    assert log.since(0) == []
    for task_id in ("a", "b", "a", "c"):
        log.record(task_id)
    assert log.seq == 4
    assert log.since(0) == ["b", "a", "c"]  # a's last change is after b's
    assert log.since(2) == ["a", "c"]
    assert log.since(4) == []


def test_a_reader_behind_the_floor_gets_none_and_trimming_keeps_what_is_unsent():
    log = NodeChanges(limit=3)
    for task_id in "abcde":
        log.record(task_id)
    assert len(log) == 3 and log.floor == 2
    assert log.since(1) is None  # changes 1..2 are forgotten: a whole set instead
    assert log.since(2) == ["c", "d", "e"]
    log.trim(4)
    assert len(log) == 1 and log.floor == 4 and log.since(4) == ["e"]
    assert log.since(3) is None


async def test_the_hub_logs_only_nodes_with_a_stream_and_trims_to_the_slowest():
    hub = TaskHub(change_limit=100)

    def change(task_id: str, node: str, old_node: str = "") -> None:
        hub.on_task_change(tasks_pb2.Task(id=task_id, node_id=node), old_node)

    change("t0", "n1")  # nobody watches n1: nothing kept
    assert hub.log_size("n1") == 0
    fast, slow = hub.subscribe("n1"), hub.subscribe("n1")
    change("t1", "n1")
    change("t2", "", old_node="n1")  # left n1: a change of n1's too
    change("t3", "n2")
    assert fast.event.is_set() and slow.event.is_set()
    ids, seq = hub.changes(fast)
    assert ids == ["t1", "t2"] and seq == 2
    hub.sent(fast, seq)
    assert hub.log_size("n1") == 2  # the slow stream has not sent them yet
    hub.sent(slow, seq)
    assert hub.log_size("n1") == 0
    hub.unsubscribe(fast)
    hub.unsubscribe(slow)
    assert hub.log_size("n1") == 0 and hub.subscribe("n1").seq == 0  # a fresh log


# -- WatchAssignments on a state machine -------------------------------------------------------
class Leader:
    """A state machine behind the real CoordinatorService; commands applied at once."""

    def __init__(self, change_limit: int = 10_000):
        self.sm = ClusterStateMachine()
        self.hub = TaskHub(change_limit)
        self.sm.tasks.listeners.append(self.hub.on_task_change)
        self.term = 1
        self.index = 0
        self.commits = 0
        self.sent: list[tuple[str, int, int]] = []
        self.hub.on_sent = lambda kind, messages, entries: self.sent.append((kind, messages, entries))
        self.ctx = SimpleNamespace(state=self.sm, hub=self.hub, read=self._no_barrier, commit=self._commit,
                                   require_leader=lambda: None,
                                   consensus=SimpleNamespace(term=lambda: self.term))
        self.svc = CoordinatorService(self.ctx)
        self.apply(register_node=state_pb2.RegisterNodeCmd(
            node_id="n1", name="one", address="127.0.0.1:1", capacity=common_pb2.Capacity(cpu_logical=64)))

    async def _no_barrier(self) -> None:
        return None

    async def _commit(self, cmd: state_pb2.Command):
        self.commits += 1
        self.index += 1
        result = self.sm.apply(self.index, cmd.SerializeToString())
        if isinstance(result, Exception):
            raise result
        return result

    def apply(self, **op) -> object:
        self.index += 1
        return self.sm.apply(self.index, state_pb2.Command(at_ms=1000, **op).SerializeToString())

    def submit_and_place(self, *ids: str, attempt: int = 1) -> None:
        fresh = [i for i in ids if i not in self.sm.tasks.tasks]
        if fresh:
            self.apply(submit_tasks=state_pb2.SubmitTasksCmd(tasks=[
                state_pb2.SubmitTaskCmd(task_id=i, spec=tasks_pb2.TaskSpec(argv=["true"], max_retries=3))
                for i in fresh]))
        self.apply(apply_plan=state_pb2.ApplyPlanCmd(term=self.term, placements=[
            state_pb2.PlacementCmd(task_id=i, attempt=self.sm.tasks.get(i).attempt, node_id="n1") for i in ids]))

    def event(self, task_id: str, kind, exit_code: int = 0) -> None:
        ev = tasks_pb2.TaskEvent(task_id=task_id, attempt=self.sm.tasks.get(task_id).attempt, kind=kind,
                                 exit_code=exit_code)
        self.apply(task_event=state_pb2.TaskEventCmd(node_id="n1", event=ev))


class Agent:
    """Reads one WatchAssignments stream as an agent would, into `sets`."""

    def __init__(self, leader: Leader, deltas: bool = True):
        self.sets: list[tasks_pb2.AssignmentSet] = []
        self._read_to = 0
        watch = CoordinatorService.WatchAssignments.__wrapped__  # past the gRPC boundary
        self._gen = watch(leader.svc, coordinator_pb2.WatchAssignmentsRequest(node_id="n1", deltas=deltas), None)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for aset in self._gen:
            self.sets.append(aset)

    async def next(self, count: int = 1) -> list[tasks_pb2.AssignmentSet]:
        """The next `count` messages not read yet."""
        start, self._read_to = self._read_to, self._read_to + count
        async with asyncio.timeout(WAIT_S):
            while len(self.sets) < self._read_to:
                await asyncio.sleep(0)
        return self.sets[start:self._read_to]

    async def quiet(self) -> None:
        """Let the stream run until it waits for a change; nothing more came."""
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(self.sets) == self._read_to, self.sets[self._read_to:]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._gen.aclose()


def keys(aset: tasks_pb2.AssignmentSet) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    return ([(a.task_id, a.attempt) for a in aset.assignments], [(r.task_id, r.attempt) for r in aset.removed])


@pytest.fixture
async def leader():
    return Leader()


async def test_a_whole_set_first_then_only_what_changed(leader):
    leader.submit_and_place("t1", "t2")
    agent = Agent(leader)
    try:
        (first,) = await agent.next()
        assert not first.delta and first.version == 1 and first.term == 1
        assert keys(first) == ([("t1", 1), ("t2", 1)], [])
        leader.submit_and_place("t3")
        (d,) = await agent.next()
        assert d.delta and d.version == 2 and keys(d) == ([("t3", 1)], [])
        leader.event("t3", KIND.KIND_STARTED)  # assigned -> running: nothing for the agent to do
        await agent.quiet()
        leader.event("t1", KIND.KIND_EXITED, exit_code=0)
        (d,) = await agent.next()
        assert d.version == 3 and keys(d) == ([], [("t1", 1)])
        # A failed attempt placed again on the same node before the stream ran (no await in
        # between): one delta, the old attempt out and the new one in.
        leader.event("t2", KIND.KIND_EXITED, exit_code=1)
        leader.submit_and_place("t2")
        (d,) = await agent.next()
        assert keys(d) == ([("t2", 2)], [("t2", 1)])
        leader.apply(cancel_task=state_pb2.CancelTaskCmd(task_id="t3"))
        (d,) = await agent.next()
        assert keys(d) == ([], [("t3", 1)])
        assert all(kind == "delta" for kind, _, _ in leader.sent[1:])
    finally:
        await agent.close()


async def test_per_change_work_does_not_grow_with_the_tasks_held(leader, monkeypatch):
    built: list[str] = []
    real = assignment_stream.assignment
    monkeypatch.setattr(assignment_stream, "assignment", lambda state, t: built.append(t.id) or real(state, t))
    held = [f"t{i:04d}" for i in range(1000)]
    leader.submit_and_place(*held)
    agent = Agent(leader)
    try:
        (first,) = await agent.next()
        assert len(first.assignments) == 1000 and len(built) == 1000
        built.clear()
        for task_id in held[:50]:
            leader.event(task_id, KIND.KIND_STARTED)
            leader.event(task_id, KIND.KIND_EXITED, exit_code=0)
        removed = []
        while len(removed) < 50:
            (d,) = await agent.next()
            assert d.delta and not d.assignments
            removed += [r.task_id for r in d.removed]
        assert sorted(removed) == held[:50]
        assert built == []  # no assignment of the 950 others was built again
        leader.submit_and_place("extra")
        (d,) = await agent.next()
        assert keys(d) == ([("extra", 1)], []) and built == ["extra"]
    finally:
        await agent.close()


async def test_a_new_term_sends_the_whole_set_again(leader):
    leader.submit_and_place("t1")
    agent = Agent(leader)
    try:
        await agent.next()
        leader.term = 2
        leader.hub.wake_all()  # what a leadership change does
        (again,) = await agent.next()
        assert not again.delta and again.term == 2 and again.version == 2
        assert keys(again) == ([("t1", 1)], [])
        leader.submit_and_place("t2")
        (d,) = await agent.next()
        assert d.delta and d.term == 2 and keys(d) == ([("t2", 1)], [])
    finally:
        await agent.close()


async def test_a_stream_further_behind_than_the_log_gets_a_whole_set():
    leader = Leader(change_limit=5)
    leader.submit_and_place("t0")
    agent = Agent(leader)
    try:
        await agent.next()
        # Ten changes while the stream is not running: more than the log keeps.
        leader.submit_and_place(*[f"t{i}" for i in range(1, 11)])
        for i in range(1, 11):
            leader.event(f"t{i}", KIND.KIND_STARTED)
        (whole,) = await agent.next()
        assert not whole.delta and whole.version == 2
        assert [a.task_id for a in whole.assignments] == sorted(f"t{i}" for i in range(11))
        assert [k for k, _, _ in leader.sent] == ["whole", "whole"]
    finally:
        await agent.close()


async def test_an_agent_that_did_not_ask_for_deltas_gets_whole_sets(leader):
    leader.submit_and_place("t1")
    agent = Agent(leader, deltas=False)
    try:
        await agent.next()
        leader.submit_and_place("t2")
        (again,) = await agent.next()
        assert not again.delta and keys(again) == ([("t1", 1), ("t2", 1)], [])
    finally:
        await agent.close()


async def test_a_large_delta_goes_in_several_messages_each_a_version(leader, monkeypatch):
    monkeypatch.setattr(assignment_stream.v, "ASSIGNMENT_CHUNK_BYTES", 60)  # ~2 assignments
    agent = Agent(leader)
    try:
        (first,) = await agent.next()
        assert keys(first) == ([], []) and not first.more
        leader.submit_and_place(*[f"t{i}" for i in range(10)])
        got = []
        while len(got) < 10:
            (d,) = await agent.next()
            assert d.delta and not d.more and d.assignments
            got += [a.task_id for a in d.assignments]
        versions = [s.version for s in agent.sets]
        assert versions == list(range(1, len(agent.sets) + 1)) and len(agent.sets) >= 4
        assert got == [f"t{i}" for i in range(10)]
    finally:
        await agent.close()


async def test_a_report_is_one_log_entry(leader):
    leader.submit_and_place(*[f"t{i}" for i in range(20)])
    req = coordinator_pb2.ReportTaskEventsRequest(node_id="n1", events=[
        tasks_pb2.TaskEvent(task_id=f"t{i}", attempt=1, kind=kind, exit_code=0)
        for kind in (KIND.KIND_STARTED, KIND.KIND_EXITED) for i in range(20)] + [
        tasks_pb2.TaskEvent(task_id="t-never", attempt=1, kind=KIND.KIND_EXITED)])
    report = CoordinatorService.ReportTaskEvents.__wrapped__
    resp = await report(leader.svc, req, None)
    assert resp.accepted == 40 and leader.commits == 1
    assert all(leader.sm.tasks.get(f"t{i}").state == tasks_pb2.TASK_STATE_SUCCEEDED for i in range(20))


async def test_a_full_report_settles_the_lost_attempts_in_one_entry(leader):
    leader.submit_and_place(*[f"t{i}" for i in range(5)])
    for i in range(5):
        leader.event(f"t{i}", KIND.KIND_STARTED)
    req = coordinator_pb2.ReportTaskEventsRequest(node_id="n1", full_report=True, running=[
        tasks_pb2.Assignment(task_id="t0", attempt=1)])
    report = CoordinatorService.ReportTaskEvents.__wrapped__
    resp = await report(leader.svc, req, None)
    assert resp.accepted == 4 and leader.commits == 1
    assert leader.sm.tasks.get("t0").state == tasks_pb2.TASK_STATE_RUNNING
    assert [leader.sm.tasks.get(f"t{i}").attempt for i in range(1, 5)] == [2] * 4  # requeued (retries)
