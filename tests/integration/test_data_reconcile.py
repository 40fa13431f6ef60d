"""The dataset table and the agents' disks kept in agreement, on real agents: a node back
after DOWN is re-listed (its surplus copies swept), a deleted dataset's blobs are swept
from a node that missed the delete, and a put in progress keeps its blobs."""

from __future__ import annotations

import hashlib
import json

import grpc
import numpy as np
import pytest

from lepton.v1 import datasets_pb2 as dpb
from lepton.v1.datasets_pb2_grpc import DatasetsStub, ShardsStub
from tests.integration.cluster import wait_until
from tests.integration.test_data import blobs, ctl, three

pytestmark = pytest.mark.integration

# Report every half second; sweep orphans older than a second.
FAST_DATA = ["--shard-inventory-interval", "0.5", "--shard-orphan-grace", "1"]


def node_state(c, node_id: str) -> str:
    return next(n.state for n in c.nodes() if n.id == node_id)


def agree(agents, datasets) -> bool:
    """Every agent's disk holds exactly the shards the table lists on it."""
    for a in agents:
        listed = {s.id for ds in datasets for s in ds.shards if a.node_id in s.replicas}
        if blobs(a) != listed:
            return False
    return True


def test_a_node_back_after_down_is_relisted_and_its_surplus_swept(agents, tmp_path):
    voter, workers, c = three(agents, *FAST_DATA)
    rng = np.random.default_rng(5)
    np.save(tmp_path / "full.npy", rng.normal(size=(3000, 4)).astype(np.float32))
    np.save(tmp_path / "pair.npy", rng.normal(size=(4000, 4)).astype(np.float32))
    c.put_dataset(tmp_path / "full.npy", "full", shards=3, replicas=3)  # on every node
    pair = c.put_dataset(tmp_path / "pair.npy", "pair", shards=6, replicas=2)
    victim = workers[0]
    surplus = {s.id for s in pair.shards if victim.node_id in s.replicas}
    assert surplus
    victim.kill9()
    wait_until(lambda: node_state(c, victim.node_id) == "down", timeout=60, what="victim down")

    def healed():
        p = c.dataset("pair")
        return p.under_replicated == 0 and all(victim.node_id not in s.replicas for s in p.shards)

    wait_until(healed, timeout=60, what="pair re-replicated elsewhere")
    # "full" has nowhere to go: two copies of three until the victim is back.
    assert all(len(s.replicas) == 2 for s in c.dataset("full").shards)
    assert surplus <= blobs(victim)  # still on its disk, no longer listed

    victim.start()  # same node id, same data dir

    def settled():
        f, p = c.dataset("full"), c.dataset("pair")
        return (f.under_replicated == 0 and all(victim.node_id in s.replicas for s in f.shards)
                and agree([voter, *workers], [f, p]) and (f, p))

    f, p = wait_until(settled, timeout=90, what="victim re-listed, its surplus copies swept")
    assert not surplus & blobs(victim)
    assert all(len(s.replicas) == 2 for s in p.shards)
    shown = json.loads(ctl(voter.address, "-o", "json", "data", "show", "full").stdout)
    assert shown["under_replicated"] == 0
    assert all(victim.node_id in s["replicas"] and len(s["replicas"]) == 3 for s in shown["shards"])
    assert victim.address in shown["addresses"].values()
    assert "under-replicated" not in ctl(voter.address, "data", "show", "full").stdout
    c.get_dataset("full", tmp_path / "out.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.load(tmp_path / "full.npy"))
    c.close()


def upload(address: str, data: bytes) -> str:
    sid = hashlib.sha256(data).hexdigest()
    reqs = iter([dpb.WriteShardRequest(shard_id=sid, size=len(data)), dpb.WriteShardRequest(data=data)])
    with grpc.insecure_channel(address) as ch:
        list(ShardsStub(ch).WriteShard(reqs, timeout=30))
    return sid


def test_orphans_are_swept_and_a_put_in_progress_keeps_its_blobs(agents, tmp_path):
    voter, workers, c = three(agents, *FAST_DATA)
    np.save(tmp_path / "in.npy", np.arange(8000, dtype=np.float32).reshape(-1, 4))
    gone = {s.id for s in c.put_dataset(tmp_path / "in.npy", "gone", shards=4, replicas=2).shards}
    victim = workers[0]
    assert gone & blobs(victim)
    victim.kill9()
    c.delete_dataset("gone")  # its delete of the victim's copies fails: the victim is dead
    others = [voter, workers[1]]
    wait_until(lambda: not any(gone & blobs(a) for a in others), what="blobs deleted on live nodes")
    assert gone & blobs(victim)
    victim.start()
    wait_until(lambda: not gone & blobs(victim), timeout=60, what="the victim's orphans swept")

    # A put in progress: planned, its blob uploaded, not committed. Next to it on the same
    # node, a blob no plan names (a client that crashed before planning).
    held_bytes, stray_bytes = b"held blob " * 100, b"stray blob " * 100
    held_id = hashlib.sha256(held_bytes).hexdigest()
    meta = dpb.Shard(id=held_id, size=len(held_bytes), rows=1, dtype="<f4")
    with grpc.insecure_channel(voter.address) as ch:
        plan = DatasetsStub(ch).PlanPut(dpb.PlanPutRequest(name="pending", replication=1, shards=[meta]),
                                        timeout=30)
    node_id, address = plan.placements[0].node_ids[0], plan.placements[0].addresses[0]
    holder = next(a for a in [voter, *workers] if a.node_id == node_id)
    assert upload(address, held_bytes) == held_id
    stray = upload(address, stray_bytes)
    # Both are older than the grace once the stray one is swept: the held one survived a sweep.
    wait_until(lambda: stray not in blobs(holder), timeout=60, what="the stray blob swept")
    assert held_id in blobs(holder)
    meta.replicas.append(node_id)
    ds = c.commit_dataset(dpb.Dataset(name="pending", replication=1, shards=[meta]))
    assert ds.version == 1 and ds.shards[0].replicas == [node_id]
    # Committed: listed, so it stays; every disk agrees with the table.
    wait_until(lambda: agree([voter, *workers], [c.dataset("pending")]), timeout=30, what="agreement")
    c.close()
