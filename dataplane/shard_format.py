"""What a shard holds: its records, planning and writing shards, reading them back.

A shard is one `.npy` file holding a 1-D structured array, one element per row:

    field "x": the features, dtype and row shape of the input (e.g. ("<f4", (784,)))
    field "y": the label (only when the dataset has labels)

One blob per logical shard keeps features and labels of a row together (one id, one
replica set, one transfer), and the file memory-maps: `np.load(p, mmap_mode="r")["x"]`.
Pure numpy; used by the client (put/get; input and output formats are client/formats.py
and client/format_out.py) and the agent (processing).
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
