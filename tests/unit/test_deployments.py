"""Deployments in the replicated state (coordinator/state/deployments.py)."""

from __future__ import annotations

import pytest

from lepton.common import validation as v
from lepton.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from lepton.common.states import TaskState
from lepton.coordinator.loops.serving import model_of, replica_spec
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import datasets_pb2, serving_pb2, state_pb2, tasks_pb2
from tests.unit.test_datasets import A, World

MODEL = datasets_pb2.DATASET_KIND_MODEL


def world() -> World:
    w = World()
    for name, kind in (("digits", MODEL), ("digits2", MODEL), ("raw", datasets_pb2.DATASET_KIND_DATA)):
        ds = datasets_pb2.Dataset(name=name, replication=1, source="model.safetensors", kind=kind)
        ds.shards.add(id=A, size=100, rows=10, dtype="|u1", replicas=["n1"])
        assert not isinstance(w.apply(put_dataset=state_pb2.PutDatasetCmd(dataset=ds)), Exception)
    return w


def create(w: World, name="web", model="digits", replicas=2, owner="alice", **fields):
    spec = serving_pb2.DeploymentSpec(name=name, model=model, replicas=replicas, **fields)
    return w.apply(create_deployment=state_pb2.CreateDeploymentCmd(spec=spec, owner=owner, owner_role="user"))


def add_replicas(w: World, name: str, ids: list[str], drain: tuple[str, ...] = ()):
    rec = w.sm.deployments.get(name)
    cmd = state_pb2.DeploymentReplicasCmd(deployment=name, drain=drain)
    for task_id in ids:
        cmd.submit.add(task_id=task_id, spec=replica_spec(rec))
    return w.apply(deployment_replicas=cmd)


def test_create_records_generation_one_and_survives_a_snapshot():
    w = world()
    dep = create(w, max_batch=8, max_wait_ms=5, priority=3)
    assert (dep.generation, dep.owner, dep.state, dep.spec.max_batch) == (1, "alice", "starting", 8)
    assert add_replicas(w, "web", ["t-1", "t-2"]) == 2
    task = w.sm.tasks.get("t-1")
    assert task.spec.replica.deployment == "web" and task.spec.replica.generation == 1
    assert task.spec.owner == "alice" and task.spec.owner_role == "user" and task.spec.priority == 3
    assert model_of(task) == "digits"
    copy = ClusterStateMachine()
    copy.restore(w.sm.snapshot(), w.index)
    assert copy.deployments.get("web") == w.sm.deployments.get("web")
    assert [t.id for t in copy.deployments.live_tasks("web")] == ["t-1", "t-2"]


def test_bad_specs_and_models_are_refused_with_a_message():
    w = world()
    assert isinstance(create(w, name="Bad_Name"), InvalidArgument)
    assert isinstance(create(w, replicas=0), InvalidArgument)
    assert isinstance(create(w, replicas=v.MAX_REPLICAS + 1), InvalidArgument)
    assert isinstance(create(w, max_batch=v.MAX_SERVE_BATCH + 1), InvalidArgument)
    missing = create(w, model="nope")
    assert isinstance(missing, NotFound) and 'model "nope" not found' in missing.message
    data = create(w, model="raw")
    assert isinstance(data, FailedPrecondition) and "not a model" in data.message
    assert w.sm.deployments.records == {}
    create(w)
    assert isinstance(create(w), AlreadyExists)


def test_a_retried_create_answers_with_the_first():
    w = world()
    spec = serving_pb2.DeploymentSpec(name="web", model="digits", replicas=1)
    first = w.apply(create_deployment=state_pb2.CreateDeploymentCmd(spec=spec, owner="a", request_id="r1"))
    again = w.apply(create_deployment=state_pb2.CreateDeploymentCmd(spec=spec, owner="a", request_id="r1"))
    assert again == first


def test_scale_update_and_only_the_owner_changes_it():
    w = world()
    create(w)
    assert w.apply(scale_deployment=state_pb2.ScaleDeploymentCmd(name="web", replicas=3)).spec.replicas == 3
    denied = w.apply(scale_deployment=state_pb2.ScaleDeploymentCmd(name="web", replicas=1, only_owner="bob"))
    assert isinstance(denied, PermissionDenied) and "belongs to alice" in denied.message
    ok = w.apply(update_deployment=state_pb2.UpdateDeploymentCmd(name="web", model="digits2", only_owner="alice"))
    assert (ok.generation, ok.spec.model) == (2, "digits2")
    assert isinstance(w.apply(update_deployment=state_pb2.UpdateDeploymentCmd(name="web", model="raw")),
                      FailedPrecondition)
    assert isinstance(w.apply(scale_deployment=state_pb2.ScaleDeploymentCmd(name="web", replicas=0)), InvalidArgument)
    assert isinstance(w.apply(scale_deployment=state_pb2.ScaleDeploymentCmd(name="nope", replicas=1)), NotFound)


def test_delete_marks_stopping_and_removal_waits_for_the_tasks():
    w = world()
    create(w)
    add_replicas(w, "web", ["t-1"])
    assert isinstance(w.apply(delete_deployment=state_pb2.DeleteDeploymentCmd(name="web", only_owner="bob")),
                      PermissionDenied)
    dep = w.apply(delete_deployment=state_pb2.DeleteDeploymentCmd(name="web"))
    assert dep.state == "stopping" and w.sm.deployments.get("web").deleting
    assert isinstance(add_replicas(w, "web", ["t-2"]), FailedPrecondition)  # no new replicas while removed
    again = create(w)
    assert isinstance(again, AlreadyExists) and "is being removed" in again.message
    assert isinstance(w.apply(scale_deployment=state_pb2.ScaleDeploymentCmd(name="web", replicas=3)),
                      FailedPrecondition)
    assert isinstance(w.apply(delete_deployment=state_pb2.DeleteDeploymentCmd(name="web", remove=True)),
                      FailedPrecondition)
    w.apply(cancel_task=state_pb2.CancelTaskCmd(task_id="t-1"))
    w.apply(delete_deployment=state_pb2.DeleteDeploymentCmd(name="web", remove=True))
    assert "web" not in w.sm.deployments.records
    assert not isinstance(create(w), Exception)  # the name is free again


def test_draining_is_recorded_and_ended_tasks_are_pruned():
    w = world()
    create(w)
    add_replicas(w, "web", ["t-1", "t-2"])
    assert isinstance(add_replicas(w, "web", [], drain=("t-9",)), FailedPrecondition)
    add_replicas(w, "web", [], drain=("t-1",))
    assert list(w.sm.deployments.get("web").draining) == ["t-1"]
    w.apply(cancel_task=state_pb2.CancelTaskCmd(task_id="t-1"))
    assert [t.id for t in w.sm.deployments.live_tasks("web")] == ["t-2"]
    add_replicas(w, "web", ["t-3"])  # any change prunes what ended
    rec = w.sm.deployments.get("web")
    assert list(rec.task_ids) == ["t-2", "t-3"] and list(rec.draining) == []


def test_replica_tasks_are_all_or_none_and_count_against_quotas():
    w = world()
    create(w)
    w.apply(submit_task=state_pb2.SubmitTaskCmd(task_id="t-taken", spec=tasks_pb2.TaskSpec(argv=["x"])))
    assert isinstance(add_replicas(w, "web", ["t-1", "t-taken"]), FailedPrecondition)
    assert "t-1" not in w.sm.tasks.tasks and list(w.sm.deployments.get("web").task_ids) == []
    w.apply(set_quota=_quota("alice", 1))
    assert isinstance(add_replicas(w, "web", ["t-1", "t-2"]), ResourceExhausted)
    assert w.sm.tasks.get("t-taken").state == TaskState.PENDING.proto


def _quota(user: str, pending: int) -> state_pb2.SetQuotaCmd:
    from lepton.v1 import security_pb2

    return state_pb2.SetQuotaCmd(quota=security_pb2.Quota(user=user, pending_tasks=pending))


def test_user_task_specs_may_not_set_replica():
    spec = tasks_pb2.TaskSpec(argv=["x"], replica=tasks_pb2.ReplicaSpec(deployment="web", generation=1))
    with pytest.raises(InvalidArgument, match="only by the serving loop"):
        v.check_task_spec(spec)
    v.check_task_spec(tasks_pb2.TaskSpec(argv=["x"]))


@pytest.mark.parametrize("fields", [{"job_id": "j-someone-elses"}, {"gang_size": 2}, {"gang_rank": 1}])
def test_user_task_specs_may_not_set_gang_fields(fields):
    # SubmitTask took them: a forged job id joined another's gang, and gang_size 0 stopped
    # every scheduling cycle (found by test_fuzz_api).
    with pytest.raises(InvalidArgument, match="set by the coordinator"):
        v.check_task_spec(tasks_pb2.TaskSpec(argv=["x"], **fields))


def test_the_method_table_keeps_reports_to_nodes_and_changes_to_users():
    from lepton.common import auth
    from lepton.common.auth import Role

    def rule(name: str):
        return auth.rule_for(f"/lepton.v1.Deployments/{name}")

    for name in ("ReportReplicas", "WatchEndpoints"):
        assert rule(name).allows(Role.NODE)
        assert not any(rule(name).allows(r) for r in (Role.VIEWER, Role.USER, Role.ADMIN))  # tasks act as people
    for name in ("CreateDeployment", "ScaleDeployment", "UpdateDeployment", "DeleteDeployment"):
        assert rule(name).allows(Role.USER) and not rule(name).allows(Role.VIEWER)
        assert not rule(name).allows(Role.NODE) and not rule(name).read
    assert rule("ListDeployments").allows(Role.VIEWER) and rule("GetDeployment").read


def test_a_served_model_is_not_deleted_until_its_deployment_goes():
    w = world()
    create(w)
    refused = w.apply(delete_dataset=state_pb2.DeleteDatasetCmd(name="digits"))
    assert isinstance(refused, FailedPrecondition) and "served by deployment web" in refused.message
    assert "digits" in w.sm.datasets.datasets
    assert not isinstance(w.apply(delete_dataset=state_pb2.DeleteDatasetCmd(name="digits2")), Exception)
    w.apply(delete_deployment=state_pb2.DeleteDeploymentCmd(name="web"))  # being removed: no longer served
    assert not isinstance(w.apply(delete_dataset=state_pb2.DeleteDatasetCmd(name="digits")), Exception)


def test_an_update_must_change_what_is_served():
    """The same model again restarts every replica for nothing: refused, nothing changed;
    a version of it put since (trained again to the same name) rolls."""
    w = world()
    create(w)
    same = w.apply(update_deployment=state_pb2.UpdateDeploymentCmd(name="web", model="digits"))
    assert isinstance(same, FailedPrecondition) and "already serves digits (version 1)" in same.message
    assert w.sm.deployments.get("web").deployment.generation == 1
    ds = datasets_pb2.Dataset(name="digits", replication=1, source="model.safetensors", kind=MODEL)
    ds.shards.add(id=A, size=100, rows=10, dtype="|u1", replicas=["n1"])
    w.apply(at_ms=5000, put_dataset=state_pb2.PutDatasetCmd(dataset=ds))
    rolled = w.apply(at_ms=6000, update_deployment=state_pb2.UpdateDeploymentCmd(name="web", model="digits"))
    assert rolled.generation == 2, rolled
