"""The leader's scheduling loop: snapshot -> pure `schedule()` -> commit the plan.

Why a pending task waits ("unschedulable: needs 4 gpus, largest node has 0") is
leader-local soft state: it changes too often to be worth a log entry, and a new leader
recomputes it on its first cycle.

A cycle's cost follows what changed, not how much is pending: a burst of changes is one
cycle (`min_cycle_s`); fresh submissions alone are placed into the room left over; a full
pass takes the most urgent `max_per_cycle` tasks from a `PendingQueue` kept between cycles
(O(k log k) with 200,000 pending, not a sort of them all) and is spaced by its own cost
(`full_pass_spacing`), so a stream of finishing tasks cannot keep the event loop busy.
The scheduler's snapshot (and the columns it builds from it) is kept until a node or an
allocation changes, and new tasks that each match a shape a pass on that snapshot found
unplaceable are answered from it without a pass: under a flood of tasks no node can take,
a cycle costs a dict lookup per new task.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Awaitable, Callable

from lepton.common.errors import FailedPrecondition, InvalidArgument
from lepton.common.states import NodeState, TaskState
from lepton.common.validation import split_host_port
from lepton.coordinator.loops.pending_queue import PendingQueue
from lepton.coordinator.scheduler import (
    Allocation,
    ClusterSnapshot,
    NodeView,
    Policy,
    TaskRequest,
    known_failure,
)
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.coordinator.state.tasks import HOLDING, P
from lepton.v1 import state_pb2, tasks_pb2

logger = logging.getLogger(__name__)

Commit = Callable[[state_pb2.Command], Awaitable[object]]


class WaitReasons(dict):
    """Why each pending task the last passes looked at waits; a pending task the last full
    pass left out (queued behind `max_per_cycle` more urgent ones) reads `behind` without
    an entry of its own, so 200,000 of them cost nothing."""

    def __init__(self, reasons: dict[str, str] | None = None, behind: str = ""):
        super().__init__(reasons or {})
        self.behind = behind

    def __missing__(self, task_id: str) -> str:
        if self.behind:
            return self.behind
        raise KeyError(task_id)

    def get(self, task_id: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(task_id, self.behind or default)

    def clear(self) -> None:
        super().clear()
        self.behind = ""


def cpu_millis(cpu: float) -> int:
    return int(round(cpu * 1000))


def node_views(sm: ClusterStateMachine) -> list[NodeView]:
    """Every node's capacity and labels, empty (no allocations): O(nodes), no task read."""
    return [
        NodeView(
            node_id=n.id,
            cpu_millis=n.capacity.cpu_logical * 1000,
            memory_bytes=n.capacity.memory_bytes,
            gpus={g.index: g.memory_total_bytes for g in n.capacity.gpus},
            labels=dict(n.labels),
            schedulable=n.state == NodeState.READY.proto and not n.draining,
        )
        for n in sm.nodes.values()
    ]


def build_snapshot(
    sm: ClusterStateMachine, kept: dict[str, tuple[str, int, Allocation]] | None = None
) -> ClusterSnapshot:
    """The scheduler's view of the replicated state: schedulable nodes and what holds
    resources on them. Suspect, down, left and draining nodes take no new work.
    `kept`: allocations from earlier builds by task id, with the (node, attempt) they were
    made for (an attempt's resources do not change while it holds them); making them
    anew was most of a rebuild's cost."""
    nodes = node_views(sm)
    tasks = sm.tasks.tasks
    allocations = []
    for ids in sm.tasks.by_node.values():
        for task_id in ids:
            t = tasks[task_id]
            if t.state not in HOLDING:
                continue
            old = kept.get(task_id) if kept is not None else None
            if old is not None and old[0] == t.node_id and old[1] == t.attempt:
                allocations.append(old[2])
                continue
            a = _allocation(t)
            if kept is not None:
                kept[task_id] = (t.node_id, t.attempt, a)
            allocations.append(a)
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
        spread_group=t.spec.replica.deployment or None,
    )


def task_request(t: tasks_pb2.Task, *, pack: bool = False) -> TaskRequest:
    """`pack`: a deployment's replica that may share a node with its siblings."""
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
        gang_id=t.spec.job_id or None,
        gang_size=t.spec.gang_size if t.spec.job_id else 1,
        spread_group=None if pack else t.spec.replica.deployment or None,
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
        free_port: Callable[[str], int] = lambda node_id: 0,
        aging_interval_s: float = 1.0,
        max_per_cycle: int = 2000,
        min_cycle_s: float = 0.02,
        full_pass_spacing: float = 4.0,
    ):
        self._state = state
        self._commit = commit
        self._is_leader = is_leader
        self._term = term
        self._wall_ms = wall_ms
        self._policy = policy or Policy()
        self._free_port = free_port  # a node's last reported free port, 0 if unknown
        self._aging_interval_s = aging_interval_s
        self._max_per_cycle = max_per_cycle
        self._min_cycle_s = min_cycle_s  # under a flood of submissions, one plan per this
        # After a full pass that took d seconds, the next waits spacing x d (fresh passes
        # go on meanwhile): full passes take at most 1 / (1 + spacing) of the loop.
        self._full_pass_spacing = full_pass_spacing
        self._full_not_before = float("-inf")
        self._wakeup = asyncio.Event()
        self.reasons = WaitReasons()
        # Every PENDING task in scheduling order, kept by on_task_change; `_queue_of` is the
        # table's pending set it mirrors (a restored snapshot brings a new one: rebuilt).
        self._queue = PendingQueue()
        self._queue_of: set[str] = state.tasks.pending
        # What changed since the last cycle decides how much to look at: fresh submissions
        # alone can only use the room left over, so only they need placing; anything that
        # frees room (or a node change, or a new leader) calls for a full pass.
        self._fresh: set[str] = set()
        self._full = True
        self._last_full = float("-inf")
        # The last full pass placed and preempted nothing, and nothing has freed room since:
        # aging alone reorders only tasks that cannot be placed (preemption goes by base
        # priority), so the periodic pass is skipped. Under a flood of unplaceable tasks
        # it was the largest cost on the leader.
        self._settled = False
        # Pending tasks' requests, kept between cycles: a spec does not change after
        # submission, and converting thousands of them each aging pass was a tenth of a
        # busy leader's CPU. Dropped when a task leaves PENDING (and pruned on full passes).
        self._requests: dict[str, TaskRequest] = {}
        # The scheduler's snapshot is kept until something it reads changes: `_version` counts
        # node changes (wake) and task changes that touch an allocation; a restored snapshot
        # brings new tables (compared by identity).
        self._version = 0
        self._view: tuple[int, object, object, ClusterSnapshot] | None = None
        # Shapes the last passes on the current snapshot could not place, with why (see
        # scheduler.known_failure): fresh tasks that all match one are answered without a
        # pass. Valid while `_view` is; only from plans that placed and preempted nothing.
        self._unplaceable: dict[tuple, tuple[float, str]] = {}
        self._unplaceable_of: ClusterSnapshot | None = None
        # Allocations of held tasks, reused by each rebuild (see build_snapshot); a task's
        # entry goes when it changes (a start excepted), all of them with a restored table.
        self._allocations: dict[str, tuple[str, int, Allocation]] = {}
        # Told each leader cycle's duration in seconds (metrics); settable after construction.
        self.on_cycle: Callable[[float], None] | None = None

    def wake(self, *_: object) -> None:
        """Something changed that may free capacity: look at every pending task."""
        self._version += 1
        self._full = True
        self._settled = False
        self._wakeup.set()

    def on_task_change(self, task: tasks_pb2.Task, old_node: str) -> None:
        state = task.state
        if old_node or state != P[TaskState.PENDING]:
            self._version += 1  # it held, or may now hold, resources on a node
        if state != P[TaskState.RUNNING]:
            self._allocations.pop(task.id, None)
        if state == P[TaskState.PENDING]:
            self._queue.push(task.id, task.spec.priority, task.created_at_ms)
        else:
            self._queue.discard(task.id)
        if not self._is_leader():
            # A follower schedules nothing, and a new leader starts with a full pass (wake):
            # collecting fresh ids here only grew a set nobody emptied, and woke the loop.
            return
        if state == P[TaskState.PENDING] and not old_node and not task.history:
            self._fresh.add(task.id)  # a new submission
        elif state in HOLDING:
            self._requests.pop(task.id, None)
            return  # our own placements, and starts: no room freed
        else:
            self._requests.pop(task.id, None)
            self._full, self._settled = True, False
        self._wakeup.set()

    async def run_cycle(self) -> str:
        """Read a snapshot, decide with the pure scheduler, commit the plan as one command."""
        if not self._is_leader():
            self.reasons.clear()
            return "not the leader: nothing to schedule"
        table = self._state.tasks
        fresh, self._fresh = self._fresh, set()
        loop = asyncio.get_running_loop()
        now = loop.time()
        full = self._full or (not self._settled and now - self._last_full >= self._aging_interval_s)
        if full and now < self._full_not_before:
            full = False  # spaced by the last full pass's cost; `run` comes back for it
            self._full = True
        if not table.pending:
            if full:
                self._full, self._last_full = False, now
            self.reasons.clear()
            return "nothing pending"
        # Bound one cycle's work (it runs on the event loop): the most urgent first.
        # Aging only reorders within a priority here; the pure scheduler applies it fully.
        if full:
            self._full, self._last_full = False, now
            queued = len(table.pending)
            pending = [table.tasks[i] for i in self._most_urgent(table.pending)]
        else:
            candidates = fresh & table.pending
            if not candidates:
                return "nothing new to place"
            snapshot = self._snapshot()
            if self._all_known_unplaceable(candidates, snapshot):
                return "new tasks match shapes found unplaceable: no pass"  # one log line a flood
            pending = heapq.nsmallest(
                self._max_per_cycle,
                (table.tasks[i] for i in candidates),
                key=lambda t: (-t.spec.priority, t.created_at_ms, t.id),
            )
            if len(candidates) > len(pending):
                # The rest stay fresh for the next cycle: on a settled cluster no full pass
                # would come for them (a flood larger than one cycle waited for a change).
                self._fresh |= candidates - {t.id for t in pending}
                self._wakeup.set()
        attempts = {t.id: t.attempt for t in pending}
        if full and len(self._requests) > 2 * len(table.pending) + 1000:
            self._requests = {i: r for i, r in self._requests.items() if i in table.pending}
        from lepton.coordinator.scheduler import schedule  # numpy: loaded when first needed

        requests, refused = [], {}
        for t in pending:
            try:
                requests.append(self._request(t))
            except InvalidArgument as err:  # one task the scheduler cannot take must not stop the rest
                refused[t.id] = f"cannot be placed: {err.message}"
        snapshot = self._snapshot()
        plan = schedule(snapshot, requests, now_ms=self._wall_ms(), policy=self._policy)
        if not plan.placements and not plan.preemptions:
            self._remember_unplaceable(snapshot, plan.failed_shapes)
        if full:
            self._settled = not plan.placements and not plan.preemptions
            behind = f"waiting: queued behind {len(pending)} more urgent tasks" if queued > len(pending) else ""
            self.reasons = WaitReasons(plan.unschedulable, behind)
            wait = (loop.time() - now) * self._full_pass_spacing
            if wait > self._min_cycle_s:  # a cheap pass is spaced by min_cycle_s alone
                self._full_not_before = loop.time() + wait
        else:
            self.reasons.update(plan.unschedulable)
        self.reasons.update(refused)
        if not plan.placements and not plan.preemptions:
            return plan.summary()
        cmd = state_pb2.Command(
            apply_plan=state_pb2.ApplyPlanCmd(
                term=self._term(),
                placements=self._with_rendezvous([
                    state_pb2.PlacementCmd(
                        task_id=p.task_id, attempt=attempts[p.task_id],
                        node_id=p.node_id, gpu_indices=list(p.gpu_indices),
                    )
                    for p in plan.placements.values()
                ]),
                preemptions=[
                    state_pb2.PreemptionCmd(
                        task_id=p.task_id, attempt=table.tasks[p.task_id].attempt,
                        for_task_id=p.for_task_id,
                    )
                    for p in plan.preemptions
                    if p.task_id in table.tasks
                ],
            )
        )
        try:
            await self._commit(cmd)
        except FailedPrecondition as err:  # the state moved on meanwhile; next cycle retries
            return f"plan dropped ({err.message})"
        return plan.summary()

    def _snapshot(self) -> ClusterSnapshot:
        """The scheduler's snapshot, rebuilt only when something it reads has changed."""
        sm = self._state
        view = self._view
        if view is None or view[0] != self._version or view[1] is not sm.nodes or view[2] is not sm.tasks.by_node:
            if view is not None and view[2] is not sm.tasks.by_node:
                self._allocations.clear()  # a restored table: its tasks may hold elsewhere
            view = self._view = (self._version, sm.nodes, sm.tasks.by_node, build_snapshot(sm, self._allocations))
        return view[3]

    def _remember_unplaceable(self, snapshot: ClusterSnapshot, failed: dict[tuple, tuple[float, str]]) -> None:
        if self._unplaceable_of is not snapshot:
            self._unplaceable, self._unplaceable_of = {}, snapshot
        known = self._unplaceable
        for shape, (priority, reason) in failed.items():
            if shape not in known or known[shape][0] < priority:  # one state: the same reason
                known[shape] = (priority, reason)

    def _all_known_unplaceable(self, candidates: set[str], snapshot: ClusterSnapshot) -> bool:
        """True, with each one's reason recorded, when every candidate would fail on this
        snapshot as a task of its shape already did. Only all of them: were one placed (or
        did it preempt), the rest would meet another state."""
        if self._unplaceable_of is not snapshot or not self._unplaceable:
            return False
        tasks, reasons = self._state.tasks.tasks, {}
        for task_id in candidates:
            try:
                reason = known_failure(self._unplaceable, self._request(tasks[task_id]), self._policy)
            except InvalidArgument as err:
                reason = f"cannot be placed: {err.message}"
            if reason is None:
                return False
            reasons[task_id] = reason
        self.reasons.update(reasons)
        return True

    def _most_urgent(self, pending: set[str]) -> list[str]:
        """The `max_per_cycle` most urgent pending ids, from the queue; rebuilt first when
        it does not mirror `pending` (a restored snapshot, or a leader's first pass)."""
        if self._queue_of is not pending or len(self._queue) != len(pending):
            tasks = self._state.tasks.tasks
            self._queue.clear()
            for task_id in pending:
                t = tasks[task_id]
                self._queue.push(task_id, t.spec.priority, t.created_at_ms)
            self._queue_of = pending
        return self._queue.smallest(self._max_per_cycle)

    def _request(self, task: tasks_pb2.Task) -> TaskRequest:
        req = self._requests.get(task.id)
        if req is None:
            dep = self._state.deployments.records.get(task.spec.replica.deployment)
            pack = dep is not None and dep.deployment.spec.pack
            req = self._requests[task.id] = task_request(task, pack=pack)
        return req

    def _with_rendezvous(self, placements: list[state_pb2.PlacementCmd]) -> list[state_pb2.PlacementCmd]:
        """Gang members learn where rank 0 hosts the job's store: rank 0's node, on a port
        that node reported free in its last heartbeat (soft state, hence chosen here and
        written into the command)."""
        tasks = self._state.tasks.tasks
        taken: dict[str, set[int]] = {}
        rendezvous: dict[str, tuple[str, int]] = {}
        for pl in placements:
            spec = tasks[pl.task_id].spec
            if spec.job_id and spec.gang_rank == 0:
                node = self._state.nodes[pl.node_id]
                port = self._free_port(pl.node_id) or 29500
                used = taken.setdefault(pl.node_id, set())
                while port in used:  # two jobs on one node in one plan
                    port += 1
                used.add(port)
                # The bare host: torch reads MASTER_ADDR as one, so an IPv6 one without brackets.
                rendezvous[spec.job_id] = (split_host_port(node.address)[0], port)
        for pl in placements:
            job_id = tasks[pl.task_id].spec.job_id
            if job_id in rendezvous:
                pl.master_addr, pl.master_port = rendezvous[job_id]
        return placements

    async def run(self) -> None:
        last = ""
        loop = asyncio.get_running_loop()
        ended = -float("inf")  # when the last cycle ended (loop time)
        while True:
            timeout = self._aging_interval_s
            if self._full and self._full_not_before > loop.time():  # a deferred full pass
                timeout = min(timeout, self._full_not_before - loop.time())
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                if not self._settled:
                    self._full = True  # aging: waiting tasks gain priority over time
            self._wakeup.clear()
            # Cycles are at least min_cycle_s apart, so a burst of submissions lands in one
            # plan; the first change after a quiet spell is placed at once (its latency is
            # the submit-to-start time users see).
            if (spacing := ended + self._min_cycle_s - loop.time()) > 0:
                await asyncio.sleep(spacing)
            started = time.perf_counter()
            try:
                sentence = await self.run_cycle()
                if self.on_cycle is not None and self._is_leader():
                    self.on_cycle(time.perf_counter() - started)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("scheduling cycle failed")
                continue
            finally:
                ended = loop.time()
            if sentence != last:
                logger.info("scheduler: %s", sentence)
                last = sentence
