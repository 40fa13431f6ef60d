"""The shard layout the built-in recipes read. numpy only: the data plane may use it too.

A shard is one of:
  - `<name>.npz`: a numpy archive (`np.savez`, compressed or not) with array `x` and,
    when labelled, array `y`;
  - any other path `P`: the pair `P.x.npy` and `P.y.npy` (`y` optional), plain `.npy` files
    read with mmap, for shards too large to load at once.

Arrays:
  x  float32, shape (n, d) for tabular data (logreg, mlp), (n, c, h, w) or (n, h, w) for
     images (cnn; (n, h, w) means one channel). Other float dtypes are converted.
  y  labels, shape (n,). An integer dtype (int64, int32...) means classification with
     classes 0..k-1; a float dtype means regression (shape (n, k) gives k targets).

  - a data-plane shard from the shard store: one `.npy` of records with field `x` and
    optional `y` (see `lepton.dataplane.shard_format`).

A job's worker finds its shards in LEPTON_SHARDS: paths separated by commas (so a path
must hold no comma), each rank its own list; they are read in that order and concatenated.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from lepton.common.durable import atomic_writer

__all__ = [
    "SHARDS_ENV",
    "load_shards",
    "parse_shards",
    "read_shard",
    "shards_from_env",
    "task_of_labels",
    "write_shard",
]

SHARDS_ENV = "LEPTON_SHARDS"
# What tasks write (shards, models, predictions): readable by the agent that uploads it.
OUTPUT_MODE = 0o644


def parse_shards(value: str) -> list[str]:
    """The paths in a LEPTON_SHARDS value (empty items are skipped)."""
    return [p.strip() for p in value.split(",") if p.strip()]


def shards_from_env(env: Mapping[str, str] | None = None) -> list[str]:
    """This rank's shard paths, from LEPTON_SHARDS in `env` (default: os.environ)."""
    return parse_shards((os.environ if env is None else env).get(SHARDS_ENV, ""))


def write_shard(path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray | None = None) -> None:
    """Write one shard (layout by suffix, see the module doc); each file atomically
    (`atomic_writer`). Raises ValueError when x and y disagree in length, OSError."""
    x = np.asarray(x)
    if y is not None:
        y = np.asarray(y)
        if len(y) != len(x):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    path = Path(path)
    if path.suffix == ".npz":
        arrays = {"x": x} if y is None else {"x": x, "y": y}
        with atomic_writer(path, mode=OUTPUT_MODE) as f:
            np.savez(f, **arrays)
        return
    with atomic_writer(f"{path}.x.npy", mode=OUTPUT_MODE) as f:
        np.save(f, x)
    if y is not None:
        with atomic_writer(f"{path}.y.npy", mode=OUTPUT_MODE) as f:
            np.save(f, y)


def read_shard(path: str | os.PathLike[str], *, need_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(x as float32, y or None) of one shard. Raises FileNotFoundError for a missing
    shard, ValueError for a malformed one (or no labels when `need_labels`)."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files:
                raise ValueError(f"{path}: no array 'x' in the archive")
            x = z["x"]
            y = z["y"] if "y" in z.files else None
    elif path.is_file() and not Path(f"{path}.x.npy").exists():
        # The data plane's shard: one .npy of records with field x and optional y.
        recs = np.load(path, mmap_mode="r", allow_pickle=False)
        names = recs.dtype.names or ()
        if "x" not in names:
            raise ValueError(f"{path}: a shard file needs a record field 'x'")
        x = recs["x"]
        y = recs["y"] if "y" in names else None
    else:
        x = np.load(f"{path}.x.npy", mmap_mode="r", allow_pickle=False)
        y_path = Path(f"{path}.y.npy")
        y = np.load(y_path, mmap_mode="r", allow_pickle=False) if y_path.exists() else None
    if x.ndim < 2:
        raise ValueError(f"{path}: x must have a row axis and features, not shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{path}: x must be numeric, not {x.dtype}")
    if y is None:
        if need_labels:
            raise ValueError(f"{path}: no labels (y)")
    elif len(y) != len(x):
        raise ValueError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    elif not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"{path}: y must be numeric, not {y.dtype}")
    return np.asarray(x, dtype=np.float32), (None if y is None else np.asarray(y))


def load_shards(paths: Iterable[str | os.PathLike[str]], *, need_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """The shards in `paths`, in order, concatenated. Raises ValueError when there are
    none or they disagree (feature shape, label dtype kind or presence), plus what
    `read_shard` raises."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray | None] = []
    for p in paths:
        x, y = read_shard(p, need_labels=need_labels)
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise ValueError(f"{p}: features of shape {x.shape[1:]}, the first shard's are {xs[0].shape[1:]}")
        if ys and (y is None) != (ys[0] is None):
            raise ValueError(f"{p}: some shards have labels and some do not")
        if ys and y is not None and ys[0] is not None and task_of_labels(y) != task_of_labels(ys[0]):
            raise ValueError(f"{p}: labels of dtype {y.dtype}, the first shard's are {ys[0].dtype}")
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError(f"no shards given (set {SHARDS_ENV} or pass --shards)")
    x = np.concatenate(xs) if len(xs) > 1 else xs[0]
    if ys[0] is None:
        return x, None
    labelled: Sequence[np.ndarray] = [y for y in ys if y is not None]
    return x, (np.concatenate(labelled) if len(labelled) > 1 else labelled[0])


def task_of_labels(y: np.ndarray) -> str:
    """"classification" for integer labels, "regression" for float ones."""
    return "classification" if np.issubdtype(y.dtype, np.integer) else "regression"
