"""Assignments by change, the agent's half (issue 15): the desired set a stream's messages
build (whole sets replace it, deltas change it, a delta out of order is refused), the loop
handing the runner changes rather than the whole set, dropping a stream whose deltas do not
follow, and the runner acting on a change alone (O(change): the rest is left as it is)."""

from __future__ import annotations

import pytest

from lepton.agent.assignments import DesiredSet
from lepton.common.errors import Unavailable
from lepton.v1 import tasks_pb2
from tests.unit.link_fakes import wait_until
from tests.unit.test_assignment_loop import A, FakeRunner, World
from tests.unit.test_runner import node, sh  # noqa: F401 - the fixture


def spec_of(task_id: str, attempt: int, term: int = 3) -> tasks_pb2.Assignment:
    return tasks_pb2.Assignment(task_id=task_id, attempt=attempt, term=term,
                                spec=tasks_pb2.TaskSpec(argv=["true"]))


def whole(version: int, *pairs: tuple[str, int], term: int = 3, more: bool = False) -> tasks_pb2.AssignmentSet:
    return tasks_pb2.AssignmentSet(term=term, version=version, more=more,
                                   assignments=[spec_of(t, n, term) for t, n in pairs])


def delta(version: int, added=(), removed=(), term: int = 3) -> tasks_pb2.AssignmentSet:
    return tasks_pb2.AssignmentSet(
        term=term, version=version, delta=True, assignments=[spec_of(t, n, term) for t, n in added],
        removed=[tasks_pb2.AssignmentRemoval(task_id=t, attempt=n) for t, n in removed])


def held(d: DesiredSet) -> list[tuple[str, int]]:
    return sorted((a.task_id, a.attempt) for a in d.by_task.values())


def test_whole_sets_replace_and_deltas_change_the_set():
    d = DesiredSet()
    assert d.add(whole(1, ("a", 1), more=True)) is None  # the rest of the set is to come
    change = d.add(whole(1, ("b", 1)))
    assert change.removed is None and [a.task_id for a in change.assignments] == ["a", "b"]
    change = d.add(delta(2, added=[("c", 1)], removed=[("a", 1)]))
    assert [a.task_id for a in change.assignments] == ["c"] and change.removed == [("a", 1)]
    assert held(d) == [("b", 1), ("c", 1)]
    # A new attempt of a held task replaces the old one: the old is stopped even unnamed.
    change = d.add(delta(3, added=[("b", 2)]))
    assert change.removed == [("b", 1)] and held(d) == [("b", 2), ("c", 1)]
    # A removal of an attempt not held (already replaced) is passed on, the set unchanged.
    change = d.add(delta(4, removed=[("b", 1)]))
    assert change.removed == [("b", 1)] and held(d) == [("b", 2), ("c", 1)]
    change = d.add(whole(5, ("z", 1)))
    assert change.removed is None and held(d) == [("z", 1)]


@pytest.mark.parametrize("first, bad", [
    (None, delta(1, added=[("a", 1)])),  # a delta before any whole set
    (whole(1, ("a", 1)), delta(3, added=[("b", 1)])),  # version 2 was lost
    (whole(1, ("a", 1)), delta(2, added=[("b", 1)], term=4)),  # another term's
    (whole(1, ("a", 1)), delta(1, added=[("b", 1)])),  # a repeat
])
def test_a_delta_that_does_not_follow_is_refused(first, bad):
    d = DesiredSet()
    if first is not None:
        d.add(first)
    before = held(d)
    with pytest.raises(Unavailable, match="does not follow"):
        d.add(bad)
    assert held(d) == before


class DeltaRunner(FakeRunner):
    def __init__(self):
        super().__init__()
        self.changes: list[tuple[list[tuple[str, int]], list[tuple[str, int]] | None, int]] = []

    def reconcile(self, specs, term: int, *, removed=None) -> str:
        specs = list(specs)
        self.changes.append(([(s.task_id, s.attempt) for s in specs], removed, term))
        return super().reconcile(specs, term)


async def test_the_loop_asks_for_deltas_and_hands_the_runner_only_the_change(tmp_path):
    world = World(tmp_path)
    world.runner = DeltaRunner()
    world.loop.attach(world.runner)
    try:
        world.start(world.loop.watch())
        stream = await world.stream_at(A)
        assert stream.request.deltas
        stream.push(whole(1, ("a", 1), ("b", 1)))
        stream.push(delta(2, added=[("c", 1)], removed=[("a", 1)]))
        await wait_until(lambda: len(world.runner.changes) == 2, "two reconciles")
        assert world.runner.changes == [([("a", 1), ("b", 1)], None, 3), ([("c", 1)], [("a", 1)], 3)]
    finally:
        await world.stop()


async def test_a_gap_in_the_deltas_drops_the_stream_and_the_next_starts_whole(tmp_path):
    world = World(tmp_path)
    world.runner = DeltaRunner()
    world.loop.attach(world.runner)
    try:
        world.start(world.loop.watch())
        stream = await world.stream_at(A)
        stream.push(whole(1, ("a", 1)))
        stream.push(delta(3, added=[("b", 1)]))  # version 2 never came
        again = await world.stream_at(A, 2)
        assert stream.cancelled
        again.push(whole(1, ("a", 1), ("b", 1)))
        await wait_until(lambda: len(world.runner.changes) == 2, "the whole set again")
        assert world.runner.changes == [([("a", 1)], None, 3), ([("a", 1), ("b", 1)], None, 3)]
    finally:
        await world.stop()


async def test_the_runner_acts_on_a_change_and_leaves_the_rest(node):  # noqa: F811
    r = await node.runner()
    long = "echo ready; sleep 1000"
    assert r.reconcile([sh("a", long), sh("b", long)], term=5) == "started 2, stopped 0, 2 running"
    # Only c is named: a and b, not in this change, keep running.
    assert r.reconcile([sh("c", long)], term=5, removed=[]) == "started 1, stopped 0, 3 live"
    await node.output_has("a", "ready")
    assert r.reconcile([], term=5, removed=[("a", 1), ("x", 1)]) == "started 0, stopped 1, 3 live"
    assert (await node.exited("a")).reason == "cancelled"
    assert sorted(t.task_id for t in r.running()) == ["b", "c"]
    assert r._retention.desired == {("b", 1), ("c", 1)}  # what the sweeps keep
    # Fenced like a whole set: a change from an older term is ignored.
    assert r.reconcile([], term=4, removed=[("b", 1)]).startswith("ignored")
    assert sorted(t.task_id for t in r.running()) == ["b", "c"]


async def test_a_delta_with_shipped_code_waits_for_it_then_starts_with_the_whole_set(tmp_path):
    from tests.unit.test_code_cache import FakeCode

    class Runner(DeltaRunner):
        def running(self):
            raise AssertionError("a delta walked every running attempt")

    world = World(tmp_path)
    world.runner = Runner()
    world.loop.attach(world.runner)
    code = world.loop._code = FakeCode(tmp_path / "trees")
    digest = "ab" * 32
    shipped = spec_of("s", 1)
    shipped.spec.code_digest = digest
    try:
        world.start(world.loop.watch())
        stream = await world.stream_at(A)
        stream.push(whole(1, ("a", 1)))
        stream.push(tasks_pb2.AssignmentSet(term=3, version=2, delta=True, assignments=[shipped]))
        await wait_until(lambda: len(world.runner.changes) == 2, "the delta")
        assert world.runner.changes[1] == ([], [], 3) and code.fetches == [digest]  # held back
        code.ready.add(digest)
        world.runner.running = lambda: []  # a whole reconcile may look
        code.done()  # here now: the whole set again, with it
        assert world.runner.changes[2] == ([("a", 1), ("s", 1)], None, 3)
    finally:
        await world.stop()
