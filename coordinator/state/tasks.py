"""Tasks in the replicated state: the lifecycle and the commands that move it.

Every function here is called from `ClusterStateMachine.apply` and must stay
deterministic: the time comes from the command, never from a clock.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from lepton.common.errors import FailedPrecondition, InvalidArgument
from lepton.common.states import TaskState
from lepton.coordinator.state.jobs import GangMixin
from lepton.coordinator.state.retention import TaskHistory
from lepton.v1 import common_pb2, state_pb2, tasks_pb2

if TYPE_CHECKING:
    from lepton.coordinator.state.state_machine import ClusterStateMachine


P = {s: s.proto for s in TaskState}  # short alias for comparisons below

# States in which an attempt holds resources on a node (the scheduler's allocations).
HOLDING = (P[TaskState.ASSIGNED], P[TaskState.RUNNING])
# States in which an attempt may still be alive on a node.
ON_NODE = (P[TaskState.ASSIGNED], P[TaskState.RUNNING], P[TaskState.PREEMPTED])

# Requeues of one task after losing its node, before a further loss fails it: a task that
# keeps taking its nodes down (a kernel panic, out of memory) is not rescheduled forever.
MAX_NODE_LOSSES = 3

_EVENT_KINDS = (tasks_pb2.TaskEvent.KIND_STARTED, tasks_pb2.TaskEvent.KIND_EXITED)

# Called with (task, node id it was on before this change, or "").
TaskListener = Callable[[tasks_pb2.Task, str], None]


def copy_task(task: tasks_pb2.Task) -> tasks_pb2.Task:
    out = tasks_pb2.Task()
    out.CopyFrom(task)
    return out


class TaskTable(GangMixin):
    """The tasks part of the state machine, with its derived indexes."""

    def __init__(self, sm: ClusterStateMachine):
        self._sm = sm
        self.tasks: dict[str, tasks_pb2.Task] = {}
        self.by_request: dict[str, str] = {}  # request id -> task id (idempotent submission)
        self.by_node: dict[str, set[str]] = {}  # node id -> ids of tasks with an attempt there
        self.pending: set[str] = set()  # ids of PENDING tasks: what the scheduler looks at
        self.pending_by_owner: Counter[str] = Counter()  # the pending_tasks quota, without a scan
        self.listeners: list[TaskListener] = []
        # (created_at_ms, id) of every task, sorted: what ListTasks pages walk.
        self.order: list[tuple[int, str]] = []
        self.history = TaskHistory()  # summaries of garbage-collected tasks (retention.py)
        self._init_jobs()

    # -- derived indexes -------------------------------------------------------------
    def _index(self, task: tasks_pb2.Task, old_node: str) -> None:
        if old_node and old_node != task.node_id or task.state not in ON_NODE:
            self.by_node.get(old_node, set()).discard(task.id)
        if task.node_id and task.state in ON_NODE:
            self.by_node.setdefault(task.node_id, set()).add(task.id)
        if task.state == P[TaskState.PENDING]:
            if task.id not in self.pending:
                self.pending.add(task.id)
                self.pending_by_owner[task.spec.owner] += 1
        elif task.id in self.pending:
            self.pending.discard(task.id)
            owner = task.spec.owner
            self.pending_by_owner[owner] -= 1
            if not self.pending_by_owner[owner]:
                del self.pending_by_owner[owner]

    def rebuild(self, tasks: list[tasks_pb2.Task]) -> None:
        self.tasks = {t.id: copy_task(t) for t in tasks}
        self.by_request = {
            t.spec.request_id: t.id for t in tasks if t.spec.request_id and not t.spec.job_id
        }
        self.by_node = {}
        self.pending = set()
        self.pending_by_owner = Counter()
        for task in self.tasks.values():
            self._index(task, "")
        self.order = sorted((t.created_at_ms, t.id) for t in self.tasks.values())
        self._rebuild_jobs()

    def _add(self, task: tasks_pb2.Task) -> None:
        self.tasks[task.id] = task
        bisect.insort(self.order, (task.created_at_ms, task.id))

    def forget(self, task_ids: list[str]) -> None:
        """Remove finished tasks and their indexes (garbage collection; retention.py)."""
        for task_id in task_ids:
            task = self.tasks.pop(task_id)
            rid = task.spec.request_id
            if rid and self.by_request.get(rid) == task_id:
                del self.by_request[rid]
        # One pass, not a deletion per task: each would move the rest of the list.
        self.order = [key for key in self.order if key[1] in self.tasks]

    def _changed(self, task: tasks_pb2.Task, old_node: str) -> None:
        self._index(task, old_node)
        for listener in list(self.listeners):
            listener(task, old_node)

    # -- reads -----------------------------------------------------------------------
    def get(self, task_id: str) -> tasks_pb2.Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise self.history.not_found(task_id)  # says so when it was garbage-collected
        return task

    def on_node(self, node_id: str) -> list[tasks_pb2.Task]:
        return [self.tasks[t] for t in sorted(self.by_node.get(node_id, ()))]

    # -- commands --------------------------------------------------------------------
    def submit(self, c: state_pb2.SubmitTaskCmd, at_ms: int, answered: bool = True) -> tasks_pb2.Task | None:
        """The new (or retried) task as a copy; None when not `answered` (nobody waits)."""
        rid = c.spec.request_id
        if rid and rid in self.by_request:
            return copy_task(self.tasks[self.by_request[rid]]) if answered else None  # a retry
        if c.task_id in self.tasks:
            raise FailedPrecondition(f'task id "{c.task_id}" is taken')
        task = tasks_pb2.Task(
            id=c.task_id, spec=c.spec, state=P[TaskState.PENDING], attempt=1,
            created_at_ms=at_ms, reason="waiting for the scheduler",
        )
        self._add(task)
        if rid:
            self.by_request[rid] = task.id
        self._changed(task, "")
        return copy_task(task) if answered else None

    def submit_many(self, c: state_pb2.SubmitTasksCmd, at_ms: int,
                    answered: bool = True) -> list[tasks_pb2.Task | None]:
        """All or nothing: a taken (or repeated) task id refuses the whole batch before
        any is stored. Request ids repeated from earlier, or within the batch, answer
        with the task the first one made, as in `submit`."""
        ids = [t.task_id for t in c.tasks]
        if len(set(ids)) != len(ids):
            raise FailedPrecondition("a task id appears twice in the batch")
        for task_id in ids:
            if task_id in self.tasks:
                raise FailedPrecondition(f'task id "{task_id}" is taken')
        return [self.submit(t, at_ms, answered) for t in c.tasks]

    def apply_plan(self, c: state_pb2.ApplyPlanCmd, at_ms: int) -> int:
        """All or nothing: one stale entry (the state moved since the plan was made)
        rejects the whole plan, so a gang is never half placed. Returns placements made."""
        for pre in c.preemptions:
            task = self.tasks.get(pre.task_id)
            if task is None or task.attempt != pre.attempt or task.state not in HOLDING:
                raise FailedPrecondition(f"stale plan: {pre.task_id} is no longer running")
        for pl in c.placements:
            task = self.tasks.get(pl.task_id)
            if task is None or task.attempt != pl.attempt or task.state != P[TaskState.PENDING]:
                raise FailedPrecondition(f"stale plan: {pl.task_id} is no longer pending")
            node = self._sm.nodes.get(pl.node_id)
            if node is None or node.state != common_pb2.NODE_STATE_READY or node.draining:
                raise FailedPrecondition(f"stale plan: node {pl.node_id} takes no work")
        for pre in c.preemptions:
            task = self.tasks[pre.task_id]
            task.state = P[TaskState.PREEMPTED]
            task.reason = f"preempted by {pre.for_task_id}"
            self._changed(task, task.node_id)
        for pl in c.placements:
            task = self.tasks[pl.task_id]
            node = self._sm.nodes[pl.node_id]
            task.master_addr = pl.master_addr
            task.master_port = pl.master_port
            task.state = P[TaskState.ASSIGNED]
            task.node_id = node.id
            task.node_address = node.address
            del task.gpu_indices[:]
            task.gpu_indices.extend(pl.gpu_indices)
            task.assigned_at_ms = at_ms
            task.assigned_term = c.term
            task.reason = ""
            self._changed(task, "")
        return len(c.placements)

    def event(self, c: state_pb2.TaskEventCmd, at_ms: int) -> tasks_pb2.Task:
        return copy_task(self._event(c.node_id, c.event, at_ms))

    def events(self, c: state_pb2.TaskEventsCmd, at_ms: int) -> int:
        """A report's events in order, each as `event` alone: one about a task this cluster
        no longer has (collected since) or of an unknown kind is skipped, not the batch.
        Returns how many were about a task it has."""
        taken = 0
        for ev in c.events:
            if ev.task_id in self.tasks and ev.kind in _EVENT_KINDS:
                self._event(c.node_id, ev, at_ms)
                taken += 1
        return taken

    def _event(self, node_id: str, ev: tasks_pb2.TaskEvent, at_ms: int) -> tasks_pb2.Task:
        task = self.get(ev.task_id)
        if ev.attempt != task.attempt or task.node_id != node_id:
            return task  # about an older attempt, or from the wrong node: stale
        if ev.kind == tasks_pb2.TaskEvent.KIND_STARTED:
            if task.state == P[TaskState.ASSIGNED]:
                task.state = P[TaskState.RUNNING]
                task.started_at_ms = ev.at_ms or at_ms
                self._changed(task, task.node_id)
        elif ev.kind == tasks_pb2.TaskEvent.KIND_EXITED:
            if task.state in HOLDING and ev.requeue and not task.spec.job_id:
                # Its agent is shutting down gracefully: like a preemption, not a failure.
                # (A gang member takes the gang path: the whole job restarts.)
                self._requeue(task, TaskState.PREEMPTED, ev.exit_code, ev.reason or "agent stopping",
                              ev.at_ms or at_ms)
            elif task.state in HOLDING:
                self._attempt_over(task, ev.exit_code, ev.reason, ev.at_ms or at_ms, True)
            elif task.state == P[TaskState.PREEMPTED]:
                self._requeue(task, TaskState.PREEMPTED, ev.exit_code, task.reason, ev.at_ms or at_ms)
        else:
            raise InvalidArgument(f"unknown task event kind {ev.kind}")
        return task

    def cancel(self, c: state_pb2.CancelTaskCmd, at_ms: int) -> tasks_pb2.Task:
        task = self.get(c.task_id)
        state = TaskState.from_proto(task.state)
        if state.final:
            raise FailedPrecondition(f'task "{task.id}" already {state.value}')
        self._finish(task, TaskState.CANCELLED, None, "cancelled", at_ms)
        if task.spec.job_id:
            self._cancel_gang(task, at_ms)
        return copy_task(task)

    def node_gone(self, node_id: str, reason: str, at_ms: int) -> None:
        """The node left, or is lost (down past its attempts' lease): its attempts are over.

        Losing the node is not the task's failure: the attempt is requeued without counting
        one, up to MAX_NODE_LOSSES times; past that the task fails, saying so. (A gang
        member takes the gang path: the whole job restarts, within max_restarts.)"""
        for task in self.on_node(node_id):
            if task.state == P[TaskState.PREEMPTED]:
                self._requeue(task, TaskState.PREEMPTED, None, task.reason, at_ms)
            elif task.spec.job_id:
                self._attempt_over(task, None, reason, at_ms, False)
            elif task.node_losses < MAX_NODE_LOSSES:
                task.node_losses += 1
                self._requeue(task, TaskState.FAILED, None, reason, at_ms)
                task.reason = f"requeued after {reason} (node loss {task.node_losses}/{MAX_NODE_LOSSES})"
            else:
                why = f"{reason}: its node was lost {MAX_NODE_LOSSES + 1} times (node-loss budget spent)"
                self._finish(task, TaskState.FAILED, None, why, at_ms)

    # -- helpers ---------------------------------------------------------------------
    def _record(self, task, state: TaskState, exit_code: int | None, reason: str, at_ms: int) -> None:
        task.history.append(tasks_pb2.AttemptRecord(
            attempt=task.attempt, node_id=task.node_id, state=state.proto,
            exit_code=exit_code or 0, reason=reason, started_at_ms=task.started_at_ms,
            finished_at_ms=at_ms,
        ))

    def _finish(self, task, state: TaskState, exit_code: int | None, reason: str, at_ms: int,
                shown: str | None = None) -> None:
        """End `task` in the final `state`: its attempt, if it had a node, goes to the history
        with `reason`; the task shows `shown` (default: `reason`)."""
        old_node = task.node_id
        if task.node_id:
            self._record(task, state, exit_code, reason, at_ms)
        task.state = state.proto
        task.reason = reason if shown is None else shown
        task.finished_at_ms = at_ms
        self._changed(task, old_node)

    def _attempt_over(self, task, exit_code: int | None, reason: str, at_ms: int, exited: bool) -> None:
        if exited:
            task.has_exit_code = True
            task.exit_code = exit_code or 0
        if exited and exit_code == 0:
            self._finish(task, TaskState.SUCCEEDED, 0, reason or "exited", at_ms, shown="")
            return
        why = reason or (f"exit code {exit_code}" if exited else "lost")
        if exited and reason in ("", "exited"):
            why = f"exit code {exit_code}"
        if task.spec.job_id:
            self._gang_failed(task, exit_code if exited else None, why, at_ms)
            return
        task.failures += 1
        if task.failures <= task.spec.max_retries:
            self._requeue(task, TaskState.FAILED, exit_code, why, at_ms)
            task.reason = f"retry {task.failures}/{task.spec.max_retries} after {why}"
            return
        self._finish(task, TaskState.FAILED, exit_code, why, at_ms)

    def _requeue(self, task, outcome: TaskState, exit_code: int | None, reason: str, at_ms: int) -> None:
        old_node = task.node_id
        self._record(task, outcome, exit_code, reason, at_ms)
        task.state = P[TaskState.PENDING]
        task.attempt += 1
        task.node_id = ""
        task.node_address = ""
        del task.gpu_indices[:]
        task.started_at_ms = 0
        task.assigned_at_ms = 0
        task.reason = f"requeued after {reason}"
        self._changed(task, old_node)
