"""Tables in: Parquet and Arrow IPC files (pyarrow) and CSV, read in record batches.

Features are the chosen columns, each a number or a fixed-shape list of numbers (a
`fixed_size_list`, or a `list` whose rows all have one length: embeddings). One column
keeps its cell shape as the row shape; several are laid side by side in one row of their
common numpy type. A missing value (null) becomes NaN: an integer or boolean column that
holds nulls is stored as float64. The description (`schema`) keeps each column's Arrow
type, place in the row and whether it had nulls, so `data get` rebuilds the same columns.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lepton.common.errors import InvalidArgument

from .formats import Source, _batch_rows, _Choice, _names, encode_schema, peek_line

__all__ = ["csv_source", "table_source"]


@dataclass
class _Column:
    name: str
    value: np.dtype  # numpy type of one number of a cell (float64 when nulls need NaN)
    shape: list[int | None]  # a cell's shape; None: a variable list, its width read from data
    nulls: bool
    tensor: list[int] | None = None  # an Arrow fixed_shape_tensor's shape (storage: one list)

    @property
    def width(self) -> int:
        return int(np.prod([d or 0 for d in self.shape], dtype=np.int64)) if self.shape else 1


def _column(f: pa.Field, name: str) -> tuple[np.dtype, list[int | None], list[int] | None]:
    t, shape = f.type, []
    tensor = None
    if isinstance(t, pa.BaseExtensionType):  # read by its storage; a tensor keeps its shape
        tensor = list(t.shape) if hasattr(t, "shape") else None
        t = t.storage_type
    while True:
        if pa.types.is_fixed_size_list(t):
            shape.append(t.list_size)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            if shape:
                raise InvalidArgument(f"{name}: column {f.name!r} ({f.type}): only the outer "
                                      "list may have a variable length")
            shape.append(None)
        else:
            break
        t = t.value_type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise InvalidArgument(f"{name}: column {f.name!r} is {f.type}, not numbers "
                              "(choose columns with --features or --features-prefix)")
    return np.dtype(t.to_pandas_dtype()), shape, tensor


def _cells(arr: pa.Array, col: _Column, what: str) -> np.ndarray:
    """A column's rows as an (n, width) array; nulls as NaN."""
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    n = len(arr)
    if not col.shape:
        if arr.null_count and col.value.kind != "f":
            arr = arr.cast(pa.float64())
        return arr.to_numpy(zero_copy_only=False).reshape(n, 1)
    if col.shape[0] is None or arr.null_count:  # every non-null row must have the width
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if arr.null_count:
            lengths = lengths[~np.isnan(lengths.astype(np.float64))]
        if len(lengths) and (lengths != col.shape[0] if col.shape[0] else lengths != lengths[0]).any():
            raise InvalidArgument(f"{what}: column {col.name!r} has lists of different lengths "
                                  f"(ragged); every row needs {col.shape[0] or int(lengths[0])}")
    values = arr
    for _ in col.shape:
        values = values.flatten()
    if values.null_count and col.value.kind != "f":
        raise InvalidArgument(f"{what}: column {col.name!r} has missing numbers in integer lists")
    flat = values.to_numpy(zero_copy_only=False)
    width = col.width
    if len(flat) == n * width:
        return flat.reshape(n, width)
    valid = n - arr.null_count
    if len(flat) != valid * width:
        raise InvalidArgument(f"{what}: column {col.name!r} has lists of different lengths (ragged)")
    if col.value.kind != "f":
        raise InvalidArgument(f"{what}: column {col.name!r} has missing rows in an integer list")
    out = np.full((n, width), np.nan, dtype=col.value)
    out[arr.is_valid().to_numpy(zero_copy_only=False)] = flat.reshape(valid, width)
    return out


class _Layout:
    """Where each feature column sits in a stored row, and the label column."""

    def __init__(self, feats: list[_Column], label: _Column | None, what: str):
        self.feats, self.label, self.what = feats, label, what
        if label is not None and label.shape:
            raise InvalidArgument(f"{what}: the label {label.name!r} must be one number per row")
        self.x_dtype = np.result_type(*[c.value for c in feats])
        if self.x_dtype.kind not in "biuf":
            raise InvalidArgument(f"{what}: features must be numbers, not {self.x_dtype}")

    def fix_widths(self, batch: pa.RecordBatch) -> None:
        """Variable lists: their width is the first non-null row's length."""
        for c in self.feats:
            if c.shape and c.shape[0] is None:
                lengths = pc.list_value_length(batch.column(c.name)).drop_null()
                if not len(lengths):
                    raise InvalidArgument(f"{self.what}: column {c.name!r}: no row in the first "
                                          "batch says its length")
                c.shape[0] = int(lengths[0].as_py())

    @property
    def row_shape(self) -> tuple[int, ...]:
        if len(self.feats) == 1:
            return tuple(int(d) for d in (self.feats[0].tensor or self.feats[0].shape))
        return (sum(c.width for c in self.feats),)

    def rows(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray | None]:
        n = batch.num_rows
        x = np.empty((n, sum(c.width for c in self.feats)), dtype=self.x_dtype)
        at = 0
        for c in self.feats:
            arr = batch.column(c.name)
            c.nulls = c.nulls or arr.null_count > 0
            x[:, at:at + c.width] = _cells(arr, c, self.what)
            at += c.width
        y = None
        if self.label is not None:
            y = _cells(batch.column(self.label.name), self.label, self.what)[:, 0]
        return x.reshape(n, *self.row_shape), y

    def describe(self, fields: list[pa.Field], kind: str, fmt: str) -> dict[str, Any]:
        cols, at = [], 0
        by_name = {c.name: c for c in self.feats}
        for f in fields:
            if f.name in by_name:
                c = by_name[f.name]
                cols.append({"name": c.name, "role": "x", "offset": at, "width": c.width,
                             "nulls": c.nulls})
                at += c.width
            elif self.label is not None and f.name == self.label.name:
                cols.append({"name": f.name, "role": "y", "nulls": self.label.nulls})
        return {"kind": kind, "format": fmt, "columns": cols,
                "arrow": encode_schema(pa.schema(fields))}


def _null_columns(pf: Any, names: list[str]) -> set[str]:
    """Scalar columns of a Parquet file that hold a null somewhere: from the row groups'
    statistics, or by reading that one column where a row group has none."""
    md, out = pf.metadata, set()
    leaf = {md.schema.column(j).path: j for j in range(md.num_columns)}
    for name in names:
        j = leaf.get(name)
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(j).statistics if j is not None else None
            if st is not None and st.has_null_count:
                nulls = st.null_count
            else:
                nulls = pf.read_row_group(g, columns=[name]).column(0).null_count
            if nulls:
                out.add(name)
                break
    return out


def table_source(f: IO[bytes], name: str, suffix: str, choose: _Choice, batch_bytes: int) -> Source:
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        # Neither pre-buffered nor whole column chunks read at once: both held a row group.
        pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=4 << 20)
        schema, rows = pf.schema_arrow, pf.metadata.num_rows
        null_of = lambda cols: _null_columns(pf, cols)  # noqa: E731
        read = lambda cols, n: pf.iter_batches(batch_size=n, columns=cols)  # noqa: E731
        fmt = "parquet"
    else:
        try:
            reader = pa.ipc.open_file(f)
        except pa.ArrowInvalid:
            f.seek(0)
            raise InvalidArgument(f"{name}: not an Arrow IPC file (Feather v2); an Arrow "
                                  "stream or Feather v1 file is not read") from None
        schema, fmt = reader.schema, "arrow"
        rows = reader.count_rows()

        def stored() -> Iterator[pa.RecordBatch]:  # one at a time; memory-mapped when local
            return (reader.get_batch(i) for i in range(reader.num_record_batches))

        null_of = lambda cols: {c for b in stored() for c in cols if b.column(c).null_count}  # noqa: E731

        def read(cols: list[str], n: int) -> Iterator[pa.RecordBatch]:
            for b in stored():
                b = b.select(cols)
                for at in range(0, b.num_rows, n):
                    yield b.slice(at, n)

    names = schema.names
    if len(set(names)) != len(names):
        raise InvalidArgument(f"{name}: column names repeat ({_names(names)})")
    feat_names, label_name = choose.pick(names, name)
    chosen = [*feat_names, *([label_name] if label_name else [])]
    kinds = {c: _column(schema.field(c), name) for c in chosen}
    # A scalar integer column with nulls is stored as float64: known before any row is
    # read (Parquet statistics). A list column's nulls are noted as its rows stream by.
    has_nulls = null_of([c for c in chosen if not kinds[c][1]])

    def column(c: str) -> _Column:
        value, shape, tensor = kinds[c]
        nulls = c in has_nulls
        if nulls and value.kind != "f":
            value = np.dtype(np.float64)
        return _Column(c, value, list(shape), nulls, tensor)

    layout = _Layout([column(c) for c in feat_names], column(label_name) if label_name else None, name)
    order = [c for c in names if c in set(chosen)]
    first = next(iter(read(order, 1024)), None)
    if first is None or rows == 0:
        raise InvalidArgument(f"{name}: no rows")
    layout.fix_widths(first)
    row_bytes = layout.x_dtype.itemsize * max(1, int(np.prod(layout.row_shape, dtype=np.int64)))
    described: dict[str, Any] = {}

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        for b in read(order, _batch_rows(row_bytes, batch_bytes)):
            if b.num_rows:
                yield layout.rows(b)
        described.update(layout.describe([schema.field(c) for c in order], "table", fmt))

    y_dtype = layout.label.value if layout.label else None
    described.update(layout.describe([schema.field(c) for c in order], "table", fmt))
    return Source(name, described, layout.x_dtype, layout.row_shape, y_dtype, rows, batches())


# -- CSV ---------------------------------------------------------------------------------------

def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_source(f: IO[bytes], name: str, choose: _Choice, batch_bytes: int) -> Source:
    """Numbers only (empty cells are NaN), an optional header. Features are stored as
    float32; the label as int64 when every label is a whole number, else float32 (known
    from a first pass over the label column, which also counts the rows)."""
    from pyarrow import csv

    first = peek_line(f)
    if not first.strip():
        raise InvalidArgument(f"{name}: empty file")
    cells = [c.strip() for c in first.split(",")]
    header = not all(_is_number(c) for c in cells if c)
    names = cells if header else [str(i) for i in range(len(cells))]
    if header and len(set(names)) != len(names):
        raise InvalidArgument(f"{name}: column names repeat ({_names(names)})")
    feats, label = choose.pick(names, name)
    if not header and choose.label is None:
        label = None  # no header: a label only when asked for by index
    types = {c: pa.float64() for c in names}

    def reader(cols: list[str]) -> Any:
        f.seek(0)
        return csv.open_csv(
            f,
            read_options=csv.ReadOptions(column_names=None if header else names,
                                         block_size=max(1 << 20, min(batch_bytes, 64 << 20))),
            convert_options=csv.ConvertOptions(column_types=types, include_columns=cols),
        )

    # Readers are closed as soon as they stop, failed or not: one a refusal's traceback kept
    # alive until interpreter exit aborted the CLI there ("terminate called without an
    # active exception", about 1 run in 50 on a loaded machine).
    rows, integral = 0, True
    try:
        with closing(reader([label or feats[0]])) as first_pass:
            for b in first_pass:
                rows += b.num_rows
                if label is not None and integral:
                    v = b.column(0).to_numpy(zero_copy_only=False)
                    integral = bool(np.all(np.isfinite(v)) and np.all(v == np.round(v)))
    except pa.ArrowInvalid as err:
        raise InvalidArgument(f"{name}: {_short(err)}") from None
    y_dtype = None if label is None else np.dtype(np.int64 if integral else np.float32)
    order = [c for c in names if c in set(feats) or c == label]

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        try:
            with closing(reader(order)) as blocks:
                for b in blocks:
                    x = np.empty((b.num_rows, len(feats)), dtype=np.float32)
                    for i, c in enumerate(feats):
                        x[:, i] = b.column(c).to_numpy(zero_copy_only=False)
                    y = None if label is None else b.column(label).to_numpy(zero_copy_only=False).astype(y_dtype)
                    yield x, y
        except pa.ArrowInvalid as err:
            raise InvalidArgument(f"{name}: {_short(err)}") from None

    schema = {"kind": "csv", "header": header, "columns": order, "label": label}
    return Source(name, schema, np.dtype(np.float32), (len(feats),), y_dtype, rows, batches())


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]
