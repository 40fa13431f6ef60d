"""Liveness decisions with a fake clock: each run_cycle's sentence is asserted."""

from __future__ import annotations

import pytest

from lepton.common.errors import NotFound
from lepton.coordinator.loops.liveness import (
    HeartbeatBudget,
    Liveness,
    LivenessTimings,
    budget_factor,
    scaled_thresholds,
)
from lepton.coordinator.state.state_machine import ClusterStateMachine, NodeState
from lepton.v1 import common_pb2, state_pb2


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
        index[0] += 1
        return sm.apply(index[0], cmd.SerializeToString())

    live = Liveness(sm, propose, LivenessTimings(2.0, 3.0, 3.0), monotonic=clock, wall_ms=lambda: int(clock.t * 1000))
    for name in ("a", "b"):
        index[0] += 1
        sm.apply(index[0], state_pb2.Command(register_node=state_pb2.RegisterNodeCmd(
            node_id=name, name=name, address="127.0.0.1:1",
            capacity=common_pb2.Capacity(cpu_logical=1, memory_bytes=1))).SerializeToString())
    live.on_leadership(True, 1)
    return sm, clock, live


def state(sm, node_id):
    return NodeState.from_proto(sm.nodes[node_id].state)


async def test_silent_node_goes_suspect_then_down_and_comes_back(world):
    sm, clock, live = world
    await live.heartbeat("a", common_pb2.Usage())
    await live.heartbeat("b", common_pb2.Usage())
    assert await live.run_cycle() == "2 nodes heartbeating (failover grace)"
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


async def test_new_leader_gives_a_grace_period_before_down(world):
    sm, clock, live = world
    clock.t += 2.1
    assert await live.run_cycle() == "marked suspect: a, b"
    clock.t += 0.5  # 2.6 s silent: suspect, and still inside the grace period
    assert await live.run_cycle() == "0 nodes heartbeating, 2 suspect (failover grace)"
    live.on_leadership(True, 2)  # a failover restarts every timer
    clock.t += 2.9
    assert await live.run_cycle() == "0 nodes heartbeating, 2 suspect (failover grace)"
    clock.t += 0.2
    assert await live.run_cycle() == "marked down: a, b"


async def test_followers_do_nothing_and_unknown_nodes_are_refused(world):
    sm, clock, live = world
    live.on_leadership(False, 3)
    clock.t += 100
    assert await live.run_cycle() == "not the leader: nothing to check"
    assert state(sm, "a") == NodeState.READY
    with pytest.raises(NotFound):
        await live.heartbeat("ghost", common_pb2.Usage())


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
    sm.apply(len(sm.nodes) + 100, state_pb2.Command(register_node=state_pb2.RegisterNodeCmd(
        node_id=node_id, name=node_id, address="127.0.0.1:1",
        capacity=common_pb2.Capacity(cpu_logical=1, memory_bytes=1))).SerializeToString())


@pytest.fixture
def budgeted():
    """Base interval 1 s, suspect 2 s, down 3 s, and a budget of 2 beats/s: two nodes fit."""
    sm = ClusterStateMachine()
    clock = Clock()
    index = [1000]

    async def propose(cmd: state_pb2.Command):
        index[0] += 1
        return sm.apply(index[0], cmd.SerializeToString())

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
    # Silent since the failover: suspect after 2 x 3 s, not 2 s.
    clock.t += 5.9
    assert await live.run_cycle() == "6 nodes heartbeating"
    clock.t += 0.1
    assert await live.run_cycle() == "marked suspect: a, b, c, d, e, f"


async def test_nodes_told_to_beat_less_often_are_not_suspected(budgeted):
    sm, clock, live, _ = budgeted
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
