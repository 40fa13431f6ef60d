"""Garbage collection of finished work, and the bounded history of what it collected.

Finished tasks would otherwise stay in the state forever: every snapshot, every catch-up
and every list would grow with the cluster's age. Like Nomad's job GC, a finished task or
job leaves once it is past the retention: beyond the newest `keep_finished` finished ones,
or finished more than `max_age_ms` ago. A job is one unit: it goes whole, once every member
is finished. Nothing that is not finished is ever collected.

What goes leaves a `TaskSummary` in `TaskHistory` (id, name, owner, final state, exit,
times), so `tasks show` can say what became of it; the history keeps the newest
`history_limit` summaries. Deterministic like the rest of the state machine: the time is
the command's, and ties are broken by id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lepton.common.errors import NotFound
from lepton.common.states import TaskState
from lepton.coordinator.state.jobs import member_id
from lepton.v1 import state_pb2, tasks_pb2

if TYPE_CHECKING:
    from lepton.coordinator.state.tasks import TaskTable


# Tasks one command collects at most (a job whole): a large backlog goes over several
# commands, so no single apply holds the leader's event loop for long.
MAX_PER_COMMAND = 10_000


@dataclass(frozen=True, slots=True)
class Collected:
    """What one collection did; `more`: it stopped at MAX_PER_COMMAND with work left."""

    tasks: int
    jobs: int
    finished_kept: int
    history_size: int
    more: bool = False


class TaskHistory:
    """Summaries of collected tasks by id, oldest collected first, at most a limit of them."""

    def __init__(self) -> None:
        self._by_id: dict[str, tasks_pb2.TaskSummary] = {}  # insertion order: collection order

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, task_id: str) -> tasks_pb2.TaskSummary | None:
        return self._by_id.get(task_id)

    def add(self, summary: tasks_pb2.TaskSummary) -> None:
        self._by_id.pop(summary.id, None)
        self._by_id[summary.id] = summary

    def trim(self, limit: int) -> None:
        """Drop the oldest collected past `limit`."""
        excess = len(self._by_id) - limit
        if excess > 0:
            for task_id in list(self._by_id)[:excess]:
                del self._by_id[task_id]

    def summaries(self) -> Iterable[tasks_pb2.TaskSummary]:
        return self._by_id.values()

    def rebuild(self, summaries: Iterable[tasks_pb2.TaskSummary]) -> None:
        self._by_id = {}
        for s in summaries:
            copy = tasks_pb2.TaskSummary()
            copy.CopyFrom(s)
            self.add(copy)

    def not_found(self, task_id: str) -> NotFound:
        """The NotFound for a task id: what became of it, when it was collected."""
        s = self._by_id.get(task_id)
        if s is None:
            return NotFound(f'task "{task_id}" not found')
        state = TaskState.from_proto(s.state).value
        exit_part = f" (exit code {s.exit_code})" if s.has_exit_code else ""
        return NotFound(
            f'task "{task_id}" was garbage-collected (collected_at_ms={s.collected_at_ms}): it '
            f"{state}{exit_part} at finished_at_ms={s.finished_at_ms}; its summary is all that is kept"
        )


    def job_not_found(self, job_id: str) -> NotFound:
        """The NotFound for a job id, saying so when it was collected (by its rank 0)."""
        s = self._by_id.get(member_id(job_id, 0))
        if s is None or s.job_id != job_id:
            return NotFound(f'job "{job_id}" not found')
        return NotFound(f'job "{job_id}" was garbage-collected (collected_at_ms={s.collected_at_ms}); '
                        f"its members' summaries: tasks show {member_id(job_id, 'RANK')}")


def summarize(task: tasks_pb2.Task, at_ms: int) -> tasks_pb2.TaskSummary:
    return tasks_pb2.TaskSummary(
        id=task.id, name=task.spec.name, owner=task.spec.owner, job_id=task.spec.job_id,
        state=task.state, has_exit_code=task.has_exit_code, exit_code=task.exit_code,
        reason=task.reason[:256], created_at_ms=task.created_at_ms,
        finished_at_ms=task.finished_at_ms, collected_at_ms=at_ms, attempt=task.attempt,
    )


_FINAL = frozenset(s.proto for s in TaskState if s.final)


def _finished(task: tasks_pb2.Task) -> bool:
    return task.state in _FINAL  # a set lookup: this runs over every task each GC check


def finished_units(table: TaskTable) -> list[tuple[int, str, list[str]]]:
    """Every finished unit as (finished_at_ms, unit id, its task ids): a task outside any
    job, or a job all of whose members finished (at its last member's finish). Newest first."""
    units = []
    for task in table.tasks.values():
        if not _finished(task):
            continue
        job_id = task.spec.job_id
        if not job_id:
            units.append((task.finished_at_ms, task.id, [task.id]))
        elif task.spec.gang_rank == 0:  # a job is looked at once, from its rank 0
            members = [table.tasks[i] for i in table.jobs.get(job_id, [task.id])]
            if all(_finished(m) for m in members):
                units.append((max(m.finished_at_ms for m in members), job_id, [m.id for m in members]))
    units.sort(reverse=True)
    return units


def select(table: TaskTable, keep_finished: int, max_age_ms: int | None, at_ms: int) -> tuple[list, int]:
    """(the units to collect, oldest last; how many finished units stay). Units are newest
    first, so what stays is a prefix: at most keep_finished, none finished before the age."""
    units = finished_units(table)
    kept = min(keep_finished, len(units))
    if max_age_ms is not None:
        oldest_kept = at_ms - max_age_ms
        kept = next((i for i, u in enumerate(units[:kept]) if u[0] < oldest_kept), kept)
    return units[kept:], kept


def collect(table: TaskTable, c: state_pb2.CollectGarbageCmd, at_ms: int) -> Collected:
    """The command: remove what `select` picks, summarize it, trim the history."""
    max_age = c.max_age_ms if c.HasField("max_age_ms") else None
    doomed, kept = select(table, c.keep_finished, max_age, at_ms)
    gone: list[str] = []
    jobs = 0
    oldest_first = doomed[::-1]
    for n, (_finished_at, unit_id, task_ids) in enumerate(oldest_first):
        if gone and len(gone) + len(task_ids) > MAX_PER_COMMAND:
            more = len(oldest_first) - n
            break
        if unit_id in table.jobs:
            table.forget_job(unit_id)
            jobs += 1
        for task_id in task_ids:
            table.history.add(summarize(table.tasks[task_id], at_ms))
        gone.extend(task_ids)
    else:
        more = 0
    table.forget(gone)
    table.history.trim(c.history_limit)
    return Collected(tasks=len(gone), jobs=jobs, finished_kept=kept + more, history_size=len(table.history),
                     more=bool(more))
