"""Typed results of the client API: plain dataclasses, never protobuf messages.

Callers (the CLI, scripts, notebooks) get stable Python objects whose `to_dict()` is the
documented JSON shape of `lepton-ctl -o json` (docs/cli.md). Conversions from the wire live
here too, so that a proto change touches one file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lepton.common.states import NodeState, TaskState
from lepton.v1 import common_pb2, coordinator_pb2, tasks_pb2

__all__ = [
    "FINAL_TASK_STATES",
    "NODE_STATES",
    "TASK_STATES",
    "AttemptInfo",
    "Capacity",
    "ClusterStatusInfo",
    "GpuInfo",
    "NodeEvent",
    "NodeInfo",
    "TaskInfo",
    "TaskResources",
    "Usage",
    "VoterInfo",
    "state_to_proto",
    "task_state_to_proto",
]

# The lowercase names the API speaks, in lifecycle order (lepton.common.states).
NODE_STATES: tuple[str, ...] = tuple(s.value for s in NodeState)

_EVENT_KIND_FROM_PROTO: dict[int, str] = {
    coordinator_pb2.NodeEvent.KIND_REGISTERED: "registered",
    coordinator_pb2.NodeEvent.KIND_STATE_CHANGED: "state_changed",
    coordinator_pb2.NodeEvent.KIND_DRAIN_CHANGED: "drain_changed",
}


def state_to_proto(state: str) -> int:
    """`"ready"` → `NODE_STATE_READY`; raises InvalidArgument for anything else."""
    return NodeState.parse(state).proto


def _pct(value: float) -> float:
    # Percentages are float32 on the wire; 2 decimals keep the JSON stable and readable.
    return round(float(value), 2)


class _DictMixin:
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: snake_case keys, ints for bytes and milliseconds."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class GpuInfo(_DictMixin):
    """One GPU as NVML reports it (capacity) or as it is now (usage)."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_percent: float

    @classmethod
    def from_proto(cls, msg: common_pb2.Gpu) -> GpuInfo:
        return cls(
            index=msg.index,
            uuid=msg.uuid,
            name=msg.name,
            memory_total_bytes=msg.memory_total_bytes,
            memory_used_bytes=msg.memory_used_bytes,
            utilization_percent=_pct(msg.utilization_percent),
        )


@dataclass(frozen=True)
class Capacity(_DictMixin):
    """What a node has, measured by its agent at start."""

    cpu_logical: int = 0
    cpu_physical: int = 0
    cpu_model: str = ""
    memory_bytes: int = 0
    disk_bytes: int = 0
    gpus: list[GpuInfo] = field(default_factory=list)

    @classmethod
    def from_proto(cls, msg: common_pb2.Capacity) -> Capacity:
        return cls(
            cpu_logical=msg.cpu_logical,
            cpu_physical=msg.cpu_physical,
            cpu_model=msg.cpu_model,
            memory_bytes=msg.memory_bytes,
            disk_bytes=msg.disk_bytes,
            gpus=[GpuInfo.from_proto(g) for g in msg.gpus],
        )


@dataclass(frozen=True)
class Usage(_DictMixin):
    """What a node is using now (from its last heartbeat; soft state on the leader)."""

    cpu_percent: float = 0.0
    memory_used_bytes: int = 0
    disk_free_bytes: int = 0
    load1: float = 0.0
    gpus: list[GpuInfo] = field(default_factory=list)

    @classmethod
    def from_proto(cls, msg: common_pb2.Usage) -> Usage:
        return cls(
            cpu_percent=_pct(msg.cpu_percent),
            memory_used_bytes=msg.memory_used_bytes,
            disk_free_bytes=msg.disk_free_bytes,
            load1=_pct(msg.load1),
            gpus=[GpuInfo.from_proto(g) for g in msg.gpus],
        )


@dataclass(frozen=True)
class NodeInfo(_DictMixin):
    """One node of the cluster as the leader knows it.

    `state` is one of `ready`, `suspect`, `down`, `left` (`unknown` only from a newer
    server). Times are Unix milliseconds; 0 means never/unknown. `usage` is None when the
    leader has no recent heartbeat in memory (e.g. right after a failover).
    """

    id: str
    name: str
    address: str
    labels: dict[str, str]
    state: str
    draining: bool
    voter: bool
    capacity: Capacity
    usage: Usage | None
    registered_at: int
    state_changed_at: int
    state_reason: str
    last_heartbeat_ms: int
    version: str

    @classmethod
    def from_proto(cls, msg: common_pb2.Node) -> NodeInfo:
        return cls(
            id=msg.id,
            name=msg.name,
            address=msg.address,
            labels=dict(sorted(msg.labels.items())),
            state=NodeState.name_of(msg.state),
            draining=msg.draining,
            voter=msg.voter,
            capacity=Capacity.from_proto(msg.capacity),
            usage=Usage.from_proto(msg.usage) if msg.HasField("usage") else None,
            registered_at=msg.registered_at_ms,
            state_changed_at=msg.state_changed_at_ms,
            state_reason=msg.state_reason,
            last_heartbeat_ms=msg.last_heartbeat_ms,
            version=msg.version,
        )

    @property
    def display_state(self) -> str:
        """`ready`, or `ready (draining)` for a draining node."""
        return f"{self.state} (draining)" if self.draining else self.state


@dataclass(frozen=True)
class VoterInfo(_DictMixin):
    """One Raft voter as the leader sees it. `role`: leader, follower, candidate or unknown."""

    id: str
    address: str
    role: str
    match_index: int
    lag: int

    @classmethod
    def from_proto(cls, msg: coordinator_pb2.Voter) -> VoterInfo:
        return cls(
            id=msg.id,
            address=msg.address,
            role=msg.role or "unknown",
            match_index=msg.match_index,
            lag=msg.lag,
        )


@dataclass(frozen=True)
class ClusterStatusInfo(_DictMixin):
    """The coordinator's view of itself: who leads, how far the log is, how many nodes."""

    leader_id: str
    leader: str
    term: int
    commit_index: int
    applied_index: int
    voters: list[VoterInfo]
    nodes_by_state: dict[str, int]
    node_count: int
    version: str
    state_backend: str = ""  # single, raft or etcd ("" from an older coordinator)
    etcd_endpoints: list[str] = field(default_factory=list)
    etcd_prefix: str = ""

    @classmethod
    def from_proto(cls, msg: coordinator_pb2.ClusterStatus) -> ClusterStatusInfo:
        return cls(
            leader_id=msg.leader_id,
            leader=msg.leader,
            term=msg.term,
            commit_index=msg.commit_index,
            applied_index=msg.applied_index,
            voters=[VoterInfo.from_proto(v) for v in msg.voters],
            nodes_by_state=dict(sorted(msg.nodes_by_state.items())),
            node_count=msg.node_count,
            version=msg.version,
            state_backend=msg.state_backend,
            etcd_endpoints=list(msg.etcd_endpoints),
            etcd_prefix=msg.etcd_prefix,
        )


@dataclass(frozen=True)
class NodeEvent(_DictMixin):
    """One node change from `Client.watch_nodes()`.

    `kind` is `registered`, `state_changed` or `drain_changed` (`unknown` only from a newer
    server); `node` is the node after the change; `index` the log index that made it.
    """

    kind: str
    node: NodeInfo
    at_ms: int
    index: int

    @classmethod
    def from_proto(cls, msg: coordinator_pb2.NodeEvent) -> NodeEvent:
        return cls(
            kind=_EVENT_KIND_FROM_PROTO.get(msg.kind, "unknown"),
            node=NodeInfo.from_proto(msg.node),
            at_ms=msg.at_ms,
            index=msg.index,
        )


# -- tasks ----------------------------------------------------------------------------

# The lowercase task states the API speaks, in lifecycle order; the last three are final.
TASK_STATES: tuple[str, ...] = tuple(s.value for s in TaskState)
FINAL_TASK_STATES: frozenset[str] = frozenset(s.value for s in TaskState if s.final)


def task_state_to_proto(state: str) -> int:
    """`"running"` → `TASK_STATE_RUNNING`; raises InvalidArgument for anything else."""
    return TaskState.parse(state).proto


@dataclass(frozen=True)
class TaskResources(_DictMixin):
    """What a task asks for. `cpu` in (fractional) cores; `gpu_memory_bytes` is the least
    memory each of its GPUs must have (0: any)."""

    cpu: float = 0.0
    memory_bytes: int = 0
    gpus: int = 0
    gpu_memory_bytes: int = 0

    @classmethod
    def from_proto(cls, msg: tasks_pb2.Resources) -> TaskResources:
        return cls(
            cpu=float(msg.cpu),
            memory_bytes=msg.memory_bytes,
            gpus=msg.gpus,
            gpu_memory_bytes=msg.gpu_memory_bytes,
        )


@dataclass(frozen=True)
class AttemptInfo(_DictMixin):
    """One finished attempt of a task, from its history.

    `state`: how it ended (`succeeded`, `failed`, `cancelled` or `preempted`).
    `exit_code`: None when the attempt ended without one (node lost, cancelled, preempted
    before it exited); negative N means killed by signal N.
    """

    attempt: int
    node_id: str
    state: str
    exit_code: int | None
    reason: str
    started_at_ms: int
    finished_at_ms: int

    @classmethod
    def from_proto(cls, msg: tasks_pb2.AttemptRecord) -> AttemptInfo:
        state = TaskState.name_of(msg.state)
        # The record has no has_exit_code: 0 is "none" unless the attempt succeeded.
        code: int | None = msg.exit_code
        if code == 0 and state != "succeeded":
            code = None
        return cls(
            attempt=msg.attempt,
            node_id=msg.node_id,
            state=state,
            exit_code=code,
            reason=msg.reason,
            started_at_ms=msg.started_at_ms,
            finished_at_ms=msg.finished_at_ms,
        )


@dataclass(frozen=True)
class TaskInfo(_DictMixin):
    """One task as the leader knows it.

    `state` is one of `TASK_STATES` (`unknown` only from a newer server). `attempt` counts
    from 1 and grows on each requeue; `failures` counts failed attempts (a preemption is not
    one, nor is a lost node: `node_losses` counts those). `node_id`/`node_address`/`gpu_indices` are the current (or last) attempt's
    placement, empty while pending. `exit_code` is None until an attempt exited. `reason`
    says why a pending task waits, or why a task failed. `command` is the argv list, or the
    shell string when the task runs under `/bin/sh -c`. Times are Unix ms; 0: not yet.
    """

    id: str
    name: str
    state: str
    attempt: int
    failures: int
    node_losses: int
    node_id: str
    node_address: str
    gpu_indices: list[int]
    exit_code: int | None
    reason: str
    priority: int
    owner: str
    command: list[str] | str
    resources: TaskResources
    constraints: dict[str, str]
    env: dict[str, str]
    workdir: str
    max_retries: int
    timeout_s: float
    grace_s: float
    request_id: str
    created_at_ms: int
    assigned_at_ms: int
    started_at_ms: int
    finished_at_ms: int
    history: list[AttemptInfo]
    job_id: str = ""  # the job this task is a member of (node `gang_rank`), "" for none
    gang_rank: int = 0
    restart_count: int = 0  # a member's: how often its job restarted as a whole
    code_digest: str = ""  # the shipped folder it runs in (--working-dir), "" for none

    @classmethod
    def from_proto(cls, msg: tasks_pb2.Task) -> TaskInfo:
        spec = msg.spec
        return cls(
            id=msg.id,
            name=spec.name,
            state=TaskState.name_of(msg.state),
            attempt=msg.attempt,
            failures=msg.failures,
            node_losses=msg.node_losses,
            node_id=msg.node_id,
            node_address=msg.node_address,
            gpu_indices=list(msg.gpu_indices),
            exit_code=msg.exit_code if msg.has_exit_code else None,
            reason=msg.reason,
            priority=spec.priority,
            owner=spec.owner,
            command=list(spec.argv) if spec.argv else spec.shell,
            resources=TaskResources.from_proto(spec.resources),
            constraints=dict(sorted(spec.constraints.items())),
            env=dict(sorted(spec.env.items())),
            workdir=spec.workdir,
            max_retries=spec.max_retries,
            timeout_s=float(spec.timeout_s),
            grace_s=float(spec.grace_s),
            request_id=spec.request_id,
            created_at_ms=msg.created_at_ms,
            assigned_at_ms=msg.assigned_at_ms,
            started_at_ms=msg.started_at_ms,
            finished_at_ms=msg.finished_at_ms,
            history=[AttemptInfo.from_proto(h) for h in msg.history],
            job_id=spec.job_id,
            gang_rank=spec.gang_rank,
            restart_count=msg.restart_count,
            code_digest=spec.code_digest,
        )

    @property
    def done(self) -> bool:
        """Whether the task is final: succeeded, failed or cancelled."""
        return self.state in FINAL_TASK_STATES

    @property
    def shell(self) -> bool:
        """Whether `command` is a shell string (run under `/bin/sh -c`)."""
        return isinstance(self.command, str)
