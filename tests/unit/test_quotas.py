"""Per-user quotas in the replicated state (coordinator/state/quotas.py): set and lifted by
command, enforced as submissions are applied, refusals naming the quota, snapshots."""

from __future__ import annotations

import uuid

import pytest

from lepton.common.auth import new_token, token_id
from lepton.common.errors import InvalidArgument, ResourceExhausted
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import common_pb2, datasets_pb2, security_pb2, state_pb2, tasks_pb2


class World:
    def __init__(self) -> None:
        self.sm = ClusterStateMachine()
        self.index = 0
        self.apply(register_node=state_pb2.RegisterNodeCmd(
            node_id="n1", name="n1", address="n1:1", capacity=common_pb2.Capacity(cpu_logical=1, memory_bytes=1)))

    def apply(self, **op):
        self.index += 1
        return self.sm.apply(self.index, state_pb2.Command(at_ms=1000, **op).SerializeToString())

    def quota(self, user: str, unlimited=(), **limits):
        return self.apply(set_quota=state_pb2.SetQuotaCmd(
            quota=security_pb2.Quota(user=user, **limits), unlimited=list(unlimited)))

    def submit(self, owner: str, n: int = 1, request_ids: list[str] | None = None):
        rids = request_ids or [uuid.uuid4().hex for _ in range(n)]
        return self.apply(submit_tasks=state_pb2.SubmitTasksCmd(tasks=[
            state_pb2.SubmitTaskCmd(task_id="t-" + uuid.uuid4().hex[:12], spec=tasks_pb2.TaskSpec(
                argv=["true"], owner=owner, request_id=rid)) for rid in rids]))

    def put(self, owner: str, name: str, size: int):
        ds = datasets_pb2.Dataset(name=name, replication=1, owner=owner)
        ds.shards.add(id="a" * 64, size=size, rows=1, dtype="<f4", replicas=["n1"])
        return self.apply(put_dataset=state_pb2.PutDatasetCmd(dataset=ds))

    def token(self, name: str):
        token, h = new_token()
        return self.apply(create_token=state_pb2.CreateTokenCmd(
            token_id=token_id(token), name=name, role="user", token_hash=h))


def test_no_quota_means_no_limit() -> None:
    w = World()
    assert len(w.submit("alice", 50)) == 50


def test_pending_tasks_refused_past_the_limit_naming_the_quota() -> None:
    w = World()
    view = w.quota("alice", pending_tasks=3)
    assert view.quota.pending_tasks == 3 and view.pending_tasks == 0
    assert len(w.submit("alice", 2)) == 2
    err = w.submit("alice", 2)
    assert isinstance(err, ResourceExhausted)
    assert 'quota pending_tasks of user "alice" is 3' in err.message and "2 pending" in err.message
    assert len(w.sm.tasks.tasks) == 2  # the whole batch refused, nothing stored
    assert len(w.submit("alice", 1)) == 1  # up to the limit
    assert len(w.submit("bob", 10)) == 10  # others are not limited


def test_a_retried_submission_counts_nothing() -> None:
    w = World()
    w.quota("alice", pending_tasks=2)
    rids = ["r1", "r2"]
    first = w.submit("alice", request_ids=rids)
    again = w.submit("alice", request_ids=rids)  # at the limit, but the same two tasks
    assert [t.id for t in again] == [t.id for t in first]


def test_a_job_counts_each_member() -> None:
    w = World()
    w.quota("alice", pending_tasks=3)
    err = w.apply(submit_job=state_pb2.SubmitJobCmd(
        job_id="j-1", nodes=4, spec=tasks_pb2.TaskSpec(argv=["true"], owner="alice", request_id="j")))
    assert isinstance(err, ResourceExhausted) and "adds 4" in err.message


def test_finished_tasks_do_not_count() -> None:
    w = World()
    w.quota("alice", pending_tasks=1)
    (task,) = w.submit("alice", 1)
    w.apply(cancel_task=state_pb2.CancelTaskCmd(task_id=task.id))
    assert len(w.submit("alice", 1)) == 1


def test_dataset_bytes_counts_other_datasets_and_the_new_version() -> None:
    w = World()
    w.quota("alice", dataset_bytes=1000)
    assert w.put("alice", "d1", 600).size == 600
    assert w.put("alice", "d1", 900).size == 900  # replaces d1: 900 in all
    err = w.put("alice", "d2", 200)
    assert isinstance(err, ResourceExhausted)
    assert 'quota dataset_bytes of user "alice" is 1000' in err.message
    assert "d2" not in w.sm.datasets.datasets


def test_tokens_quota() -> None:
    w = World()
    w.quota("alice", tokens=1)
    assert isinstance(w.token("alice"), security_pb2.ApiToken)
    err = w.token("alice")
    assert isinstance(err, ResourceExhausted) and 'quota tokens of user "alice" is 1' in err.message


def test_set_merges_lifts_and_removes() -> None:
    w = World()
    w.quota("alice", pending_tasks=5, tokens=2)
    view = w.quota("alice", dataset_bytes=10)
    assert (view.quota.pending_tasks, view.quota.tokens, view.quota.dataset_bytes) == (5, 2, 10)
    view = w.quota("alice", unlimited=["pending_tasks"])
    assert not view.quota.HasField("pending_tasks")
    assert len(w.submit("alice", 20)) == 20
    w.quota("alice", unlimited=["tokens", "dataset_bytes"])
    assert "alice" not in w.sm.quotas.quotas  # no limit left


@pytest.mark.parametrize("quota, unlimited, words", [
    (security_pb2.Quota(user=""), [], "user name"),
    (security_pb2.Quota(user="a"), ["bogus"], "unknown limit"),
    (security_pb2.Quota(user="a", tokens=1), ["tokens"], "both set and lifted"),
])
def test_bad_quota_commands_are_refused(quota, unlimited, words) -> None:
    w = World()
    err = w.apply(set_quota=state_pb2.SetQuotaCmd(quota=quota, unlimited=unlimited))
    assert isinstance(err, InvalidArgument) and words in err.message
    assert not w.sm.quotas.quotas


def test_quotas_survive_a_snapshot() -> None:
    w = World()
    w.quota("alice", pending_tasks=1)
    other = ClusterStateMachine()
    other.restore(w.sm.snapshot(), w.index)
    assert other.quotas.quotas["alice"].pending_tasks == 1
    other.apply(w.index + 1, state_pb2.Command(at_ms=1, submit_task=state_pb2.SubmitTaskCmd(
        task_id="t-1", spec=tasks_pb2.TaskSpec(argv=["true"], owner="alice"))).SerializeToString())
    err = other.apply(w.index + 2, state_pb2.Command(at_ms=1, submit_task=state_pb2.SubmitTaskCmd(
        task_id="t-2", spec=tasks_pb2.TaskSpec(argv=["true"], owner="alice"))).SerializeToString())
    assert isinstance(err, ResourceExhausted)


# -- lepton-ctl quota: what is refused before anything is sent ---------------------------------

@pytest.mark.parametrize("argv, words", [
    (["quota", "set", "alice"], "give at least one of"),
    (["quota", "set", "alice", "--tokens", "-1"], "must be between 0 and 2^64-1"),
    (["quota", "set", "alice", "--pending-tasks", "many"], "not an integer"),
    (["quota", "set", "alice", "--dataset-bytes", "99999999999999999999GiB"], "too large (under 8 EiB)"),
])
def test_quota_cli_refuses_bad_values_in_one_line(capsys, argv, words) -> None:
    from lepton.client import cli

    code = cli.main(["--server", "127.0.0.1:1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_pending_counts_per_owner_are_kept_not_scanned() -> None:
    """The pending_tasks check reads a count the table keeps (it scanned every pending task
    of the cluster per submission, on every replica); it agrees with a scan through
    submissions, cancels and a snapshot restore."""
    w = World()

    def scanned(sm: ClusterStateMachine) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in sm.tasks.pending:
            owner = sm.tasks.tasks[i].spec.owner
            out[owner] = out.get(owner, 0) + 1
        return out

    tasks = w.submit("alice", 3) + w.submit("bob", 2)
    w.apply(cancel_task=state_pb2.CancelTaskCmd(task_id=tasks[0].id))
    w.apply(cancel_task=state_pb2.CancelTaskCmd(task_id=tasks[0].id))  # twice: counted once
    assert dict(w.sm.tasks.pending_by_owner) == scanned(w.sm) == {"alice": 2, "bob": 2}
    assert w.quota("alice", pending_tasks=5).pending_tasks == 2
    other = ClusterStateMachine()
    other.restore(w.sm.snapshot(), w.index)
    assert dict(other.tasks.pending_by_owner) == scanned(other)
    w.apply(cancel_task=state_pb2.CancelTaskCmd(task_id=tasks[3].id))
    w.apply(cancel_task=state_pb2.CancelTaskCmd(task_id=tasks[4].id))
    assert dict(w.sm.tasks.pending_by_owner) == scanned(w.sm) == {"alice": 2}
