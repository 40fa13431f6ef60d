"""lepton.workloads.reader: every row exactly once per epoch across ranks and DataLoader
workers, whatever the shard sizes; deterministic shuffles; memory-mapped shards."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton.dataplane import shard_format as fmt
from lepton.workloads import reader
from lepton.workloads.reader import ShardRows, epoch_order, rank_range, worker_range


def _write_shards(folder, sizes: list[int], *, labels: bool = True) -> list[str]:
    """Data-plane shards whose x[:, 0] is the row's global id (in shard order)."""
    paths, next_id = [], 0
    for i, n in enumerate(sizes):
        x = np.zeros((n, 3), np.float32)
        x[:, 0] = np.arange(next_id, next_id + n)
        y = (np.arange(next_id, next_id + n) % 5).astype(np.int64) if labels else None
        path = folder / f"s{i}.npy"
        fmt.write_shard(fmt.make_records(x, y), path)
        paths.append(str(path))
        next_id += n
    return paths


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.integers(1, 9), st.integers(1, 5),
       st.booleans(), st.integers(0, 3))
def test_ranks_and_workers_cover_every_row_once(sizes, world, workers, shuffle, epoch):
    total = sum(sizes)
    seen: Counter[int] = Counter()
    per_rank = []
    for rank in range(world):
        start, stop = rank_range(total, rank, world)
        per_rank.append(stop - start)
        order = epoch_order(stop - start, shuffle=shuffle, seed=7, epoch=epoch, rank=rank)
        for w in range(workers):
            a, b = worker_range(len(order), w, workers)
            seen.update(int(i) + start for i in order[a:b])
    assert seen == Counter(range(total))  # each exactly once: no padding, nothing dropped
    assert max(per_rank) - min(per_rank) <= 1


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
       st.integers(1, 4))
def test_shard_rows_reads_the_global_index_space(tmp_path_factory, sizes, world):
    paths = _write_shards(tmp_path_factory.mktemp("shards"), sizes)
    ids = []
    for rank in range(world):
        rows = ShardRows(paths, rank=rank, world_size=world)
        for i in range(len(rows)):  # one row at a time: the same row as a batch of one
            x, y = rows.row(i)
            assert x[0] == rows.start + i and y == rows.rows([i])[1][0]
        for x, y in rows.iter_batches(4, shuffle=True, seed=1, epoch=2):
            assert y is not None and list(y) == [int(i) % 5 for i in x[:, 0]]  # labels stay with rows
            ids.extend(int(i) for i in x[:, 0])
    assert sorted(ids) == list(range(sum(sizes)))


def test_default_is_this_ranks_lepton_shards(tmp_path):
    paths = _write_shards(tmp_path, [3, 5, 2])
    # A job gives rank 1 of 2 shards 1 (round robin): no second split by RANK.
    rows = ShardRows(env={"LEPTON_SHARDS": paths[1], "RANK": "1", "WORLD_SIZE": "2"})
    assert len(rows) == 5
    x, _ = rows.rows(np.arange(5))
    assert list(x[:, 0]) == [3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="already this rank's shards"):
        ShardRows(rank=0, world_size=2, env={"LEPTON_SHARDS": paths[0]})
    with pytest.raises(ValueError, match="no shards"):
        ShardRows(env={})
    # Given every shard, RANK/WORLD_SIZE choose the slice.
    rows = ShardRows(paths, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert (rows.start, rows.stop) == (5, 10)


def test_shuffle_is_deterministic_by_seed_and_epoch():
    a = epoch_order(100, shuffle=True, seed=3, epoch=1)
    assert np.array_equal(a, epoch_order(100, shuffle=True, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(100, shuffle=True, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_order(100, shuffle=True, seed=4, epoch=1))
    assert list(epoch_order(4, shuffle=False, seed=3, epoch=9)) == [0, 1, 2, 3]


def test_bad_shards_are_refused(tmp_path):
    good = _write_shards(tmp_path, [2])[0]
    other = tmp_path / "other.npy"
    fmt.write_shard(fmt.make_records(np.zeros((2, 4), np.float32), None), other)
    with pytest.raises(ValueError, match="rows of shape"):
        ShardRows([good, str(other)])
    nolabel = tmp_path / "nolabel.npy"
    fmt.write_shard(fmt.make_records(np.zeros((2, 3), np.float32), None), nolabel)
    with pytest.raises(ValueError, match="some shards have labels"):
        ShardRows([good, str(nolabel)])
    with pytest.raises(FileNotFoundError):
        ShardRows([str(tmp_path / "missing.npy")])
    with pytest.raises(ValueError, match="outside a world"):
        ShardRows([good], rank=2, world_size=2)
    with pytest.raises(IndexError):
        ShardRows([good]).rows([2])
    with pytest.raises(IndexError):
        ShardRows([good]).row(-1)


def test_plain_npy_and_npz_shards(tmp_path):
    np.save(tmp_path / "plain.npy", np.arange(6, dtype=np.int32).reshape(3, 2))
    np.savez(tmp_path / "pair.npz", x=np.ones((2, 2), np.int32), y=np.array([1, 2]))
    plain = ShardRows([str(tmp_path / "plain.npy")])
    assert not plain.has_labels and plain.rows([2])[0].tolist() == [[4, 5]]
    x, y = ShardRows([str(tmp_path / "pair.npz")]).rows([1, 0])
    assert x.shape == (2, 2) and list(y) == [2, 1]


def test_importing_the_reader_does_not_import_torch():
    code = ("import sys, lepton.workloads.reader as r; r.ShardRows; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_datasets_with_dataloader_workers(tmp_path, workers):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    paths = _write_shards(tmp_path, [7, 0, 12, 4])
    for cls in (reader.RowIterableDataset, reader.RowDataset):
        epochs = []
        for epoch in (0, 1):
            ids = []
            for rank in range(2):
                data = cls(paths, rank=rank, world_size=2, shuffle=True, seed=5)
                data.set_epoch(epoch)
                for x, y in DataLoader(data, batch_size=3, num_workers=workers):
                    assert x.dtype == torch.float32 and y.dtype == torch.int64
                    assert torch.equal(y, x[:, 0].long() % 5)
                    ids.extend(int(i) for i in x[:, 0])
            assert sorted(ids) == list(range(23)), cls.__name__
            epochs.append(ids)
        assert epochs[0] != epochs[1]  # a new order each epoch
