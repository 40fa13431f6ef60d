"""The leader's table of replica reports, and the endpoint sets routers watch.

Soft state, on the leader only: agents report their replicas (ReportReplicas, at once on a
change and every ~2 s), so a new leader rebuilds the table within a report interval and
losing leadership clears it. A node's report replaces what it said before. For REBUILD_S
after it starts leading, a watch sends nothing (routers keep routing with the last set they
had), so no router is handed the half-built set of a new leader.

Node restriction: an entry is kept only for a task the replicated state has on that node
(assigned or running there), that is a replica of the deployment named (TaskSpec.replica)
and that the deployment's record lists; anything else in a report is ignored (a stale
report after the task moved, or a node speaking for others).

The endpoint set (WatchEndpoints: the whole set on each change, with a growing version)
holds, per deployment, the replicas that are READY by their node's report, whose task is
RUNNING on that node, not marked draining, on a READY node. Entries go at once when their
task stops or moves, or their node goes down or leaves. Draining is read from the state
(the serving loop commits it): every change of the deployments table wakes the watches
(a listener, so an idle leader has no timer).

Every deployment in the state is in the set, with no endpoints while none is ready: routers
answer NOT_FOUND only for a name the set lacks.

Routers' counters (RouterStats) in reports go to `stats_sink` (ServingStats: the serving
metrics' aggregation, coordinator/api/serving_stats.py), which `stats(name)` asks for a
deployment's figures; only those of deployments in the state, and a removed deployment's
are forgotten when it leaves the state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from lepton.common import validation as v
from lepton.common.errors import InvalidArgument
from lepton.common.states import NodeState, TaskState
from lepton.coordinator.api.serving_stats import ServingStats
from lepton.v1 import serving_pb2

logger = logging.getLogger(__name__)

MAX_REPORTED_REPLICAS = 4096  # one node's replicas in one report
MAX_REPORTED_STATS = 1024  # deployments' router counters in one report
MAX_BUCKETS = 64
POLL_S = 0.25  # a new leader's watches re-check this often whether REBUILD_S has passed
# Every agent with replicas reports within its interval (agent/serving.py REPORT_S, 2 s;
# at once when its link moves to the new leader): the table is whole after that, a margin.
REBUILD_S = 3.0

_REPORTABLE = {serving_pb2.REPLICA_PENDING, serving_pb2.REPLICA_READY, serving_pb2.REPLICA_UNHEALTHY,
               serving_pb2.REPLICA_DRAINING}
_ON_NODE = (TaskState.ASSIGNED.proto, TaskState.RUNNING.proto)
_GONE_NODE = (NodeState.DOWN.proto, NodeState.LEFT.proto)


class StatsSink(Protocol):
    """Where routers' counters go (coordinator/api/serving_stats.py)."""

    def report(self, request: serving_pb2.ReportReplicasRequest, exists: Callable[[str], bool]) -> None: ...

    def stats(self, deployment: str) -> serving_pb2.DeploymentStats: ...

    def deployments(self) -> set[str]: ...

    def forget(self, deployment: str) -> None: ...


class EndpointTable:
    """See the module doc. Used on the coordinator's event loop only."""

    def __init__(self, state: Any, *, require_leader: Callable[[], None] = lambda: None,
                 stats_sink: StatsSink | None = None, poll_s: float = POLL_S,
                 rebuild_s: float = REBUILD_S, clock: Callable[[], float] = time.monotonic):
        self._sm = state
        self._require_leader = require_leader  # raises NotLeader: ends watches on a follower
        self.stats_sink: StatsSink = stats_sink if stats_sink is not None else ServingStats()
        self._poll_s = poll_s
        self._rebuild_s = rebuild_s
        self._clock = clock
        self._leading_since = -float("inf")  # the table is whole from the start (tests, one voter)
        self._reports: dict[str, dict[str, serving_pb2.ReplicaReport]] = {}  # node -> task -> report
        self._node_of: dict[str, str] = {}  # task -> the node that reported it
        self._watchers: set[asyncio.Event] = set()
        # Versions grow across leaders too (wall-clock based start), so a router can tell.
        self._version = int(time.time() * 1000)
        self._current = serving_pb2.EndpointSet(version=self._version)
        self._dirty = True
        self._seen_changes = -1  # the deployments table's change counter last computed with

    # -- wiring --------------------------------------------------------------------------
    def listen(self, state: Any, consensus: Any) -> None:
        """Follow task, node and leadership changes (the coordinator calls this once)."""
        state.tasks.listeners.append(self.on_task_change)
        state.add_listener(self.on_node_change)
        # A drain mark (or any deployment change) recomputes the set: no timer while idle.
        state.deployments.listeners.append(self.on_deployments_change)
        consensus.add_leadership_listener(self.on_leadership)

    def on_task_change(self, task: Any, old_node: str) -> None:
        node = self._node_of.get(task.id)
        if node is None:
            return
        if task.node_id != node or task.state not in _ON_NODE:
            self._drop_task(task.id)
        self._changed()  # RUNNING now, perhaps: the set may gain it

    def on_node_change(self, change: Any) -> None:
        node = change.node
        if node.id not in self._reports:
            return
        if node.state in _GONE_NODE:
            for task_id in list(self._reports[node.id]):
                self._drop_task(task_id)
            del self._reports[node.id]
        self._changed()  # suspect, back, or a new address: the set is computed again

    def on_deployments_change(self) -> None:
        """Recompute the set; a removed deployment's figures go (serve rm, then up again
        under the same name, starts from zero)."""
        for name in self.stats_sink.deployments() - self._sm.deployments.records.keys():
            self.stats_sink.forget(name)
        self._changed()

    def on_leadership(self, is_leader: bool, term: int = 0) -> None:
        """Soft state: a new leader starts empty (agents report within ~2 s); a former
        leader forgets, and its watches end (they re-check leadership when woken)."""
        self._reports.clear()
        self._node_of.clear()
        if is_leader:
            self._leading_since = self._clock()
        self._changed()

    # -- reports -------------------------------------------------------------------------
    def report(self, node_id: str, request: serving_pb2.ReportReplicasRequest, caller: Any = None) -> None:
        """Take a node's report (its whole replica list). The caller's right to speak for
        `node_id` is checked by the service; here, each entry must be that node's (module
        doc). Raises InvalidArgument for a malformed report."""
        _check_report(request)
        kept: dict[str, serving_pb2.ReplicaReport] = {}
        ignored = 0
        for r in request.replicas:
            if self._belongs(node_id, r):
                kept[r.task_id] = r
            else:
                ignored += 1
        if ignored:
            logger.debug("node %s reported %d replica(s) not its own; ignored", node_id, ignored)
        old = self._reports.get(node_id, {})
        for task_id in old.keys() - kept.keys():
            self._node_of.pop(task_id, None)
        for task_id in kept:
            previous = self._node_of.get(task_id)
            if previous is not None and previous != node_id:
                self._reports.get(previous, {}).pop(task_id, None)
            self._node_of[task_id] = node_id
        self._reports[node_id] = kept
        if request.stats:  # a removed deployment's counters are not kept
            self.stats_sink.report(request, self._sm.deployments.records.__contains__)
        if _states(old) != _states(kept):
            self._changed()

    def _belongs(self, node_id: str, r: serving_pb2.ReplicaReport) -> bool:
        task = self._sm.tasks.tasks.get(r.task_id)
        if task is None or task.node_id != node_id or task.state not in _ON_NODE:
            return False
        if not task.spec.HasField("replica") or task.spec.replica.deployment != r.deployment:
            return False
        rec = self._sm.deployments.records.get(r.deployment)
        return rec is not None and r.task_id in rec.task_ids

    def _drop_task(self, task_id: str) -> None:
        node = self._node_of.pop(task_id, None)
        if node is not None:
            self._reports.get(node, {}).pop(task_id, None)

    # -- reads ---------------------------------------------------------------------------
    def replicas(self, deployment: str) -> list[serving_pb2.ReplicaReport]:
        """What the nodes report of `deployment`'s replicas (task_id, state, outstanding...),
        by task id. Tasks no report names are not here (PENDING to callers)."""
        out = [r for reports in self._reports.values() for r in reports.values() if r.deployment == deployment]
        return sorted(out, key=lambda r: r.task_id)

    def stats(self, deployment: str) -> serving_pb2.DeploymentStats:
        return self.stats_sink.stats(deployment)

    def endpoint_set(self) -> serving_pb2.EndpointSet:
        """The current set (module doc); the version grows when it changes."""
        changes = self._sm.deployments.changes
        if not self._dirty and changes == self._seen_changes:
            return self._current
        self._dirty = False
        self._seen_changes = changes
        fresh = self._compute()
        if fresh.deployments != self._current.deployments:
            self._version += 1
            fresh.version = self._version
            self._current = fresh
        return self._current

    def _compute(self) -> serving_pb2.EndpointSet:
        out = serving_pb2.EndpointSet()
        tasks, nodes, records = self._sm.tasks.tasks, self._sm.nodes, self._sm.deployments.records
        for name in records:
            out.deployments[name].SetInParent()  # listed, even with no endpoint
        for node_id in sorted(self._reports):
            node = nodes.get(node_id)
            if node is None or node.state != NodeState.READY.proto:
                continue
            for task_id in sorted(self._reports[node_id]):
                r = self._reports[node_id][task_id]
                task = tasks.get(task_id)
                rec = records.get(r.deployment)
                if (r.state != serving_pb2.REPLICA_READY or task is None or task.node_id != node_id
                        or task.state != TaskState.RUNNING.proto or rec is None or task_id not in rec.task_ids
                        or task_id in rec.draining):
                    continue
                out.deployments[r.deployment].endpoints.append(serving_pb2.Endpoint(
                    task_id=task_id, node_id=node_id, node_address=node.address,
                    generation=task.spec.replica.generation))
        return out

    async def watch(self, request: Any = None, context: Any = None) -> AsyncIterator[serving_pb2.EndpointSet]:
        """The whole set now, then again on each change; ends (NotLeader) once this
        coordinator stops leading."""
        wake = asyncio.Event()
        self._watchers.add(wake)
        sent = None
        try:
            while (wait := self._leading_since + self._rebuild_s - self._clock()) > 0:
                self._require_leader()
                await asyncio.sleep(min(wait, self._poll_s))
            while True:
                self._require_leader()
                wake.clear()  # before computing: a change from here on wakes the wait below
                current = self.endpoint_set()
                if current.version != sent:
                    sent = current.version
                    yield current
                    continue  # what changed while the set was being sent is looked at now
                await wake.wait()
        finally:
            self._watchers.discard(wake)

    def _changed(self) -> None:
        self._dirty = True
        for wake in self._watchers:
            wake.set()


def _states(reports: dict[str, serving_pb2.ReplicaReport]) -> dict[str, tuple[str, int]]:
    return {task_id: (r.deployment, r.state) for task_id, r in reports.items()}


def _check_report(request: serving_pb2.ReportReplicasRequest) -> None:
    """Raises InvalidArgument for a report no agent sends."""
    if len(request.replicas) > MAX_REPORTED_REPLICAS:
        raise InvalidArgument(f"{len(request.replicas)} replicas; at most {MAX_REPORTED_REPLICAS} per report")
    if len(request.stats) > MAX_REPORTED_STATS:
        raise InvalidArgument(f"{len(request.stats)} router stats; at most {MAX_REPORTED_STATS} per report")
    for r in request.replicas:
        v.require_id(r.task_id, "replicas.task_id")
        v.check_deployment_name(r.deployment)
        if r.state not in _REPORTABLE:
            raise InvalidArgument(f"replica {r.task_id}: state {r.state} is not a replica state")
    for s in request.stats:
        v.check_deployment_name(s.deployment)
        if len(s.bucket_le_ms) != len(s.bucket_counts) or len(s.bucket_le_ms) > MAX_BUCKETS:
            raise InvalidArgument(f"router stats of {s.deployment}: bucket bounds and counts must pair up, "
                                  f"at most {MAX_BUCKETS}")
