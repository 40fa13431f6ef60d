"""Job and member task ids, one convention for the coordinator, the agent and the client.

The coordinator names a job `j-<hex>` and its member of rank R (the R-th node) the task
`t-<hex>-R`: every task id starts `t-` and every job id `j-`, so no id or id prefix names
both a job and a task. Ids of other shapes (tests, states written before this convention:
`<job>-R`) keep the plain `<job>-R` form.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from lepton.common.states import TaskState

JOB_PREFIX = "j-"
TASK_PREFIX = "t-"


def is_job_id(ref: str) -> bool:
    return ref.startswith(JOB_PREFIX)


def member_id(job_id: str, rank: int | str) -> str:
    """The task id of job `job_id`'s member `rank`."""
    if is_job_id(job_id):
        return f"{TASK_PREFIX}{job_id[len(JOB_PREFIX):]}-{rank}"
    return f"{job_id}-{rank}"


def job_of(task_id: str) -> str:
    """The job a member task id belongs to (the inverse of `member_id`), or "" for a task
    id that names no member."""
    job, dash, rank = task_id.rpartition("-")
    if not (dash and job and rank.isdigit()):
        return ""
    if job.startswith(TASK_PREFIX) and len(job) > len(TASK_PREFIX):
        return JOB_PREFIX + job[len(TASK_PREFIX):]
    return "" if job == TASK_PREFIX.rstrip("-") else job


def job_state(members: Collection[TaskState]) -> TaskState:
    """A job's state from its members': a failure or a cancel wins, then success only when
    every member succeeded, then the furthest any member got."""
    for decisive in (TaskState.FAILED, TaskState.CANCELLED):
        if decisive in members:
            return decisive
    if set(members) == {TaskState.SUCCEEDED}:
        return TaskState.SUCCEEDED
    for furthest in (TaskState.RUNNING, TaskState.ASSIGNED):
        if furthest in members:
            return furthest
    return TaskState.PENDING


def job_summary(members: Sequence[tuple[TaskState, str, int]]) -> tuple[TaskState, str, int]:
    """(state, reason, restart count) of a job from its members' (state, reason, restart
    count) in node order: the coordinator's GetJob and the client's job list agree."""
    state = job_state({s for s, _, _ in members})
    reason = next((r for s, r, _ in members if s == state and r), "")
    return state, reason, max((n for _, _, n in members), default=0)
