"""The task half of the client: submit, inspect, cancel and wait for tasks, read their output.

    with Client("10.0.0.1:7070") as c:
        t = c.submit(["python", "train.py"], gpus=1, memory="16GiB", max_retries=2)
        for chunk in c.logs(t.id, follow=True):
            sys.stdout.buffer.write(chunk)
        print(c.wait(t.id).state)

`TaskMethods` is mixed into `Client`: the coordinator calls go to the leader like every other
call; `logs` reads from the agent that runs the attempt (`TaskInfo.node_address`), directly.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import grpc

from lepton.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    LeptonError,
    NotFound,
    Unavailable,
    from_rpc_error,
)
from lepton.common.job_ids import is_job_id
from lepton.common.paging import MAX_PAGE, walk_pages
from lepton.common.sizes import parse_size
from lepton.common.validation import MAX_GPUS, MAX_PRIORITY, MAX_RETRIES, require_id, spec_batches
from lepton.dataplane.code_archive import check_digest
from lepton.v1 import agent_pb2 as apb
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import tasks_pb2
from lepton.v1.agent_pb2_grpc import AgentStub
from lepton.v1.coordinator_pb2_grpc import CoordinatorStub

from ._coalesce import Coalescer
from ._transport import transport_failure
from .types import TaskInfo, task_state_to_proto

if TYPE_CHECKING:
    from .client import _Conn

__all__ = ["TASK_OPTIONS", "TaskMethods", "TaskOptions", "build_spec", "parse_size"]

log = logging.getLogger(__name__)

# WaitTask is a long poll; one call waits at most this long on the server.
WAIT_CHUNK_S = 60.0
# How often `logs(follow=True)` re-reads a task that is not running yet, or whose attempt is
# over on its agent but not yet in the coordinator's state (doubling up to the maximum).
LOG_POLL_INITIAL_S = 0.2
LOG_POLL_MAX_S = 1.0

def _number(value: Any, what: str, *, integer: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise InvalidArgument(f"{what} must be {kind}, not {value!r}")
    if not math.isfinite(value):
        raise InvalidArgument(f"{what} must be finite, not {value}")
    return value


def _non_negative(value: Any, what: str, *, integer: bool = False) -> Any:
    if _number(value, what, integer=integer) < 0:
        raise InvalidArgument(f"{what} must not be negative, got {value:g}")
    return value


def _at_most(value: Any, what: str, high: int) -> Any:
    """Within the cluster's limit, which also keeps it within its proto field (past that,
    building the message raised ValueError)."""
    if value > high:
        raise InvalidArgument(f"{what} is {value}; at most {high}")
    return value


def _priority(value: Any) -> int:
    if not -MAX_PRIORITY <= _number(value, "priority", integer=True) <= MAX_PRIORITY:
        raise InvalidArgument(f"priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}, not {value}")
    return value


def _str_map(value: Mapping[str, str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, val in (value or {}).items():
        if not isinstance(key, str) or not key or not isinstance(val, str):
            raise InvalidArgument(f"{what} must map non-empty strings to strings: {key!r}={val!r}")
        out[key] = val
    return out


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, not {type(value).__name__}")
    return value


@dataclass(frozen=True, kw_only=True)
class TaskOptions:
    """A task's options besides its argv: the one list of keywords that `build_spec`,
    `Client.submit`, the items of `submit_many`, `submit_job` and lepton-ctl's submit/run
    take (the CLI maps its options onto these fields).

    `shell`: a command line run under `/bin/sh -c` (instead of argv). `memory` and
    `gpu_memory` (per GPU) take bytes or strings such as `"16GiB"` (see `parse_size`).
    `constraints`: node labels that must match. `timeout`: seconds the task may run (0: no
    limit); `grace`: seconds between SIGTERM and SIGKILL when it is stopped (0: 10 s).
    `request_id` None becomes a fresh uuid4 hex, which makes the submission idempotent (a
    retry, or a second submit with the same id, returns the same task); `""` sends none.
    `on_disconnect`: `"stop"` (default): an attempt whose node loses the leader past its
    lease is killed there before the leader starts a replacement; `"keep"`: it runs on, and
    may overlap its replacement (for work that must never be stopped).
    """

    shell: str = ""
    name: str = ""
    cpu: float = 0.0
    memory: int | str = 0
    gpus: int = 0
    gpu_memory: int | str = 0
    priority: int = 0
    constraints: Mapping[str, str] | None = None
    env: Mapping[str, str] | None = None
    workdir: str = ""
    max_retries: int = 0
    timeout: float = 0.0
    grace: float = 0.0
    owner: str = ""
    request_id: str | None = None
    on_disconnect: str = "stop"
    # The stored code archive the task starts in (`Client.push_code`); the submit calls
    # also take `working_dir=FOLDER`, which they pack, store and turn into this.
    code_digest: str = ""


TASK_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(TaskOptions))


def build_spec(argv: Sequence[str] | None = None, **options: Any) -> tasks_pb2.TaskSpec:
    """The TaskSpec `Client.submit` sends, after the checks that need no server.
    `options` are `TaskOptions`' fields; another keyword is a TypeError."""
    o = TaskOptions(**options)
    if isinstance(argv, (str, bytes)):
        raise InvalidArgument(
            "argv must be a list of strings, not a string; for a command line use shell="
        )
    args = list(argv or ())
    for i, arg in enumerate(args):
        if not isinstance(arg, str):
            raise InvalidArgument(f"argv[{i}] must be a string, not {type(arg).__name__}")
    shell = _text(o.shell, "shell")
    if not args and not shell.strip():
        raise InvalidArgument("the command is empty: give argv or shell")
    if args and shell:
        raise InvalidArgument("give argv or shell, not both")
    if args and not args[0]:
        raise InvalidArgument("argv[0] is empty")
    request_id = uuid.uuid4().hex if o.request_id is None else o.request_id
    return tasks_pb2.TaskSpec(
        name=_text(o.name, "name"),
        argv=args,
        shell=shell,
        env=_str_map(o.env, "env"),
        workdir=_text(o.workdir, "workdir"),
        resources=tasks_pb2.Resources(
            cpu=float(_non_negative(o.cpu, "cpu")),
            memory_bytes=parse_size(o.memory, "memory"),
            gpus=_at_most(_non_negative(o.gpus, "gpus", integer=True), "gpus", MAX_GPUS),
            gpu_memory_bytes=parse_size(o.gpu_memory, "gpu memory"),
        ),
        priority=_priority(o.priority),
        constraints=_str_map(o.constraints, "constraints"),
        max_retries=_at_most(_non_negative(o.max_retries, "max_retries", integer=True), "max_retries", MAX_RETRIES),
        timeout_s=float(_non_negative(o.timeout, "timeout")),
        owner=_text(o.owner, "owner"),
        request_id=_text(request_id, "request_id"),
        grace_s=float(_non_negative(o.grace, "grace")),
        on_disconnect=_on_disconnect(o.on_disconnect),
        code_digest=_code_digest(o.code_digest),
    )


def _code_digest(value: object) -> str:
    return check_digest(value) if value else ""


ON_DISCONNECT = {"stop": tasks_pb2.ON_DISCONNECT_STOP, "keep": tasks_pb2.ON_DISCONNECT_KEEP}


def _on_disconnect(value: object) -> int:
    if value not in ON_DISCONNECT:
        raise InvalidArgument(f"on_disconnect must be one of {', '.join(ON_DISCONNECT)}, not {value!r}")
    return ON_DISCONNECT[value]


class _Pause:
    """Sleeps that double from LOG_POLL_INITIAL_S to LOG_POLL_MAX_S; `reset()` on progress."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._next = LOG_POLL_INITIAL_S

    def __call__(self) -> None:
        time.sleep(self._next)
        self._next = min(self._next * 2, LOG_POLL_MAX_S)


class TaskMethods:
    """The task API of `Client` (a mixin: it uses the client's leader-finding call machinery)."""

    if TYPE_CHECKING:
        _timeout: float
        _closed: bool
        _streams: Any

        def _unary(self, stub_cls: type, method: str, request: Any, **kw: Any) -> Any: ...
        def _call(self, attempt: Callable[[_Conn, float], Any], **kw: Any) -> Any: ...
        def _conn(self, address: str) -> _Conn: ...
        def node(self, node_id: str, *, timeout: float | None = None) -> Any: ...
        def _with_code(self, options: Mapping[str, Any], shipped: dict[str, str] | None = None,
                       ) -> dict[str, Any]: ...

    def submit(self, argv: Sequence[str] | None = None, **options: Any) -> TaskInfo:
        """Submit a task; returns it once the cluster has stored it (pending).

        Give `argv` (exec'd as is) or `shell=` (run under `/bin/sh -c`); the other options
        are `TaskOptions`' fields (cpu, memory, gpus, priority, max_retries, timeout, ...).
        `working_dir=FOLDER`: the task starts in a copy of that folder, packed and stored
        first unless the cluster has it already (`push_code`).
        Obvious mistakes raise InvalidArgument before anything is sent.
        """
        spec = build_spec(argv, **self._with_code(options))
        if not spec.request_id:  # not safe to repeat, so not to batch either: alone
            return TaskInfo.from_proto(self._unary(CoordinatorStub, "SubmitTask",
                                                   cpb.SubmitTaskRequest(spec=spec), idempotent=False))
        # Threads submitting at once share calls (`_coalesce`); a lone caller's is its own.
        return TaskInfo.from_proto(self._submitter().submit(spec))

    def _submitter(self) -> Coalescer:
        with self._lock:
            if self._coalescer is None:
                # Safe to repeat: with a request id, the leader answers a repeat with the
                # task the first one made.
                self._coalescer = Coalescer(
                    lambda spec: self._unary(CoordinatorStub, "SubmitTask", cpb.SubmitTaskRequest(spec=spec)),
                    lambda specs: self._unary(CoordinatorStub, "SubmitTasks",
                                              cpb.SubmitTasksRequest(specs=specs)).tasks,
                    size_of=lambda spec: spec.ByteSize(),  # batches within the server's byte cap too
                )
            return self._coalescer

    def submit_many(self, tasks: Sequence[Mapping[str, Any]], *, batch: int = 1000) -> list[TaskInfo]:
        """Submit many tasks, `batch` per call; returns them in order, once stored.

        Each item holds `submit`'s keyword arguments (`argv` or `shell`, `cpu`, ...). Every
        spec is checked before anything is sent. Each call is one log entry, stored whole
        or not at all, and is retried safely (each spec has a request id). A sweep of
        thousands of tasks costs a few calls instead of thousands: per-call overhead,
        not the log, limits how fast one client can submit.
        """
        if not 1 <= batch <= 1000:
            raise InvalidArgument(f"batch must be between 1 and 1000, not {batch}")
        specs = []
        shipped: dict[str, str] = {}  # each working_dir is packed and stored once
        for i, kwargs in enumerate(tasks):
            if not isinstance(kwargs, Mapping):
                raise InvalidArgument(f"tasks[{i}] must be a mapping of submit() arguments")
            try:
                specs.append(build_spec(**self._with_code(kwargs, shipped)))
            except TypeError as err:
                raise InvalidArgument(f"tasks[{i}]: {err}") from None
            except InvalidArgument as err:
                raise InvalidArgument(f"tasks[{i}]: {err.message}") from None
        out: list[TaskInfo] = []
        for chunk in spec_batches(specs, batch):  # by count and bytes: one log entry each
            req = cpb.SubmitTasksRequest(specs=chunk)
            idempotent = all(s.request_id for s in chunk)
            resp = self._unary(CoordinatorStub, "SubmitTasks", req, idempotent=idempotent)
            out.extend(TaskInfo.from_proto(t) for t in resp.tasks)
        return out

    def get(self, task_id: str, *, timeout: float | None = None) -> TaskInfo:
        """One task by its exact id; NotFound when there is none."""
        req = cpb.GetTaskRequest(task_id=require_id(task_id, "task id"))
        return TaskInfo.from_proto(self._unary(CoordinatorStub, "GetTask", req, timeout=timeout))

    def tasks(
        self,
        states: Sequence[str] | None = None,
        owner: str | None = None,
        limit: int = 0,
        *,
        id_prefix: str = "",
        timeout: float | None = None,
    ) -> list[TaskInfo]:
        """Tasks, oldest first; only those in one of `states`, of `owner` and whose id
        starts with `id_prefix` when given. `limit` > 0 keeps the newest `limit` of them.
        Pages through the server's answers (`timeout` is per page). Also callable as
        `list(...)`."""
        if isinstance(states, str):
            states = [states]
        limit = _non_negative(limit, "limit", integer=True)
        base = cpb.ListTasksRequest(
            states=[task_state_to_proto(s) for s in states or ()],
            owner=_text(owner or "", "owner"),
            id_prefix=_text(id_prefix, "id_prefix"),
            newest_first=bool(limit),  # the newest `limit`: walk from the newest end
        )
        out: list[TaskInfo] = []

        def fetch(token: str) -> tuple[Sequence[tasks_pb2.Task], str]:
            req = cpb.ListTasksRequest()
            req.CopyFrom(base)
            req.page_token = token
            req.page_size = min(limit - len(out), MAX_PAGE) if limit else 0
            resp = self._unary(CoordinatorStub, "ListTasks", req, timeout=timeout)
            return resp.tasks, resp.next_page_token

        for task in walk_pages(fetch):
            out.append(TaskInfo.from_proto(task))
            if limit and len(out) >= limit:
                break
        return out[::-1] if limit else out

    def find_task(self, ref: str, *, timeout: float | None = None) -> TaskInfo:
        """The task `ref` names: its exact id, else a unique id prefix (`t-` may be left out).

        Raises NotFound when nothing matches and InvalidArgument when `ref` is ambiguous.
        """
        ref = require_id(ref, "task id")
        if is_job_id(ref):  # jobs are j-..., tasks (job members too) t-...: never both
            raise InvalidArgument(f'"{ref}" is a job id, not a task id: see jobs show|cancel|logs')
        missing = NotFound(f'task "{ref}" not found')
        try:
            return self.get(ref, timeout=timeout)
        except NotFound as err:
            missing = err  # it may say the task was garbage-collected, and what became of it
        except InvalidArgument:
            pass  # not an exact id (a prefix, or with characters no id has): look it up
        matches = self.tasks(id_prefix=ref, timeout=timeout)
        if not ref.startswith("t-"):
            matches += self.tasks(id_prefix="t-" + ref, timeout=timeout)
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise missing
        listed = ", ".join(sorted(t.id for t in matches)[:5])
        more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
        raise InvalidArgument(f'task "{ref}" is ambiguous: matches {listed}{more}')

    def cancel(self, task_id: str, *, timeout: float | None = None) -> TaskInfo:
        """Cancel a task (its running attempt gets SIGTERM, then SIGKILL after its grace).
        Returns it, `cancelled`. FailedPrecondition when it is already final."""
        req = cpb.CancelTaskRequest(task_id=require_id(task_id, "task id"))
        # A repeat after a lost reply changes nothing (it then says "already cancelled").
        resp = self._unary(CoordinatorStub, "CancelTask", req, idempotent=True, timeout=timeout)
        return TaskInfo.from_proto(resp)

    def wait(self, task_id: str, timeout: float | None = None) -> TaskInfo:
        """Block until the task is final (succeeded, failed or cancelled); returns it.

        `timeout`: seconds to wait in all (None: as long as it takes); DeadlineExceeded when
        it passes first. The leader is long-polled (WaitTask), at most WAIT_CHUNK_S a call.
        """
        task_id = require_id(task_id, "task id")
        if timeout is not None:
            _non_negative(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_CHUNK_S if deadline is None else max(0.0, deadline - time.monotonic())
            chunk = min(WAIT_CHUNK_S, left)
            task = self._wait_once(task_id, chunk)
            if task.done:
                return task
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(f'task "{task_id}" is still {task.state} after {timeout:g}s')

    def _wait_once(self, task_id: str, chunk: float) -> TaskInfo:
        req = cpb.WaitTaskRequest(task_id=task_id, timeout_s=chunk)
        # The server holds the call up to `chunk`; the usual budget is for its answer.
        budget = chunk + self._timeout

        def attempt(conn: _Conn, _attempt_timeout: float) -> Any:
            return conn.stub(CoordinatorStub).WaitTask(req, timeout=budget)

        resp = self._call(attempt, what="WaitTask", idempotent=True, timeout=budget)
        return TaskInfo.from_proto(resp)

    # -- output --------------------------------------------------------------------------

    def logs(
        self,
        task_id: str,
        *,
        follow: bool = False,
        attempt: int = 0,
        from_attempt: int = 0,
        on_task: Callable[[TaskInfo], None] | None = None,
    ) -> Iterator[bytes]:
        """A task's output (stdout and stderr as one stream, in order) as raw byte chunks.

        Read from the agent that runs or ran the attempt. Without `follow`: what there is
        now, of `attempt` (0: the latest one that was placed on a node).
        With `follow`: waits for a pending task to be placed, streams the output as it is
        made, and stops once the task is final and its output drained. With `attempt` N, only
        that attempt is followed. Otherwise it starts at the current attempt, or at
        `from_attempt` (`run` passes 1, so that nothing is missed), and goes on with the next
        attempt whenever one fails and is retried, or is preempted and requeued.
        `on_task` is called with every state of the task the iterator fetches (the CLI uses
        it for notes on pending reasons and retries). The output of an attempt whose agent
        cannot be reached once the attempt is over is skipped, with a warning (logged).
        """
        task_id = require_id(task_id, "task id")
        _non_negative(attempt, "attempt", integer=True)
        _non_negative(from_attempt, "from_attempt", integer=True)
        if attempt and from_attempt:
            raise InvalidArgument("give attempt or from_attempt, not both")
        return self._logs(
            task_id, follow=bool(follow), attempt=attempt, first=from_attempt, on_task=on_task
        )

    def _logs(
        self,
        task_id: str,
        *,
        follow: bool,
        attempt: int,
        first: int,
        on_task: Callable[[TaskInfo], None] | None,
    ) -> Iterator[bytes]:
        def fetch() -> TaskInfo:
            t = self.get(task_id)
            if on_task is not None:
                on_task(t)
            return t

        task = fetch()
        if not follow:
            number = attempt or _latest_run(task)
            if number:
                address = self._attempt_address(task, number)
                for data, _ in self._agent_logs(address, task_id, number, follow=False, offset=0):
                    yield data
            return

        number, offset = attempt or first or task.attempt, 0
        pause, warned = _Pause(), False
        while not self._closed:
            current = number == task.attempt
            if number > task.attempt or (current and not task.node_address):
                if task.done:
                    return  # e.g. cancelled before it was placed
                pause()  # not placed yet
                task = fetch()
                continue
            live = current and not task.done
            try:
                address = self._attempt_address(task, number)
                chunks = self._agent_logs(address, task_id, number, follow=live, offset=offset)
                for chunk, resume_at in chunks:
                    offset = resume_at  # the agent's offsets: exact across its output rotations
                    pause.reset()
                    yield chunk
            except NotFound as e:
                # Live: the agent has not started it yet. Over: it never ran there.
                if not live:
                    log.debug("no output of %s attempt %d: %s", task_id, number, e.message)
            except (Unavailable, DeadlineExceeded) as e:
                if not live:
                    log.warning("skipping the output of %s attempt %d: %s", task_id, number, e)
                elif not warned:
                    warned = True
                    log.warning("%s; still trying (the task is %s)", e, task.state)
            if self._closed:
                return
            if not live:
                if attempt or task.done and number == task.attempt:
                    return
                number, offset, warned = number + 1, 0, False
                continue
            # Following ended: the attempt is over, or the agent is not serving it (yet).
            task = fetch()
            if number == task.attempt and not task.done:
                pause()
            # Else the next round reads what is left of the attempt, without follow.

    def _attempt_address(self, task: TaskInfo, number: int) -> str:
        """The address of the agent that runs or ran attempt `number` of `task`."""
        if number == task.attempt and task.node_address:
            return task.node_address
        for rec in reversed(task.history):
            if rec.attempt == number and rec.node_id:
                return self.node(rec.node_id).address
        raise NotFound(f"attempt {number} of task {task.id} has not run")

    def _agent_logs(
        self, address: str, task_id: str, attempt: int, *, follow: bool, offset: int
    ) -> Iterator[tuple[bytes, int]]:
        """(data, the offset to resume at after it) for each chunk the agent sends. Offsets are
        the agent's: output it rotated away still counts, and its notes take none."""
        req = apb.StreamLogsRequest(task_id=task_id, attempt=attempt, follow=follow, offset=offset)
        call = self._conn(address).stub(AgentStub).StreamLogs(req)
        self._streams.add(call)  # so that close() ends it
        try:
            for chunk in call:
                if chunk.data:
                    yield chunk.data, chunk.offset if chunk.note else chunk.offset + len(chunk.data)
        except grpc.RpcError as err:
            if self._closed or err.code() == grpc.StatusCode.CANCELLED:
                return
            failure = transport_failure(err)
            if failure is not None:
                raise Unavailable(
                    f"cannot reach the agent at {address} ({failure.reason})"
                ) from None
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise LeptonError(f"{address} does not serve task output (StreamLogs)") from None
            raise from_rpc_error(err) from None
        finally:
            call.cancel()
            self._streams.discard(call)

    # Last in the class body: inside it, `list` is still the builtin.
    list = tasks


def _latest_run(task: TaskInfo) -> int:
    """The newest attempt of `task` that was placed on a node; 0 when none was."""
    if task.node_address:
        return task.attempt
    return max((h.attempt for h in task.history if h.node_id), default=0)
