"""This rank's rows of a dataset, for training scripts that do not want to know the layout.

    from lepton.workloads.reader import RowDataset
    data = RowDataset(shuffle=True, seed=0)        # this rank's rows of $LEPTON_SHARDS
    loader = torch.utils.data.DataLoader(data, batch_size=64, num_workers=2)
    for epoch in range(E):
        data.set_epoch(epoch)
        for x, y in loader: ...

Three views of the same rows, all memory-mapped (a shard is read only where a row is used):
`ShardRows` (numpy: `len`, `rows(indices)`, `iter_batches`), and two torch Datasets,
`RowDataset` (map-style) and `RowIterableDataset` (iterable, split across DataLoader workers
with `get_worker_info`). Importing this module does not import torch: the two torch classes
are built on first access (the agent's main process must never load torch).

How rows are split across ranks, so that each row is read exactly once per epoch, with no
padding and nothing dropped:
- Default (no paths): the rows of this rank's `LEPTON_SHARDS`. A `run --dataset` job already
  gives each global rank its own shards (shard i to rank i % world size), so the ranks' rows
  are disjoint and together cover the dataset. Ranks can then hold different row counts
  (whole shards); a DDP loop needs `torch.distributed.algorithms.Join` for the uneven tail
  (see examples/ddp_reader.py).
- Given `paths` (every shard of the dataset, e.g. from `data get NAME DIR`): one global row
  index space over the shards in that order; rank r of W (default RANK / WORLD_SIZE) reads
  rows [r*N//W, (r+1)*N//W): contiguous, counts differ by at most one.
Within a rank, the epoch's order is the rank's rows in order, or with `shuffle` a
permutation seeded by (seed, epoch, rank); DataLoader workers of the iterable take
contiguous, disjoint slices of that order ([w*n//k, (w+1)*n//k)). The map-style dataset
maps index i to the epoch's i-th row; use it without a DistributedSampler (the split across
ranks is already done) and without `persistent_workers` (workers copy the epoch at start).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lepton.workloads.recipes.data import SHARDS_ENV, parse_shards

__all__ = [
    "RowDataset",  # noqa: F822 (built on first access, see __getattr__)
    "RowIterableDataset",  # noqa: F822
    "ShardRows",
    "epoch_order",
    "rank_range",
    "worker_range",
]


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s rows [start, stop) of `total` rows split into `world_size` parts."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return total * rank // world_size, total * (rank + 1) // world_size


worker_range = rank_range  # the same cut, of a rank's rows across its DataLoader workers


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0) -> np.ndarray:
    """The order of a rank's `n` rows in `epoch`: 0..n-1, or a permutation of it that
    depends only on (seed, epoch, rank)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch, rank]).permutation(n).astype(np.int64)


def _open_shard(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y or None), memory-mapped: a data-plane shard (records with field x[, y]), a
    plain .npy of features, or an .npz with x[, y] (loaded: archives do not map)."""
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files:
                raise ValueError(f"{path}: no array 'x' in the archive")
            return z["x"], (z["y"] if "y" in z.files else None)
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    names = arr.dtype.names or ()
    if not names:
        return arr, None
    if "x" not in names:
        raise ValueError(f"{path}: a shard file needs a record field 'x', has {names}")
    return arr["x"], (arr["y"] if "y" in names else None)


class ShardRows:
    """This rank's rows of a set of shards (see the module doc for which rows).

    `paths`: None for $LEPTON_SHARDS (this rank's shards in a job), else every shard of the
    dataset, split by `rank`/`world_size` (default $RANK/$WORLD_SIZE, else 0 and 1).
    Raises ValueError for no shards, shards that disagree (row shape, labels or not), or a
    rank outside the world; FileNotFoundError for a missing shard."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]] | None = None, *, rank: int | None = None,
                 world_size: int | None = None, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        if paths is None:
            if rank is not None or world_size is not None:
                raise ValueError(f"${SHARDS_ENV} is already this rank's shards: give paths to split by rank")
            files, rank, world_size = parse_shards(env.get(SHARDS_ENV, "")), 0, 1
        else:
            files = [os.fspath(p) for p in paths]
            rank = int(env.get("RANK", 0)) if rank is None else rank
            world_size = int(env.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if not files:
            raise ValueError(f"no shards (set {SHARDS_ENV}, e.g. run with --dataset NAME, or give paths)")
        self.paths = [str(Path(p)) for p in files]
        self._xs: list[np.ndarray] = []
        self._ys: list[np.ndarray | None] = []
        for p in self.paths:
            x, y = _open_shard(p)
            if self._xs and x.shape[1:] != self._xs[0].shape[1:]:
                raise ValueError(f"{p}: rows of shape {x.shape[1:]}, the first shard's are {self._xs[0].shape[1:]}")
            if self._ys and (y is None) != (self._ys[0] is None):
                raise ValueError(f"{p}: some shards have labels and some do not")
            self._xs.append(x)
            self._ys.append(y)
        self.rank, self.world_size = rank, world_size
        self._ends = np.cumsum([len(x) for x in self._xs], dtype=np.int64)
        self._ends_list = self._ends.tolist()  # for one row at a time: bisect beats numpy
        self.start, self.stop = rank_range(int(self._ends[-1]), rank, world_size)

    @property
    def has_labels(self) -> bool:
        return self._ys[0] is not None

    def __len__(self) -> int:
        return self.stop - self.start

    def global_index(self, indices: np.ndarray) -> np.ndarray:
        """This rank's row numbers -> rows of the global index space (the shards in order)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        return indices + self.start

    def row(self, index: int) -> tuple[np.ndarray, Any]:
        """(x, y or None) of this rank's row `index` (a copy of x)."""
        if not 0 <= index < len(self):
            raise IndexError(f"row index {index} out of range for {len(self)} rows")
        glob = index + self.start
        s = bisect.bisect_right(self._ends_list, glob)
        local = glob - (self._ends_list[s - 1] if s else 0)
        y = self._ys[s]
        return np.array(self._xs[s][local]), (None if y is None else y[local])

    def rows(self, indices: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """(x, y or None) of this rank's rows `indices`, in that order (copies, writable)."""
        glob = self.global_index(np.asarray(indices))
        shard = np.searchsorted(self._ends, glob, side="right")
        starts = self._ends - np.array([len(x) for x in self._xs], dtype=np.int64)
        local = glob - starts[shard]
        x = np.empty((len(glob), *self._xs[0].shape[1:]), dtype=self._xs[0].dtype)
        y = None if self._ys[0] is None else np.empty(len(glob), dtype=self._ys[0].dtype)
        for s in np.unique(shard):
            pick = shard == s
            x[pick] = self._xs[s][local[pick]]
            if y is not None:
                y[pick] = self._ys[s][local[pick]]  # type: ignore[index]
        return x, y

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                     drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """This rank's rows as numpy (x, y) batches in the epoch's order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        order = epoch_order(len(self), shuffle=shuffle, seed=seed, epoch=epoch, rank=self.rank)
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            yield self.rows(chunk)


def _torch_classes() -> dict[str, type]:
    import torch.utils.data as tud  # only a training process gets here

    class _Epochs:
        def _setup(self, paths, rank, world_size, shuffle: bool, seed: int) -> None:
            self.rows = ShardRows(paths, rank=rank, world_size=world_size)
            self.shuffle, self.seed, self.epoch = shuffle, seed, 0
            self._order: tuple[int, np.ndarray] | None = None

        def set_epoch(self, epoch: int) -> None:
            """Choose the epoch whose order the next pass reads (call before iterating)."""
            self.epoch = int(epoch)

        def order(self) -> np.ndarray:
            if self._order is None or self._order[0] != self.epoch:
                self._order = (self.epoch, epoch_order(len(self.rows), shuffle=self.shuffle, seed=self.seed,
                                                       epoch=self.epoch, rank=self.rows.rank))
            return self._order[1]

    class RowDataset(_Epochs, tud.Dataset):
        """Map-style: item i is the epoch's i-th row of this rank, x or (x, y) as numpy."""

        def __init__(self, paths=None, *, rank=None, world_size=None, shuffle: bool = False, seed: int = 0):
            self._setup(paths, rank, world_size, shuffle, seed)

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> Any:
            if not -len(self) <= i < len(self):
                raise IndexError(i)
            x, y = self.rows.row(int(self.order()[i]))
            return x if y is None else (x, y)

    class RowIterableDataset(_Epochs, tud.IterableDataset):
        """Iterable: this rank's rows in the epoch's order, each DataLoader worker its slice."""

        def __init__(self, paths=None, *, rank=None, world_size=None, shuffle: bool = False, seed: int = 0,
                     read_ahead: int = 256):
            self._setup(paths, rank, world_size, shuffle, seed)
            self.read_ahead = read_ahead

        def __len__(self) -> int:
            return len(self.rows)

        def __iter__(self) -> Iterator[Any]:
            info = tud.get_worker_info()
            worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
            order = self.order()
            start, stop = worker_range(len(order), worker, workers)
            for i in range(start, stop, self.read_ahead):  # gather rows in blocks, yield one by one
                x, y = self.rows.rows(order[i:min(i + self.read_ahead, stop)])
                for j in range(len(x)):
                    yield x[j] if y is None else (x[j], y[j])

    return {"RowDataset": RowDataset, "RowIterableDataset": RowIterableDataset}


_classes: dict[str, type] = {}


def __getattr__(name: str) -> type:
    if name in ("RowDataset", "RowIterableDataset"):
        if not _classes:
            _classes.update(_torch_classes())
        return _classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
