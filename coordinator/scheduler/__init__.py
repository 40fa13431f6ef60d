"""The scheduler: a pure function from a cluster snapshot and pending tasks to a Plan.

    plan = schedule(snapshot, pending, now_ms=now, policy=Policy())

The leader derives `snapshot` from the replicated state and commits the Plan as log
commands; nothing here does I/O, reads a clock or draws random numbers. `Harness`
plays the leader in tests.
"""

from __future__ import annotations

from .harness import Harness
from .placement import schedule
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
)

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
    "schedule",
]
