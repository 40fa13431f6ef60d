"""Deployments in the replicated state: a model served by N replica tasks (docs/serving.md).

Called from `ClusterStateMachine.apply`; deterministic (time from the command, never a
clock). Errors are raised as LeptonErrors, which `apply` turns into returned values.

A deployment's record lists the replica tasks the serving loop started for it (submitted
by the same command that records them, so a task is never a replica of nobody) and which of
them are draining. Tasks that ended are pruned from the record whenever it changes; readers
skip them before that. What the replicas report (ready, unhealthy) is soft state on the
leader (coordinator/api/endpoints.py), never here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lepton.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from lepton.common.states import TaskState
from lepton.common.validation import check_dataset_name, check_deployment_spec, check_replica_count
from lepton.v1 import datasets_pb2, serving_pb2, state_pb2, tasks_pb2

if TYPE_CHECKING:
    from lepton.coordinator.state.state_machine import ClusterStateMachine

# Deployment.state values the state machine sets; the serving loop refines the rest
# ("ready", "rolling", "degraded") from what replicas report.
STARTING = "starting"
STOPPING = "stopping"
MAX_DEPLOYMENTS = 1000


def copy_record(rec: state_pb2.DeploymentRecord) -> state_pb2.DeploymentRecord:
    out = state_pb2.DeploymentRecord()
    out.CopyFrom(rec)
    return out


def check_model(sm: ClusterStateMachine, model: str) -> None:
    """The model must be a stored dataset of kind model: NotFound / FailedPrecondition."""
    check_dataset_name(model, "model name")
    ds = sm.datasets.datasets.get(model)
    if ds is None:
        raise NotFound(f'model "{model}" not found (lepton-ctl models list)')
    if ds.kind != datasets_pb2.DATASET_KIND_MODEL:
        raise FailedPrecondition(f'"{model}" is not a model (lepton-ctl models list shows the models)')


def check_new_model(sm: ClusterStateMachine, rec: state_pb2.DeploymentRecord, model: str) -> None:
    """An update changes what is served: another model, or a version of the same one put
    since the deployment last changed (trained again to the same name). FailedPrecondition
    otherwise: it would restart every replica for nothing."""
    check_model(sm, model)
    dep = rec.deployment
    ds = sm.datasets.datasets[model]
    if model == dep.spec.model and ds.created_at_ms <= dep.updated_at_ms:
        raise FailedPrecondition(
            f'deployment "{dep.spec.name}" already serves {model} (version {ds.version}); name another model, '
            "or put a new version of it first")


def check_deployment_owner(rec: state_pb2.DeploymentRecord, only_owner: str) -> None:
    """PermissionDenied unless `only_owner` is empty (an admin, or auth off) or owns it.
    Checked when applied, so a change that raced an rm and re-create cannot touch the new
    owner's deployment."""
    owner = rec.deployment.owner
    if only_owner and owner != only_owner:
        raise PermissionDenied(
            f'deployment "{rec.deployment.spec.name}" belongs to {owner or "nobody (made without --auth)"}; '
            f"{only_owner} may not change it")


class DeploymentTable:
    """The deployments part of the state machine."""

    def __init__(self, sm: ClusterStateMachine):
        self._sm = sm
        self.records: dict[str, state_pb2.DeploymentRecord] = {}
        self.by_request: dict[str, str] = {}  # request id -> name (idempotent create)
        # Bumped by every change (local, not replicated); each listener is called after it
        # (the endpoint table recomputes its set: a drain mark takes a replica out).
        self.changes = 0
        self.listeners: list[Callable[[], None]] = []

    def _changed(self) -> None:
        self.changes += 1
        for listener in list(self.listeners):
            listener()

    def rebuild(self, records: list[state_pb2.DeploymentRecord]) -> None:
        self.records = {r.deployment.spec.name: copy_record(r) for r in records}
        self.by_request = {r.request_id: name for name, r in self.records.items() if r.request_id}
        self._changed()

    def fill(self, snap: state_pb2.StateSnapshot) -> None:
        for name in sorted(self.records):
            snap.deployments.append(self.records[name])

    # -- reads -------------------------------------------------------------------------
    def get(self, name: str) -> state_pb2.DeploymentRecord:
        """The record itself (callers copy before handing it out); raises NotFound."""
        rec = self.records.get(name)
        if rec is None:
            raise NotFound(f'deployment "{name}" not found (lepton-ctl serve ls)')
        return rec

    def live_tasks(self, name: str) -> list[tasks_pb2.Task]:
        """The deployment's replica tasks that have not ended, oldest first."""
        rec = self.get(name)
        tasks = self._sm.tasks.tasks
        return [tasks[t] for t in rec.task_ids if t in tasks and not TaskState.from_proto(tasks[t].state).final]

    def check_unserved(self, model: str) -> None:
        """FailedPrecondition when a deployment (not being removed) serves `model`: its
        replicas would fail to load it on their next start."""
        users = sorted(n for n, r in self.records.items() if r.deployment.spec.model == model and not r.deleting)
        if users:
            raise FailedPrecondition(
                f'"{model}" is served by deployment {", ".join(users)}; lepton-ctl serve rm or serve update it first')

    # -- commands ----------------------------------------------------------------------
    def create(self, c: state_pb2.CreateDeploymentCmd, at_ms: int) -> serving_pb2.Deployment:
        if c.request_id and c.request_id in self.by_request:
            return _copy(self.records[self.by_request[c.request_id]].deployment)  # a retry
        check_deployment_spec(c.spec)
        old = self.records.get(c.spec.name)
        if old is not None and old.deleting:
            raise AlreadyExists(f'deployment "{c.spec.name}" is being removed; create it again once it is gone')
        if old is not None:
            raise AlreadyExists(f'deployment "{c.spec.name}" exists (lepton-ctl serve update or scale changes it)')
        if len(self.records) >= MAX_DEPLOYMENTS:
            raise FailedPrecondition(f"{len(self.records)} deployments; at most {MAX_DEPLOYMENTS}")
        check_model(self._sm, c.spec.model)
        rec = state_pb2.DeploymentRecord(request_id=c.request_id, owner_role=c.owner_role,
                                         owner_token_id=c.owner_token_id)
        dep = rec.deployment
        dep.spec.CopyFrom(c.spec)
        dep.generation = 1
        dep.owner = c.owner
        dep.created_at_ms = dep.updated_at_ms = at_ms
        dep.state = STARTING
        self.records[c.spec.name] = rec
        if c.request_id:
            self.by_request[c.request_id] = c.spec.name
        self._changed()
        return _copy(dep)

    def _changeable(self, name: str, only_owner: str) -> state_pb2.DeploymentRecord:
        rec = self.get(name)
        check_deployment_owner(rec, only_owner)
        if rec.deleting:
            raise FailedPrecondition(f'deployment "{name}" is being removed')
        return rec

    def scale(self, c: state_pb2.ScaleDeploymentCmd, at_ms: int) -> serving_pb2.Deployment:
        rec = self._changeable(c.name, c.only_owner)
        check_replica_count(c.replicas)
        rec.deployment.spec.replicas = c.replicas
        rec.deployment.updated_at_ms = at_ms
        self._touch(rec)
        return _copy(rec.deployment)

    def update(self, c: state_pb2.UpdateDeploymentCmd, at_ms: int) -> serving_pb2.Deployment:
        rec = self._changeable(c.name, c.only_owner)
        check_new_model(self._sm, rec, c.model)
        rec.deployment.spec.model = c.model
        rec.deployment.generation += 1
        rec.deployment.updated_at_ms = at_ms
        self._touch(rec)
        return _copy(rec.deployment)

    def delete(self, c: state_pb2.DeleteDeploymentCmd, at_ms: int) -> serving_pb2.Deployment:
        rec = self.get(c.name)
        check_deployment_owner(rec, c.only_owner)
        if c.remove:
            live = self.live_tasks(c.name)
            if live:
                raise FailedPrecondition(f'deployment "{c.name}" still has {len(live)} replica task(s)')
            del self.records[c.name]
            if rec.request_id and self.by_request.get(rec.request_id) == c.name:
                del self.by_request[rec.request_id]
            self._changed()
            return _copy(rec.deployment)
        rec.deleting = True
        rec.deployment.state = STOPPING
        rec.deployment.updated_at_ms = at_ms
        self._touch(rec)
        return _copy(rec.deployment)

    def replicas(self, c: state_pb2.DeploymentReplicasCmd, at_ms: int) -> int:
        """Submit replica tasks and mark replicas draining, all or none. Returns how many
        tasks were submitted."""
        rec = self.get(c.deployment)
        if c.submit and rec.deleting:
            raise FailedPrecondition(f'deployment "{c.deployment}" is being removed')
        for sub in c.submit:
            if sub.spec.replica.deployment != c.deployment:
                raise InvalidArgument(f"task {sub.task_id} is not a replica of {c.deployment}")
        for task_id in c.drain:
            if task_id not in rec.task_ids:
                raise FailedPrecondition(f"task {task_id} is not a replica of {c.deployment}")
        if c.submit:
            self._sm.quotas.check_tasks(s.spec for s in c.submit)
            self._sm.tasks.submit_many(state_pb2.SubmitTasksCmd(tasks=c.submit), at_ms)
            rec.task_ids.extend(s.task_id for s in c.submit)
        rec.draining.extend(t for t in c.drain if t not in rec.draining)
        self._touch(rec)
        return len(c.submit)

    def _touch(self, rec: state_pb2.DeploymentRecord) -> None:
        """Prune ended tasks from the record, and count the change."""
        tasks = self._sm.tasks.tasks
        live = [t for t in rec.task_ids if t in tasks and not TaskState.from_proto(tasks[t].state).final]
        if len(live) != len(rec.task_ids):
            del rec.task_ids[:]
            rec.task_ids.extend(live)
            kept = [t for t in rec.draining if t in live]
            del rec.draining[:]
            rec.draining.extend(kept)
        self._changed()


def _copy(dep: serving_pb2.Deployment) -> serving_pb2.Deployment:
    out = serving_pb2.Deployment()
    out.CopyFrom(dep)
    return out
