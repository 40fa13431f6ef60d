"""Multi-node jobs (gangs), torch.distributed ones in particular: submit, list, get,
cancel, wait, logs.

Mixed into `Client`. A job `j-<hex>` of N nodes is N gang members (tasks `t-<hex>-<node>`,
lepton.common.job_ids) that the cluster places all-or-nothing and restarts together.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lepton.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from lepton.common.job_ids import JOB_PREFIX, is_job_id, job_of, job_summary
from lepton.common.states import TaskState
from lepton.common.validation import require_id
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import tasks_pb2
from lepton.v1.coordinator_pb2_grpc import CoordinatorStub

from .tasks import build_spec
from .types import FINAL_TASK_STATES as FINAL
from .types import TaskInfo

_UINT32_MAX = (1 << 32) - 1


@dataclass
class JobInfo:
    id: str
    state: str
    reason: str
    restart_count: int
    tasks: list[TaskInfo] = field(default_factory=list)
    owner: str = ""

    @property
    def name(self) -> str:
        return self.tasks[0].name if self.tasks else ""

    @property
    def nodes(self) -> int:
        return len(self.tasks)

    @property
    def created_at_ms(self) -> int:
        return self.tasks[0].created_at_ms if self.tasks else 0

    @property
    def done(self) -> bool:
        return self.state in FINAL

    @property
    def exit_code(self) -> int | None:
        """The failing member's exit code (0 when every member succeeded)."""
        if self.state == "succeeded":
            return 0
        codes = [t.exit_code for t in self.tasks if t.state == "failed" and t.exit_code]
        return codes[0] if codes else None

    @classmethod
    def from_proto(cls, job: tasks_pb2.Job) -> JobInfo:
        return cls(
            id=job.id, state=TaskState.name_of(job.state), reason=job.reason,
            restart_count=job.restart_count, tasks=[TaskInfo.from_proto(t) for t in job.tasks],
            owner=job.owner,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "state": self.state, "reason": self.reason,
                "owner": self.owner, "nodes": self.nodes, "restart_count": self.restart_count,
                "exit_code": self.exit_code, "tasks": [t.to_dict() for t in self.tasks]}


def _state(name: str) -> TaskState:
    """A member's TaskState; a state this client does not know (a newer server's) counts as
    pending: neither final nor running."""
    try:
        return TaskState(name)
    except ValueError:
        return TaskState.PENDING


def check_shards_for_ranks(ds: Any, nodes: int, nproc_per_node: int) -> None:
    """Refuse, before launch, a job whose dataset has fewer shards than it has ranks: shard
    i goes to global rank i % world, so a rank would start with no data at all."""
    ranks = nodes * nproc_per_node
    if len(ds.shards) < ranks:
        raise FailedPrecondition(
            f'dataset "{ds.name}" has {len(ds.shards)} shard(s) for {ranks} ranks ({nodes} '
            f"node(s) x {nproc_per_node}): every rank needs one; use fewer nodes or store it "
            f"in more shards (data put --shards {ranks})")


class JobMethods:
    """Job calls of `Client` (needs `_unary`, `logs`, `tasks`, `cancel`, `dataset`)."""

    def submit_job(
        self,
        argv: Sequence[str] | None = None,
        *,
        nodes: int = 1,
        nproc_per_node: int = 0,
        gpus_per_node: int = 0,
        max_restarts: int = 0,
        dataset: str = "",
        **kw: Any,
    ) -> JobInfo:
        """Submit a gang of `nodes` members. With `nproc_per_node` > 0 it is a
        torch.distributed job: each member starts that many workers with torchrun's
        environment. Other keywords are those of `submit` (cpu, memory, env, priority...).
        Raises InvalidArgument for impossible jobs (no nodes, more ranks than cores, an
        unknown dataset: NotFound)."""
        if nodes < 1:
            raise InvalidArgument(f"--nodes must be at least 1, not {nodes}")
        if nproc_per_node < 0 or gpus_per_node < 0 or max_restarts < 0:
            raise InvalidArgument("nproc_per_node, gpus_per_node and max_restarts must be >= 0")
        # Past its proto field (uint32), building the message would raise ValueError; the
        # cluster's own limits are smaller and checked where they live.
        for what, n in (("nodes", nodes), ("nproc_per_node", nproc_per_node), ("max_restarts", max_restarts)):
            if n > _UINT32_MAX:
                raise InvalidArgument(f"{what} {n} is out of range")
        if gpus_per_node:
            kw["gpus"] = gpus_per_node
        if nproc_per_node and not kw.get("cpu"):
            kw["cpu"] = float(nproc_per_node)  # a worker per core, as the scheduler sees it
        spec = build_spec(argv, **self._with_code(kw))  # working_dir= too
        spec.max_restarts = max_restarts
        if nproc_per_node:
            spec.torch.CopyFrom(tasks_pb2.TorchSpec(nproc_per_node=nproc_per_node, dataset=dataset))
        elif dataset:
            raise InvalidArgument("dataset needs a torch job (nproc_per_node > 0)")
        if dataset:
            check_shards_for_ranks(self.dataset(dataset), nodes, nproc_per_node)  # NotFound too
        req = cpb.SubmitJobRequest(spec=spec, nodes=nodes)
        resp = self._unary(CoordinatorStub, "SubmitJob", req, idempotent=bool(spec.request_id))
        return JobInfo.from_proto(resp)

    def job(self, job_id: str, *, timeout: float | None = None) -> JobInfo:
        req = cpb.GetJobRequest(job_id=require_id(job_id, "job id"))
        return JobInfo.from_proto(self._unary(CoordinatorStub, "GetJob", req, timeout=timeout))

    def jobs(self, states: Sequence[str] | None = None, owner: str | None = None, *,
             timeout: float | None = None) -> list[JobInfo]:
        """Jobs, oldest first; only those in one of `states` and of `owner` when given. Read
        from one walk of the task list: a job is its members (the leader derives GetJob's
        state the same way, common/job_ids.job_summary)."""
        if isinstance(states, str):
            states = [states]
        members: dict[str, list[TaskInfo]] = {}
        for t in self.tasks(owner=owner, timeout=timeout):
            if t.job_id:
                members.setdefault(t.job_id, []).append(t)
        out = []
        for job_id, tasks in members.items():
            tasks.sort(key=lambda t: t.gang_rank)
            state, reason, restarts = job_summary(
                [(_state(t.state), t.reason, t.restart_count) for t in tasks])
            if not states or state.value in states:
                out.append(JobInfo(job_id, state.value, reason, restarts, tasks, tasks[0].owner))
        return out

    def find_job(self, ref: str, *, timeout: float | None = None) -> JobInfo:
        """The job `ref` names: its id, a unique id prefix (`j-` may be left out), or one of
        its member tasks' ids. NotFound when nothing matches, InvalidArgument when several do."""
        ref = require_id(ref, "job id")
        # A job id is no member's id, though `j-8296` (an all-digit prefix) reads as member
        # 8296 of a job "j" to `job_of`, which knows task ids named before t- ids.
        member_of = job_of(ref)
        if member_of and f"{member_of}-" != JOB_PREFIX:
            ref = member_of
        try:
            return self.job(ref, timeout=timeout)
        except NotFound as err:
            missing = err  # it may say the job was garbage-collected
        except InvalidArgument:
            missing = NotFound(f'job "{ref}" not found')
        prefix = ref if is_job_id(ref) else JOB_PREFIX + ref
        matches = [j for j in self.jobs(timeout=timeout) if j.id.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise missing
        listed = ", ".join(j.id for j in matches[:5])
        raise InvalidArgument(f'job "{ref}" is ambiguous: matches {listed}'
                              + (f" and {len(matches) - 5} more" if len(matches) > 5 else ""))

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> JobInfo:
        """Cancel every member of the job (cancelling one cancels its gang). Returns the job;
        FailedPrecondition when it had already ended."""
        job = self.job(job_id, timeout=timeout)
        live = [t for t in job.tasks if not t.done]
        if not live:
            raise FailedPrecondition(f'job "{job.id}" is already {job.state}')
        try:
            self.cancel(live[0].id, timeout=timeout)
        except FailedPrecondition:
            pass  # that member ended meanwhile; the look below says what the job is now
        return self.job(job.id, timeout=timeout)

    def wait_job(self, job_id: str, timeout: float | None = None, poll: float = 0.25) -> JobInfo:
        """Until the job is finished; DeadlineExceeded if `timeout` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.done:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(f"job {job_id} still {job.state} after {timeout:g}s")
            time.sleep(poll)

    def job_logs(self, job_id: str, *, follow: bool = False, rank: int | None = None) -> Iterator[bytes]:
        """Every member's output, lines interleaved as they come (each worker line is
        prefixed `[rank K] `); `rank` keeps one rank's lines."""
        job = self.job(job_id)
        lines: queue.Queue[bytes | None] = queue.Queue(maxsize=10_000)
        prefix = None if rank is None else f"[rank {rank}] ".encode()

        def pump(task_id: str) -> None:
            pending = b""
            try:
                for chunk in self.logs(task_id, follow=follow, from_attempt=1 if follow else 0):
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    for line in complete:
                        lines.put(line + b"\n")
                if pending:
                    lines.put(pending + b"\n")
            except Exception as err:  # noqa: BLE001 - one member's stream must not end the rest
                lines.put(f"lepton: logs of {task_id}: {err}\n".encode())
            finally:
                lines.put(None)

        threads = [threading.Thread(target=pump, args=(t.id,), daemon=True) for t in job.tasks]
        for t in threads:
            t.start()
        open_streams = len(threads)
        while open_streams:
            line = lines.get()
            if line is None:
                open_streams -= 1
            elif prefix is None or line.startswith(prefix):
                yield line
