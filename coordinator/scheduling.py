"""The leader's scheduling loop: snapshot -> pure `schedule()` -> commit the plan.

Why a pending task waits ("unschedulable: needs 4 gpus, largest node has 0") is
leader-local soft state: it changes too often to be worth a log entry, and a new leader
recomputes it on its first cycle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from lepton.common.errors import FailedPrecondition
from lepton.coordinator.scheduler import (
    Allocation,
    ClusterSnapshot,
    NodeView,
    Policy,
    TaskRequest,
    schedule,
)
from lepton.coordinator.state_machine import ClusterStateMachine
from lepton.coordinator.tasks import HOLDING, P, TaskState
from lepton.v1 import common_pb2, state_pb2, tasks_pb2

logger = logging.getLogger(__name__)

Commit = Callable[[state_pb2.Command], Awaitable[object]]


def cpu_millis(cpu: float) -> int:
    return int(round(cpu * 1000))


def build_snapshot(sm: ClusterStateMachine) -> ClusterSnapshot:
    """The scheduler's view of the replicated state: schedulable nodes and what holds
    resources on them. Suspect, down, left and draining nodes take no new work."""
    nodes = [
        NodeView(
            node_id=n.id,
            cpu_millis=n.capacity.cpu_logical * 1000,
            memory_bytes=n.capacity.memory_bytes,
            gpus={g.index: g.memory_total_bytes for g in n.capacity.gpus},
            labels=dict(n.labels),
            schedulable=n.state == common_pb2.NODE_STATE_READY and not n.draining,
        )
        for n in sm.nodes.values()
    ]
    allocations = [
        _allocation(t)
        for ids in sm.tasks.by_node.values()
        for t in (sm.tasks.tasks[i] for i in ids)
        if t.state in HOLDING
    ]
    return ClusterSnapshot.from_tables(nodes, allocations)


def _allocation(t: tasks_pb2.Task) -> Allocation:
    r = t.spec.resources
    return Allocation(
        task_id=t.id,
        node_id=t.node_id,
        priority=t.spec.priority,
        cpu_millis=cpu_millis(r.cpu),
        memory_bytes=r.memory_bytes,
        gpu_indices=tuple(t.gpu_indices),
    )


def task_request(t: tasks_pb2.Task) -> TaskRequest:
    r = t.spec.resources
    return TaskRequest(
        task_id=t.id,
        priority=t.spec.priority,
        submitted_at_ms=t.created_at_ms,
        cpu_millis=cpu_millis(r.cpu),
        memory_bytes=r.memory_bytes,
        gpus=r.gpus,
        gpu_memory_bytes=r.gpu_memory_bytes,
        constraints=dict(t.spec.constraints),
    )


class SchedulingLoop:
    """Runs `run_cycle()` whenever the state changes, and every `aging_interval_s`."""

    def __init__(
        self,
        state: ClusterStateMachine,
        commit: Commit,
        *,
        is_leader: Callable[[], bool],
        term: Callable[[], int],
        wall_ms: Callable[[], int],
        policy: Policy | None = None,
        aging_interval_s: float = 1.0,
    ):
        self._state = state
        self._commit = commit
        self._is_leader = is_leader
        self._term = term
        self._wall_ms = wall_ms
        self._policy = policy or Policy()
        self._aging_interval_s = aging_interval_s
        self._wakeup = asyncio.Event()
        self.reasons: dict[str, str] = {}

    def wake(self, *_: object) -> None:
        self._wakeup.set()

    async def run_cycle(self) -> str:
        """Read a snapshot, decide with the pure scheduler, commit the plan as one command."""
        if not self._is_leader():
            self.reasons.clear()
            return "not the leader: nothing to schedule"
        pending = [t for t in self._state.tasks.tasks.values() if t.state == P[TaskState.PENDING]]
        if not pending:
            self.reasons.clear()
            return "nothing pending"
        attempts = {t.id: t.attempt for t in self._state.tasks.tasks.values()}
        plan = schedule(
            build_snapshot(self._state),
            [task_request(t) for t in pending],
            now_ms=self._wall_ms(),
            policy=self._policy,
        )
        self.reasons = dict(plan.unschedulable)
        if not plan.placements and not plan.preemptions:
            return plan.summary()
        cmd = state_pb2.Command(
            apply_plan=state_pb2.ApplyPlanCmd(
                term=self._term(),
                placements=[
                    state_pb2.PlacementCmd(
                        task_id=p.task_id, attempt=attempts[p.task_id],
                        node_id=p.node_id, gpu_indices=list(p.gpu_indices),
                    )
                    for p in plan.placements.values()
                ],
                preemptions=[
                    state_pb2.PreemptionCmd(
                        task_id=p.task_id, attempt=attempts[p.task_id], for_task_id=p.for_task_id
                    )
                    for p in plan.preemptions
                ],
            )
        )
        try:
            await self._commit(cmd)
        except FailedPrecondition as err:  # the state moved on meanwhile; next cycle retries
            return f"plan dropped ({err.message})"
        return plan.summary()

    async def run(self) -> None:
        last = ""
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), self._aging_interval_s)
            except asyncio.TimeoutError:
                pass
            self._wakeup.clear()
            await asyncio.sleep(0.002)  # let a burst of submissions land in one plan
            try:
                sentence = await self.run_cycle()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("scheduling cycle failed")
                continue
            if sentence != last:
                logger.info("scheduler: %s", sentence)
                last = sentence
