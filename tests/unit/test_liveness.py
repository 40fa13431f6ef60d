"""Liveness decisions with a fake clock: each run_cycle's sentence is asserted."""

from __future__ import annotations

import pytest

from lepton.common.errors import NotFound
from lepton.coordinator.liveness import Liveness, LivenessTimings
from lepton.coordinator.state_machine import ClusterStateMachine, NodeState
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
