"""The leader's serving loop: each deployment keeps `replicas` replica tasks of its current
generation (docs/serving.md).

`ServingLoop.run_cycle()` compares, for every deployment, the replica tasks the state lists
with what the spec asks for and what the replicas report (the leader's endpoint table,
coordinator/api/endpoints.py), and commits what it takes, returning the sentence it logs:

- too few (created, scaled up, a replica failed): submit new
  replica tasks (after a failure, with a backoff so a model that cannot load is not
  restarted in a tight loop);
- a new generation (`serve update`), rolling: one new replica beyond the wanted count at a
  time; once it is READY, one old replica is drained; repeat until none is left;
- too many (scale down) or removed: drain the surplus (not-ready replicas first).
- a replica on a node declared down: drained (then cancelled) and replaced in one step,
  not requeued once the node's attempts are surely fenced (the fence wait, ~15 s later).

Draining marks the replica DRAINING in the state, so routers stop sending to it; after
DRAIN_WAIT_S its task is cancelled (SIGTERM, then SIGKILL after the task's grace). A removed
deployment leaves the state once none of its tasks is left. Spreading across nodes is the
scheduler's (TaskSpec.replica.deployment, coordinator/scheduler/placement.py).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from lepton.common.errors import LeptonError
from lepton.common.loops import run_cycles
from lepton.common.states import NodeState, TaskState
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import serving_pb2, state_pb2, tasks_pb2

logger = logging.getLogger(__name__)

Commit = Callable[[state_pb2.Command], Awaitable[object]]
READY = serving_pb2.REPLICA_READY
DRAIN_WAIT_S = 1.0  # routers hear of a drain within this, before its task is cancelled
REFUSED_PAUSE_S = 5.0  # a refused step (a quota, say): submits wait this long before a retry
STALL_S = 10.0  # a rolling update's extra replica pending this long: an old one makes way
REPLICA_GRACE_S = 10.0  # SIGTERM -> SIGKILL: the replica finishes the batches it holds
BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 30.0
FAILING_AFTER = 3  # replicas failed, none of this generation ready: the deployment is "failing"
_ON_NODE = (TaskState.ASSIGNED.proto, TaskState.RUNNING.proto)
_GONE_NODE = (NodeState.DOWN.proto, NodeState.LEFT.proto)
INTERVAL_S = 0.5
# With no deployment (or off the leader) the loop waits for a wake-up: a new deployment, a
# replica task's change or leadership; this is only the fallback.
IDLE_INTERVAL_S = 30.0


class ReplicaStates(Protocol):
    """What the loop needs of the endpoint table: the reported replicas of a deployment,
    each with `.task_id` and `.state` (a ReplicaState)."""

    def replicas(self, deployment: str) -> Iterable[Any]: ...


def reported_states(endpoints: ReplicaStates | None, name: str) -> dict[str, int]:
    """task id -> the ReplicaState its agent last reported; {} without a table."""
    if endpoints is None:
        return {}
    return {r.task_id: r.state for r in endpoints.replicas(name)}


def model_of(task: tasks_pb2.Task) -> str:
    argv = list(task.spec.argv)
    return argv[argv.index("--model") + 1] if "--model" in argv[:-1] else ""


def replica_views(sm: ClusterStateMachine, endpoints: ReplicaStates | None, name: str) -> list[serving_pb2.Replica]:
    """The deployment's live replicas as `serve show` lists them: DRAINING as the state
    says; otherwise what the agent reports for a running task; else PENDING."""
    rec = sm.deployments.get(name)
    draining = set(rec.draining)
    reported = reported_states(endpoints, name)
    out = []
    for task in sm.deployments.live_tasks(name):
        state = serving_pb2.REPLICA_PENDING
        if task.id in draining:
            state = serving_pb2.REPLICA_DRAINING
        elif task.state == TaskState.RUNNING.proto and task.id in reported:
            state = reported[task.id]
        out.append(serving_pb2.Replica(task_id=task.id, node_id=task.node_id, generation=task.spec.replica.generation,
                                       model=model_of(task), state=state))
    return out


def replica_spec(rec: state_pb2.DeploymentRecord) -> tasks_pb2.TaskSpec:
    """The task one replica of the deployment's current generation runs."""
    dep = rec.deployment
    spec = dep.spec
    return tasks_pb2.TaskSpec(
        name=f"serve-{spec.name}-g{dep.generation}",
        # The coordinator's interpreter, as `lepton-ctl train` uses the client's: agents
        # run the same installation.
        argv=[sys.executable, "-m", "lepton.workloads.serving.replica", "--model", spec.model,
              "--deployment", spec.name, "--generation", str(dep.generation),
              "--max-batch", str(max(spec.max_batch, 1)), "--max-wait-ms", str(spec.max_wait_ms),
              # torch's threads: the replica's cpus, not one per core of the node
              "--cpus", f"{spec.resources.cpu:g}",
              "--claim-key"],  # only its agent may call it (workloads/serving/replica_key.py)
        resources=spec.resources,
        priority=spec.priority,
        grace_s=REPLICA_GRACE_S,
        owner=dep.owner,
        owner_role=rec.owner_role,
        owner_token_id=rec.owner_token_id,
        replica=tasks_pb2.ReplicaSpec(deployment=spec.name, generation=dep.generation),
    )


@dataclass
class _Soft:
    """What the loop remembers of one deployment (leader-local; rebuilt after failover)."""

    drain_since: dict[str, float] = field(default_factory=dict)  # task id -> monotonic
    pending_since: dict[str, float] = field(default_factory=dict)  # task id -> monotonic
    known: set[str] = field(default_factory=set)  # live task ids at the last cycle
    failures: int = 0  # replicas that ended without being drained, since all were last ready
    retry_at: float = 0.0
    paused_by: str = ""  # why submits wait until retry_at
    state: str = ""
    message: str = ""


@dataclass(frozen=True)
class Plan:
    """One deployment's step: tasks to submit, replicas to drain, tasks to cancel."""

    submit: int = 0
    drain: tuple[str, ...] = ()
    cancel: tuple[str, ...] = ()
    remove: bool = False
    state: str = ""
    message: str = ""


def plan_deployment(rec: state_pb2.DeploymentRecord, live: list[tasks_pb2.Task], reported: dict[str, int],
                    drained_long_enough: Callable[[str], bool],
                    stalled: Callable[[tasks_pb2.Task], bool] = lambda t: False,
                    lost: Callable[[tasks_pb2.Task], bool] = lambda t: False) -> Plan:
    """The next step for one deployment: a pure function of the state, the reports,
    which drains have waited long enough, which tasks have waited too long for a node and
    which are on a node declared down."""
    plan = _plan(rec, [t for t in live if not lost(t) or t.id in rec.draining], reported, drained_long_enough,
                 stalled)
    # A replica on a down node serves nothing (routers dropped it): it is drained at once,
    # and replaced in the same step, rather than requeued once its lease is surely over
    # (the fence wait). Should it still run cut off, its lease fences it; a second copy of
    # a replica is harmless, unlike a second copy of a batch task.
    gone = tuple(t.id for t in live if lost(t) and t.id not in rec.draining)
    if not gone:
        return plan
    return replace(plan, drain=gone + plan.drain, remove=False,
                   message=plan.message + f"; replacing {len(gone)} replica(s) on a down node")


def _plan(rec: state_pb2.DeploymentRecord, live: list[tasks_pb2.Task], reported: dict[str, int],
          drained_long_enough: Callable[[str], bool], stalled: Callable[[tasks_pb2.Task], bool]) -> Plan:
    dep = rec.deployment
    gen = dep.generation
    draining = set(rec.draining)

    def ready(t: tasks_pb2.Task) -> bool:
        return t.state == TaskState.RUNNING.proto and reported.get(t.id) == READY

    cancel = tuple(t.id for t in live if t.id in draining and drained_long_enough(t.id))
    serving = [t for t in live if t.id not in draining]
    if rec.deleting:
        if not live:
            return Plan(remove=True, state="stopping", message="all replicas stopped; removing")
        return Plan(drain=tuple(t.id for t in serving), cancel=cancel, state="stopping",
                    message=f"stopping {len(live)} replica(s)")
    want = dep.spec.replicas
    current = [t for t in serving if t.spec.replica.generation == gen]
    old = [t for t in serving if t.spec.replica.generation != gen]
    ready_current = [t for t in current if ready(t)]
    # Draining a not-ready replica costs no capacity: those go first, then the newest (the
    # record lists them in submission order).
    by_drain_order = sorted(reversed(current), key=lambda t: (ready(t), -t.created_at_ms))
    if old:
        # Rolling: at most one replica beyond `want`. Old replicas that serve nothing go at
        # once; a ready one once the ready new ones and the other ready old ones make `want`.
        room = want + 1 - len(serving)
        submit = max(0, min(want - len(current), room))
        ready_old = sorted((t for t in old if ready(t)), key=lambda t: t.created_at_ms)
        drain = [t.id for t in old if not ready(t)]
        spare = len(ready_current) + len(ready_old) - want
        drain += [t.id for t in ready_old[:max(0, spare)]]
        msg = f"rolling to generation {gen} ({dep.spec.model}): {len(ready_current)}/{want} new ready"
        if (spare <= 0 and not draining & {t.id for t in live} and len(ready_current) + len(ready_old) >= 2
                and any(stalled(t) for t in current)):
            # The extra replica finds no room: an old one makes way (one below the count
            # until the new one is ready; never the last one serving).
            drain.append(ready_old[0].id)
            msg += "; no room for an extra replica, so an old one makes way"
        msg += f", {len(ready_old) - len([t for t in ready_old if t.id in drain])} old serving"
        return Plan(submit=submit, drain=tuple(drain), cancel=cancel, state="rolling", message=msg)
    if len(current) > want:
        surplus = [t.id for t in by_drain_order[: len(current) - want]]
        return Plan(drain=tuple(surplus), cancel=cancel, state="scaling",
                    message=f"scaling down to {want}: draining {len(surplus)}")
    submit = want - len(current)
    if len(ready_current) >= want:
        state, msg = "ready", f"{want}/{want} replicas ready"
    elif ready_current:
        state, msg = "degraded", f"{len(ready_current)}/{want} replicas ready"
    else:
        state, msg = "starting", f"0/{want} replicas ready"
    return Plan(submit=submit, cancel=cancel, state=state, message=msg)


class ServingLoop:
    def __init__(self, state: ClusterStateMachine, commit: Commit, *, is_leader: Callable[[], bool],
                 monotonic: Callable[[], float], endpoints: ReplicaStates | None = None,
                 new_task_id: Callable[[], str] | None = None,
                 pending_reason: Callable[[str], str] | None = None) -> None:
        self._sm = state
        self._commit = commit
        self._is_leader = is_leader
        self._now = monotonic
        self.endpoints = endpoints  # H5's EndpointTable; set by the Coordinator
        self._new_id = new_task_id or (lambda: "t-" + uuid.uuid4().hex[:12])
        # Why a pending task waits (the scheduler's reason), for the loop's sentence.
        self._pending_reason = pending_reason or (lambda task_id: "")
        self._soft: dict[str, _Soft] = {}
        self.wakeup = asyncio.Event()

    def wake(self, *_: object) -> None:
        self.wakeup.set()

    def status(self, name: str) -> tuple[str, str]:
        """(state, sentence) the loop last found for the deployment; ("", "") if none yet."""
        soft = self._soft.get(name)
        return (soft.state, soft.message) if soft is not None else ("", "")

    def on_leadership(self, is_leader: bool, term: int) -> None:
        self._soft.clear()  # drains restart their wait; backoffs start over
        self.wake()

    async def run_cycle(self) -> str:
        if not self._is_leader():
            self._soft.clear()
            return "not the leader"
        table = self._sm.deployments
        for gone in set(self._soft) - set(table.records):
            del self._soft[gone]
        said = []
        for name in sorted(table.records):
            try:
                said.append(await self._step(name))
            except LeptonError as err:  # e.g. lost leadership, a quota: retried after a pause
                soft = self._soft.setdefault(name, _Soft())
                soft.message = f"waiting: {err.message or type(err).__name__}"
                soft.retry_at = self._now() + REFUSED_PAUSE_S
                soft.paused_by = soft.message
                said.append(f"{name}: {soft.message}")
        return "; ".join(s for s in said if s) or "no deployments"

    async def _step(self, name: str) -> str:
        rec = self._sm.deployments.records[name]
        live = self._sm.deployments.live_tasks(name)
        soft = self._soft.setdefault(name, _Soft())
        now = self._now()
        reported = reported_states(self.endpoints, name)
        live_ids = {t.id for t in live}
        # Replicas that ended without being drained by us failed (or were cancelled by hand).
        ended = soft.known - live_ids - set(soft.drain_since)
        if ended:
            soft.failures += len(ended)
            backoff = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (soft.failures - 1))
            soft.retry_at = now + backoff
            # Why, and where to look: the task's own reason (an exit code) and its logs. The
            # same words for the whole wait: `serve up` prints each new sentence.
            last = max(ended)  # one of them
            task = self._sm.tasks.tasks.get(last)
            why = (task.reason if task is not None else "") or "ended"
            soft.paused_by = (f"backing off {backoff:g}s: {soft.failures} replica(s) failed, the last "
                              f"{last} ({why}; lepton-ctl logs {last})")
        for task_id in rec.draining:
            soft.drain_since.setdefault(task_id, now)
        pending = [t for t in live if t.state == TaskState.PENDING.proto]
        soft.pending_since = {t.id: soft.pending_since.get(t.id, now) for t in pending}
        plan = plan_deployment(rec, live, reported, lambda t: now - soft.drain_since.get(t, now) >= DRAIN_WAIT_S,
                               lambda t: t.id in soft.pending_since and now - soft.pending_since[t.id] >= STALL_S,
                               self._on_lost_node)
        soft.state, soft.message = plan.state, plan.message
        if plan.state == "ready":  # not merely one ready: a sibling may be crash-looping
            soft.failures = 0
        elif (plan.state in ("starting", "rolling") and soft.failures >= FAILING_AFTER
              and not any(t.spec.replica.generation == rec.deployment.generation
                          and t.state == TaskState.RUNNING.proto and reported.get(t.id) == READY for t in live)):
            # `serve up`/`update` stop waiting; the loop keeps trying (an update's old
            # replicas keep serving meanwhile: they drain only once new ones are ready).
            soft.state = "failing"
        waiting = [self._pending_reason(t.id) for t in pending if t.id not in rec.draining]
        waiting = [w for w in waiting if w]
        if waiting and plan.state in ("starting", "degraded", "rolling"):
            soft.message += f"; {len(pending)} pending ({waiting[0]})"
        done = []
        if plan.remove:
            await self._commit(state_pb2.Command(delete_deployment=state_pb2.DeleteDeploymentCmd(name=name, remove=True)))
            self._soft.pop(name, None)
            return f"{name}: removed"
        submit = plan.submit
        if submit and now < soft.retry_at:
            soft.message += f"; {soft.paused_by}"
            submit = 0
        if submit or plan.drain:
            cmd = state_pb2.DeploymentReplicasCmd(deployment=name, drain=plan.drain)
            for _ in range(submit):
                cmd.submit.add(task_id=self._new_id(), spec=replica_spec(rec))
            # A quota refusal here costs no log entry (applying checks again).
            self._sm.quotas.check_tasks(t.spec for t in cmd.submit)
            await self._commit(state_pb2.Command(deployment_replicas=cmd))
            for task_id in plan.drain:
                soft.drain_since[task_id] = now
            if submit:
                done.append(f"started {submit}")
            if plan.drain:
                done.append(f"draining {len(plan.drain)}")
        for task_id in plan.cancel:
            try:
                await self._commit(state_pb2.Command(cancel_task=state_pb2.CancelTaskCmd(task_id=task_id)))
            except LeptonError as err:  # ended meanwhile: nothing to cancel
                logger.debug("cancel %s: %s", task_id, err)
            done.append(f"stopped {task_id}")
        soft.known = {t.id for t in self._sm.deployments.live_tasks(name)} if name in self._sm.deployments.records else set()
        for task_id in list(soft.drain_since):
            if task_id not in soft.known:
                del soft.drain_since[task_id]
        return f"{name}: {plan.message}" + (f" ({', '.join(done)})" if done else "")

    def _on_lost_node(self, task: tasks_pb2.Task) -> bool:
        """Placed on a node declared down (or gone): its replica serves no one."""
        if task.state not in _ON_NODE or not task.node_id:
            return False
        node = self._sm.nodes.get(task.node_id)
        return node is not None and node.state in _GONE_NODE

    def _interval(self) -> float:
        busy = self._is_leader() and self._sm.deployments.records
        return INTERVAL_S if busy else IDLE_INTERVAL_S

    async def run(self) -> None:
        await run_cycles("serving", self.run_cycle, interval_s=self._interval, wakeup=self.wakeup, gather_s=0.05,
                         logger=logger)
