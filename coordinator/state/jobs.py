"""Multi-node jobs: gangs of tasks that are placed, fail and restart together.

A job of N nodes is N tasks `member_id(job, rank)` (`t-<hex>-<rank>` for job `j-<hex>`,
lepton.common.job_ids) sharing `spec.job_id`; "rank" here is the member's node index.
The scheduler places a gang all-or-nothing on distinct nodes. When one member fails
(non-zero exit, timeout, node lost), every member stops at once: the others drop out of their agents' desired sets,
so their workers are killed instead of hanging in a collective until it times out. The
gang then restarts as a whole (attempt + 1, restart_count + 1, a new rendezvous) while
`max_restarts` allows, else every member fails.

Mixed into `TaskTable`; deterministic like the rest of the state machine.
"""

from __future__ import annotations

from lepton.common.errors import FailedPrecondition
from lepton.common.job_ids import job_summary, member_id
from lepton.common.states import TaskState
from lepton.v1 import state_pb2, tasks_pb2

__all__ = ["GangMixin", "member_id"]


class GangMixin:
    """Needs from TaskTable: tasks, _add, _changed, _record, _finish, copy_task-able state."""

    def _init_jobs(self) -> None:
        self.jobs: dict[str, list[str]] = {}  # job id -> member task ids by rank
        self.job_requests: dict[str, str] = {}  # request id -> job id (idempotent submission)

    def _rebuild_jobs(self) -> None:
        self._init_jobs()
        for task in sorted(self.tasks.values(), key=lambda t: (t.spec.job_id, t.spec.gang_rank)):
            if task.spec.job_id:
                self.jobs.setdefault(task.spec.job_id, []).append(task.id)
                if task.spec.gang_rank == 0 and task.spec.request_id:
                    self.job_requests[task.spec.request_id] = task.spec.job_id

    def forget_job(self, job_id: str) -> None:
        """Drop a job's entry, before its members are forgotten (garbage collection;
        retention.py). Its request id is rank 0's."""
        ids = self.jobs.pop(job_id, [])
        rid = self.tasks[ids[0]].spec.request_id if ids and ids[0] in self.tasks else ""
        if rid and self.job_requests.get(rid) == job_id:
            del self.job_requests[rid]

    # -- commands --------------------------------------------------------------------
    def submit_job(self, c: state_pb2.SubmitJobCmd, at_ms: int) -> tasks_pb2.Job:
        rid = c.spec.request_id
        if rid and rid in self.job_requests:
            return self.job(self.job_requests[rid])  # a retried submission
        if c.job_id in self.jobs or any(member_id(c.job_id, r) in self.tasks for r in range(c.nodes)):
            raise FailedPrecondition(f'job id "{c.job_id}" is taken')
        ids = []
        for rank in range(c.nodes):
            spec = tasks_pb2.TaskSpec()
            spec.CopyFrom(c.spec)
            spec.job_id = c.job_id
            spec.gang_size = c.nodes
            spec.gang_rank = rank
            if rank:
                spec.request_id = ""  # the job's request id lives on rank 0 only
            task = tasks_pb2.Task(
                id=member_id(c.job_id, rank), spec=spec, state=TaskState.PENDING.proto, attempt=1,
                created_at_ms=at_ms, reason="waiting for the scheduler",
            )
            self._add(task)
            ids.append(task.id)
            self._changed(task, "")
        self.jobs[c.job_id] = ids
        if rid:
            self.job_requests[rid] = c.job_id
        return self.job(c.job_id)

    def _gang_failed(self, failed: tasks_pb2.Task, exit_code: int | None, why: str, at_ms: int) -> None:
        """One member's attempt is over without success: stop the whole gang, then restart
        it or fail it."""
        members = [self.tasks[i] for i in self.jobs.get(failed.spec.job_id, [failed.id])]
        restarts = max(m.restart_count for m in members)
        restart = restarts < failed.spec.max_restarts
        rank = failed.spec.gang_rank
        for m in members:
            if TaskState.from_proto(m.state).final and not restart:
                continue
            old_node = m.node_id
            own = m.id == failed.id
            # "node K": the member's index. "rank" means a worker's global rank everywhere.
            reason = why if own else f"stopped: node {rank} failed ({why})"
            if own and exit_code is not None:
                m.has_exit_code, m.exit_code = True, exit_code
            if not restart:
                self._finish(m, TaskState.FAILED, exit_code if own else None, reason, at_ms)
                continue
            if m.node_id:
                self._record(m, TaskState.FAILED, exit_code if own else None, reason, at_ms)
            m.state = TaskState.PENDING.proto
            m.attempt += 1
            m.restart_count = restarts + 1
            m.node_id = m.node_address = m.master_addr = ""
            m.master_port = 0
            del m.gpu_indices[:]
            m.started_at_ms = m.assigned_at_ms = m.finished_at_ms = 0
            m.reason = f"restart {restarts + 1}/{m.spec.max_restarts} after node {rank}: {why}"
            self._changed(m, old_node)

    def _cancel_gang(self, task: tasks_pb2.Task, at_ms: int) -> None:
        """Cancelling one member cancels the job: the rest could only hang."""
        for member_id_ in self.jobs.get(task.spec.job_id, []):
            m = self.tasks[member_id_]
            if m.id == task.id or TaskState.from_proto(m.state).final:
                continue
            self._finish(m, TaskState.CANCELLED, None, "cancelled", at_ms)

    # -- reads -----------------------------------------------------------------------
    def job(self, job_id: str) -> tasks_pb2.Job:
        """The job with its members and a derived state; raises NotFound."""
        ids = self.jobs.get(job_id)
        if not ids:
            raise self.history.job_not_found(job_id)  # says so when it was garbage-collected
        members = [self.tasks[i] for i in ids]
        state, reason, restarts = job_summary(
            [(TaskState.from_proto(m.state), m.reason, m.restart_count) for m in members])
        job = tasks_pb2.Job(id=job_id, state=state.proto, reason=reason, restart_count=restarts,
                            owner=members[0].spec.owner)
        for m in members:
            job.tasks.append(m)
        return job
