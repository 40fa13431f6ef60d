"""The one vocabulary of node and task states, shared by every layer.

Each state is a lowercase name (what the API, the CLI, logs and metrics speak) tied to its
value in the lepton.v1 enums (`NODE_STATE_READY`, `TASK_STATE_RUNNING`, ...). The values
are read from the generated enums, and a state there without a member here (or the other
way round) fails at import. Beside them, the moves each may make: `can_transition` for
nodes (the state machine checks it), `TASK_MOVES` for tasks.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

from lepton.common.errors import InvalidArgument
from lepton.v1 import common_pb2, tasks_pb2

S = TypeVar("S", bound="_ProtoState")


class _ProtoState(str, Enum):
    """A state named in lowercase and numbered by its proto enum (bound by `_bind`)."""

    @property
    def proto(self) -> int:
        return _TO_PROTO[type(self)][self]

    @classmethod
    def from_proto(cls: type[S], value: int) -> S:
        """The member for a proto value; InvalidArgument for one this code does not know."""
        try:
            return _BY_PROTO[cls][value]
        except KeyError:
            raise InvalidArgument(f"unknown {_KIND[cls]} state {value}") from None

    @classmethod
    def name_of(cls, value: int) -> str:
        """The name for a proto value, `"unknown"` for one this code does not know (a newer
        server may send a state an older client has never heard of)."""
        member = _BY_PROTO[cls].get(value)
        return member.value if member is not None else "unknown"

    @classmethod
    def parse(cls: type[S], name: Any) -> S:
        """`"Running "` → `TaskState.RUNNING`; InvalidArgument for anything else."""
        try:
            return cls(name.strip().lower())
        except (ValueError, AttributeError):
            expected = ", ".join(s.value for s in cls)
            raise InvalidArgument(
                f"unknown {_KIND[cls]} state {name!r} (expected one of {expected})"
            ) from None


class NodeState(_ProtoState):
    """Lifecycle of a node in the cluster state.

    Legal transitions (each one a log command):
      (unknown)            -> READY    register
      READY                -> SUSPECT  no heartbeat for `suspect_after`
      SUSPECT              -> DOWN     no heartbeat for `down_after`
      SUSPECT | DOWN       -> READY    a heartbeat arrives again
      READY|SUSPECT|DOWN   -> LEFT     graceful leave (SIGTERM)
      any                  -> READY    re-register (an agent restarts)
    Draining is a separate flag: a draining node keeps its state but takes no new work.
    """

    READY = "ready"
    SUSPECT = "suspect"
    DOWN = "down"
    LEFT = "left"


class TaskState(_ProtoState):
    """Lifecycle of a task, members in lifecycle order; its moves are `TASK_MOVES`.
    SUCCEEDED, FAILED and CANCELLED are final, except that a gang restarts as a whole."""

    PENDING = "pending"
    ASSIGNED = "assigned"
    RUNNING = "running"
    PREEMPTED = "preempted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


# The node moves the state machine accepts through SetNodeState (register is its own command).
_NODE_MOVES: dict[NodeState, frozenset[NodeState]] = {
    NodeState.READY: frozenset({NodeState.SUSPECT, NodeState.LEFT}),
    NodeState.SUSPECT: frozenset({NodeState.READY, NodeState.DOWN, NodeState.LEFT}),
    NodeState.DOWN: frozenset({NodeState.READY, NodeState.LEFT}),
    NodeState.LEFT: frozenset(),
}


def can_transition(src: NodeState, dst: NodeState) -> bool:
    return dst in _NODE_MOVES[src]


# Every move a task makes, each one a log command; the state machine makes no other
# (tests/unit/test_task_moves.py walks it at random and checks each move against this).
_T = TaskState
TASK_MOVES: dict[TaskState, frozenset[TaskState]] = {
    # placed by a committed plan; cancelled; a gang member restarted or failed with its gang
    _T.PENDING: frozenset({_T.ASSIGNED, _T.CANCELLED, _T.PENDING, _T.FAILED}),
    # started; exited 0; failed with no retries (or node losses) left; requeued (a retry, a
    # lost node, its agent stopping); evicted for a higher priority; cancelled
    _T.ASSIGNED: frozenset({_T.RUNNING, _T.SUCCEEDED, _T.FAILED, _T.PENDING, _T.PREEMPTED,
                            _T.CANCELLED}),
    _T.RUNNING: frozenset({_T.SUCCEEDED, _T.FAILED, _T.PENDING, _T.PREEMPTED, _T.CANCELLED}),
    # the evicted attempt exited (or its node is lost): requeued; cancelled; its gang failed
    _T.PREEMPTED: frozenset({_T.PENDING, _T.CANCELLED, _T.FAILED}),
    # final, but a gang restarts whole: a member that had succeeded runs again
    _T.SUCCEEDED: frozenset({_T.PENDING}),
    _T.FAILED: frozenset(),
    _T.CANCELLED: frozenset(),
}


# Per class: a str Enum member hashes as its name, and node and task names may one day meet.
_TO_PROTO: dict[type[_ProtoState], dict[_ProtoState, int]] = {}
_BY_PROTO: dict[type[_ProtoState], dict[int, _ProtoState]] = {}
_KIND: dict[type[_ProtoState], str] = {}


def _bind(cls: type[_ProtoState], enum: Any, prefix: str, kind: str) -> None:
    """Number `cls`'s members from the proto `enum`; both must name the same states."""
    wire = {v.name.removeprefix(prefix).lower(): v.number for v in enum.DESCRIPTOR.values if v.number}
    mine = {s.value for s in cls}
    if set(wire) != mine:
        raise ImportError(f"{cls.__name__} {sorted(mine)} != lepton.v1 {enum.DESCRIPTOR.name} {sorted(wire)}")
    _TO_PROTO[cls] = {s: wire[s.value] for s in cls}
    _BY_PROTO[cls] = {wire[s.value]: s for s in cls}
    _KIND[cls] = kind


_bind(NodeState, common_pb2.NodeState, "NODE_STATE_", "node")
_bind(TaskState, tasks_pb2.TaskState, "TASK_STATE_", "task")
