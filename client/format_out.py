"""Writing a downloaded dataset as one file: .parquet, .arrow/.feather, .npz, .npy or .csv,
chosen by the output's suffix, streamed shard by shard (memory holds one chunk).

What comes out is what went in when the dataset records its input (`Dataset.schema`, from
client/formats.py): a plain .npy comes back with its dtype and shape, an .npz with its
array names and dtypes, a table with its columns, Arrow types and nulls, a CSV with its
header and columns; rows keep their order. A dataset without a description (made by
processing) comes back as records x[, y] in a .npy, arrays x[, y] in an .npz, columns
x[, y] in a table and x_0 .. x_k[, y] in a CSV.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from lepton.common.errors import InvalidArgument

from .formats import OUTPUTS, decode_schema

__all__ = ["check_suffix", "write_output"]

CHUNK_BYTES = 16 << 20


def check_suffix(suffix: str, out: str) -> None:
    if suffix not in OUTPUTS:
        raise InvalidArgument(f"{out}: say the format by the suffix: {', '.join(OUTPUTS)}")


def _chunks(paths: list[Path]) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(x, y) rows of the shards in order, about CHUNK_BYTES at a time (memory-mapped)."""
    for p in paths:
        recs = np.load(p, mmap_mode="r", allow_pickle=False)
        per = max(1, CHUNK_BYTES // max(1, recs.dtype.itemsize))
        has_y = "y" in (recs.dtype.names or ())
        for at in range(0, len(recs), per):
            part = recs[at:at + per]
            yield part["x"], (part["y"] if has_y else None)


def write_output(f: IO[bytes], suffix: str, paths: list[Path], schema: dict[str, Any],
                 rows: int, x_dtype: np.dtype, row_shape: tuple[int, ...],
                 y_dtype: np.dtype | None) -> None:
    """Write the shards at `paths` (in row order) to the open file `f` as `suffix`."""
    if suffix == ".npy":
        _write_npy(f, paths, schema, rows, x_dtype, row_shape, y_dtype)
    elif suffix == ".npz":
        _write_npz(f, paths, schema, rows, x_dtype, row_shape, y_dtype)
    else:
        _write_table(f, suffix, paths, schema, x_dtype, row_shape, y_dtype)


# -- numpy -------------------------------------------------------------------------------------

def _header(f: IO[bytes], dtype: np.dtype, shape: tuple[int, ...]) -> None:
    info = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(f, info)
    except ValueError:  # a header over 64 KiB (very many fields)
        np.lib.format.write_array_header_2_0(f, info)


def _write_npy(f, paths, schema, rows, x_dtype, row_shape, y_dtype) -> None:
    kind = schema.get("kind")
    if kind == "npy":  # a plain array: the same dtype (byte order too) and shape
        dtype = np.dtype(schema["dtype"])
        _header(f, dtype, (rows, *row_shape))
        for x, _ in _chunks(paths):
            f.write(np.ascontiguousarray(x, dtype=dtype).tobytes())
        return
    if kind == "npy-records":
        dtype = np.lib.format.descr_to_dtype(_tuples(schema["descr"]))
    else:
        fields = [("x", x_dtype, row_shape)] + ([("y", y_dtype)] if y_dtype is not None else [])
        dtype = np.dtype(fields)
    _header(f, dtype, (rows,))
    for x, y in _chunks(paths):
        recs = np.empty(len(x), dtype=dtype)
        recs["x"] = x
        if y is not None:
            recs["y"] = y
        f.write(recs.tobytes())


def _tuples(descr: Any) -> Any:
    """JSON turned the descr's tuples into lists; numpy wants tuples back."""
    if isinstance(descr, list):
        return [tuple(_tuples(d) for d in item) if isinstance(item, list) else item for item in descr]
    return descr


def _write_npz(f, paths, schema, rows, x_dtype, row_shape, y_dtype) -> None:
    if schema.get("kind") == "npz":
        arrays = [(schema["x"], np.dtype(schema["x_dtype"]), row_shape, 0)]
        if schema.get("y"):
            arrays.append((schema["y"], np.dtype(schema["y_dtype"]), (), 1))
    else:
        arrays = [("x", x_dtype, row_shape, 0)] + ([("y", y_dtype, (), 1)] if y_dtype is not None else [])
    # Stored, not compressed, as np.savez does; each member is written as the shards stream.
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, dtype, shape, which in arrays:
            with z.open(name + ".npy", "w", force_zip64=True) as m:
                _header(m, dtype, (rows, *shape))
                for chunk in _chunks(paths):
                    m.write(np.ascontiguousarray(chunk[which], dtype=dtype).tobytes())


# -- tables ------------------------------------------------------------------------------------

def _table_columns(schema, x_dtype, row_shape, y_dtype) -> tuple[Any, list[dict[str, Any]]]:
    """(Arrow schema, column places) to write: the input's when it was a table or a CSV,
    else x (a number or nested fixed-size lists of the row shape) and y."""
    import pyarrow as pa

    kind = schema.get("kind")
    if kind == "table":
        return decode_schema(schema["arrow"]), schema["columns"]
    x_type = pa.from_numpy_dtype(x_dtype)
    if kind == "csv":
        fields, cols, at = [], [], 0
        for name in schema["columns"]:
            if name == schema.get("label"):
                fields.append(pa.field(name, pa.from_numpy_dtype(y_dtype)))
                cols.append({"name": name, "role": "y", "nulls": y_dtype.kind == "f"})
            else:
                fields.append(pa.field(name, x_type))
                cols.append({"name": name, "role": "x", "offset": at, "width": 1, "nulls": True})
                at += 1
        return pa.schema(fields), cols
    x_name, y_name = (schema["x"], schema.get("y") or "y") if kind == "npz" else ("x", "y")
    for d in reversed(row_shape):
        x_type = pa.list_(x_type, d)
    fields = [pa.field(x_name, x_type)]
    cols: list[dict[str, Any]] = [{"name": x_name, "role": "x", "offset": 0,
                                   "width": int(np.prod(row_shape, dtype=np.int64)), "nulls": False}]
    if y_dtype is not None:
        fields.append(pa.field(y_name, pa.from_numpy_dtype(y_dtype)))
        cols.append({"name": y_name, "role": "y", "nulls": False})
    return pa.schema(fields), cols


def _arrow_column(values: np.ndarray, field: Any, nulls: bool) -> Any:
    """One column from an (n, width) block: the field's type; NaN back to null where the
    input had nulls."""
    import pyarrow as pa

    if isinstance(field.type, pa.BaseExtensionType):  # e.g. fixed_shape_tensor: its storage
        storage = _arrow_column(values, pa.field(field.name, field.type.storage_type), nulls)
        return pa.ExtensionArray.from_storage(field.type, storage)
    t, sizes = field.type, []
    while pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        sizes.append(t)
        t = t.value_type
    leaf = np.dtype(t.to_pandas_dtype())
    if not sizes:
        v = values[:, 0]
        mask = np.isnan(v) if nulls and v.dtype.kind == "f" else None
        if mask is not None and not mask.any():
            mask = None
        if mask is not None and leaf.kind != "f":
            v = np.where(mask, 0, v)
        return pa.array(np.ascontiguousarray(v, dtype=leaf), type=t, mask=mask)
    # Rebuild from the innermost list out; only the outer list may be variable (its width
    # is what is left of the row).
    widths = [lt.list_size if pa.types.is_fixed_size_list(lt) else None for lt in sizes]
    known = int(np.prod([w for w in widths if w], dtype=np.int64))
    widths = [w or values.shape[1] // max(1, known) for w in widths]
    arr = pa.array(np.ascontiguousarray(values, dtype=leaf).reshape(-1), type=t)
    for w in reversed(widths):
        arr = pa.FixedSizeListArray.from_arrays(arr, w)
    if nulls and values.dtype.kind == "f":  # a null row came in as all NaN
        missing = np.isnan(values).all(axis=1)
        if missing.any():
            arr = pa.FixedSizeListArray.from_arrays(arr.values, arr.type.list_size,
                                                    mask=pa.array(missing))
    return arr.cast(field.type) if arr.type != field.type else arr


def _write_table(f, suffix, paths, schema, x_dtype, row_shape, y_dtype) -> None:
    import pyarrow as pa

    arrow, cols = _table_columns(schema, x_dtype, row_shape, y_dtype)
    if suffix == ".csv":
        arrow, cols = _flat_for_csv(arrow, cols)
    writer = _table_writer(f, suffix, arrow, schema)
    try:
        for x, y in _chunks(paths):
            flat = np.asarray(x).reshape(len(x), -1)
            arrays = []
            for c, fld in zip(cols, arrow, strict=True):
                if c["role"] == "y":
                    block = np.asarray(y).reshape(-1, 1)
                else:
                    block = flat[:, c["offset"]:c["offset"] + c["width"]]
                arrays.append(_arrow_column(block, fld, c.get("nulls", False)))
            writer.write_batch(pa.record_batch(arrays, schema=arrow))
    finally:
        writer.close()


def _flat_for_csv(arrow, cols) -> tuple[Any, list[dict[str, Any]]]:
    """CSV cells hold one number: a list column becomes NAME_0 .. NAME_k."""
    import pyarrow as pa

    fields, out = [], []
    for fld, c in zip(arrow, cols, strict=True):
        top = fld.type.storage_type if isinstance(fld.type, pa.BaseExtensionType) else fld.type
        t = top
        while pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
            t = t.value_type
        if t == top:
            fields.append(fld)
            out.append(c)
            continue
        for i in range(c["width"]):
            fields.append(pa.field(f"{fld.name}_{i}", t))
            out.append({**c, "offset": c["offset"] + i, "width": 1})
    return pa.schema(fields), out


def _table_writer(f, suffix, arrow, schema) -> Any:
    import pyarrow as pa

    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetWriter(f, arrow)
    if suffix == ".csv":
        import csv as pycsv
        import io

        from pyarrow import csv

        if schema.get("header", True):  # pyarrow quotes every header name; quote as needed
            line = io.StringIO()
            pycsv.writer(line, lineterminator="\n").writerow(arrow.names)
            f.write(line.getvalue().encode())
        options = csv.WriteOptions(include_header=False, quoting_style="needed")
        return csv.CSVWriter(f, arrow, write_options=options)
    return pa.ipc.new_file(f, arrow)
