"""The split's plan (client) and cut (holder) in lepton.dataplane.process: disjoint parts that
cover every row, sizes by the fractions up to rounding, per label when stratified, the same
rows for the same seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton.common.errors import InvalidArgument
from lepton.dataplane import process as proc
from lepton.dataplane import shard_format as fmt
from lepton.dataplane.shards import ShardStore


def _shards(sizes: list[int], classes: int, seed: int = 0) -> list[np.ndarray]:
    """Record shards whose x[:, 0] is the row's global id; labels 0..classes-1, skewed."""
    rng = np.random.default_rng(seed)
    out, next_id = [], 0
    for n in sizes:
        x = np.zeros((n, 2), np.float32)
        x[:, 0] = np.arange(next_id, next_id + n)
        y = np.minimum(rng.geometric(0.4, n) - 1, classes - 1).astype(np.int64)
        out.append(fmt.make_records(x, y))
        next_id += n
    return out


def _cut(shards, fractions, seed, stratify):
    counts = [proc.label_counts(s["y"]) if stratify else {"0": len(s)} for s in shards]
    strata, alloc = proc.plan_split(counts, fractions, seed)
    parts = []
    for k in range(len(fractions)):
        picked = []
        for j, recs in enumerate(shards):
            spec = {"seed": seed, "part": k, "counts": alloc[j, :, :].tolist(),
                    "strata": strata if stratify else None}
            spec = json.loads(json.dumps(spec))  # as it crosses the wire
            picked.append(recs[proc.split_rows(recs, spec, j)])
        parts.append(np.concatenate(picked))
    return parts


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=1, max_size=6), st.integers(1, 5),
       st.sampled_from([[0.8, 0.2], [0.5, 0.3, 0.2], [0.1, 0.9], [0.25] * 4]),
       st.integers(0, 2**40), st.booleans())
def test_parts_are_disjoint_cover_and_follow_the_fractions(sizes, classes, fractions, seed, stratify):
    shards = _shards(sizes, classes, seed % 1000)
    parts = _cut(shards, fractions, seed, stratify)
    ids = np.concatenate([p["x"][:, 0] for p in parts]).astype(int)
    assert sorted(ids) == list(range(sum(sizes)))  # every row once: disjoint and covering
    every_y = np.concatenate([s["y"] for s in shards]) if sizes else np.zeros(0, np.int64)
    labels = np.unique(every_y)
    for k, part in enumerate(parts):
        if stratify:  # each label's rows cut by the fractions, up to one row of rounding
            for lab in labels:
                want = fractions[k] * np.sum(every_y == lab)
                assert abs(np.sum(part["y"] == lab) - want) < 1
        else:
            assert abs(len(part) - fractions[k] * sum(sizes)) < 1
        assert list(part["x"][:, 0]) == sorted(part["x"][:, 0])  # row order kept within a part
        assert part.dtype == shards[0].dtype


def test_a_dataset_without_rows_splits_into_empty_parts():
    for stratify in (False, True):
        parts = _cut(_shards([0, 0], 3), [0.5, 0.5], 1, stratify)
        assert [len(p) for p in parts] == [0, 0]


def test_same_seed_same_split_other_seed_other_split():
    shards = _shards([50, 30, 41], 3)
    a = _cut(shards, [0.7, 0.3], 11, True)
    b = _cut(shards, [0.7, 0.3], 11, True)
    c = _cut(shards, [0.7, 0.3], 12, True)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("fractions, seed, message", [
    ([0.8, 0.3], 0, "sum to 1"),
    ([1.0], 0, "2 to 16 fractions"),
    ([1.2, -0.2], 0, "positive"),
    ([0.5, float("nan")], 0, "positive"),
    ([0.5, 0.5], -1, "seed must be"),
])
def test_bad_fractions_and_seeds(fractions, seed, message):
    with pytest.raises(InvalidArgument, match=message):
        proc.check_split(fractions, seed)


def test_label_counts_needs_integer_labels():
    assert proc.label_counts(np.array([2, 0, 2])) == {"0": 1, "2": 2}
    with pytest.raises(InvalidArgument, match="has none"):
        proc.label_counts(None)
    with pytest.raises(InvalidArgument, match="integer"):
        proc.label_counts(np.array([0.5, 1.0]))
    with pytest.raises(InvalidArgument, match="at most"):
        proc.label_counts(np.arange(proc.MAX_STRATA + 1))


def test_a_plan_that_does_not_fit_the_shard_is_refused():
    recs = _shards([10], 2)[0]
    with pytest.raises(InvalidArgument, match="does not match"):
        proc.split_rows(recs, {"seed": 0, "part": 0, "counts": [[3, 3]], "strata": None}, 0)
    with pytest.raises(InvalidArgument, match="bad split spec"):
        proc.split_rows(recs, {"seed": 0, "part": 2, "counts": [[5, 5]], "strata": None}, 0)
    with pytest.raises(InvalidArgument, match="bad split spec"):
        proc.split_rows(recs, {"part": 0, "counts": [[5, 5]]}, 0)
    for bad in ({"counts": [[2**70, 0]]}, {"strata": ["9" * 5000]}, {"strata": "01"}, {"counts": {"a": 1}},
                {"strata": [2**70]}):
        spec = {"seed": 0, "part": 0, "counts": [[5, 5]], "strata": None, **bad}
        with pytest.raises(InvalidArgument, match="bad split spec"):
            proc.split_rows(recs, spec, 0)


@pytest.mark.parametrize("encrypted", [False, True])
def test_transform_shard_stores_one_part_with_the_dtype_kept(tmp_path, encrypted):
    cipher = None
    if encrypted:
        from lepton.dataplane.shard_crypto import ShardCipher
        cipher = ShardCipher(b"k" * 32)
    store = ShardStore(tmp_path / "shards", cipher=cipher)
    x = np.arange(20, dtype=np.int16).reshape(10, 2)  # not float: a split must not cast
    recs = fmt.make_records(x, np.arange(10, dtype=np.uint8) % 2)
    sid = proc._save(store, recs).id  # stored as processing stores a shard
    strata, alloc = proc.plan_split([proc.label_counts(recs["y"])], [0.6, 0.4], 3)
    got = []
    for k in range(2):
        spec = {"split": {"seed": 3, "part": k, "counts": alloc[0].tolist(), "strata": strata}, "index": 0}
        meta, report = proc.transform_shard(store, sid, spec, 0)
        part = store.load(meta.id)
        assert part.dtype == recs.dtype and meta.rows == len(part) == report["rows_out"]
        got.append(part)
    assert [len(p) for p in got] == [6, 4]
    assert sorted(np.concatenate(got)["x"][:, 0].tolist()) == list(range(0, 20, 2))


def test_a_failed_commit_removes_the_parts_already_committed():
    from lepton.client.processor import DataProcessor
    from lepton.common.errors import Unavailable
    from lepton.v1 import datasets_pb2 as dpb

    class FakeClient:
        def __init__(self):
            self.committed, self.deleted, self.released = [], [], []

        def commit_dataset(self, ds):
            if self.committed:
                raise Unavailable("leader lost")
            self.committed.append(ds.name)
            return type("Info", (), {"name": ds.name})()

        def delete_dataset(self, name):
            self.deleted.append(name)

        def _release(self, ids, nodes):
            self.released.append((sorted(ids), nodes))

    made = [dpb.Dataset(name=n, shards=[dpb.Shard(id=f"id-{n}", replicas=["node-1"])]) for n in ("a", "b")]
    fake = FakeClient()
    with pytest.raises(Unavailable):
        DataProcessor(fake)._commit_all(made)
    assert fake.committed == ["a"] and fake.deleted == ["a"]
    assert fake.released == [(["id-a", "id-b"], ["node-1"])]


@pytest.mark.parametrize("kind", ["model", "checkpoint"])
def test_process_and_split_refuse_a_model_or_checkpoint_before_any_work(kind):
    from lepton.client.processor import DataProcessor
    from lepton.common.errors import InvalidArgument

    class FakeClient:
        def dataset(self, name):
            return type("Info", (), {"name": name, "kind": kind, "shards": []})()

    proc = DataProcessor(FakeClient())
    with pytest.raises(InvalidArgument, match=f'"ckpt-j-1" is a {kind}, not a dataset to process'):
        proc.run("ckpt-j-1", [{"op": "normalize"}], out="x")
    with pytest.raises(InvalidArgument, match=f'"ckpt-j-1" is a {kind}, not a dataset to split'):
        proc.split_data("ckpt-j-1", [0.5, 0.5], ["a", "b"])
