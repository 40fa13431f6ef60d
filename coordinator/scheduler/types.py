"""Inputs and output of the scheduler: a cluster snapshot in, a plan out.

All of these are frozen value objects. Mappings held by them (labels, GPUs, plan
tables) are plain dicts for speed; treat them as read-only once built.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from lepton.common.errors import InvalidArgument

#: Every reason in `Plan.unschedulable` starts with one of these two prefixes.
#: UNSCHEDULABLE: would not fit even on an empty cluster; retrying is pointless until
#: nodes or the request change. WAITING: fits somewhere in principle, no room now.
UNSCHEDULABLE = "unschedulable:"
WAITING = "waiting:"

Scoring = Literal["spread", "binpack"]


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise InvalidArgument(what)


@dataclass(frozen=True, slots=True)
class Allocation:
    """A task that is running (or bound) on a node and holds its resources."""

    task_id: str
    node_id: str  # where the resources are held; frees them there when preempted
    priority: int = 0  # base priority; only strictly lower ones may be preempted
    cpu_millis: int = 0  # counted against the node's cpu
    memory_bytes: int = 0  # counted against the node's memory
    gpu_indices: tuple[int, ...] = ()  # device indices it owns, unavailable to others
    gang_id: str | None = None  # preempting one member preempts the whole gang
    spread_group: str | None = None  # as TaskRequest.spread_group

    def __post_init__(self) -> None:
        _require(self.cpu_millis >= 0 and self.memory_bytes >= 0,
                 f"allocation {self.task_id}: negative resources")


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as the scheduler sees it: capacity, labels, and what already runs there."""

    node_id: str  # also the final tie-break: nodes are considered in node_id order
    cpu_millis: int  # allocatable cpu, millicores
    memory_bytes: int  # allocatable memory
    gpus: Mapping[int, int] = field(default_factory=dict)  # device index -> memory bytes
    labels: Mapping[str, str] = field(default_factory=dict)  # matched by TaskRequest.constraints
    # False for draining, down, suspect or left nodes: never a placement target, but
    # their allocations still count (a victim's gang mates may live there).
    schedulable: bool = True
    allocations: tuple[Allocation, ...] = ()  # what already holds resources here

    def __post_init__(self) -> None:
        _require(self.cpu_millis >= 0 and self.memory_bytes >= 0,
                 f"node {self.node_id}: negative capacity")
        for a in self.allocations:
            _require(a.node_id == self.node_id,
                     f"allocation {a.task_id} names node {a.node_id}, listed on {self.node_id}")


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Every node with its allocations, as of one point in the replicated log."""

    nodes: tuple[NodeView, ...] = ()

    @property
    def allocations(self) -> tuple[Allocation, ...]:
        """Every allocation on every node, in node order."""
        return tuple(a for n in self.nodes for a in n.allocations)

    @classmethod
    def from_tables(
        cls, nodes: Iterable[NodeView], allocations: Iterable[Allocation] = ()
    ) -> ClusterSnapshot:
        """Build from flat node and allocation tables (the replicated state's shape).

        Allocations are appended to the allocations a NodeView already has. An
        allocation on a node that is not in `nodes` is dropped: it holds no capacity
        the scheduler can hand out.
        """
        by_node: dict[str, list[Allocation]] = {}
        for a in allocations:
            by_node.setdefault(a.node_id, []).append(a)
        out = []
        for n in nodes:
            extra = by_node.get(n.node_id)
            if extra:
                n = NodeView(n.node_id, n.cpu_millis, n.memory_bytes, n.gpus, n.labels,
                             n.schedulable, n.allocations + tuple(extra))
            out.append(n)
        return cls(tuple(out))


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """One task waiting for a node. A gang is several requests sharing `gang_id`."""

    task_id: str  # final ordering tie-break, and the key in Plan tables
    priority: int = 0  # higher is scheduled first and may preempt strictly lower
    submitted_at_ms: int = 0  # older goes first among equals; drives aging
    cpu_millis: int = 0
    memory_bytes: int = 0
    gpus: int = 0  # number of whole devices
    gpu_memory_bytes: int = 0  # minimum memory per chosen device; 0 = any device
    constraints: Mapping[str, str] = field(default_factory=dict)  # node labels that must match
    gang_id: str | None = None  # all-or-nothing group; members share it
    gang_size: int = 1  # members the gang must have; all must be pending to place any
    gang_distinct_nodes: bool = True  # members on different nodes (the usual multi-node job)
    preferred_nodes: tuple[str, ...] = ()  # data locality: used when feasible, not required
    # Tasks of one group (a deployment's replicas) go to nodes holding none of the group
    # while such a node fits; only then may they share one.
    spread_group: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.task_id), "task id must not be empty")
        _require(
            min(self.cpu_millis, self.memory_bytes, self.gpus, self.gpu_memory_bytes) >= 0,
            f"task {self.task_id}: negative resources",
        )
        _require(self.gang_size >= 1, f"task {self.task_id}: gang_size must be >= 1")
        _require(self.gang_id is not None or self.gang_size == 1,
                 f"task {self.task_id}: gang_size without gang_id")


@dataclass(frozen=True, slots=True)
class Policy:
    """Knobs of one scheduling pass."""

    scoring: Scoring = "spread"  # spread: least loaded node; binpack: most loaded that fits
    # Aging: effective = priority + min(waited_minutes * aging_per_minute, max_aging),
    # so a low-priority task eventually overtakes a stream of newer higher ones.
    aging_per_minute: float = 1.0
    max_aging: float = 60.0  # cap, so aging cannot outrank a genuinely critical tier
    preemption: bool = True  # may evict strictly lower base-priority allocations
    # CPU-only tasks go to GPU nodes only when no GPU-less node fits, so GPUs are not
    # stranded behind a GPU node whose cpu or memory has been used up.
    reserve_gpu_nodes: bool = True

    def __post_init__(self) -> None:
        _require(self.scoring in ("spread", "binpack"), f"unknown scoring {self.scoring!r}")
        _require(self.aging_per_minute >= 0 and self.max_aging >= 0,
                 "aging must not be negative")

    def effective_priority(self, task: TaskRequest, now_ms: int) -> float:
        """Base priority plus the capped aging bonus for time waited so far."""
        waited_min = max(0, now_ms - task.submitted_at_ms) / 60_000.0
        return task.priority + min(waited_min * self.aging_per_minute, self.max_aging)


def request_shape(t: TaskRequest) -> tuple:
    """What whether `t` fits depends on: (cpu, memory, gpus, gpu memory, sorted labels)."""
    c = t.constraints
    return (t.cpu_millis, t.memory_bytes, t.gpus, t.gpu_memory_bytes,
            tuple(sorted(c.items())) if c else ())


def known_failure(failed_shapes: Mapping[tuple, tuple[float, str]], t: TaskRequest,
                  policy: Policy) -> str | None:
    """The reason a pass on the snapshot behind `failed_shapes` would give `t`, when it
    is certain to fail there (the rule `schedule` itself applies within a pass), else None.
    Gang members are never answered here: a gang fails or fits as a whole."""
    if t.gang_id is not None:
        return None
    failed = failed_shapes.get(request_shape(t))
    if failed is not None and (t.priority <= failed[0] or not policy.preemption):
        return failed[1]
    return None


@dataclass(frozen=True, slots=True)
class Placement:
    """Bind `task_id` to `node_id`, on exactly these GPU devices."""

    task_id: str
    node_id: str
    gpu_indices: tuple[int, ...] = ()  # ascending; becomes CUDA_VISIBLE_DEVICES on the agent


@dataclass(frozen=True, slots=True)
class Preemption:
    """Evict `task_id` from `node_id` (the leader requeues it) to make room for `for_task_id`."""

    task_id: str
    node_id: str
    for_task_id: str  # the placement this eviction serves; gang mates name it too


@dataclass(frozen=True, slots=True)
class Plan:
    """What one scheduling pass decided. Every pending task id appears in exactly one of
    `placements` or `unschedulable`."""

    placements: dict[str, Placement] = field(default_factory=dict)  # in decision order
    preemptions: tuple[Preemption, ...] = ()  # victims; each at most once per plan
    unschedulable: dict[str, str] = field(default_factory=dict)  # task id -> readable reason
    considered: int = 0  # pending tasks looked at, for summary()
    # request_shape -> (highest base priority that failed, reason) as of the pass's end:
    # on the same snapshot, a single task of that shape and no higher priority fails the
    # same way (the leader's loop skips a pass on that). Not part of what was decided.
    failed_shapes: dict[tuple, tuple[float, str]] = field(
        default_factory=dict, compare=False, repr=False)

    def waiting(self) -> dict[str, str]:
        """Unplaced tasks that fit in principle and only lack room now."""
        return {t: r for t, r in self.unschedulable.items() if r.startswith(WAITING)}

    def summary(self) -> str:
        """One sentence for logs, e.g. 'placed 12 of 15 tasks, preempted 2, 3 unschedulable'."""
        n_wait = len(self.waiting())
        s = (f"placed {len(self.placements)} of {self.considered} tasks, "
             f"preempted {len(self.preemptions)}, {len(self.unschedulable)} unschedulable")
        if n_wait:
            s += f" ({n_wait} waiting for room)"
        return s
