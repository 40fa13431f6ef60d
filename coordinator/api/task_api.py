"""The task half of the Coordinator API: users submit and watch tasks; agents receive
their desired set (whole, then by change: assignment_stream.py) and report what happened.
Mixed into CoordinatorService."""

from __future__ import annotations

import asyncio
import logging
import os

from lepton.common import validation as v
from lepton.common.auth import Role, current_principal, require_owner
from lepton.common.errors import InvalidArgument, NotFound
from lepton.common.grpc_util import rpc_boundary
from lepton.common.paging import MAX_PAGE, decode_token, page_size, take_page
from lepton.coordinator.api.assignment_stream import AssignmentStream
from lepton.coordinator.state.security_state import check_node_caller, stamp_owner
from lepton.coordinator.state.tasks import P, TaskState, copy_task
from lepton.v1 import common_pb2, coordinator_pb2, state_pb2, tasks_pb2

logger = logging.getLogger(__name__)

MAX_EVENTS_PER_REPORT = 1000
# Events in one log entry: a whole report (1,000 events of at most ~1.1 KiB) fits, well
# under the entry cap (MAX_ENTRY_BYTES); a node's many lost attempts are cut to fit.
EVENTS_ENTRY_BYTES = 2 << 20
MAX_GANG = 64  # nodes in one job
MAX_NPROC = 64  # workers per node
MAX_WAIT_S = 300.0
MAX_BATCH = 1000  # specs in one SubmitTasks call
YIELD_EVERY = 100  # specs checked between yields to the event loop (~10 ms at most)
REDACTED = "<redacted>"  # what others see instead of a task's env values


def new_id(prefix: str) -> str:
    """A task or job id: 48 random bits, as uuid4().hex[:12] gave, without building a UUID."""
    return prefix + os.urandom(6).hex()


def may_see_env(owner: str) -> bool:
    """Env values (often secrets) are for the task's owner and admins only; with auth off
    everything has one owner."""
    p = current_principal()
    return p is None or p.role == Role.ADMIN or (p.role != Role.NODE and p.name == owner)


class TaskApi:
    """Expects `self._ctx` (CoordinatorContext) with `.hub` and `.scheduling` set."""

    def _task_view(self, task: tasks_pb2.Task, *, private: bool = False) -> tasks_pb2.Task:
        """What the caller may see of `task`; `private`: `task` is already a copy nobody
        else holds (a command's result), so it is edited in place."""
        out = task if private else copy_task(task)
        if not may_see_env(out.spec.owner):
            for name in list(out.spec.env):  # not while iterating the map itself
                out.spec.env[name] = REDACTED
        if out.state == P[TaskState.PENDING]:
            reason = self._ctx.scheduling.reasons.get(out.id)
            if reason:
                out.reason = reason
        return out

    @rpc_boundary
    async def SubmitTask(self, request, context):
        v.check_task_spec(request.spec, self._ctx.max_spec_bytes)
        stamp_owner(request.spec, self._ctx.state)  # the caller, with auth on
        # Quotas: refused here without a log entry; applying the command checks again.
        self._ctx.state.quotas.check_tasks([request.spec])
        cmd = state_pb2.Command(
            submit_task=state_pb2.SubmitTaskCmd(task_id=new_id("t-"), spec=request.spec)
        )
        with self._ctx.admission.admit(1, request.ByteSize()):  # sheds a flood
            task = await self._ctx.commit(cmd)
        return self._task_view(task, private=True)

    @rpc_boundary
    async def SubmitTasks(self, request, context):
        specs = request.specs
        if not 1 <= len(specs) <= MAX_BATCH:
            raise InvalidArgument(f"specs must hold 1 to {MAX_BATCH} tasks, not {len(specs)}")
        self._ctx.require_leader()  # a follower redirects before the costly part too
        # Shed a flood before the costly part: checking each spec, then applying the batch.
        with self._ctx.admission.admit(len(specs), request.ByteSize()):
            total = 0
            for i, spec in enumerate(specs):
                if i % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)  # heartbeats and Raft get the loop in between
                try:
                    v.check_task_spec(spec, self._ctx.max_spec_bytes)
                except InvalidArgument as err:
                    raise InvalidArgument(f"specs[{i}]: {err.message}") from None
                total += spec.ByteSize()
            if total > v.MAX_BATCH_SPEC_BYTES:  # one log entry holds the whole batch
                raise InvalidArgument(
                    f"the {len(specs)} specs take {total} bytes; one SubmitTasks carries at most "
                    f"{v.MAX_BATCH_SPEC_BYTES} (send fewer at a time)"
                )
            cmd = state_pb2.Command(submit_tasks=state_pb2.SubmitTasksCmd(tasks=[
                state_pb2.SubmitTaskCmd(task_id=new_id("t-"), spec=spec) for spec in specs
            ]))
            for c in cmd.submit_tasks.tasks:
                stamp_owner(c.spec, self._ctx.state)  # the caller, with auth on
            self._ctx.state.quotas.check_tasks(c.spec for c in cmd.submit_tasks.tasks)
            tasks = await self._ctx.commit(cmd)
        return coordinator_pb2.SubmitTasksResponse(tasks=[self._task_view(t, private=True) for t in tasks])

    @rpc_boundary
    async def SubmitJob(self, request, context):
        spec = request.spec
        v.check_task_spec(spec, self._ctx.max_spec_bytes)
        stamp_owner(spec, self._ctx.state)
        if not 1 <= request.nodes <= MAX_GANG:
            raise InvalidArgument(f"nodes must be between 1 and {MAX_GANG}, not {request.nodes}")
        if spec.job_id or spec.gang_size or spec.gang_rank:
            raise InvalidArgument("job_id, gang_size and gang_rank are set by the coordinator")
        if spec.max_restarts > v.MAX_RETRIES:
            raise InvalidArgument(f"max_restarts is {spec.max_restarts}; at most {v.MAX_RETRIES}")
        await self._ctx.read()
        if spec.HasField("torch"):
            self._check_torch(spec, request.nodes)
        job_id = new_id("j-")
        cmd = state_pb2.Command(submit_job=state_pb2.SubmitJobCmd(job_id=job_id, spec=spec, nodes=request.nodes))
        self._ctx.state.quotas.check_job(cmd.submit_job)
        with self._ctx.admission.admit(request.nodes, request.nodes * spec.ByteSize()):
            job = await self._ctx.commit(cmd)
        return self._job_view(job)

    def _check_torch(self, spec, nodes: int) -> None:
        """Refuse what could never run, with a reason a person can act on."""
        nproc = spec.torch.nproc_per_node
        if not 1 <= nproc <= MAX_NPROC:
            raise InvalidArgument(f"nproc_per_node must be between 1 and {MAX_NPROC}, not {nproc}")
        ready = [n for n in self._ctx.state.nodes.values() if n.state == common_pb2.NODE_STATE_READY]
        if len(ready) < nodes:
            raise InvalidArgument(f"the job needs {nodes} nodes; the cluster has {len(ready)} ready")
        cores = max((n.capacity.cpu_logical for n in ready), default=0)
        if nproc > cores:
            raise InvalidArgument(f"{nproc} ranks per node need {nproc} cores; the largest node has {cores}")
        dataset = spec.torch.dataset
        if dataset:
            self._ctx.state.datasets.get(dataset)  # NotFound names it

    def _job_view(self, job: tasks_pb2.Job) -> tasks_pb2.Job:
        out = tasks_pb2.Job()
        out.CopyFrom(job)
        del out.tasks[:]
        out.tasks.extend(self._task_view(t) for t in job.tasks)
        return out

    @rpc_boundary
    async def GetJob(self, request, context):
        v.require_id(request.job_id, "job_id")
        await self._ctx.read()
        return self._job_view(self._ctx.state.tasks.job(request.job_id))

    @rpc_boundary
    async def GetTask(self, request, context):
        v.require_id(request.task_id, "task_id")
        await self._ctx.read()
        return self._task_view(self._ctx.state.tasks.get(request.task_id))

    @rpc_boundary
    async def ListTasks(self, request, context):
        wanted = {TaskState.from_proto(s).proto for s in request.states}
        v.check_text(request.owner, "owner", v.MAX_NAME)
        v.check_text(request.id_prefix, "id_prefix", v.MAX_NAME)
        after = decode_token(request.page_token, (int, str))
        legacy = request.limit and not (request.page_size or after)  # an older client's --limit
        size = min(request.limit, MAX_PAGE) if legacy else page_size(request.page_size)
        await self._ctx.read()
        table = self._ctx.state.tasks

        def select(key):
            t = table.tasks[key[1]]
            if wanted and t.state not in wanted or request.owner and t.spec.owner != request.owner:
                return None
            return self._task_view(t) if t.id.startswith(request.id_prefix) else None

        # No await from here: the walk reads one state.
        tasks, token = take_page(table.order, after, size=size, select=select, size_of=lambda t: t.ByteSize(),
                                 reverse=request.newest_first or bool(legacy))
        if legacy:
            return coordinator_pb2.ListTasksResponse(tasks=tasks[::-1])
        return coordinator_pb2.ListTasksResponse(tasks=tasks, next_page_token=token)

    @rpc_boundary
    async def CollectGarbage(self, request, context):
        keep = request.keep_finished if request.HasField("keep_finished") else None
        max_age = request.max_age_s if request.HasField("max_age_s") else None
        self._ctx.gc.command(keep, max_age)  # InvalidArgument before anything is proposed
        done = await self._ctx.gc.collect(keep, max_age)
        logger.info("garbage collection asked for: %d tasks (%d jobs) collected", done.tasks, done.jobs)
        return coordinator_pb2.CollectGarbageResponse(
            tasks_collected=done.tasks, jobs_collected=done.jobs,
            finished_kept=done.finished_kept, history_size=done.history_size,
        )

    @rpc_boundary
    async def CancelTask(self, request, context):
        v.require_id(request.task_id, "task_id")
        await self._ctx.read()
        task = self._ctx.state.tasks.get(request.task_id)  # NotFound before proposing
        require_owner(task.spec.owner, f"task {task.id}")
        task = await self._ctx.commit(
            state_pb2.Command(cancel_task=state_pb2.CancelTaskCmd(task_id=request.task_id))
        )
        return self._task_view(task)

    @rpc_boundary
    async def WaitTask(self, request, context):
        v.require_id(request.task_id, "task_id")
        if not 0 <= request.timeout_s <= MAX_WAIT_S:
            raise InvalidArgument(f"timeout_s must be between 0 and {MAX_WAIT_S:g}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_s
        while True:
            await self._ctx.read()
            task = self._ctx.state.tasks.get(request.task_id)
            left = deadline - loop.time()
            if TaskState.from_proto(task.state).final or left <= 0:
                return self._task_view(task)
            await self._ctx.hub.wait_for_change(min(left, 1.0))

    @rpc_boundary
    async def WatchAssignments(self, request, context):
        node_id = v.require_id(request.node_id, "node_id")
        await self._ctx.read()
        if node_id not in self._ctx.state.nodes:
            raise NotFound(f'node "{node_id}" is not registered')
        check_node_caller(self._ctx.state, node_id)
        hub = self._ctx.hub
        watch = hub.subscribe(node_id)
        stream = AssignmentStream(self._ctx.state, node_id)
        try:
            while True:
                watch.event.clear()
                self._ctx.require_leader()  # a deposed leader ends the stream; agents re-find
                term = self._ctx.consensus.term()
                # From here to `sent`, no await: the set and the change number agree.
                changed, seq = hub.changes(watch)
                if request.deltas and stream.version and term == stream.term and changed is not None:
                    kind, sets = "delta", stream.delta(term, changed)
                else:  # the first set, a new term, a stream too far behind, an older agent
                    kind, sets = "whole", stream.whole(term)
                hub.sent(watch, seq)
                if sets and hub.on_sent is not None:
                    hub.on_sent(kind, len(sets), sum(len(s.assignments) + len(s.removed) for s in sets))
                for aset in sets:
                    yield aset
                await watch.event.wait()
        finally:
            hub.unsubscribe(watch)

    @rpc_boundary
    async def ReportTaskEvents(self, request, context):
        node_id = v.require_id(request.node_id, "node_id")
        if len(request.events) > MAX_EVENTS_PER_REPORT:
            raise InvalidArgument(f"{len(request.events)} events; at most {MAX_EVENTS_PER_REPORT} per report")
        for ev in request.events:
            v.require_id(ev.task_id, "event.task_id")
            if ev.attempt < 1:
                raise InvalidArgument("event.attempt must be >= 1")
            if ev.kind not in (tasks_pb2.TaskEvent.KIND_STARTED, tasks_pb2.TaskEvent.KIND_EXITED):
                raise InvalidArgument(f"unknown event kind {ev.kind}")
            v.check_text(ev.reason, "event.reason", 1024)
        await self._ctx.read()
        if node_id not in self._ctx.state.nodes:
            raise NotFound(f'node "{node_id}" is not registered')
        check_node_caller(self._ctx.state, node_id)
        # Not the events about tasks this cluster never had (e.g. the state was wiped).
        known = [ev for ev in request.events if ev.task_id in self._ctx.state.tasks.tasks]
        accepted = await self._commit_events(node_id, known)
        if request.full_report:
            accepted += await self._settle(node_id, request.running)
        return coordinator_pb2.ReportTaskEventsResponse(accepted=accepted)

    async def _settle(self, node_id: str, running) -> int:
        """A restarted agent's full report: attempts we think run there but it does not
        are lost. (Attempts it runs that it should not are stopped by its own reconcile.)"""
        alive = {(a.task_id, a.attempt) for a in running}
        lost = [
            tasks_pb2.TaskEvent(
                task_id=task.id, attempt=task.attempt, kind=tasks_pb2.TaskEvent.KIND_EXITED,
                exit_code=-9, reason="lost: the agent no longer runs it",
            )
            for task in self._ctx.state.tasks.on_node(node_id)
            if task.state == P[TaskState.RUNNING] and (task.id, task.attempt) not in alive
        ]
        if lost:
            await self._commit_events(node_id, lost)
            logger.warning("node %s: %d attempts lost across an agent restart", node_id, len(lost))
        return len(lost)

    async def _commit_events(self, node_id: str, events: list[tasks_pb2.TaskEvent]) -> int:
        """One command for all of `events` (one Raft round), cut only where a batch would
        pass the entry cap; returns how many were about tasks the state has."""
        taken = 0
        for batch in v.batches_by_size(events, EVENTS_ENTRY_BYTES):
            cmd = state_pb2.Command(task_events=state_pb2.TaskEventsCmd(node_id=node_id, events=batch))
            taken += await self._ctx.commit(cmd)
        return taken
