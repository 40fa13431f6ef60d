"""Liveness decisions with a fake clock: each run_cycle's sentence is asserted."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from lepton.common.errors import NotFound
from lepton.common.failover import attempt_lease_s, failover_grace_s, fence_wait_s
from lepton.coordinator.loops.liveness import (
    HeartbeatBudget,
    Liveness,
    LivenessTimings,
    budget_factor,
    scaled_thresholds,
)
from lepton.coordinator.state.state_machine import ClusterStateMachine, NodeState
from lepton.v1 import common_pb2, state_pb2, tasks_pb2


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def world():
    sm = ClusterStateMachine()
    clock = Clock()
    index = [0]

    async def propose(cmd: state_pb2.Command):
        index[0] = sm.applied_index + 1
        return sm.apply(index[0], cmd.SerializeToString())

    live = Liveness(sm, propose, LivenessTimings(2.0, 3.0, 3.0), monotonic=clock, wall_ms=lambda: int(clock.t * 1000))
    for name in ("a", "b"):
        index[0] += 1
        sm.apply(index[0], state_pb2.Command(register_node=state_pb2.RegisterNodeCmd(
            node_id=name, name=name, address="127.0.0.1:1",
            capacity=common_pb2.Capacity(cpu_logical=1, memory_bytes=1))).SerializeToString())
    live.on_leadership(True, 1)
    return sm, clock, live


def world_propose(sm):
    async def propose(cmd: state_pb2.Command):
        result = sm.apply(sm.applied_index + 1, cmd.SerializeToString())
        if isinstance(result, Exception):
            raise result
        return result
    return propose


def state(sm, node_id):
    return NodeState.from_proto(sm.nodes[node_id].state)


async def test_silent_node_goes_suspect_then_down_and_comes_back(world):
    sm, clock, live = world
    await live.heartbeat("a", common_pb2.Usage())
    await live.heartbeat("b", common_pb2.Usage())
    assert await live.run_cycle() == "2 nodes heartbeating (failover grace)"
    clock.t += live.grace_s(1.0)
    await live.heartbeat("a", common_pb2.Usage())
    await live.heartbeat("b", common_pb2.Usage())
    assert await live.run_cycle() == "2 nodes heartbeating"
    clock.t += 2.5
    await live.heartbeat("a", common_pb2.Usage())
    assert await live.run_cycle() == "marked suspect: b"
    clock.t += 1.0
    await live.heartbeat("a", common_pb2.Usage())
    assert await live.run_cycle() == "marked down: b"
    assert state(sm, "b") == NodeState.DOWN
    assert await live.run_cycle() == "1 nodes heartbeating"
    await live.heartbeat("b", common_pb2.Usage())
    assert state(sm, "b") == NodeState.READY


def test_the_failover_grace_is_the_sum_an_agent_needs():
    # detection (3 beats + 1) + find (2 x (1 s backoff + 1 s first answer)) + 1 beat
    assert failover_grace_s(1.0) == 4.0 + 4.0 + 1.0
    assert failover_grace_s(3.0) == 12.0 + 8.0 + 3.0  # stretched by the heartbeat budget
    # An attempt outlives a failover (grace + one answer deadline); the leader waits past it.
    assert attempt_lease_s(1.0) == 12.0 and fence_wait_s(1.0) == 15.0


async def test_new_leader_gives_a_grace_period_before_suspect_or_down(world):
    sm, clock, live = world
    grace = live.grace_s(1.0)
    assert grace == failover_grace_s(1.0) > 3.0  # the derived sum beats the configured 3 s
    clock.t += grace - 1.1  # not heard from: suspect 1 s (down_after - suspect_after) before the end
    assert await live.run_cycle() == "2 nodes heartbeating (failover grace)"
    clock.t += 0.2
    assert await live.run_cycle() == "marked suspect: a, b"
    live.on_leadership(True, 2)  # a failover restarts every timer
    clock.t += grace - 0.1
    assert await live.run_cycle() == "0 nodes heartbeating, 2 suspect (failover grace)"
    await live.heartbeat("a", common_pb2.Usage())
    clock.t += 0.2
    assert await live.run_cycle() == "marked down: b"
    assert state(sm, "a") == NodeState.READY


async def test_the_leader_never_suspects_its_own_node(world):
    sm, clock, _ = world
    live = Liveness(sm, world_propose(sm), LivenessTimings(2.0, 3.0, 3.0), monotonic=clock,
                    wall_ms=lambda: int(clock.t * 1000), self_id="a")
    live.on_leadership(True, 3)
    for _ in range(10):  # a never beats here (its agent talks to the old leader)
        clock.t += 3.0
        await live.heartbeat("b", common_pb2.Usage())
        assert await live.run_cycle() in ("2 nodes heartbeating", "2 nodes heartbeating (failover grace)")
    assert state(sm, "a") == NodeState.READY


async def test_many_nodes_silent_at_once_wait_one_grace(world):
    sm, clock, live = world
    for name in ("c", "d"):
        register(sm, name)
    grace = live.grace_s(1.0)
    clock.t += grace
    await beat(live, "a", "b", "c", "d")
    assert await live.run_cycle() == "4 nodes heartbeating"
    clock.t += 2.1  # three of four go silent together (the leader's own trouble, most likely)
    await beat(live, "a")
    assert await live.run_cycle() == "marked suspect: b, c, d"
    clock.t += 1.0
    await beat(live, "a")
    assert await live.run_cycle() == "1 nodes heartbeating, 3 suspect (mass down: waiting)"
    clock.t += grace - 0.5
    await beat(live, "a", "c")  # c was fine after all
    assert await live.run_cycle() == "2 nodes heartbeating, 2 suspect (mass down: waiting)"
    assert state(sm, "b") == NodeState.SUSPECT
    clock.t += 0.6  # the wait is over: those still silent are down
    await beat(live, "a", "c")
    assert await live.run_cycle() == "marked down: b, d"
    assert state(sm, "c") == NodeState.READY


async def test_a_stalled_leader_loop_restarts_the_timers(world):
    sm, clock, _ = world
    live = Liveness(sm, world_propose(sm), LivenessTimings(2.0, 3.0, 3.0), monotonic=clock,
                    wall_ms=lambda: int(clock.t * 1000), cycle_interval_s=0.2)
    live.on_leadership(True, 3)
    clock.t += live.grace_s(1.0)
    await beat(live, "a", "b")
    assert await live.run_cycle() == "2 nodes heartbeating"
    clock.t += 5.0  # SIGSTOP: no cycle ran, no beat was read
    assert await live.run_cycle() == "2 nodes heartbeating (failover grace)"
    assert state(sm, "a") == state(sm, "b") == NodeState.READY


async def test_a_down_nodes_attempts_are_requeued_only_after_the_fence_wait(world):
    sm, clock, live = world
    spec = tasks_pb2.TaskSpec(argv=["sleep", "60"])
    await world_propose(sm)(state_pb2.Command(submit_task=state_pb2.SubmitTaskCmd(task_id="t1", spec=spec)))
    await world_propose(sm)(state_pb2.Command(apply_plan=state_pb2.ApplyPlanCmd(term=1, placements=[
        state_pb2.PlacementCmd(task_id="t1", attempt=1, node_id="b")])))
    clock.t += live.grace_s(1.0)
    await beat(live, "a", "b")
    assert await live.run_cycle() == "2 nodes heartbeating"
    clock.t += 2.1
    await beat(live, "a")
    assert await live.run_cycle() == "marked suspect: b"
    clock.t += 1.0
    await beat(live, "a")
    assert await live.run_cycle() == "marked down: b"
    assert sm.tasks.get("t1").state == tasks_pb2.TASK_STATE_ASSIGNED  # its lease still runs
    clock.t += live.fence_wait_s(1.0) - 0.1
    await beat(live, "a")
    assert await live.run_cycle() == "1 nodes heartbeating"
    assert sm.tasks.get("t1").node_id == "b"
    clock.t += 0.2
    await beat(live, "a")
    assert await live.run_cycle() == "requeued the attempts of: b"
    task = sm.tasks.get("t1")
    assert task.state == tasks_pb2.TASK_STATE_PENDING and task.failures == 0 and task.node_losses == 1
    # A failover forgets when b went down: the new leader waits the whole fence again.
    await world_propose(sm)(state_pb2.Command(apply_plan=state_pb2.ApplyPlanCmd(term=2, placements=[
        state_pb2.PlacementCmd(task_id="t1", attempt=2, node_id="a")])))
    await world_propose(sm)(state_pb2.Command(set_node_state=state_pb2.SetNodeStateCmd(
        node_id="a", state=NodeState.SUSPECT.proto)))
    await world_propose(sm)(state_pb2.Command(set_node_state=state_pb2.SetNodeStateCmd(
        node_id="a", state=NodeState.DOWN.proto)))
    live.on_leadership(True, 4)
    assert await live.run_cycle() == "0 nodes heartbeating (failover grace)"
    clock.t += live.fence_wait_s(1.0) - 0.1
    assert (await live.run_cycle()).startswith("0 nodes heartbeating")
    await live.heartbeat("a", common_pb2.Usage())  # back before the wait ended: nothing requeued
    clock.t += 1.0
    assert await live.run_cycle() == "1 nodes heartbeating"
    assert sm.tasks.get("t1").node_id == "a" and sm.tasks.get("t1").attempt == 2


async def test_next_due_is_the_soonest_deadline_any_node_can_reach(world):
    sm, clock, live = world
    grace = live.grace_s(1.0)
    # Not heard from since the leadership began: suspect 1 s before the grace ends.
    assert live.next_due(clock.t) == pytest.approx(100.0 + grace - 3.0 + 2.0)
    clock.t += 1.0
    await beat(live, "a", "b")
    assert live.next_due(clock.t) == pytest.approx(clock.t + 2.0)  # suspect_after past the beats
    clock.t += grace
    await beat(live, "a")
    assert await live.run_cycle() == "marked suspect: b"
    b_last = clock.t - grace  # b's last beat
    clock.t += 0.5
    await beat(live, "a")
    # b is due down 3 s after its last beat; a is due suspect 2 s after its own.
    assert live.next_due(clock.t) == pytest.approx(min(b_last + 3.0, clock.t + 2.0))
    live.on_leadership(False, 2)
    assert live.next_due(clock.t) == float("inf")  # a follower has nothing due


async def test_next_due_waits_for_a_down_nodes_fence_and_ignores_the_leaders_own_node(world):
    sm, clock, _ = world
    live = Liveness(sm, world_propose(sm), LivenessTimings(2.0, 3.0, 3.0), monotonic=clock,
                    wall_ms=lambda: int(clock.t * 1000), self_id="a")
    live.on_leadership(True, 2)
    spec = tasks_pb2.TaskSpec(argv=["sleep", "60"])
    await world_propose(sm)(state_pb2.Command(submit_task=state_pb2.SubmitTaskCmd(task_id="t1", spec=spec)))
    await world_propose(sm)(state_pb2.Command(apply_plan=state_pb2.ApplyPlanCmd(term=2, placements=[
        state_pb2.PlacementCmd(task_id="t1", attempt=1, node_id="b")])))
    clock.t += live.grace_s(1.0) + 5.0  # b never beat: suspect, then down
    assert await live.run_cycle() == "marked suspect: b"
    assert await live.run_cycle() == "marked down: b"
    down_at = clock.t
    # Only b's fence remains (a is this leader: never due).
    assert live.next_due(clock.t) == pytest.approx(down_at + live.fence_wait_s(1.0))
    clock.t = live.next_due(clock.t)
    assert await live.run_cycle() == "requeued the attempts of: b"
    assert live.next_due(clock.t) == float("inf")


async def test_an_idle_leader_sleeps_until_a_node_changes(monkeypatch, caplog):
    """Counts cycles, not time: the old loop cycled every 0.2 s whatever happened."""
    monkeypatch.setattr("lepton.coordinator.loops.liveness.IDLE_WAKE_S", 3600.0)
    sm = ClusterStateMachine()
    live = Liveness(sm, world_propose(sm), LivenessTimings(2.0, 3.0, 3.0), monotonic=time.monotonic,
                    wall_ms=lambda: int(time.time() * 1000), self_id="me", cycle_interval_s=0.2)
    register(sm, "me")
    live.on_leadership(True, 1)
    runner = asyncio.create_task(live.run())
    try:
        await until(lambda: live.cycles >= 1)
        await asyncio.sleep(1.0)  # five cycles' worth of the old polling
        assert live.cycles == 1  # alone: nothing can be due
        register(sm, "b")  # a node joins: the loop wakes for it
        await until(lambda: live.cycles >= 2)
        assert live.next_due(time.monotonic()) < math.inf
        assert live.wake_at == pytest.approx(live.next_due(time.monotonic()), abs=0.5)
        assert "stalled" not in caplog.text  # a long sleep is not a stall
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_followers_do_nothing_and_unknown_nodes_are_refused(world):
    sm, clock, live = world
    live.on_leadership(False, 3)
    clock.t += 100
    assert await live.run_cycle() == "not the leader: nothing to check"
    assert state(sm, "a") == NodeState.READY
    with pytest.raises(NotFound):
        await live.heartbeat("ghost", common_pb2.Usage())


async def test_heartbeat_hook_gets_the_interval_since_the_nodes_last_beat(world):
    sm, clock, live = world
    seen: list[tuple[str, float | None]] = []
    live.on_heartbeat = lambda node_id, interval: seen.append((node_id, interval))
    for step in (0.0, 1.0, 1.5):
        clock.t += step
        await live.heartbeat("a", common_pb2.Usage())
    await live.heartbeat("b", common_pb2.Usage())
    assert seen == [("a", None), ("a", 1.0), ("a", 1.5), ("b", None)]
    live.on_leadership(True, 2)  # a new leadership forgets the last beats: no stale gap
    clock.t += 600
    await live.heartbeat("a", common_pb2.Usage())
    assert seen[-1] == ("a", None)


# The heartbeat budget: interval = max(base, live / budget), thresholds stretched alike.

def test_budget_factor_is_one_within_budget_and_proportional_beyond():
    assert budget_factor(0, 1.0, 2000) == 1.0
    assert budget_factor(2000, 1.0, 2000) == 1.0  # exactly at the budget: the base interval
    assert budget_factor(5000, 1.0, 2000) == 2.5  # 5,000 nodes: one beat each 2.5 s
    assert budget_factor(5001, 1.0, 2000) == 2.55  # rounded up to a twentieth: within budget
    assert budget_factor(3, 0.2, 1.0) == 15.0  # 3 nodes, 1 beat/s: 3 s = 15 x 0.2 s
    assert budget_factor(100_000, 1.0, 2000) == 50.0
    for nodes in (1, 999, 2001, 4321, 77_777):
        interval = 1.0 * budget_factor(nodes, 1.0, 2000)
        assert interval >= max(1.0, nodes / 2000)  # never over budget
        assert interval < max(1.0, nodes / 2000) + 0.05  # and at most a step above it


def test_thresholds_scale_with_the_factor():
    timings = LivenessTimings(2.0, 3.0, 3.0, 1.0, 2000)
    assert scaled_thresholds(timings, 1.0) == (2.0, 3.0)
    assert scaled_thresholds(timings, 2.5) == (5.0, 7.5)


def test_budget_holds_the_larger_factor_for_a_grace_period_after_a_change():
    budget = HeartbeatBudget(LivenessTimings(2.0, 3.0, 3.0, 1.0, 10))
    assert not budget.update(10, now=0.0) and budget.factor == 1.0
    assert budget.update(30, now=1.0)  # grows: thresholds stretch at once
    assert budget.factor == 3.0 and budget.interval_s == 3.0 and budget.threshold_factor(1.0) == 3.0
    assert budget.update(10, now=2.0)  # shrinks: the old factor holds for 3 x down_after
    assert budget.factor == 1.0 and budget.threshold_factor(2.0) == 3.0
    assert budget.threshold_factor(10.9) == 3.0
    assert budget.update(20, now=5.0)  # a change inside the hold keeps the larger factor
    assert budget.factor == 2.0 and budget.threshold_factor(5.0) == 3.0
    assert budget.threshold_factor(13.9) == 3.0 and budget.threshold_factor(14.0) == 2.0


def register(sm, node_id: str) -> None:
    sm.apply(sm.applied_index + 1, state_pb2.Command(register_node=state_pb2.RegisterNodeCmd(
        node_id=node_id, name=node_id, address="127.0.0.1:1",
        capacity=common_pb2.Capacity(cpu_logical=1, memory_bytes=1))).SerializeToString())


@pytest.fixture
def budgeted():
    """Base interval 1 s, suspect 2 s, down 3 s, and a budget of 2 beats/s: two nodes fit."""
    sm = ClusterStateMachine()
    clock = Clock()

    async def propose(cmd: state_pb2.Command):
        return sm.apply(sm.applied_index + 1, cmd.SerializeToString())

    live = Liveness(sm, propose, LivenessTimings(2.0, 3.0, 0.0, 1.0, 2.0), monotonic=clock,
                    wall_ms=lambda: int(clock.t * 1000))
    for name in ("a", "b"):
        register(sm, name)
    live.on_leadership(True, 1)
    return sm, clock, live, propose


async def beat(live, *names):
    for name in names:
        await live.heartbeat(name, common_pb2.Usage())


async def test_a_new_leader_takes_the_interval_of_the_node_table(budgeted):
    sm, clock, live, _ = budgeted
    assert live.interval_ms == 1000
    for name in ("c", "d", "e", "f"):
        register(sm, name)
    live.on_leadership(True, 2)
    assert live.interval_ms == 3000  # 6 nodes at 2 beats/s
    # Silent since the failover: the grace stretches too (23 s at 3 s beats), and suspect
    # comes 3 x 1 s (down_after - suspect_after, stretched) before it ends.
    grace = live.grace_s(3.0)
    assert grace == failover_grace_s(3.0) == 23.0
    clock.t += grace - 3.1
    assert await live.run_cycle() == "6 nodes heartbeating (failover grace)"
    clock.t += 0.2
    assert await live.run_cycle() == "marked suspect: a, b, c, d, e, f"


async def test_nodes_told_to_beat_less_often_are_not_suspected(budgeted):
    sm, clock, live, _ = budgeted
    clock.t += live.grace_s(2.0)  # past the grace even at the stretched interval below
    await beat(live, "a", "b")
    register(sm, "c")  # 3 nodes > 2 beats/s: everyone is told 1.5 s
    await beat(live, "c")
    assert await live.run_cycle() == "3 nodes heartbeating"
    assert live.interval_ms == 1500
    clock.t += 2.5  # past the base suspect_after (2 s), inside the stretched one (3 s)
    assert await live.run_cycle() == "3 nodes heartbeating"
    await beat(live, "a", "b", "c")
    clock.t += 3.1  # past the stretched suspect_after: still detected
    await beat(live, "a", "b")
    assert await live.run_cycle() == "marked suspect: c"
    clock.t += 1.5  # down after 3 x 1.5 = 4.5 s
    await beat(live, "a", "b")
    assert await live.run_cycle() == "marked down: c"
    assert state(sm, "c") == NodeState.DOWN
    # Down nodes do not beat: the interval shrinks back to the base.
    assert live.interval_ms == 1000


async def test_a_shrinking_interval_causes_no_burst_of_suspects(budgeted):
    sm, clock, live, propose = budgeted
    for name in ("c", "d", "e", "f"):
        register(sm, name)
    live.on_leadership(True, 2)  # 6 nodes: 3 s
    clock.t += live.grace_s(3.0)
    await beat(live, "a", "b", "c", "d", "e", "f")
    clock.t += 0.1
    for name in ("c", "d", "e", "f"):  # four leave: the base interval again...
        await propose(state_pb2.Command(set_node_state=state_pb2.SetNodeStateCmd(
            node_id=name, state=NodeState.LEFT.proto, reason="left")))
    assert await live.run_cycle() == "2 nodes heartbeating"
    assert live.interval_ms == 1000
    # ...but a and b may not have heard yet: silent 2.9 s (> 2 s) is fine for a while.
    clock.t += 2.8
    assert await live.run_cycle() == "2 nodes heartbeating"
    await beat(live, "a", "b")
    clock.t += 7.0  # the hold (3 x down_after = 9 s) is over: silence counts in 1 s beats
    await beat(live, "a")
    assert await live.run_cycle() == "marked suspect: b"
