"""The cluster's replicated state: a deterministic state machine fed by log commands.

`ClusterStateMachine.apply(index, data)` is the only way state changes. It reads nothing
but its arguments (the proposer stamps the time into the command), so every replica that
applies the same log reaches the same state. Indexes and soft state are derived elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from lepton.common.errors import FailedPrecondition, InvalidArgument, LeptonError, NotFound
from lepton.common.states import NodeState, can_transition
from lepton.coordinator.state.datasets import DatasetTable
from lepton.coordinator.state.deployments import DeploymentTable
from lepton.coordinator.state.quotas import QuotaTable
from lepton.coordinator.state.retention import collect
from lepton.coordinator.state.security_state import SecurityTable
from lepton.coordinator.state.tasks import HOLDING, TaskTable
from lepton.v1 import common_pb2, coordinator_pb2, state_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NodeChange:
    """What one applied command did to one node; feeds WatchNodes."""

    kind: int  # coordinator_pb2.NodeEvent.Kind
    node: common_pb2.Node
    at_ms: int
    index: int


NodeListener = Callable[[NodeChange], None]


class ClusterStateMachine:
    """Nodes and tasks (`self.tasks`, a TaskTable) as the log defines them.

    `apply` never raises for a bad command: it returns a `LeptonError` instance, so every
    replica records the same outcome and the proposer can surface it to the caller.
    """

    def __init__(self) -> None:
        self.applied_index = 0
        self.answered = True  # whether the command being applied has a waiter (apply)
        self.nodes: dict[str, common_pb2.Node] = {}
        self.tasks = TaskTable(self)
        self.datasets = DatasetTable(self)
        # Tokens, audit log, cluster id; task credentials are checked against the tasks.
        self.security = SecurityTable(find_task=lambda task_id: self.tasks.tasks.get(task_id),
                                      holding=lambda task: task.state in HOLDING)
        self.quotas = QuotaTable(self)  # checked before submissions below (_HANDLERS)
        self.deployments = DeploymentTable(self)  # served models (docs/serving.md)
        self._listeners: list[NodeListener] = []

    # -- subscriptions ---------------------------------------------------------------
    def add_listener(self, listener: NodeListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: NodeListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, kind: int, node: common_pb2.Node, at_ms: int) -> None:
        change = NodeChange(kind, _copy(node), at_ms, self.applied_index)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # a slow or broken watcher must never stop the log
                logger.exception("node listener failed")

    # -- applying --------------------------------------------------------------------
    def apply(self, index: int, data: bytes, answered: bool = True) -> object:
        """Apply the command at `index`; return its result or a LeptonError instance.
        `answered=False`: nobody waits for it (a follower), so submissions skip the task
        copies they return (a quarter of a follower's apply, issue 15) and answer None."""
        if index <= self.applied_index:
            raise ValueError(f"index {index} already applied (at {self.applied_index})")
        self.applied_index = index
        self.answered = answered
        cmd = state_pb2.Command()
        try:
            cmd.ParseFromString(data)
        except Exception:  # noqa: BLE001 - a corrupt command must not stop the replica
            return InvalidArgument(f"command at index {index} does not parse")
        op = cmd.WhichOneof("op")
        handler = _HANDLERS.get(op or "")
        if handler is None:
            return None  # noop, or an op from a newer version: skipped the same everywhere
        try:
            return handler(self, getattr(cmd, op), cmd.at_ms)
        except LeptonError as err:
            return err

    def _register(self, c: state_pb2.RegisterNodeCmd, at_ms: int) -> common_pb2.Node:
        node = self.nodes.get(c.node_id)
        if node is None:
            node = common_pb2.Node(id=c.node_id, registered_at_ms=at_ms)
            self.nodes[c.node_id] = node
        node.name = c.name
        node.address = c.address
        node.labels.clear()
        node.labels.update(c.labels)
        node.capacity.CopyFrom(c.capacity)
        node.voter = c.voter
        node.version = c.version
        if node.state == NodeState.LEFT.proto:
            # A node that left (and drained itself on the way out) comes back fresh. A drain
            # survives a crash and restart, though: that one was an operator's.
            node.draining = False
        node.state = NodeState.READY.proto
        node.state_changed_at_ms = at_ms
        node.state_reason = "registered"
        self._emit(coordinator_pb2.NodeEvent.KIND_REGISTERED, node, at_ms)
        return _copy(node)

    def _set_state(self, c: state_pb2.SetNodeStateCmd, at_ms: int) -> common_pb2.Node:
        node = self._get(c.node_id)
        src = NodeState.from_proto(node.state)
        dst = NodeState.from_proto(c.state)
        if src == dst:
            return _copy(node)  # idempotent: a retried command changes nothing
        if not can_transition(src, dst):
            raise FailedPrecondition(f"node {c.node_id} cannot go from {src.value} to {dst.value}")
        node.state = dst.proto
        node.state_changed_at_ms = at_ms
        node.state_reason = c.reason
        self._emit(coordinator_pb2.NodeEvent.KIND_STATE_CHANGED, node, at_ms)
        if dst == NodeState.DOWN:
            # Its attempts stay until NodeLostCmd: they may still run until their lease ends.
            self.datasets.node_gone(node.id, "node_lost", at_ms)
        elif dst == NodeState.LEFT:
            self.tasks.node_gone(node.id, "node left", at_ms)
            self.datasets.node_gone(node.id, "node left", at_ms)
        return _copy(node)

    def _node_lost(self, c: state_pb2.NodeLostCmd, at_ms: int) -> common_pb2.Node:
        """Requeue a down node's attempts (see coordinator/loops/liveness.py: the fence wait)."""
        node = self._get(c.node_id)
        if node.state != NodeState.DOWN.proto:
            raise FailedPrecondition(f"node {c.node_id} is {NodeState.from_proto(node.state).value}, not down")
        self.tasks.node_gone(node.id, c.reason or "node_lost", at_ms)
        return _copy(node)

    def _set_drain(self, c: state_pb2.SetDrainCmd, at_ms: int) -> common_pb2.Node:
        node = self._get(c.node_id)
        if node.draining != c.draining:
            node.draining = c.draining
            self._emit(coordinator_pb2.NodeEvent.KIND_DRAIN_CHANGED, node, at_ms)
        return _copy(node)

    def _get(self, node_id: str) -> common_pb2.Node:
        node = self.nodes.get(node_id)
        if node is None:
            raise NotFound(f'node "{node_id}" not found')
        return node

    # -- reading ---------------------------------------------------------------------
    def get_node(self, node_id: str) -> common_pb2.Node:
        """A copy of the node; raises NotFound."""
        return _copy(self._get(node_id))

    def list_nodes(self) -> list[common_pb2.Node]:
        return [_copy(n) for n in sorted(self.nodes.values(), key=lambda n: (n.name, n.id))]

    # -- snapshots -------------------------------------------------------------------
    def snapshot(self) -> bytes:
        snap = state_pb2.StateSnapshot(index=self.applied_index)
        for node_id in sorted(self.nodes):
            snap.nodes.append(self.nodes[node_id])
        for task_id in sorted(self.tasks.tasks):
            snap.tasks.append(self.tasks.tasks[task_id])
        for name in sorted(self.datasets.datasets):
            snap.datasets.append(self.datasets.datasets[name])
        snap.task_history.extend(self.tasks.history.summaries())
        self.security.fill(snap)
        self.quotas.fill(snap)
        self.deployments.fill(snap)
        return snap.SerializeToString(deterministic=True)

    def restore(self, data: bytes, index: int) -> None:
        snap = state_pb2.StateSnapshot()
        snap.ParseFromString(data)
        self.nodes = {n.id: _copy(n) for n in snap.nodes}
        self.tasks.rebuild(list(snap.tasks))
        self.tasks.history.rebuild(snap.task_history)
        self.datasets.rebuild(list(snap.datasets))
        self.security.rebuild(snap)
        self.quotas.rebuild(snap)
        self.deployments.rebuild(list(snap.deployments))
        self.applied_index = index


def _copy(node: common_pb2.Node) -> common_pb2.Node:
    out = common_pb2.Node()
    out.CopyFrom(node)
    return out


_HANDLERS: dict[str, Callable[[ClusterStateMachine, object, int], object]] = {
    "register_node": ClusterStateMachine._register,
    "set_node_state": ClusterStateMachine._set_state,
    "set_drain": ClusterStateMachine._set_drain,
    "node_lost": ClusterStateMachine._node_lost,
    # Quota checks return None, then the command applies; a refusal raises first.
    "submit_task": lambda sm, c, at: sm.quotas.check_tasks([c.spec]) or sm.tasks.submit(c, at, sm.answered),
    "submit_tasks": lambda sm, c, at: sm.quotas.check_tasks(t.spec for t in c.tasks)
    or sm.tasks.submit_many(c, at, sm.answered),
    "apply_plan": lambda sm, c, at: sm.tasks.apply_plan(c, at),
    "task_event": lambda sm, c, at: sm.tasks.event(c, at),
    "task_events": lambda sm, c, at: sm.tasks.events(c, at),
    "cancel_task": lambda sm, c, at: sm.tasks.cancel(c, at),
    "submit_job": lambda sm, c, at: sm.quotas.check_job(c) or sm.tasks.submit_job(c, at),
    "collect_garbage": lambda sm, c, at: collect(sm.tasks, c, at),
    "put_dataset": lambda sm, c, at: sm.quotas.check_dataset(c) or sm.datasets.put(c, at),
    "delete_dataset": lambda sm, c, at: sm.deployments.check_unserved(c.name) or sm.datasets.delete(c, at),
    "add_replicas": lambda sm, c, at: sm.datasets.add_replicas(c, at),
    "drop_replicas": lambda sm, c, at: sm.datasets.drop_replicas(c, at),
    "create_token": lambda sm, c, at: sm.quotas.check_token(c) or sm.security.create_token(c, at),
    "set_quota": lambda sm, c, at: sm.quotas.set(c, at),
    "revoke_token": lambda sm, c, at: sm.security.revoke_token(c, at),
    "append_audit": lambda sm, c, at: sm.security.append_audit(c, at),
    "set_cluster_id": lambda sm, c, at: sm.security.set_cluster_id(c, at),
    "set_task_token_key": lambda sm, c, at: sm.security.set_task_token_key(c, at),
    "create_deployment": lambda sm, c, at: sm.deployments.create(c, at),
    "scale_deployment": lambda sm, c, at: sm.deployments.scale(c, at),
    "update_deployment": lambda sm, c, at: sm.deployments.update(c, at),
    "delete_deployment": lambda sm, c, at: sm.deployments.delete(c, at),
    "deployment_replicas": lambda sm, c, at: sm.deployments.replicas(c, at),
}
