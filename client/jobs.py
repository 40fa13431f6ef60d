"""Multi-node jobs (gangs), torch.distributed ones in particular: submit, get, wait, logs.

Mixed into `Client`. A job of N nodes is N gang members (tasks `<job>-<rank>`) that the
cluster places all-or-nothing and restarts together.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lepton.common.errors import DeadlineExceeded, InvalidArgument
from lepton.common.states import TaskState
from lepton.common.validation import require_id
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import tasks_pb2
from lepton.v1.coordinator_pb2_grpc import CoordinatorStub

from .tasks import build_spec
from .types import FINAL_TASK_STATES as FINAL
from .types import TaskInfo


@dataclass
class JobInfo:
    id: str
    state: str
    reason: str
    restart_count: int
    tasks: list[TaskInfo] = field(default_factory=list)
    owner: str = ""

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
        return {"id": self.id, "state": self.state, "reason": self.reason, "owner": self.owner,
                "restart_count": self.restart_count, "exit_code": self.exit_code,
                "tasks": [t.to_dict() for t in self.tasks]}


class JobMethods:
    """Job calls of `Client` (needs `_unary`, `logs`)."""

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
        req = cpb.SubmitJobRequest(spec=spec, nodes=nodes)
        resp = self._unary(CoordinatorStub, "SubmitJob", req, idempotent=bool(spec.request_id))
        return JobInfo.from_proto(resp)

    def job(self, job_id: str, *, timeout: float | None = None) -> JobInfo:
        req = cpb.GetJobRequest(job_id=require_id(job_id, "job id"))
        return JobInfo.from_proto(self._unary(CoordinatorStub, "GetJob", req, timeout=timeout))

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
