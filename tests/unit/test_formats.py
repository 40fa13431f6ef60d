"""client/formats.py and format_out.py without a cluster: an input read in batches, cut into
shards, and written back by suffix gives what went in (issue 17)."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lepton.client.format_out import check_suffix, write_output
from lepton.client.formats import cut_shards, open_source
from lepton.common.errors import InvalidArgument
from lepton.dataplane import shard_format as fmt


def through_shards(tmp_path, src_name: str, suffix: str, *, rows_per_shard: int = 7,
                   batch_bytes: int = 64, **choose) -> bytes:
    """Put `src_name` (small batches, small shards), then write it back as `suffix`."""
    work = tmp_path / "shards"
    work.mkdir(exist_ok=True)
    with open_source(str(tmp_path / src_name), batch_bytes=batch_bytes, **choose) as src:
        dtype = fmt.record_dtype(src.x_dtype, src.row_shape, src.y_dtype)
        cut = cut_shards(src.batches, dtype, itertools.repeat(rows_per_shard), work)
        schema = json.loads(json.dumps(src.schema))  # as the manifest keeps it
    first = cut[0][2]
    out = io.BytesIO()
    write_output(out, suffix, [p for *_, p in cut], schema, sum(c[2]["rows"] for c in cut),
                 np.dtype(first["dtype"]), tuple(first["shape"]),
                 np.dtype(first["label_dtype"]) if first["label_dtype"] else None)
    for *_, p in cut:
        p.unlink()
    return out.getvalue()


def test_npy_plain_keeps_dtype_and_shape(tmp_path):
    for x in (np.arange(60, dtype=">i4").reshape(5, 4, 3), np.linspace(0, 1, 23, dtype=np.float16),
              np.array([True, False, True])):
        np.save(tmp_path / "a.npy", x)
        back = np.load(io.BytesIO(through_shards(tmp_path, "a.npy", ".npy")))
        assert back.dtype == x.dtype and back.shape == x.shape
        np.testing.assert_array_equal(back, x)


def test_npz_keeps_names_dtypes_shapes_even_compressed(tmp_path):
    x = np.arange(90, dtype=np.float64).reshape(15, 3, 2)
    y = np.arange(15, dtype=np.uint8)
    np.savez_compressed(tmp_path / "a.npz", inputs=x, target=y)
    with np.load(io.BytesIO(through_shards(tmp_path, "a.npz", ".npz"))) as z:
        assert sorted(z.files) == ["inputs", "target"]
        np.testing.assert_array_equal(z["inputs"], x)
        assert z["target"].dtype == np.uint8 and z["inputs"].dtype == np.float64
        np.testing.assert_array_equal(z["target"], y)
    np.savez(tmp_path / "extra.npz", x=x, y=y, ids=np.arange(15))
    with pytest.raises(InvalidArgument, match="ids would not be stored"):
        through_shards(tmp_path, "extra.npz", ".npz")


def test_table_columns_types_nulls_and_order(tmp_path):
    n = 40
    table = pa.table({
        "flag": pa.array([i % 3 == 0 for i in range(n)]),
        "small": pa.array([None if i == 4 else i for i in range(n)], pa.int8()),
        "half": pa.array(np.arange(n, dtype=np.float16)),
        "img": pa.array([[[i, i + 1], [i + 2, i + 3]] for i in range(n)],
                        pa.list_(pa.list_(pa.int16(), 2), 2)),
        "y": pa.array([None if i == 9 else float(i) for i in range(n)], pa.float64()),
    })
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=9)
    back = pq.read_table(io.BytesIO(through_shards(tmp_path, "t.parquet", ".parquet")))
    assert back.schema.equals(table.schema) and back.equals(table)
    # One fixed-size-list column keeps its cell shape as the row shape.
    with open_source(str(tmp_path / "t.parquet"), features=["img"], label="y") as src:
        assert src.row_shape == (2, 2) and src.x_dtype == np.int16
        x, y = next(src.batches)
        np.testing.assert_array_equal(x[1], [[1, 2], [3, 4]])
    # An int column with a null is stored as float64, the null as NaN.
    with open_source(str(tmp_path / "t.parquet"), features=["small"]) as src:
        assert src.x_dtype == np.float64
        x = np.concatenate([b[0] for b in src.batches])
        assert x.shape == (40,) and np.isnan(x[4]) and x[5] == 5  # one scalar column: 1-D rows


def test_csv_round_trip_and_label_type(tmp_path):
    text = "1,0.5,3\n2,,4\n"
    (tmp_path / "n.csv").write_text(text)
    assert through_shards(tmp_path, "n.csv", ".csv").decode() == text  # no header stays none
    (tmp_path / "h.csv").write_text("a,target\n1,0.5\n2,1\n")
    with open_source(str(tmp_path / "h.csv")) as src:
        assert src.y_dtype == np.float32 and src.rows == 2
    (tmp_path / "i.csv").write_text("f1,f2,label\n1,2,0\n3,,1\n")
    with open_source(str(tmp_path / "i.csv")) as src:  # empty cells are NaN
        assert src.y_dtype == np.int64 and src.x_dtype == np.float32
        x, y = next(src.batches)
        assert x.shape == (2, 2) and np.isnan(x[1, 1]) and list(y) == [0, 1]


@pytest.mark.parametrize("bad, why", [
    (pa.table({"s": pa.array(["a"])}), "string, not numbers"),
    (pa.table({"t": pa.array([1], pa.timestamp("s"))}), "not numbers"),
    (pa.table({"v": pa.array([[1], [1, 2]], pa.list_(pa.int64()))}), "ragged"),
    (pa.table({"v": pa.array([[1, None]], pa.list_(pa.int64(), 2))}), "missing numbers"),
    (pa.table({"v": pa.array([[[1.0]]], pa.list_(pa.list_(pa.float64())))}), "only the outer list"),
])
def test_tables_refused_in_one_line(tmp_path, bad, why):
    pq.write_table(bad, tmp_path / "b.parquet")
    with pytest.raises(InvalidArgument, match=why) as err:
        through_shards(tmp_path, "b.parquet", ".npy")
    assert "\n" not in err.value.message and err.value.message.startswith("b.parquet: ")


def test_suffixes_and_urls_refused_clearly(tmp_path):
    with pytest.raises(InvalidArgument, match=r"\.parquet, \.arrow, \.feather, \.npz, \.npy, \.csv"):
        check_suffix("", "out")
    with pytest.raises(InvalidArgument, match="unsupported format .txt"):
        with open_source(str(tmp_path / "a.txt")):
            pass
    with pytest.raises(InvalidArgument, match="Protocol not known"):
        with open_source("nosuchscheme://x/a.npy"):
            pass
    with pytest.raises(InvalidArgument, match="no such file"):
        with open_source(f"file://{tmp_path}/missing.parquet"):
            pass
    np.save(tmp_path / "a.npy", np.zeros((2, 2)))
    with pytest.raises(InvalidArgument, match="for tables"):
        with open_source(str(tmp_path / "a.npy"), label="y"):
            pass
    (tmp_path / "t.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-8])
    with pytest.raises(InvalidArgument, match="truncated"):
        through_shards(tmp_path, "t.npy", ".npy")


def test_fixed_shape_tensor_column_keeps_its_shape(tmp_path):
    t = pa.fixed_shape_tensor(pa.float32(), (2, 3))
    cells = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(60, dtype=np.float32)), 6)
    table = pa.table({"img": pa.ExtensionArray.from_storage(t, cells), "label": pa.array(range(10))})
    pq.write_table(table, tmp_path / "t.parquet")
    with open_source(str(tmp_path / "t.parquet")) as src:
        assert src.row_shape == (2, 3) and src.y_dtype == np.int64
        x, _ = next(src.batches)
        np.testing.assert_array_equal(x[1], [[6, 7, 8], [9, 10, 11]])
    back = pq.read_table(io.BytesIO(through_shards(tmp_path, "t.parquet", ".parquet")))
    assert back.schema.equals(table.schema) and back.equals(table)
    header = through_shards(tmp_path, "t.parquet", ".csv").decode().splitlines()[0]
    assert header == "img_0,img_1,img_2,img_3,img_4,img_5,label"
