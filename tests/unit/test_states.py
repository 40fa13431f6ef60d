"""lepton.common.states: the one vocabulary of node and task states."""

import pytest

from lepton.common.errors import InvalidArgument
from lepton.common.states import NodeState, TaskState, _bind, _ProtoState
from lepton.v1 import common_pb2, tasks_pb2


@pytest.mark.parametrize(("states", "enum", "prefix"), [
    (NodeState, common_pb2.NodeState, "NODE_STATE_"),
    (TaskState, tasks_pb2.TaskState, "TASK_STATE_"),
])
def test_every_proto_state_has_its_lowercase_name(states, enum, prefix):
    for value in enum.DESCRIPTOR.values:
        if value.number == 0:  # UNSPECIFIED is no state
            with pytest.raises(InvalidArgument):
                states.from_proto(0)
            continue
        member = states.from_proto(value.number)
        assert member.proto == value.number
        assert member.value == value.name.removeprefix(prefix).lower()
        assert states.name_of(value.number) == member.value
        assert states.parse(f" {member.value.upper()} ") is member


def test_unknown_values_and_names():
    assert TaskState.name_of(99) == "unknown"  # a newer server's state: shown, not fatal
    with pytest.raises(InvalidArgument, match="unknown task state 99"):
        TaskState.from_proto(99)
    with pytest.raises(InvalidArgument, match=r"unknown node state 'gone' \(expected one of "
                                              r"ready, suspect, down, left\)"):
        NodeState.parse("gone")
    with pytest.raises(InvalidArgument, match="unknown task state 3"):
        TaskState.parse(3)


def test_task_states_in_lifecycle_order_final_last():
    assert [s.value for s in TaskState] == [
        "pending", "assigned", "running", "preempted", "succeeded", "failed", "cancelled"]
    assert [s.final for s in TaskState] == [False] * 4 + [True] * 3


def test_a_state_missing_on_either_side_fails_at_import():
    class Partial(_ProtoState):
        PENDING = "pending"

    with pytest.raises(ImportError, match="Partial"):
        _bind(Partial, tasks_pb2.TaskState, "TASK_STATE_", "task")
