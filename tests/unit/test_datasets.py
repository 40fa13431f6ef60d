"""Datasets in the state machine (deterministic, snapshot round trip) and the leader's
replication loop with a fake agent pool."""

from __future__ import annotations

import pytest

from lepton.common.errors import FailedPrecondition, InvalidArgument, LeptonError, NotFound
from lepton.common.validation import check_dataset_name
from lepton.coordinator.loops.replication import ReplicationLoop
from lepton.coordinator.state.state_machine import ClusterStateMachine, NodeState
from lepton.v1 import common_pb2, datasets_pb2, state_pb2

A, B, C = "a" * 64, "b" * 64, "c" * 64


class World:
    def __init__(self, nodes=("n1", "n2", "n3")):
        self.sm = ClusterStateMachine()
        self.index = 0
        for n in nodes:
            self.apply(register_node=state_pb2.RegisterNodeCmd(
                node_id=n, name=n, address=f"{n}:1", capacity=common_pb2.Capacity(cpu_logical=1, memory_bytes=1)))

    def apply(self, at_ms: int = 1000, **op):
        self.index += 1
        return self.sm.apply(self.index, state_pb2.Command(at_ms=at_ms, **op).SerializeToString())

    async def propose(self, cmd: state_pb2.Command):
        result = self.apply(**{cmd.WhichOneof("op"): getattr(cmd, cmd.WhichOneof("op"))})
        if isinstance(result, LeptonError):
            raise result
        return result

    def put(self, name: str, shards: list[tuple[str, list[str]]], replication: int = 2):
        ds = datasets_pb2.Dataset(name=name, replication=replication)
        for sid, replicas in shards:
            ds.shards.add(id=sid, size=100, rows=10, dtype="<f4", replicas=replicas)
        return self.apply(put_dataset=state_pb2.PutDatasetCmd(dataset=ds))

    def set_state(self, node: str, state: NodeState):
        return self.apply(set_node_state=state_pb2.SetNodeStateCmd(node_id=node, state=state.proto))


def replicas(w: World, name: str) -> list[list[str]]:
    return [list(s.replicas) for s in w.sm.datasets.get(name).shards]


def test_put_versions_and_delete():
    w = World()
    ds = w.put("d", [(A, ["n1", "n2"]), (B, ["n2", "n3"])])
    assert (ds.version, ds.rows, ds.size, ds.created_at_ms) == (1, 20, 200, 1000)
    assert w.put("d", [(A, ["n1", "n2"])]).version == 2
    assert w.sm.datasets.referenced(A) and not w.sm.datasets.referenced(B)
    assert w.apply(delete_dataset=state_pb2.DeleteDatasetCmd(name="d")).version == 2
    assert isinstance(w.apply(delete_dataset=state_pb2.DeleteDatasetCmd(name="d")), NotFound)
    assert not w.sm.datasets.referenced(A)


def test_bad_commands_change_nothing():
    w = World()
    assert isinstance(w.put("../x", [(A, ["n1"])]), InvalidArgument)
    assert isinstance(w.put("d", [(A, ["nobody"])]), FailedPrecondition)
    assert isinstance(w.put("d", [(A, ["n1"])], replication=0), InvalidArgument)
    assert w.sm.datasets.datasets == {}
    for bad in ("", "a/b", "..", ".hidden", "x" * 129, "a b"):
        with pytest.raises(InvalidArgument):
            check_dataset_name(bad)


def test_node_loss_removes_replicas_and_snapshot_round_trips():
    w = World()
    w.put("d", [(A, ["n1", "n2"]), (B, ["n2", "n3"])])
    w.put("e", [(A, ["n1", "n2"])], replication=3)
    w.set_state("n2", NodeState.SUSPECT)
    assert replicas(w, "d") == [["n1", "n2"], ["n2", "n3"]]  # suspect still counts
    assert not isinstance(w.set_state("n2", NodeState.DOWN), LeptonError)
    assert replicas(w, "d") == [["n1"], ["n3"]] and replicas(w, "e") == [["n1"]]
    under = {s.id: want for s, want in w.sm.datasets.under_replicated()}
    assert under == {A: 3, B: 2}
    w.apply(add_replicas=state_pb2.AddReplicasCmd(replicas=[
        state_pb2.ReplicaChange(shard_id=A, node_id="n3"),
        state_pb2.ReplicaChange(shard_id=B, node_id="n2")]))  # n2 is down: skipped
    assert replicas(w, "d") == [["n1", "n3"], ["n3"]] and replicas(w, "e") == [["n1", "n3"]]
    w.apply(drop_replicas=state_pb2.DropReplicasCmd(replicas=[
        state_pb2.ReplicaChange(shard_id=A, node_id="n1")]))
    assert replicas(w, "e") == [["n3"]]
    copy = ClusterStateMachine()
    copy.restore(w.sm.snapshot(), w.index)
    assert copy.snapshot() == w.sm.snapshot()
    assert copy.datasets.referenced(A) and copy.datasets.referenced(B)


class FakePool:
    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[tuple[str, list[str]]] = []
        self.fail = fail

    async def call(self, address, method, request, timeout):
        assert method == "PullShards"
        ids = [s.shard_id for s in request.shards]
        self.calls.append((address, ids))
        return datasets_pb2.PullShardsResponse(
            pulled=[i for i in ids if address not in self.fail],
            failed={i: "boom" for i in ids if address in self.fail})


async def test_replication_loop_copies_lost_replicas_to_other_nodes():
    w = World(("n1", "n2", "n3", "n4"))
    w.put("d", [(A, ["n1", "n2"]), (B, ["n2", "n3"]), (C, ["n3", "n4"])])
    pool = FakePool()
    loop = ReplicationLoop(w.sm, w.propose, pool, is_leader=lambda: True)
    assert await loop.run_cycle() == "all shards fully replicated"
    w.set_state("n2", NodeState.LEFT)
    assert await loop.run_cycle() == "re-replicated 2 shards"
    for reps in replicas(w, "d"):
        assert len(reps) == 2 and "n2" not in reps
    assert sorted(i for _, ids in pool.calls for i in ids) == [A, B]  # only what was lost
    assert await loop.run_cycle() == "all shards fully replicated"


async def test_replication_loop_reports_failures_and_lost_data():
    w = World(("n1", "n2", "n3"))
    w.put("d", [(A, ["n1", "n2"]), (B, ["n1"])], replication=2)
    loop = ReplicationLoop(w.sm, w.propose, FakePool(fail={"n2:1", "n3:1"}), is_leader=lambda: True)
    assert await loop.run_cycle() == "re-replicated 0 shards, 1 failed"
    w.set_state("n1", NodeState.SUSPECT)
    w.set_state("n1", NodeState.DOWN)
    assert await loop.run_cycle() == "re-replicated 0 shards, 1 failed, 1 with no live copy"
    assert await ReplicationLoop(w.sm, w.propose, FakePool(), is_leader=lambda: False).run_cycle() \
        == "not the leader: nothing to replicate"
