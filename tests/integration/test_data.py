"""Issue 5 end to end: datasets on real agents, shards moved agent to agent."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lepton.client import Client
from lepton.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from lepton.dataplane import shard_hash
from tests.integration.cluster import wait_until

pytestmark = pytest.mark.integration


def ctl(server: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lepton.client.cli", "--server", server, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def content_id(path) -> str:
    """The id of the blob's bytes, under the hash its name (the shard id) says."""
    h = shard_hash.hash_for(path.stem)
    h.update(path.read_bytes())
    return h.shard_id()


def blobs(agent) -> set[str]:
    return {p.stem for p in (agent.data_dir / "shards" / "blobs").glob("*/*.npy")}


def three(agents, *extra: str):
    voter = agents("voter", *extra)
    others = [agents(f"w{i}", "--join", voter.address, *extra) for i in (1, 2)]
    c = Client(voter.address, timeout=20)
    wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == 3, what="3 nodes")
    return voter, others, c


def test_put_get_ls_show_rm(agents, tmp_path):
    voter, workers, c = three(agents)
    x = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
    y = np.arange(1000) % 10
    np.savez(tmp_path / "in.npz", x=x, y=y)
    out = ctl(voter.address, "-o", "json", "data", "put", str(tmp_path / "in.npz"),
              "--name", "toy", "--shards", "4")
    assert out.returncode == 0, out.stderr
    put = json.loads(out.stdout)
    assert put["version"] == 1 and put["rows"] == 1000 and len(put["shards"]) == 4
    assert all(len(s["replicas"]) == 2 for s in put["shards"])
    # Each shard's two copies are where the manifest says, and nowhere else.
    by_node = {a.node_id: blobs(a) for a in [voter, *workers]}
    for s in put["shards"]:
        assert {n for n, ids in by_node.items() if s["id"] in ids} == set(s["replicas"])

    assert ctl(voter.address, "data", "get", "toy", str(tmp_path / "out.npz")).returncode == 0
    with np.load(tmp_path / "out.npz") as z:
        np.testing.assert_array_equal(z["x"], x)
        np.testing.assert_array_equal(z["y"], y)
    c.get_dataset("toy", tmp_path / "out.npy")
    assert np.load(tmp_path / "out.npy")["x"].shape == (1000, 8)

    listed = json.loads(ctl(voter.address, "-o", "json", "data", "ls").stdout)
    assert [d["name"] for d in listed] == ["toy"]
    shown = ctl(voter.address, "data", "show", "toy").stdout
    assert "toy v1" in shown and "<f4" in shown

    again = c.put_dataset(tmp_path / "in.npz", "toy", shards=2, replicas=1)
    assert again.version == 2 and len(again.shards) == 2

    assert ctl(voter.address, "data", "rm", "toy").returncode == 0
    with pytest.raises(NotFound):
        c.dataset("toy")
    wait_until(lambda: not any(blobs(a) for a in [voter, *workers]), what="blobs deleted")
    c.close()


def test_bad_input_stores_nothing(agents, tmp_path):
    voter = agents("voter", "--fake-gpus", "0")
    c = Client(voter.address, timeout=20)
    wait_until(lambda: c.nodes(), what="node")
    x = np.ones((100, 4), dtype=np.float32)
    np.save(tmp_path / "ok.npy", x)
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:300])
    with pytest.raises(NotFound):
        c.dataset("nope")
    with pytest.raises(InvalidArgument):
        c.put_dataset(tmp_path / "ok.npy", "../etc", replicas=1)
    with pytest.raises(InvalidArgument):
        c.put_dataset(tmp_path / "trunc.npy", "t", replicas=1)
    with pytest.raises(FailedPrecondition, match="ready nodes"):
        c.put_dataset(tmp_path / "ok.npy", "t", replicas=2)
    out = ctl(voter.address, "data", "get", "nope", str(tmp_path / "o.npy"))
    assert out.returncode == 1 and "not found" in out.stderr
    assert not (tmp_path / "o.npy").exists()
    assert c.datasets() == [] and not blobs(voter)
    c.close()


def test_full_store_stores_nothing(agents, tmp_path, monkeypatch):
    monkeypatch.setenv("LEPTON_SHARD_QUOTA_BYTES", "3000")
    voter = agents("voter")
    c = Client(voter.address, timeout=20)
    wait_until(lambda: c.nodes(), what="node")
    np.save(tmp_path / "big.npy", np.ones((1000, 4), dtype=np.float32))
    with pytest.raises(ResourceExhausted, match="full"):
        c.put_dataset(tmp_path / "big.npy", "big", shards=4, replicas=1)
    assert c.datasets() == []
    wait_until(lambda: not blobs(voter), what="released blobs")
    assert not list((voter.data_dir / "shards" / "tmp").iterdir())
    c.close()


def test_corrupt_replica_is_detected_and_the_other_copy_used(agents, tmp_path):
    voter, workers, c = three(agents)
    x = np.random.default_rng(1).normal(size=(200_000, 4)).astype(np.float32)  # 3 MiB+
    np.save(tmp_path / "in.npy", x)
    ds = c.put_dataset(tmp_path / "in.npy", "d", shards=1, replicas=2)
    shard = ds.shards[0]
    holders = [a for a in [voter, *workers] if a.node_id in shard.replicas]
    bad = holders[0]
    path = next((bad.data_dir / "shards" / "blobs").glob(f"*/{shard.id}.npy"))
    with open(path, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    # Put the corrupt copy first: a get tries it, catches the bad chunk, uses the other.
    view = c.dataset("d")
    view.shards[0].replicas.sort(key=lambda n: n != bad.node_id)
    c.dataset = lambda name, **kw: view
    c.get_dataset("d", tmp_path / "out.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), x)
    del c.dataset
    # The bad holder dropped its copy and told the leader; replication restores 2 copies.
    wait_until(lambda: not path.exists() or content_id(path) == shard.id, what="corrupt copy removed")
    s = wait_until(lambda: (s := c.dataset("d").shards[0]) and len(s.replicas) == 2 and s,
                   what="re-replicated after corruption")
    for a in [voter, *workers]:
        copy = next((a.data_dir / "shards" / "blobs").glob(f"*/{shard.id}.npy"), None)
        assert (copy is not None) == (a.node_id in s.replicas)
        assert copy is None or content_id(copy) == shard.id
    c.close()


def test_kill_9_of_a_holder_re_replicates(agents, tmp_path):
    voter, workers, c = three(agents)
    np.save(tmp_path / "in.npy", np.arange(40_000, dtype=np.float32).reshape(-1, 4))
    ds = c.put_dataset(tmp_path / "in.npy", "d", shards=6, replicas=2)
    victim = workers[0]
    lost = [s.id for s in ds.shards if victim.node_id in s.replicas]
    assert lost
    victim.kill9()

    def healed():
        d = c.dataset("d")
        return d.under_replicated == 0 and all(
            len(s.replicas) == 2 and victim.node_id not in s.replicas for s in d.shards) and d

    d = wait_until(healed, timeout=60, what="re-replication")
    survivors = {a.node_id: blobs(a) for a in (voter, workers[1])}
    for s in d.shards:
        assert all(s.id in survivors[n] for n in s.replicas)
    c.get_dataset("d", tmp_path / "out.npy")
    assert np.load(tmp_path / "out.npy").shape == (10_000, 4)
    c.close()


def reference(x, y):
    """One numpy pass over the concatenated data: fillna=mean, clean, normalize (zscore).
    Returns x, y and the counts of rows dropped as non-finite and as duplicates."""
    x = x.astype(np.float64)
    x = np.where(np.isnan(x), np.nanmean(x, axis=0), x)
    finite = np.all(np.isfinite(x), axis=1)
    x, y = x[finite], y[finite]
    _, first = np.unique(np.concatenate([x, y[:, None]], axis=1), axis=0, return_index=True)
    first = np.sort(first)
    x, y = x[first], y[first]
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return x.astype(np.float32), y, int((~finite).sum()), int(finite.sum() - len(first))


def test_processing_equals_numpy_on_the_concatenated_data(agents, tmp_path):
    from lepton.client.processor import DataProcessor

    voter, workers, c = three(agents)
    rng = np.random.default_rng(3)
    x = rng.normal(5, 2, size=(3000, 6)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = np.nan
    x[7, 3] = np.inf  # poisons column 3's mean, exactly as numpy would
    y = rng.integers(0, 5, 3000)
    x[2500:2600], y[2500:2600] = x[100:200], y[100:200]  # duplicates across shards
    np.savez(tmp_path / "in.npz", x=x, y=y)
    out = ctl(voter.address, "-o", "json", "data", "put", str(tmp_path / "in.npz"), "--name", "raw",
              "--shards", "5")
    assert out.returncode == 0, out.stderr
    out = ctl(voter.address, "-o", "json", "data", "process", "raw",
              "--steps", "fillna=mean,clean,normalize", "--out", "ready")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    ref_x, ref_y, nonfinite, dups = reference(x, y)
    assert dups >= 90 and nonfinite >= 1
    assert doc["report"]["dropped_duplicates"] == dups and doc["report"]["dropped_nonfinite"] == nonfinite
    assert doc["dataset"]["rows"] == len(ref_x) and len(doc["dataset"]["shards"]) == 5
    c.get_dataset("ready", tmp_path / "ready.npz")
    with np.load(tmp_path / "ready.npz") as z:
        np.testing.assert_allclose(z["x"], ref_x, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(z["y"], ref_y)

    p = DataProcessor(c, seed=1)
    aug = p.enhance_data("ready", noise=0.1)
    assert aug.rows == 2 * len(ref_x)
    med = p.preprocess_data(p.load_data(tmp_path / "in.npz", name="m", shards=3), fillna="median",
                            normalize=None)
    c.get_dataset(med.name, tmp_path / "med.npy")
    want = np.where(np.isnan(x), np.nanmedian(np.where(np.isinf(x), np.nan, x), axis=0), x)
    got = np.load(tmp_path / "med.npy")["x"]
    finite = np.isfinite(x).all(axis=1)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6)
    c.close()
