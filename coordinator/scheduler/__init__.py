"""The scheduler: a pure function from a cluster snapshot and pending tasks to a Plan.

    plan = schedule(snapshot, pending, now_ms=now, policy=Policy())

The leader derives `snapshot` from the replicated state and commits the Plan as log
commands; nothing here does I/O, reads a clock or draws random numbers, and the same
inputs give the same Plan (nodes are ordered by id, tasks by a total key).
`Harness` plays the leader in tests.

Semantics, in brief:

* Order: effective priority (base + capped aging) desc, then submission time, then
  task id. A gang is taken at the position of its best member.
* Feasibility: free cpu, memory and GPUs (devices with at least gpu_memory_bytes),
  exact label match, schedulable nodes only.
* Scoring: load after placement = max of cpu, memory (and, for GPU tasks, GPU) used
  fractions; spread picks the lowest, binpack the highest; ties by node id. CPU-only
  tasks avoid GPU nodes while another node fits (Policy.reserve_gpu_nodes).
* Spread groups (a deployment's replicas): a node holding none of the group first, while
  one fits; else any node that fits.
* GPUs: the lowest free device indices that meet the memory floor.
* Preemption, only for a task that fits nowhere now but would fit an empty node:
  victims have strictly lower *base* priority, are never evicted twice in one plan,
  and take their whole gang with them. Per node, greedy by lowest priority then
  smallest, then pruned to a minimal set; across nodes the cheapest set wins by
  (highest victim priority, number of victims, priority sum, node id). Tasks placed
  earlier in the same plan are not victims.
* Gangs: all members pending, placed atomically on distinct nodes (unless
  gang_distinct_nodes=False); a gang that does not fully fit places nothing and holds
  no capacity, so two gangs cannot deadlock half-placed. Member placement is greedy
  (largest member first), so a fit that needs a cleverer matching can be missed.
* Unplaced tasks get a reason prefixed UNSCHEDULABLE ("would not fit an empty
  cluster") or WAITING ("no room now").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .types import (
    UNSCHEDULABLE,
    WAITING,
    Allocation,
    ClusterSnapshot,
    NodeView,
    Placement,
    Plan,
    Policy,
    Preemption,
    TaskRequest,
    known_failure,
    request_shape,
)

if TYPE_CHECKING:
    from .harness import Harness
    from .placement import schedule


def __getattr__(name: str):
    # numpy is loaded on first use: a voter with nothing to schedule stays small.
    if name == "schedule":
        from .placement import schedule

        return schedule
    if name == "Harness":
        from .harness import Harness

        return Harness
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "UNSCHEDULABLE",
    "WAITING",
    "Allocation",
    "ClusterSnapshot",
    "Harness",
    "NodeView",
    "Placement",
    "Plan",
    "Policy",
    "Preemption",
    "TaskRequest",
    "known_failure",
    "request_shape",
    "schedule",
]
