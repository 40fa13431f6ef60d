"""Issue 17: `data split` on real agents: deterministic, disjoint, covering every row, per
label when stratified; bad input refused in one line with nothing changed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lepton.client import Client
from lepton.client.processor import DataProcessor
from lepton.common.errors import InvalidArgument
from lepton.dataplane import shard_format as fmt
from lepton.v1 import datasets_pb2 as dpb
from tests.integration.cluster import wait_until

pytestmark = pytest.mark.integration

ROWS = 1000


def ctl(server: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lepton.client.cli", "--server", server, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def cluster(agents, tmp_path):
    """Two agents holding a 4-shard dataset `toy`: x[:, 0] is the row id, skewed labels."""
    voter = agents("voter")
    agents("w1", "--join", voter.address)
    c = Client(voter.address, timeout=30)
    wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == 2, what="2 nodes")
    x = np.zeros((ROWS, 3), np.float32)
    x[:, 0] = np.arange(ROWS)
    y = np.minimum(np.random.default_rng(0).geometric(0.3, ROWS) - 1, 6).astype(np.int64)
    np.savez(tmp_path / "toy.npz", x=x, y=y)
    c.put_dataset(tmp_path / "toy.npz", "toy", shards=4, replicas=1)
    yield voter, c, y
    c.close()


def rows_of(c: Client, name: str, folder) -> np.ndarray:
    out = folder / f"{name}.npy"
    c.get_dataset(name, out)
    return np.load(out)


def test_split_is_deterministic_disjoint_covering_and_stratified(cluster, tmp_path):
    voter, c, y = cluster
    out = ctl(voter.address, "-o", "json", "data", "split", "toy", "--fractions", "0.8,0.2",
              "--seed", "7", "--out", "train,test", "--stratify")
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert [d["name"] for d in made] == ["train", "test"]
    train, test = rows_of(c, "train", tmp_path), rows_of(c, "test", tmp_path)
    ids = np.concatenate([train["x"][:, 0], test["x"][:, 0]]).astype(int)
    assert sorted(ids) == list(range(ROWS))  # disjoint and covering
    for label in np.unique(y):  # each label's share kept, up to one row of rounding
        assert abs(np.sum(test["y"] == label) - 0.2 * np.sum(y == label)) < 1
    assert np.array_equal(y[train["x"][:, 0].astype(int)], train["y"])  # labels stay with their rows

    # The same seed gives the same rows (content-addressed: the same shard ids), another seed others.
    p = DataProcessor(c)
    again = p.split_data("toy", [0.8, 0.2], ["train2", "test2"], stratify=True, seed=7)
    first = c.dataset("train")
    assert [s.id for s in again[0].shards] == [s.id for s in first.shards]
    p.split_data("toy", [0.8, 0.2], ["train3", "test3"], seed=8)
    other_test = rows_of(c, "test3", tmp_path)
    assert len(other_test) == 200 and set(other_test["x"][:, 0]) != set(test["x"][:, 0])
    assert "split toy v1: part 2 of 2" in c.dataset("test3").source


def test_bad_split_is_refused_in_one_line_and_changes_nothing(cluster, tmp_path):
    voter, c, _ = cluster
    before = sorted(d.name for d in c.datasets())
    cases = [
        (["toy", "--fractions", "0.8,0.3", "--out", "a,b"], "sum to 1"),
        (["toy", "--fractions", "0.8,0.2", "--out", "a"], "2 fractions but 1 output names"),
        (["toy", "--fractions", "0.8,x", "--out", "a,b"], "must be numbers"),
        (["toy", "--fractions", "0.5,0.5", "--out", "a,toy"], "must differ"),
        (["toy", "--fractions", "0.5,0.5", "--out", "a,../b"], "../b"),
        (["nope", "--fractions", "0.5,0.5", "--out", "a,b"], "nope"),
    ]
    for args, message in cases:
        out = ctl(voter.address, "data", "split", *args)
        assert out.returncode != 0, args
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, out.stderr)
    # An existing output name: ALREADY_EXISTS, and the other output is not made.
    DataProcessor(c).split_data("toy", [0.5, 0.5], ["a", "b"], seed=1)
    out = ctl(voter.address, "data", "split", "toy", "--fractions", "0.5,0.5", "--out", "c,b")
    assert out.returncode != 0 and "dataset b exists" in out.stderr
    assert sorted(d.name for d in c.datasets()) == sorted([*before, "a", "b"])
    # Stratifying needs integer labels: the holders say so.
    np.savez(tmp_path / "f.npz", x=np.zeros((10, 2), np.float32), y=np.linspace(0, 1, 10).astype(np.float32))
    c.put_dataset(tmp_path / "f.npz", "floaty", shards=2, replicas=1)
    with pytest.raises(InvalidArgument, match="integer"):
        DataProcessor(c).split_data("floaty", [0.5, 0.5], ["f1", "f2"], stratify=True)
    assert "f1" not in {d.name for d in c.datasets()}
    # A model is not a dataset to split.
    recs = fmt.make_records(np.zeros((4, 2), np.float32), None)
    sid, size = fmt.write_shard(recs, tmp_path / "m.npy")
    c.put_shards("a-model", [dpb.Shard(id=sid, size=size, **fmt.describe(recs))], {sid: tmp_path / "m.npy"},
                 replicas=1, kind="model")
    out = ctl(voter.address, "data", "split", "a-model", "--fractions", "0.5,0.5", "--out", "m1,m2")
    assert out.returncode == 1 and out.stderr.strip() == (
        'lepton-ctl: "a-model" is a model, not a dataset (see lepton-ctl models show a-model)')
