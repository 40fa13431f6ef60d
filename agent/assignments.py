"""The agent's task loop with the leader: receive the desired set, report what happened.

Level-triggered: every stream starts with the node's whole desired set (again after a
reconnect, a new leader or term); the runner starts what is missing and stops what is no
longer wanted. After it the leader sends only changes (deltas: attempts added, attempts
removed), which the loop applies to the set it holds and hands the runner as a change, so
a task's state change costs O(1) here, not O(tasks on the node). A delta that does not
follow the set before it drops the stream, and the next one starts whole. Events are queued
and re-sent until a leader accepts them (the state machine ignores repeats).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import sys

import grpc

from lepton.agent.code_cache import CodeCache
from lepton.agent.link import MAX_BACKOFF_S, MIN_BACKOFF_S, CoordinatorLink
from lepton.agent.shard_scratch import scratch_prefix
from lepton.agent.task_identity import task_env
from lepton.agent.tasks.runner import RunSpec, TaskEvent, TaskEventKind, TaskRunner
from lepton.agent.tasks.task_spec import FENCE_DOWN, FENCED, TASK_ID_RE
from lepton.common.channels import TlsConfig
from lepton.common.errors import LeptonError, Unavailable
from lepton.v1 import coordinator_pb2, tasks_pb2

logger = logging.getLogger(__name__)

DEFAULT_GRACE_S = 10.0
# The reason the agent gives attempts it stops because it is shutting down gracefully.
AGENT_STOPPING = "agent stopping"


def run_spec(a: tasks_pb2.Assignment, *, data_dir: str = "", servers: list[str] = (),
             tls: TlsConfig | None = None, shard_key_file: str = "", log_max_bytes: int = 0,
             node_store: bool = True) -> RunSpec:
    """What the runner starts for an assignment. A torch job's member runs
    `lepton.workloads.torch_task`, which starts the node's workers the way torchrun would
    (`log_max_bytes`: the cap of each rank's log there, the same as task output's; 0: none),
    in the job's folder the runner makes (`RunSpec.job_dir`). `node_store`: tasks run as the
    agent's user and may read the node's shard store and key in place; without it (a
    --task-user) a job fetches its shards into a store of its own with its credential."""
    s = a.spec
    argv, shell, env = tuple(s.argv), s.shell, dict(s.env)
    if servers:
        env.setdefault("LEPTON_SERVER", ",".join(servers))  # tasks may use the cluster too
    # Never this node's identity: the attempt's own credential (its submitter's rights) and,
    # with TLS, the CA and the identity-less task certificate (lepton.agent.task_identity).
    for key, value in task_env(data_dir, tls_on=tls is not None, token=a.task_token).items():
        env.setdefault(key, value)
    if s.job_id:
        env.update(LEPTON_JOB_ID=s.job_id, LEPTON_GANG_RANK=str(s.gang_rank),
                   LEPTON_GANG_SIZE=str(s.gang_size), LEPTON_RESTART_COUNT=str(a.restart_count))
    job_dir = ""
    if s.HasField("torch"):
        job_dir = os.path.join(os.path.abspath(data_dir), "jobs", s.job_id) if TASK_ID_RE.fullmatch(s.job_id) else ""
        launch = {
            "job_id": s.job_id, "argv": list(s.argv) or ["/bin/sh", "-c", s.shell],
            "nproc_per_node": s.torch.nproc_per_node, "node_rank": s.gang_rank,
            "nnodes": s.gang_size, "master_addr": a.master_addr, "master_port": a.master_port,
            "restart_count": a.restart_count, "max_restarts": s.max_restarts,
            "env": env, "dataset": s.torch.dataset,  # no cwd: workers start where the runner put
            # this member (its workdir, resolved once; a relative one applied again would nest)
            "data_dir": data_dir, "job_dir": job_dir, "node_store": node_store, "servers": list(servers),
            "grace_s": s.grace_s or DEFAULT_GRACE_S,
            # The path (not the secret) so the job can read this node's encrypted shards.
            "shard_key_file": shard_key_file if node_store else "",
            "log_max_bytes": log_max_bytes,
            # Decrypted shards go to memory under a name the agent removes at the attempt's end.
            "scratch_prefix": scratch_prefix(data_dir, a.task_id, a.attempt) if job_dir else "",
        }
        argv, shell = (sys.executable, "-m", "lepton.workloads.torch_task", json.dumps(launch)), ""
    return RunSpec(
        task_id=a.task_id,
        attempt=a.attempt,
        term=a.term,
        argv=argv,
        shell=shell,
        env=env,
        workdir=s.workdir,
        gpu_indices=tuple(a.gpu_indices),
        timeout_s=s.timeout_s,
        grace_s=s.grace_s or DEFAULT_GRACE_S,
        keep_on_disconnect=s.on_disconnect == tasks_pb2.ON_DISCONNECT_KEEP,
        job_dir=job_dir,
        replica=s.replica.deployment if s.HasField("replica") else "",
        replica_generation=s.replica.generation if s.HasField("replica") else 0,
    )


def to_proto(ev: TaskEvent) -> tasks_pb2.TaskEvent:
    kind = (tasks_pb2.TaskEvent.KIND_STARTED if ev.kind == TaskEventKind.STARTED
            else tasks_pb2.TaskEvent.KIND_EXITED)
    return tasks_pb2.TaskEvent(
        task_id=ev.task_id, attempt=ev.attempt, kind=kind, exit_code=ev.exit_code or 0,
        reason=ev.reason[:1024], at_ms=ev.at_ms, term=ev.term,
        # Stopped by the agent's graceful stop, or by its lease (fenced), or never started for
        # want of the node's fence: not the task's failure.
        requeue=ev.kind == TaskEventKind.EXITED and ev.reason in (AGENT_STOPPING, FENCED, FENCE_DOWN),
    )


class AssignmentChunks:
    """Joins an assignment set sent in chunks (`AssignmentSet.more`): acting on part of a
    set would stop the tasks of the parts still to come."""

    def __init__(self) -> None:
        self._parts: list[tasks_pb2.Assignment] = []
        self._term = 0

    def add(self, aset: tasks_pb2.AssignmentSet) -> list[tasks_pb2.Assignment] | None:
        """The whole set once `aset` completes it, else None."""
        if aset.term != self._term:
            self._parts = []  # a new leader's set: what came before is not part of it
            self._term = aset.term
        self._parts.extend(aset.assignments)
        if aset.more:
            return None
        whole, self._parts = self._parts, []
        return whole


@dataclasses.dataclass
class SetChange:
    """What one complete message asks of the runner: the whole set (`removed` None), or
    attempts to add and (task, attempt)s to stop."""

    assignments: list[tasks_pb2.Assignment]
    term: int
    removed: list[tuple[str, int]] | None = None


class DesiredSet:
    """The node's desired set as one stream's messages build it: a whole set (joined from
    its chunks) replaces it, a delta changes it. Raises Unavailable for a delta that does
    not follow the set before it (the stream is then dropped; the next starts whole)."""

    def __init__(self) -> None:
        self._chunks = AssignmentChunks()
        self.by_task: dict[str, tasks_pb2.Assignment] = {}
        self.version = 0
        self.term = 0
        self.has_whole = False

    def add(self, aset: tasks_pb2.AssignmentSet) -> SetChange | None:
        """The change `aset` completes, or None while a whole set is still in pieces."""
        if not aset.delta:
            whole = self._chunks.add(aset)
            if whole is None:
                return None
            self.by_task = {a.task_id: a for a in whole}
            self.version, self.term, self.has_whole = aset.version, aset.term, True
            return SetChange(whole, aset.term)
        if not self.has_whole or aset.version != self.version + 1 or aset.term != self.term:
            raise Unavailable(f"assignment delta {aset.version} (term {aset.term}) does not follow "
                              f"set {self.version} (term {self.term})")
        self.version = aset.version
        removed = []
        for r in aset.removed:  # first: a task's new attempt may come in the same delta
            held = self.by_task.get(r.task_id)
            if held is not None and held.attempt == r.attempt:
                del self.by_task[r.task_id]
            removed.append((r.task_id, r.attempt))
        for a in aset.assignments:
            held = self.by_task.get(a.task_id)
            if held is not None and held.attempt != a.attempt:
                removed.append((held.task_id, held.attempt))  # a new attempt replaces it
            self.by_task[a.task_id] = a
        return SetChange(list(aset.assignments), aset.term, removed)


class AssignmentLoop:
    """Watches this node's assignments and reports task events, wherever the leader is."""

    def __init__(self, node_id: str, link: CoordinatorLink, data_dir: str = "", *,
                 tls: TlsConfig | None = None, shard_key_file: str = "", log_max_bytes: int = 0,
                 node_store: bool = True):
        """`node_store`: see `run_spec` (False when tasks run as a --task-user)."""
        self._node_id = node_id
        self._node_store = node_store
        self._shard_key_file = shard_key_file
        self._log_max_bytes = log_max_bytes
        self._addresses = link.addresses  # tasks may use the cluster too (LEPTON_SERVER)
        self._data_dir = data_dir
        self._tls = tls
        self._link = link  # the agent's one link, shared with the heartbeat
        self._runner: TaskRunner | None = None
        self._call = None  # the WatchAssignments call, while open
        self._call_address = ""  # where it is open
        self._dropped = False  # we cancelled _call ourselves (grpc raises CancelledError)
        link.on_leader_change(self._leader_moved)
        self._events: asyncio.Queue[TaskEvent] = asyncio.Queue()
        self._full_report_due = True  # after (re)start the leader settles what we run
        self._code: CodeCache | None = None  # shipped code, made on first use
        self._desired: DesiredSet | None = None  # the current stream's

    def _reconcile(self, change: SetChange) -> str:
        """Hand the runner the set or change, less the attempts whose shipped code this node
        is still fetching (they start when it is here: `_code_arrived`); an attempt whose
        code could not be fetched fails to start, saying why."""
        # Attempts running already need no code. Looked up once, for a whole set with shipped
        # code only: a delta's attempts are new to this stream (and `launch` skips a live one).
        running: set[tuple[str, int]] | None = None if change.removed is None else set()
        specs, waiting = [], 0
        for a in change.assignments:
            spec = run_spec(a, data_dir=self._data_dir, servers=self._addresses, tls=self._tls,
                            shard_key_file=self._shard_key_file, log_max_bytes=self._log_max_bytes,
                            node_store=self._node_store)
            digest = a.spec.code_digest
            if digest and running is None:
                running = {(r.task_id, r.attempt) for r in self._runner.running()}
            if digest and (a.task_id, a.attempt) not in running:
                try:
                    tree = self._code_cache().tree(digest)
                except LeptonError as err:
                    self._refuse(spec, err.message)
                    continue
                if tree is not None:
                    spec = dataclasses.replace(spec, code_dir=str(tree))
                elif why := self._code_cache().failure(digest):
                    self._refuse(spec, why)
                else:
                    self._code_cache().fetch(digest, self._code_arrived)
                    waiting += 1
                    continue
            specs.append(spec)
        if change.removed is None:
            sentence = self._runner.reconcile(specs, change.term)
        else:
            sentence = self._runner.reconcile(specs, change.term, removed=change.removed)
        return sentence + (f", {waiting} waiting for their code" if waiting else "")

    def _refuse(self, spec: RunSpec, why: str) -> None:
        try:
            self._runner.refuse(spec, why)
        except LeptonError:
            pass  # it ran here before: its exit is the answer

    def _code_cache(self) -> CodeCache:
        if self._code is None:
            self._code = CodeCache(self._data_dir, self._link.datasets, tls=self._tls)
        return self._code

    def _code_arrived(self) -> None:
        """A fetch ended: the whole set held again, now with that code here (or failed)."""
        desired = self._desired
        if desired is not None and desired.has_whole and self._runner is not None:
            sentence = self._reconcile(SetChange(list(desired.by_task.values()), desired.term))
            logger.info("assignments (term %d, code fetched): %s", desired.term, sentence)

    async def close(self) -> None:
        """Stop the code fetches in flight (the watch and report tasks are the caller's)."""
        if self._code is not None:
            await self._code.close()

    def attach(self, runner: TaskRunner) -> None:
        """The runner reports into this loop (`on_event`), so it is made after it."""
        self._runner = runner

    def on_event(self, event: TaskEvent) -> None:
        """The runner's callback; called on the event loop."""
        self._events.put_nowait(event)

    def _leader_moved(self, old: str, new: str) -> None:
        """The link aims elsewhere (the heartbeat found the leader silent, or a call was
        redirected): a server stream from a hung leader would wait forever, so drop it."""
        if self._call is not None and self._call_address != new:
            self._dropped = True
            self._call.cancel()
            self._call = None

    async def watch(self) -> None:
        backoff = MIN_BACKOFF_S
        while True:
            self._dropped = False
            address = self._link.address
            try:
                call, address = self._link.coordinator.open_stream(
                    "WatchAssignments",
                    coordinator_pb2.WatchAssignmentsRequest(node_id=self._node_id, deltas=True))
                self._call, self._call_address = call, address
                # Per stream: a broken one drops its partial set; the next starts whole.
                self._desired = desired = DesiredSet()
                async for aset in call:
                    self._link.answered()
                    backoff = MIN_BACKOFF_S
                    change = desired.add(aset)
                    if change is None:
                        continue  # a set sent in chunks: act only once it is whole
                    sentence = self._reconcile(change)
                    if change.removed is None:
                        logger.info("assignments (term %d, whole set): %s", aset.term, sentence)
                    else:  # the runner logs what it started and stopped
                        logger.debug("assignments (term %d, delta %d): %s", aset.term, aset.version, sentence)
                raise Unavailable("assignment stream ended")
            except grpc.aio.AioRpcError as rpc_err:
                self._call = None  # re-aiming below must not cancel it again
                err = self._link.failed(rpc_err, address)
                logger.info("assignment stream: %s; retrying", err.message)
            except LeptonError as err:
                if self._call is not None:  # e.g. a delta out of order: this stream is done
                    self._call.cancel()
                    self._call = None
                logger.info("assignment stream: %s; retrying", err.message)
            except asyncio.CancelledError:
                if not self._dropped:
                    raise
                logger.info("assignment stream: the leader moved from %s; looking again", address)
                continue
            except Exception:
                logger.exception("assignment loop failed")
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(MAX_BACKOFF_S, backoff * 2)

    async def report(self) -> None:
        backoff = MIN_BACKOFF_S
        pending: list[TaskEvent] = []
        while True:
            if not pending and not self._full_report_due:
                pending.append(await self._events.get())
            while not self._events.empty() and len(pending) < 500:
                pending.append(self._events.get_nowait())
            req = coordinator_pb2.ReportTaskEventsRequest(
                node_id=self._node_id, events=[to_proto(e) for e in pending]
            )
            if self._full_report_due:
                req.full_report = True
                req.running.extend(
                    tasks_pb2.Assignment(task_id=r.task_id, attempt=r.attempt, term=r.term)
                    for r in self._runner.running()
                )
            try:
                await self._link.coordinator.call("ReportTaskEvents", req, 10.0)
                for e in pending:
                    if e.kind is TaskEventKind.EXITED:
                        self._runner.acknowledge(e.task_id, e.attempt)
                pending = []
                self._full_report_due = False
                backoff = MIN_BACKOFF_S
            except LeptonError as err:
                logger.info("task report: %s; retrying", err.message)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("task report failed")
                await asyncio.sleep(backoff)

