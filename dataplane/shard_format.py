"""What a shard holds, and turning input files into shards and shards back into files.

A shard is one `.npy` file holding a 1-D structured array, one element per row:

    field "x": the features, dtype and row shape of the input (e.g. ("<f4", (784,)))
    field "y": the label (only when the dataset has labels)

One blob per logical shard keeps features and labels of a row together (one id, one
replica set, one transfer), and the file memory-maps: `np.load(p, mmap_mode="r")["x"]`.
Pure numpy; used by the client (put/get) and the agent (processing).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from lepton.common.errors import InvalidArgument
from lepton.dataplane.shard_hash import new_hash

FEATURE_KEYS = ("x", "X", "features", "data", "inputs")
LABEL_KEYS = ("y", "Y", "labels", "label", "target", "targets")
CSV_LABEL_NAMES = ("label", "labels", "y", "target", "class")
MAX_SHARDS = 100_000


def load_input(path: str | Path, *, label: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Features and labels (or None) from a .npy, .npz or .csv file.

    .npy: a plain array (features only) or a structured one with fields x[, y].
    .npz: arrays named x/X/features/data and y/labels/target (or the only array).
    .csv: numbers, an optional header; the label column is `label` (a name or an index),
    else a header column named label/y/target/class; empty cells are NaN.
    Large .npy inputs are memory-mapped, not read. Raises InvalidArgument.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.dtype.names:
                if "x" not in arr.dtype.names:
                    raise InvalidArgument(f"{path.name}: a structured array needs a field 'x'")
                x, y = arr["x"], arr["y"] if "y" in arr.dtype.names else None
            else:
                x, y = arr, None
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                fk = next((k for k in FEATURE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
                if fk is None:
                    raise InvalidArgument(f"{path.name}: no features array (name it x); has {keys}")
                lk = next((k for k in LABEL_KEYS if k in keys), None)
                x, y = z[fk], (z[lk] if lk else None)
        elif suffix == ".csv":
            x, y = _load_csv(path, label)
        else:
            raise InvalidArgument(f"{path.name}: unsupported format (use .npy, .npz or .csv)")
    except InvalidArgument:
        raise
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as err:
        raise InvalidArgument(f"{path.name}: cannot read: {err}") from None
    check_arrays(x, y, path.name)
    return x, y


def _load_csv(path: Path, label: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    cells = [c.strip() for c in first.split(",")]
    header = not all(_is_number(c) for c in cells if c)
    data = np.genfromtxt(path, delimiter=",", skip_header=1 if header else 0, dtype=np.float64)
    data = np.atleast_2d(data) if data.size else data.reshape(0, len(cells))
    if data.ndim == 2 and data.shape[1] != len(cells) and data.shape[0] == 1:
        data = data.reshape(-1, len(cells))
    col: int | None = None
    if label is not None:
        if label.lstrip("-").isdigit():
            col = int(label) % len(cells)
        elif header and label in cells:
            col = cells.index(label)
        else:
            raise InvalidArgument(f"{path.name}: no column {label!r}")
    elif header:
        col = next((i for i, c in enumerate(cells) if c.lower() in CSV_LABEL_NAMES), None)
    if col is None:
        return data.astype(np.float32), None
    y = data[:, col]
    x = np.delete(data, col, axis=1).astype(np.float32)
    if np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return x, y.astype(np.int64)
    return x, y.astype(np.float32)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_arrays(x: np.ndarray, y: np.ndarray | None, what: str = "input") -> None:
    """Raises InvalidArgument unless x has rows of numbers and y (if any) one label each."""
    if x.ndim < 1:
        raise InvalidArgument(f"{what}: features must have at least one dimension")
    if x.dtype.kind not in "biuf":
        raise InvalidArgument(f"{what}: features must be numbers, not {x.dtype}")
    if y is not None:
        if y.ndim != 1 or len(y) != len(x):
            raise InvalidArgument(f"{what}: labels must be 1-D with one per row ({y.shape} vs {len(x)} rows)")
        if y.dtype.kind not in "biuf":
            raise InvalidArgument(f"{what}: labels must be numbers, not {y.dtype}")


def record_dtype(x_dtype, row_shape, y_dtype=None) -> np.dtype:
    fields = [("x", np.dtype(x_dtype).newbyteorder("<") if np.dtype(x_dtype).itemsize > 1
               else np.dtype(x_dtype), tuple(row_shape))]
    if y_dtype is not None:
        fields.append(("y", np.dtype(y_dtype)))
    return np.dtype(fields)


def make_records(x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    out = np.empty(len(x), dtype=record_dtype(x.dtype, x.shape[1:], None if y is None else y.dtype))
    out["x"] = x
    if y is not None:
        out["y"] = y
    return out


def split_arrays(records: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    names = records.dtype.names or ()
    return records["x"], (records["y"] if "y" in names else None)


def plan_shards(rows: int, row_bytes: int, *, shard_size: int | None = None,
                shards: int | None = None) -> list[tuple[int, int]]:
    """Row ranges [start, stop): `shards` equal parts, or parts of about `shard_size` bytes."""
    if shards is not None:
        count = shards
    else:
        per = max(1, (shard_size or 64 << 20) // max(1, row_bytes))
        count = -(-rows // per) if rows else 1
    count = max(1, min(count, rows or 1))
    if count > MAX_SHARDS:
        raise InvalidArgument(f"{count} shards; at most {MAX_SHARDS} (use bigger shards)")
    bounds = np.linspace(0, rows, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class _HashingFile(io.RawIOBase):
    def __init__(self, f):
        self._f = f
        self.h = new_hash()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._f.write(data)
        self.h.update(data)
        self.size += len(data)
        return len(data)


def write_shard(records: np.ndarray, path: str | Path) -> tuple[str, int]:
    """Save `records` as a .npy file at `path`; returns (shard id, size)."""
    with open(path, "wb") as f:
        hf = _HashingFile(f)
        np.save(hf, np.ascontiguousarray(records), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return hf.h.shard_id(), hf.size


def shard_bytes(records: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(records), allow_pickle=False)
    return buf.getvalue()


def describe(records: np.ndarray) -> dict:
    """What the manifest records about a shard's contents."""
    x_dt = records.dtype["x"]
    y_dt = records.dtype["y"].str if "y" in (records.dtype.names or ()) else ""
    return {"rows": len(records), "dtype": x_dt.base.str, "shape": list(x_dt.shape), "label_dtype": y_dt}


def data_offset(path: str | Path) -> tuple[int, np.dtype, int]:
    """(byte offset of the array data, dtype, rows) of a .npy file."""
    with open(path, "rb") as f:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
        return f.tell(), dtype, int(shape[0]) if shape else 1


def concat_shards(paths: list[Path], out: str | Path) -> int:
    """Join shard files into one .npy (same dtype) without loading them; returns rows.
    Raises InvalidArgument when the shards disagree on the dtype."""
    heads = [data_offset(p) for p in paths]
    if not heads:
        raise InvalidArgument("no shards to join")
    dtype = heads[0][1]
    if any(h[1] != dtype for h in heads):
        raise InvalidArgument("shards have different dtypes")
    rows = sum(h[2] for h in heads)
    with open(out, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": (rows,)})
        for p, (offset, _, _) in zip(paths, heads, strict=True):
            with open(p, "rb") as src:
                src.seek(offset)
                while chunk := src.read(8 << 20):
                    f.write(chunk)
    return rows


def array_from_buffer(buf: bytearray, what: str = "buffer") -> np.ndarray:
    """A read-only array over the .npy image in `buf` (a decrypted shard), without a copy.
    Raises InvalidArgument when it is not a .npy image of plain data."""
    reader = _BufferReader(buf)
    try:
        version = np.lib.format.read_magic(reader)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(reader)
    except ValueError as err:
        raise InvalidArgument(f"{what} is not a .npy file: {err}") from None
    if dtype.hasobject:
        raise InvalidArgument(f"{what} holds Python objects")
    arr = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=reader.pos)
    arr = arr.reshape(shape, order="F" if fortran else "C")
    arr.flags.writeable = False
    return arr


class _BufferReader:
    """Just enough of a file over a buffer for numpy's header reader (no copy of the data)."""

    def __init__(self, buf: bytearray):
        self._view = memoryview(buf)
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else min(len(self._view), self.pos + n)
        data = bytes(self._view[self.pos:end])
        self.pos = end
        return data
