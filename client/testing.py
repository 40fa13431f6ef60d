"""A small in-memory Coordinator for tests of the client, the CLI and tools built on them.

    fake = FakeCoordinator()
    fake.add_node(make_node("n1", "agent-1"))
    with serve(fake) as address:
        assert Client(address).nodes()[0].name == "agent-1"

It answers from a dict of nodes and a dict of tasks, records every call, and can be told to
act as a follower (`leader_hint`), to fail the next calls with UNAVAILABLE, or to answer
slowly. Tests move tasks along by hand (`assign`, `finish`, `requeue`); `FakeAgent` serves
their output (`Agent.StreamLogs`) from memory:

    fake, agent = FakeCoordinator(), FakeAgent()
    with serve(fake) as address, serve(agent) as agent_address:
        t = Client(address).submit(["true"])
        fake.assign(t.id, "n1", agent_address)
        agent.start(t.id, 1); agent.write(t.id, 1, b"hi\n"); agent.exit(t.id, 1)
        fake.finish(t.id, exit_code=0)

Not a model of the real coordinator's semantics beyond what a client can observe.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from lepton.common.errors import LEADER_METADATA_KEY, RETRY_AFTER_METADATA_KEY, LeptonError
from lepton.common.paging import MAX_PAGE, decode_token, page_size, take_page
from lepton.common.states import TaskState
from lepton.common.validation import join_host_port, split_host_port
from lepton.v1 import agent_pb2 as apb
from lepton.v1 import agent_pb2_grpc as agrpc
from lepton.v1 import common_pb2 as pb
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cgrpc
from lepton.v1 import tasks_pb2 as tpb

__all__ = ["FakeAgent", "FakeCoordinator", "make_node", "make_task", "serve"]

FINAL = tuple(s.proto for s in TaskState if s.final)


def make_node(
    node_id: str,
    name: str = "",
    *,
    address: str = "127.0.0.1:7070",
    state: int = pb.NODE_STATE_READY,
    draining: bool = False,
    voter: bool = False,
    labels: dict[str, str] | None = None,
    cpus: int = 8,
    memory_bytes: int = 16 * 1024**3,
    gpus: int = 0,
    usage: pb.Usage | None = None,
    last_heartbeat_ms: int = 0,
) -> pb.Node:
    """A Node message with plausible defaults."""
    capacity = pb.Capacity(
        cpu_logical=cpus,
        cpu_physical=max(1, cpus // 2),
        cpu_model="Fake CPU",
        memory_bytes=memory_bytes,
        disk_bytes=100 * 1024**3,
        gpus=[
            pb.Gpu(index=i, uuid=f"GPU-{i}", name="Fake GPU", memory_total_bytes=80 * 1024**3)
            for i in range(gpus)
        ],
    )
    node = pb.Node(
        id=node_id,
        name=name or node_id,
        address=address,
        labels=labels or {},
        capacity=capacity,
        state=state,
        draining=draining,
        voter=voter,
        registered_at_ms=1_700_000_000_000,
        state_changed_at_ms=1_700_000_000_000,
        version="0.1.0",
        last_heartbeat_ms=last_heartbeat_ms,
    )
    if usage is not None:
        node.usage.CopyFrom(usage)
    return node


def make_task(
    task_id: str,
    *,
    argv: list[str] | None = None,
    shell: str = "",
    state: int = tpb.TASK_STATE_PENDING,
    attempt: int = 1,
    name: str = "",
    owner: str = "",
    priority: int = 0,
    max_retries: int = 0,
    node_id: str = "",
    node_address: str = "",
    reason: str = "",
    created_at_ms: int = 1_700_000_000_000,
) -> tpb.Task:
    """A Task message with plausible defaults (`argv` defaults to `["true"]`)."""
    spec = tpb.TaskSpec(
        name=name,
        argv=argv if argv is not None else ([] if shell else ["true"]),
        shell=shell,
        owner=owner,
        priority=priority,
        max_retries=max_retries,
    )
    return tpb.Task(
        id=task_id,
        spec=spec,
        state=state,
        attempt=attempt,
        node_id=node_id,
        node_address=node_address,
        reason=reason,
        created_at_ms=created_at_ms,
    )


class FakeCoordinator(cgrpc.CoordinatorServicer):
    """The Coordinator service over dicts of nodes and tasks. Attributes may be changed
    mid-test."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.nodes: dict[str, pb.Node] = {}
        self.calls: list[tuple[str, Any]] = []
        # Act as a follower: refuse every call with UNAVAILABLE and this leader address.
        self.leader_hint: str = ""
        # Fail this many next calls with a server-side UNAVAILABLE (e.g. no leader yet).
        self.fail_unavailable: int = 0
        # Shed this many next calls as the leader's admission does (RESOURCE_EXHAUSTED with
        # `retry-after-ms`); with shed_hint_ms None, refuse them as a quota does (no hint).
        self.shed_next: int = 0
        self.shed_hint_ms: int | None = 20
        # Sleep this long before answering.
        self.delay_s: float = 0.0
        self.status = cpb.ClusterStatus(
            leader_id="n1", leader="127.0.0.1:7070", term=1, version="0.1.0"
        )
        self.events: queue.Queue[cpb.NodeEvent | None] = queue.Queue()
        self.watchers = 0
        self.tasks: dict[str, tpb.Task] = {}
        self.by_request: dict[str, str] = {}
        # Store the next this-many submissions, then answer UNAVAILABLE anyway (a lost reply).
        self.lose_submit_replies: int = 0
        self.task_changed = threading.Condition(self.lock)

    def add_node(self, node: pb.Node) -> None:
        with self.lock:
            self.nodes[node.id] = node

    def push_event(self, event: cpb.NodeEvent | None) -> None:
        """Send `event` to the (one) open watch; None ends the stream."""
        self.events.put(event)

    def _enter(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls.append((method, request))
            fail = self.fail_unavailable > 0
            if fail:
                self.fail_unavailable -= 1
            shed = self.shed_next > 0
            if shed:
                self.shed_next -= 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.leader_hint:
            context.set_trailing_metadata(((LEADER_METADATA_KEY, self.leader_hint),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "not the leader")
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no leader elected yet")
        if shed:
            if self.shed_hint_ms is not None:
                context.set_trailing_metadata(((RETRY_AFTER_METADATA_KEY, str(self.shed_hint_ms)),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy (fake)")

    def _get(self, node_id: str, context: grpc.ServicerContext) -> pb.Node:
        with self.lock:
            node = self.nodes.get(node_id)
        if node is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f'node "{node_id}" not found')
        return node

    def RegisterNode(self, request: cpb.RegisterNodeRequest, context: grpc.ServicerContext) -> Any:
        self._enter("RegisterNode", request, context)
        node = pb.Node(
            id=request.node_id,
            name=request.name,
            address=request.address,
            labels=request.labels,
            capacity=request.capacity,
            voter=request.voter,
            version=request.version,
            state=pb.NODE_STATE_READY,
            registered_at_ms=int(time.time() * 1000),
            last_heartbeat_ms=int(time.time() * 1000),
        )
        self.add_node(node)
        return cpb.RegisterNodeResponse(node=node, heartbeat_interval_ms=1000)

    def GetNode(self, request: cpb.GetNodeRequest, context: grpc.ServicerContext) -> Any:
        self._enter("GetNode", request, context)
        return self._get(request.node_id, context)

    def ListNodes(self, request: cpb.ListNodesRequest, context: grpc.ServicerContext) -> Any:
        self._enter("ListNodes", request, context)
        with self.lock:
            nodes = [
                n for n in self.nodes.values() if not request.states or n.state in request.states
            ]
        return cpb.ListNodesResponse(nodes=nodes)

    def DrainNode(self, request: cpb.DrainNodeRequest, context: grpc.ServicerContext) -> Any:
        self._enter("DrainNode", request, context)
        node = self._get(request.node_id, context)
        with self.lock:
            node.draining = request.enable
        return node

    def GetClusterStatus(
        self, request: cpb.GetClusterStatusRequest, context: grpc.ServicerContext
    ) -> Any:
        self._enter("GetClusterStatus", request, context)
        return self.status

    def WatchNodes(
        self, request: cpb.WatchNodesRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        self._enter("WatchNodes", request, context)
        with self.lock:
            self.watchers += 1
        try:
            while context.is_active():
                try:
                    event = self.events.get(timeout=0.05)
                except queue.Empty:
                    continue
                if event is None:
                    return
                yield event
        finally:
            with self.lock:
                self.watchers -= 1

    # -- tasks ---------------------------------------------------------------------------

    def add_task(self, task: tpb.Task) -> None:
        with self.lock:
            self.tasks[task.id] = task
            self.task_changed.notify_all()

    def task(self, task_id: str) -> tpb.Task:
        """A copy of the stored task."""
        with self.lock:
            out = tpb.Task()
            out.CopyFrom(self.tasks[task_id])
            return out

    def update_task(self, task_id: str, **fields: Any) -> None:
        """Set fields of a stored task (e.g. `state=tpb.TASK_STATE_RUNNING`, `reason=...`)."""
        with self.lock:
            task = self.tasks[task_id]
            for key, value in fields.items():
                setattr(task, key, value)
            self.task_changed.notify_all()

    def assign(
        self, task_id: str, node_id: str, address: str, *, state: int = tpb.TASK_STATE_RUNNING
    ) -> None:
        """Place the task's current attempt on a node (running, unless `state` says else)."""
        now = int(time.time() * 1000)
        self.update_task(
            task_id,
            state=state,
            node_id=node_id,
            node_address=address,
            reason="",
            assigned_at_ms=now,
            started_at_ms=now if state == tpb.TASK_STATE_RUNNING else 0,
        )

    def finish(self, task_id: str, exit_code: int | None = 0, reason: str = "") -> None:
        """The current attempt ended: succeeded (0), or failed (retried while retries last).
        `exit_code` None: ended without one (e.g. node lost)."""
        now = int(time.time() * 1000)
        with self.lock:
            task = self.tasks[task_id]
            if exit_code is not None:
                task.has_exit_code, task.exit_code = True, exit_code
            if exit_code == 0:
                self._record(task, tpb.TASK_STATE_SUCCEEDED, 0, reason or "exited", now)
                task.state, task.reason, task.finished_at_ms = tpb.TASK_STATE_SUCCEEDED, "", now
                self.task_changed.notify_all()
                return
            why = reason or (f"exit code {exit_code}" if exit_code is not None else "lost")
            task.failures += 1
            if task.failures <= task.spec.max_retries:
                self._requeue(task, tpb.TASK_STATE_FAILED, exit_code, why, now)
                task.reason = f"retry {task.failures}/{task.spec.max_retries} after {why}"
            else:
                self._record(task, tpb.TASK_STATE_FAILED, exit_code, why, now)
                task.state, task.reason, task.finished_at_ms = tpb.TASK_STATE_FAILED, why, now
            self.task_changed.notify_all()

    def requeue(self, task_id: str, reason: str = "preempted") -> None:
        """The current attempt was preempted and has exited: back to pending, attempt + 1."""
        with self.lock:
            task = self.tasks[task_id]
            self._requeue(task, tpb.TASK_STATE_PREEMPTED, None, reason, int(time.time() * 1000))
            self.task_changed.notify_all()

    @staticmethod
    def _record(task: tpb.Task, state: int, code: int | None, reason: str, now: int) -> None:
        task.history.append(
            tpb.AttemptRecord(
                attempt=task.attempt,
                node_id=task.node_id,
                state=state,
                exit_code=code or 0,
                reason=reason,
                started_at_ms=task.started_at_ms,
                finished_at_ms=now,
            )
        )

    def _requeue(self, task: tpb.Task, outcome: int, code: int | None, why: str, now: int) -> None:
        self._record(task, outcome, code, why, now)
        task.state, task.attempt = tpb.TASK_STATE_PENDING, task.attempt + 1
        task.node_id = task.node_address = ""
        del task.gpu_indices[:]
        task.started_at_ms = task.assigned_at_ms = 0
        task.reason = f"requeued after {why}"

    def _get_task(self, task_id: str, context: grpc.ServicerContext) -> tpb.Task:
        with self.lock:
            task = self.tasks.get(task_id)
            out = tpb.Task()
            if task is not None:
                out.CopyFrom(task)
        if task is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f'task "{task_id}" not found')
        return out

    def SubmitTask(self, request: cpb.SubmitTaskRequest, context: grpc.ServicerContext) -> Any:
        self._enter("SubmitTask", request, context)
        spec = request.spec
        if not spec.argv and not spec.shell:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the command is empty: give argv or shell"
            )
        if spec.argv and spec.shell:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give argv or shell, not both")
        if spec.resources.cpu < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "resources.cpu must be >= 0")
        with self.lock:
            existing = self.by_request.get(spec.request_id) if spec.request_id else None
            if existing is None:
                task = tpb.Task(
                    id="t-" + uuid.uuid4().hex[:12],
                    spec=spec,
                    state=tpb.TASK_STATE_PENDING,
                    attempt=1,
                    created_at_ms=int(time.time() * 1000),
                    reason="waiting for the scheduler",
                )
                self.tasks[task.id] = task
                if spec.request_id:
                    self.by_request[spec.request_id] = task.id
                existing = task.id
            lose = self.lose_submit_replies > 0
            if lose:
                self.lose_submit_replies -= 1
            out = tpb.Task()
            out.CopyFrom(self.tasks[existing])
        if lose:
            context.abort(grpc.StatusCode.UNAVAILABLE, "leader stepped down before replying")
        return out

    def GetTask(self, request: cpb.GetTaskRequest, context: grpc.ServicerContext) -> Any:
        self._enter("GetTask", request, context)
        return self._get_task(request.task_id, context)

    def ListTasks(self, request: cpb.ListTasksRequest, context: grpc.ServicerContext) -> Any:
        self._enter("ListTasks", request, context)
        try:  # pages as the coordinator's (coordinator/api/task_api.py) do
            after = decode_token(request.page_token, (int, str))
            size = page_size(request.page_size)
        except LeptonError as err:
            context.abort(err.code, err.message)
        legacy = request.limit and not (request.page_size or after)
        with self.lock:

            def select(key: tuple[int, str]) -> tpb.Task | None:
                t = self.tasks[key[1]]
                ok = (not request.states or t.state in request.states) and (
                    not request.owner or t.spec.owner == request.owner
                ) and t.id.startswith(request.id_prefix)
                return t if ok else None

            keys = sorted((t.created_at_ms, t.id) for t in self.tasks.values())
            out, token = take_page(
                keys, after, size=min(request.limit, MAX_PAGE) if legacy else size,
                select=select, size_of=lambda t: t.ByteSize(),
                reverse=request.newest_first or bool(legacy),
            )
            if legacy:
                return cpb.ListTasksResponse(tasks=out[::-1])
            return cpb.ListTasksResponse(tasks=out, next_page_token=token)

    def CancelTask(self, request: cpb.CancelTaskRequest, context: grpc.ServicerContext) -> Any:
        self._enter("CancelTask", request, context)
        self._get_task(request.task_id, context)
        with self.lock:
            task = self.tasks[request.task_id]
            if task.state in FINAL:
                name = TaskState.name_of(task.state)
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f'task "{task.id}" already {name}'
                )
            now = int(time.time() * 1000)
            if task.node_id:
                self._record(task, tpb.TASK_STATE_CANCELLED, None, "cancelled", now)
            task.state, task.reason, task.finished_at_ms = (
                tpb.TASK_STATE_CANCELLED,
                "cancelled",
                now,
            )
            self.task_changed.notify_all()
            out = tpb.Task()
            out.CopyFrom(task)
            return out

    def WaitTask(self, request: cpb.WaitTaskRequest, context: grpc.ServicerContext) -> Any:
        self._enter("WaitTask", request, context)
        if not 0 <= request.timeout_s <= 300:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "timeout_s must be between 0 and 300")
        deadline = time.monotonic() + request.timeout_s
        self._get_task(request.task_id, context)
        with self.lock:
            while True:
                task = self.tasks[request.task_id]
                left = deadline - time.monotonic()
                if task.state in FINAL or left <= 0 or not context.is_active():
                    out = tpb.Task()
                    out.CopyFrom(task)
                    return out
                self.task_changed.wait(min(left, 0.05))


class FakeAgent(agrpc.AgentServicer):
    """The Agent service over in-memory task output. `start`, `write` and `exit` an attempt;
    a following StreamLogs ends once its attempt has exited and its output is read."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.output: dict[tuple[str, int], bytearray] = {}
        self.live: set[tuple[str, int]] = set()
        self.calls: list[apb.StreamLogsRequest] = []
        self.chunk_size = 1 << 16

    def start(self, task_id: str, attempt: int) -> None:
        with self.cond:
            self.output.setdefault((task_id, attempt), bytearray())
            self.live.add((task_id, attempt))
            self.cond.notify_all()

    def write(self, task_id: str, attempt: int, data: bytes) -> None:
        with self.cond:
            self.output.setdefault((task_id, attempt), bytearray()).extend(data)
            self.cond.notify_all()

    def exit(self, task_id: str, attempt: int) -> None:
        with self.cond:
            self.live.discard((task_id, attempt))
            self.cond.notify_all()

    def StreamLogs(
        self, request: apb.StreamLogsRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        with self.cond:
            self.calls.append(request)
            attempt = request.attempt or max(
                (a for t, a in self.output if t == request.task_id), default=1
            )
            key = (request.task_id, attempt)
            known = key in self.output
        if not known:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"attempt {attempt} of task {request.task_id} never ran on this node",
            )
        offset = request.offset
        while context.is_active():
            with self.cond:
                done = not request.follow or key not in self.live
                data = bytes(self.output[key][offset : offset + self.chunk_size])
                if not data and not done:
                    self.cond.wait(0.05)
                    continue
            if not data:
                return
            yield apb.LogChunk(data=data, offset=offset)
            offset += len(data)


@contextlib.contextmanager
def serve(
    servicer: cgrpc.CoordinatorServicer | agrpc.AgentServicer,
    address: str = "127.0.0.1:0",
    *,
    agent: agrpc.AgentServicer | None = None,
) -> Iterator[str]:
    """Serve `servicer` (a Coordinator or an Agent), and `agent` too when given, on
    `address` (port 0: a free one); yields the `host:port` it got."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    if isinstance(servicer, cgrpc.CoordinatorServicer):
        cgrpc.add_CoordinatorServicer_to_server(servicer, server)
    if isinstance(servicer, agrpc.AgentServicer):
        agrpc.add_AgentServicer_to_server(servicer, server)
    if agent is not None:
        agrpc.add_AgentServicer_to_server(agent, server)
    port = server.add_insecure_port(address)
    server.start()
    try:
        yield join_host_port(split_host_port(address)[0], port)
    finally:
        server.stop(grace=None)
