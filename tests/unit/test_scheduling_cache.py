"""What the leader keeps between scheduling cycles (issue 15): the scheduler's snapshot, its
columns, and the shapes found unplaceable. Kept only while nothing they depend on changed;
each kind of change below must drop them, and a kept one must decide exactly as a fresh one."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given

from lepton.coordinator.loops.scheduling import build_snapshot
from lepton.coordinator.scheduler import (
    ClusterSnapshot,
    Policy,
    TaskRequest,
    known_failure,
    placement,
    schedule,
)
from lepton.coordinator.scheduler._state import ClusterState
from lepton.v1 import common_pb2, state_pb2, tasks_pb2
from tests.unit.test_scheduler_property import budget, clusters, policies, queues, requests
from tests.unit.test_scheduling_loop import World

# -- the pure scheduler: a pass on a kept snapshot decides as on a fresh one -----------------


def _copy(snapshot: ClusterSnapshot) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(snapshot.nodes))  # equal, but another object: no kept columns


@budget(100)
@given(clusters(), queues(), queues(), policies)
def test_a_pass_on_a_kept_snapshot_decides_as_on_a_fresh_one(snapshot, first, second, policy):
    now = 600_000
    schedule(snapshot, first, now_ms=now, policy=policy)  # its pass must leave the kept columns as built
    kept = placement._last_state[1]
    assert placement._last_state[0] is snapshot
    assert schedule(snapshot, second, now_ms=now, policy=policy) == schedule(
        _copy(snapshot), second, now_ms=now, policy=policy)
    built = ClusterState(snapshot)
    for column in ("free_cpu", "free_mem", "cpu_load", "mem_load", "gpu_load", "gpu_hold",
                   "gpu_free", "free_gpus", "alive"):
        assert (getattr(kept, column) == getattr(built, column)).all(), column
    assert kept.group_rows == built.group_rows and kept.journal == []


@budget(150)
@given(clusters(), queues(), requests("new"), policies)
def test_a_known_failure_is_what_a_pass_would_say(snapshot, pending, new, policy):
    """A shape a pass that placed nothing found unplaceable: a later task of that shape and
    no higher priority gets, from a pass on the same snapshot, that very reason."""
    now = 600_000
    plan = schedule(snapshot, pending, now_ms=now, policy=policy)
    if plan.placements or plan.preemptions:
        return
    known = known_failure(plan.failed_shapes, new, policy)
    if known is None:
        return
    alone = schedule(_copy(snapshot), [new], now_ms=now, policy=policy)
    assert not alone.placements and not alone.preemptions
    assert alone.unschedulable == {new.task_id: known}


def test_a_gang_member_is_never_a_known_failure():
    shape_failed = {(1000, 0, 0, 0, ()): (float("inf"), "unschedulable: x")}
    single = TaskRequest("t", cpu_millis=1000)
    member = TaskRequest("g-0", cpu_millis=1000, gang_id="g", gang_size=2)
    assert known_failure(shape_failed, single, Policy()) == "unschedulable: x"
    assert known_failure(shape_failed, member, Policy()) is None


# -- the loop: what it keeps, and each change that drops it ----------------------------------


@pytest.fixture
def passes(monkeypatch):
    """Counts the scheduler's passes the loop runs."""
    calls: list[int] = []
    real = placement.schedule

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(placement, "schedule", counted)
    return calls


async def settled_world() -> World:
    """n1 (4 cpus) runs "r" (3 cpus); "w" (2 cpus) waits: its shape is known unplaceable."""
    world = World()
    world.node("n1", cpus=4)
    world.submit("r", cpu=3)
    assert (await world.loop.run_cycle()).startswith("placed 1 of 1")
    world.submit("w", cpu=2)
    assert (await world.loop.run_cycle()).startswith("placed 0 of 1")
    return world


async def test_new_tasks_of_a_shape_found_unplaceable_need_no_pass(passes):
    world = await settled_world()
    before = len(passes)
    for i in range(5):
        world.submit(f"w{i}", cpu=2)
    world.submit("lower", cpu=2, priority=-1)
    sentence = await world.loop.run_cycle()
    assert sentence == "new tasks match shapes found unplaceable: no pass"
    assert len(passes) == before
    expected = world.loop.reasons["w"]
    assert expected.startswith("waiting:")
    assert all(world.loop.reasons[f"w{i}"] == expected for i in range(5))
    assert world.loop.reasons["lower"] == expected
    # One new task of another shape: a pass again, for all of them.
    world.submit("w9", cpu=2)
    world.submit("tiny", cpu=0.5)
    assert (await world.loop.run_cycle()).startswith("placed 1 of 2")
    assert len(passes) == before + 1 and world.loop.reasons["w9"] == expected
    # A higher priority than the one that failed may preempt: searched, and it does.
    world.submit("higher", cpu=2, priority=1)
    assert (await world.loop.run_cycle()).startswith("placed 1 of 1 tasks, preempted 1")
    assert len(passes) == before + 2


def _exit(world: World, task_id: str) -> None:
    task = world.sm.tasks.tasks[task_id]
    world.apply(state_pb2.Command(at_ms=2000, task_events=state_pb2.TaskEventsCmd(
        node_id=task.node_id, events=[tasks_pb2.TaskEvent(
            task_id=task_id, attempt=task.attempt, kind=tasks_pb2.TaskEvent.KIND_EXITED)])))


def _node_state(world: World, node_id: str, *states: int) -> None:
    for s in states:
        world.apply(state_pb2.Command(at_ms=2000, set_node_state=state_pb2.SetNodeStateCmd(
            node_id=node_id, state=s, reason="test")))


async def _place_another(world: World) -> None:
    world.submit("small", cpu=1)  # fits beside "r": the loop's own placement changes usage
    assert (await world.loop.run_cycle()).startswith("placed 1 of 1")


async def _preempt(world: World) -> None:
    world.submit("urgent", cpu=3, priority=9)
    assert (await world.loop.run_cycle()).startswith("placed 1 of 1 tasks, preempted 1")


CHANGES = {
    "a node joins": lambda w: w.node("n2", cpus=1),
    "a node leaves": lambda w: _node_state(w, "n1", common_pb2.NODE_STATE_LEFT),
    "a node dies": lambda w: _node_state(w, "n1", common_pb2.NODE_STATE_SUSPECT, common_pb2.NODE_STATE_DOWN),
    "a node drains": lambda w: w.apply(state_pb2.Command(
        at_ms=2000, set_drain=state_pb2.SetDrainCmd(node_id="n1", draining=True))),
    "a task finishes": lambda w: _exit(w, "r"),
    "a snapshot is restored": lambda w: w.sm.restore(w.sm.snapshot(), w.sm.applied_index),
    "usage changes": _place_another,
    "a preemption": _preempt,
}


@pytest.mark.parametrize("change", sorted(CHANGES))
async def test_each_change_drops_what_was_kept(passes, change):
    world = await settled_world()
    kept = world.loop._snapshot()
    world.submit("same-shape", cpu=2)
    assert await world.loop.run_cycle() == "new tasks match shapes found unplaceable: no pass"
    assert world.loop._snapshot() is kept  # nothing changed: neither rebuilt nor searched

    result = CHANGES[change](world)
    if asyncio.iscoroutine(result):
        await result
    fresh = world.loop._snapshot()
    assert fresh is not kept and fresh == build_snapshot(world.sm)
    before = len(passes)
    world.submit("after", cpu=2)
    await world.loop.run_cycle()
    assert len(passes) > before  # the shape is searched again, on the new snapshot
    assert world.loop._snapshot() == build_snapshot(world.sm)


async def test_a_rebuild_reuses_held_allocations_and_remakes_changed_ones():
    world = await settled_world()
    before = {a.task_id: a for a in world.loop._snapshot().allocations}
    task = world.sm.tasks.tasks["r"]
    world.apply(state_pb2.Command(at_ms=2000, task_events=state_pb2.TaskEventsCmd(
        node_id=task.node_id, events=[tasks_pb2.TaskEvent(
            task_id="r", attempt=task.attempt, kind=tasks_pb2.TaskEvent.KIND_STARTED)])))
    world.node("n2", cpus=1)  # a rebuild: "r" started meanwhile, its resources unchanged
    after = world.loop._snapshot()
    assert after == build_snapshot(world.sm)
    assert next(a for a in after.allocations if a.task_id == "r") is before["r"]
    world.submit("urgent", cpu=3, priority=9)
    assert "preempted 1" in await world.loop.run_cycle()  # "r" evicted: its kept allocation goes
    assert "r" not in world.loop._allocations
    await world.loop.run_cycle()
    assert world.loop._snapshot() == build_snapshot(world.sm)
