"""Reading `data put` inputs in batches and cutting them into shards: .npy, .npz, .csv, Parquet and Arrow IPC, from a
local path or an fsspec URL.

`open_source(url, ...)` gives a `Source`: the stored features' dtype and row shape, the
labels' dtype, the row count when the file says it, batches of (x, y) rows, and `schema`,
the JSON-able description `data get` uses to write back what came in (client/format_out.py).
Every reader streams: a .npy or .npz member is read rows at a time, a Parquet file by
record batches, a CSV by blocks (pyarrow.csv.open_csv), so memory holds one batch.
Bad input raises InvalidArgument with one line naming the file.
"""

from __future__ import annotations

import base64
import io
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlparse

import numpy as np

from lepton.common.errors import InvalidArgument
from lepton.dataplane import shard_format as fmt
from lepton.dataplane.shard_format import CSV_LABEL_NAMES, FEATURE_KEYS, LABEL_KEYS

__all__ = ["INPUTS", "OUTPUTS", "Source", "cut_shards", "open_source", "open_url", "remote_fs", "suffix_of"]

INPUTS = (".npy", ".npz", ".csv", ".parquet", ".arrow", ".feather")
OUTPUTS = (".parquet", ".arrow", ".feather", ".npz", ".npy", ".csv")
BATCH_BYTES = 16 << 20


@dataclass
class Source:
    name: str
    schema: dict[str, Any]
    x_dtype: np.dtype
    row_shape: tuple[int, ...]
    y_dtype: np.dtype | None
    rows: int | None  # None: unknown until read (never for the formats above)
    batches: Iterator[tuple[np.ndarray, np.ndarray | None]] = field(repr=False)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    return Path(urlparse(url).path if url.startswith("file://") else url)


def suffix_of(url: str) -> str:
    path = urlparse(url).path if "://" in url else url
    return PurePosixPath(path).suffix.lower()


def open_url(url: str, mode: str) -> IO[bytes]:
    """A binary file for a local path or an fsspec URL. Raises InvalidArgument naming the
    package to install when the scheme's fsspec backend is missing."""
    try:
        if is_local(url):
            return open(local_path(url), mode)  # noqa: SIM115 (the caller closes it)
        import fsspec

        return fsspec.open(url, mode).open()
    except ImportError as err:  # fsspec: "Install s3fs to access S3"
        raise InvalidArgument(f"{url}: {err} (pip install it next to lepton)") from None
    except FileNotFoundError:
        raise InvalidArgument(f"{url}: no such file") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{url}: is a directory") from None
    except (OSError, ValueError) as err:  # "Protocol not known: foo", permissions
        raise InvalidArgument(f"{url}: cannot open: {err}") from None


def remote_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path) for a URL; errors as `open_url`'s."""
    try:
        from fsspec.core import url_to_fs

        return url_to_fs(url)
    except ImportError as err:
        raise InvalidArgument(f"{url}: {err} (pip install it next to lepton)") from None
    except ValueError as err:
        raise InvalidArgument(f"{url}: {err}") from None


@contextmanager
def open_source(url: str, *, features: list[str] | None = None, features_prefix: str | None = None,
                label: str | None = None, batch_bytes: int = BATCH_BYTES) -> Iterator[Source]:
    """The input at `url` (format by suffix) as a `Source` whose batches are read while the
    context is open. `features`/`features_prefix`/`label` choose a table's columns. Raises
    InvalidArgument (one line naming the file) for anything it cannot store as it is."""
    suffix = suffix_of(url)
    name = PurePosixPath(urlparse(url).path if "://" in url else url).name
    if suffix not in INPUTS:
        raise InvalidArgument(f"{name}: unsupported format {suffix or '(no suffix)'}; "
                              f"use one of {', '.join(INPUTS)}")
    choose = _Choice(features, features_prefix, label)
    if suffix in (".npy", ".npz") and (features or features_prefix or label is not None):
        raise InvalidArgument(f"{name}: --features, --features-prefix and --label are for tables "
                              "(.csv, .parquet, .arrow); name arrays x and y in an .npz")
    with ExitStack() as stack:
        f = stack.enter_context(open_url(url, "rb"))
        try:
            if suffix == ".npy":
                src = _npy_source(f, name, url, batch_bytes)
            elif suffix == ".npz":
                src = _npz_source(stack.enter_context(zipfile.ZipFile(f)), name, batch_bytes)
            elif suffix == ".csv":
                from .format_tables import csv_source

                src = csv_source(f, name, choose, batch_bytes)
            else:
                import pyarrow as pa

                from .format_tables import table_source

                if is_local(url):  # native reads (no GIL); an Arrow file memory-mapped
                    path = str(local_path(url))
                    f = stack.enter_context(pa.memory_map(path) if suffix != ".parquet"
                                            else pa.OSFile(path))
                src = table_source(f, name, suffix, choose, batch_bytes)
        except (InvalidArgument, MemoryError):
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise InvalidArgument(f"{name}: cannot read: {_one_line(err)}") from None
        if src.rows == 0:
            raise InvalidArgument(f"{name}: no rows")
        src.batches = _guarded(src.batches, name)
        yield src


def _guarded(batches: Iterator[tuple[np.ndarray, np.ndarray | None]], name: str):
    """Read errors met while streaming become one line naming the file."""
    try:
        yield from batches
    except InvalidArgument:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InvalidArgument(f"{name}: cannot read: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


@dataclass
class _Choice:
    """Which columns of a table are the features and which the label."""

    features: list[str] | None
    prefix: str | None
    label: str | None

    def pick(self, columns: list[str], name: str) -> tuple[list[str], str | None]:
        """(feature columns in file order, label column or None). Raises InvalidArgument."""
        label = self.label
        if label is not None and label not in columns:
            if label.lstrip("-").isdigit() and -len(columns) <= int(label) < len(columns):
                label = columns[int(label)]  # CSV: a column index
            else:
                raise InvalidArgument(f"{name}: no column {label!r} (has {_names(columns)})")
        if label is None:
            label = next((c for c in columns if c.lower() in CSV_LABEL_NAMES), None)
        if self.features:
            missing = [c for c in self.features if c not in columns]
            if missing:
                raise InvalidArgument(f"{name}: no column {missing[0]!r} (has {_names(columns)})")
            if label in self.features:
                if self.label is not None:
                    raise InvalidArgument(f"{name}: column {label!r} is both a feature and the label")
                label = None  # the default label name, chosen as a feature: no label
            chosen = set(self.features)
            feats = [c for c in columns if c in chosen]
        elif self.prefix:
            feats = [c for c in columns if c.startswith(self.prefix) and c != label]
            if not feats:
                raise InvalidArgument(f"{name}: no column starts with {self.prefix!r} "
                                      f"(has {_names(columns)})")
        else:
            feats = [c for c in columns if c != label]
        if not feats:
            raise InvalidArgument(f"{name}: no feature columns")
        return feats, label


def _names(columns: list[str]) -> str:
    shown = ", ".join(columns[:20])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > 20 else "")


# -- .npy ------------------------------------------------------------------------------------

def _read_header(f: IO[bytes], what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:
        shape, fortran, dtype = fmt._read_array_header(f, version)  # 3.0: utf-8 field names
    if dtype.hasobject:
        raise InvalidArgument(f"{what}: holds Python objects (not stored)")
    return shape, fortran, dtype


def _stream_rows(f: IO[bytes], dtype: np.dtype, row_shape: tuple[int, ...], rows: int,
                 batch_rows: int, what: str) -> Iterator[np.ndarray]:
    row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
    done = 0
    while done < rows:
        n = min(batch_rows, rows - done)
        data = f.read(n * row_bytes)
        if len(data) != n * row_bytes:
            raise InvalidArgument(f"{what}: truncated ({done + len(data) // max(1, row_bytes)} "
                                  f"of {rows} rows)")
        yield np.frombuffer(data, dtype=dtype).reshape(n, *row_shape)
        done += n


def _batch_rows(row_bytes: int, batch_bytes: int) -> int:
    return max(1, batch_bytes // max(1, row_bytes))


def _npy_source(f: IO[bytes], name: str, url: str, batch_bytes: int) -> Source:
    shape, fortran, dtype = _read_header(f, name)
    if not shape:
        raise InvalidArgument(f"{name}: a 0-d array has no rows")
    rows, row_shape = shape[0], tuple(shape[1:])
    if dtype.names:
        extra = [n for n in dtype.names if n not in ("x", "y")]
        if "x" not in dtype.names or extra or row_shape:
            raise InvalidArgument(f"{name}: a structured array needs fields x[, y] and nothing "
                                  f"else (has {', '.join(dtype.names)})")
        x_dt, y_dt = dtype["x"], dtype["y"] if "y" in dtype.names else None
        schema = {"kind": "npy-records", "descr": np.lib.format.dtype_to_descr(dtype)}
        _check_numeric(x_dt.base, name, "features")
        if y_dt is not None and (y_dt.shape or y_dt.kind not in "biuf"):
            raise InvalidArgument(f"{name}: labels must be one number per row, not {y_dt}")
        x_base, x_shape = x_dt.base, x_dt.shape
    else:
        _check_numeric(dtype, name, "features")
        schema = {"kind": "npy", "dtype": dtype.str}
        x_base, x_shape, y_dt = dtype, row_shape, None
    batch = _batch_rows(dtype.itemsize * int(np.prod(row_shape, dtype=np.int64)), batch_bytes)
    if fortran and len(shape) > 1:  # rows are not contiguous: read it whole (rare)
        whole = np.load(local_path(url), mmap_mode="r") if is_local(url) else np.load(f)
        chunks: Iterator[np.ndarray] = (np.ascontiguousarray(whole[i:i + batch])
                                        for i in range(0, rows, batch))
    else:
        chunks = _stream_rows(f, dtype, row_shape, rows, batch, name)
    if dtype.names:
        batches = ((c["x"], c["y"] if y_dt is not None else None) for c in chunks)
    else:
        batches = ((c, None) for c in chunks)
    return Source(name, schema, _stored(x_base), tuple(x_shape), y_dt and _stored(y_dt), rows,
                  batches)


def _check_numeric(dtype: np.dtype, name: str, what: str) -> None:
    if dtype.kind not in "biuf":
        raise InvalidArgument(f"{name}: {what} must be numbers, not {dtype}")


def _stored(dtype: np.dtype) -> np.dtype:
    """The dtype a shard stores: little-endian (get casts back to the input's order)."""
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


# -- .npz ------------------------------------------------------------------------------------

def _npz_source(z: zipfile.ZipFile, name: str, batch_bytes: int) -> Source:
    keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    fk = next((k for k in FEATURE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
    if fk is None:
        raise InvalidArgument(f"{name}: no features array (name it x); has {', '.join(keys) or 'none'}")
    lk = next((k for k in LABEL_KEYS if k in keys), None)
    extra = [k for k in keys if k not in (fk, lk)]
    if extra:
        raise InvalidArgument(f"{name}: arrays {', '.join(extra)} would not be stored "
                              f"(only features {fk!r} and labels: name them x and y)")
    xf = z.open(fk + ".npy")
    x_shape, x_fortran, x_dt = _read_header(xf, f"{name}:{fk}")
    if not x_shape:
        raise InvalidArgument(f"{name}: {fk} is 0-d; it needs rows")
    _check_numeric(x_dt, name, "features")
    rows = x_shape[0]
    schema: dict[str, Any] = {"kind": "npz", "x": fk, "x_dtype": x_dt.str}
    parts = [(xf, x_dt, tuple(x_shape[1:]), x_fortran, fk)]
    y_dt = None
    if lk is not None:
        yf = z.open(lk + ".npy")
        y_shape, y_fortran, y_dt = _read_header(yf, f"{name}:{lk}")
        _check_numeric(y_dt, name, "labels")
        if len(y_shape) != 1 or y_shape[0] != rows:
            raise InvalidArgument(f"{name}: labels must be 1-D with one per row "
                                  f"({tuple(y_shape)} vs {rows} rows)")
        schema.update(y=lk, y_dtype=y_dt.str)
        parts.append((yf, y_dt, (), y_fortran, lk))
    if any(fortran and len(shape) for _, _, shape, fortran, _ in parts):
        raise InvalidArgument(f"{name}: Fortran-order arrays are not read; save with C order")
    row_bytes = sum(dt.itemsize * int(np.prod(shape, dtype=np.int64)) for _, dt, shape, _, _ in parts)
    batch = _batch_rows(row_bytes, batch_bytes)
    streams = [_stream_rows(f, dt, shape, rows, batch, f"{name}:{key}") for f, dt, shape, _, key in parts]
    batches = ((xs, None) for xs in streams[0]) if len(streams) == 1 else zip(*streams, strict=True)
    return Source(name, schema, _stored(x_dt), tuple(x_shape[1:]), y_dt and _stored(y_dt), rows,
                  batches)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads their own malloc arenas (up to 8 per core) and keeps what is freed
    in each: the upload and gRPC threads' 4 MiB messages grew a put's RSS with the number of
    shards (+300 MiB for 2 GiB). lepton-ctl's put and get cap them; elsewhere a no-op."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def encode_schema(schema: Any) -> str:
    """An Arrow schema as base64 text (for the JSON description)."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def decode_schema(text: str) -> Any:
    import pyarrow as pa

    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def peek_line(f: IO[bytes]) -> str:
    """The first line of a seekable file, which is left at its start."""
    head = f.read(1 << 16)
    f.seek(0)
    return io.BytesIO(head).readline().decode("utf-8", errors="replace").rstrip("\r\n")


def cut_shards(batches: Iterable[tuple[np.ndarray, np.ndarray | None]], dtype: np.dtype,
               shard_rows: Iterator[int], out_dir: Path) -> list[tuple[str, int, dict, Path]]:
    """Fill shards of `dtype` records from `batches` of (x, y) rows and write each to
    `out_dir` as soon as it is full: memory holds one shard and one batch, whatever the
    input's size. `shard_rows` says how many rows each shard takes (the last may get
    fewer). Returns (sha256, size, describe(), path) per shard, in row order."""
    out: list[tuple[str, int, dict, Path]] = []
    buf: np.ndarray | None = None
    fill = 0

    def flush(records: np.ndarray) -> None:
        if len(out) >= fmt.MAX_SHARDS:
            raise InvalidArgument(f"more than {fmt.MAX_SHARDS} shards (use bigger shards)")
        path = out_dir / f"{len(out)}.npy"
        sid, size = fmt.write_shard(records, path)
        out.append((sid, size, fmt.describe(records), path))

    for x, y in batches:
        done = 0
        while done < len(x):
            if buf is None:
                want = next(shard_rows, 0)
                if want < 1:
                    raise InvalidArgument("the input has more rows than it said")
                buf, fill = np.empty(want, dtype=dtype), 0
            n = min(len(buf) - fill, len(x) - done)
            buf["x"][fill:fill + n] = x[done:done + n]
            if y is not None:
                buf["y"][fill:fill + n] = y[done:done + n]
            fill += n
            done += n
            if fill == len(buf):
                flush(buf)
                buf = None
    if buf is not None and fill:
        flush(buf[:fill])
    return out
