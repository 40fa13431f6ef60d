from __future__ import annotations

import pytest

from lepton.common.errors import FailedPrecondition, NotFound
from lepton.coordinator.state_machine import ClusterStateMachine, NodeState, can_transition
from lepton.v1 import common_pb2, state_pb2


def register(node_id="n1", name="one", at=1000, **kw) -> bytes:
    cap = common_pb2.Capacity(cpu_logical=4, memory_bytes=8 << 30)
    return state_pb2.Command(
        at_ms=at,
        register_node=state_pb2.RegisterNodeCmd(node_id=node_id, name=name, address="127.0.0.1:1", capacity=cap, **kw),
    ).SerializeToString()


def set_state(node_id, state: NodeState, at=2000) -> bytes:
    return state_pb2.Command(
        at_ms=at, set_node_state=state_pb2.SetNodeStateCmd(node_id=node_id, state=state.proto, reason="t")
    ).SerializeToString()


def test_register_is_idempotent_and_updates():
    sm = ClusterStateMachine()
    sm.apply(1, register(labels={"a": "1"}))
    sm.apply(2, register(labels={"b": "2"}, at=5000))
    node = sm.get_node("n1")
    assert dict(node.labels) == {"b": "2"}
    assert node.registered_at_ms == 1000  # first registration time is kept
    assert len(sm.nodes) == 1


def test_lifecycle_transitions_and_illegal_ones():
    sm = ClusterStateMachine()
    sm.apply(1, register())
    assert sm.apply(2, set_state("n1", NodeState.SUSPECT)).state == NodeState.SUSPECT.proto
    assert sm.apply(3, set_state("n1", NodeState.DOWN)).state == NodeState.DOWN.proto
    err = sm.apply(4, set_state("n1", NodeState.SUSPECT))
    assert isinstance(err, FailedPrecondition) and "down to suspect" in err.message
    assert sm.get_node("n1").state == NodeState.DOWN.proto  # unchanged by the rejected command
    assert sm.apply(5, set_state("n1", NodeState.READY)).state == NodeState.READY.proto
    assert sm.apply(6, set_state("n1", NodeState.LEFT)).state == NodeState.LEFT.proto
    assert isinstance(sm.apply(7, set_state("n1", NodeState.READY)), FailedPrecondition)
    sm.apply(8, register())  # re-register brings a left node back
    assert sm.get_node("n1").state == NodeState.READY.proto


def test_unknown_node_and_garbage_commands_return_errors_not_raise():
    sm = ClusterStateMachine()
    assert isinstance(sm.apply(1, set_state("ghost", NodeState.DOWN)), NotFound)
    assert sm.apply(2, b"\xff\xff not a proto") is not None
    assert sm.applied_index == 2
    with pytest.raises(NotFound):
        sm.get_node("ghost")


def test_apply_refuses_to_go_backwards():
    sm = ClusterStateMachine()
    sm.apply(1, register())
    with pytest.raises(ValueError):
        sm.apply(1, register())


def test_snapshot_restore_roundtrip_is_exact():
    sm = ClusterStateMachine()
    sm.apply(1, register("n1", "one"))
    sm.apply(2, register("n2", "two"))
    sm.apply(3, set_state("n2", NodeState.SUSPECT))
    sm.apply(4, state_pb2.Command(set_drain=state_pb2.SetDrainCmd(node_id="n1", draining=True)).SerializeToString())
    data = sm.snapshot()
    other = ClusterStateMachine()
    other.restore(data, 4)
    assert other.snapshot() == data
    assert other.applied_index == 4
    assert other.get_node("n1").draining


def test_same_log_same_state_on_two_replicas():
    log = [register("n1"), register("n2"), set_state("n1", NodeState.SUSPECT), set_state("n1", NodeState.READY)]
    a, b = ClusterStateMachine(), ClusterStateMachine()
    for i, data in enumerate(log, 1):
        a.apply(i, data)
        b.apply(i, data)
    assert a.snapshot() == b.snapshot()


def test_listeners_see_changes_and_a_broken_one_does_not_stop_apply():
    sm = ClusterStateMachine()
    seen = []
    sm.add_listener(lambda c: (_ for _ in ()).throw(RuntimeError("boom")))
    sm.add_listener(seen.append)
    sm.apply(1, register())
    sm.apply(2, set_state("n1", NodeState.SUSPECT))
    assert [c.index for c in seen] == [1, 2]


def test_transition_table():
    assert can_transition(NodeState.READY, NodeState.SUSPECT)
    assert not can_transition(NodeState.READY, NodeState.DOWN)
    assert not can_transition(NodeState.LEFT, NodeState.READY)
