"""Issue 17, formats in and out: every format comes back as it went in (dtypes, shapes,
names, columns, nulls, row order), by the output's suffix, from paths and memory:// URLs;
bad input and unsafe outputs are refused in one line with nothing changed."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from lepton.client import Client
from lepton.client.cli import main as ctl_main
from lepton.common.errors import InvalidArgument
from tests.integration.cluster import wait_until

pytestmark = pytest.mark.integration


def ctl(server: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lepton.client.cli", "--server", server, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def one(agents):
    voter = agents("voter")
    c = Client(voter.address, timeout=20)
    wait_until(lambda: any(n.state == "ready" for n in c.nodes()), what="a ready node")
    yield voter, c
    c.close()


def a_table(rows: int = 200) -> pa.Table:
    """Scalars of several types (ints with nulls, floats with nulls), an embedding as a
    fixed-size list, a variable list of one length, a uint8 label and a string column."""
    ids = np.arange(rows)
    return pa.table({
        "id": pa.array(ids, pa.int32()),
        "f_count": pa.array([None if i % 7 == 0 else int(i) * 3 for i in ids], pa.int64()),
        "f_score": pa.array([None if i % 5 == 0 else float(i) / 4 for i in ids], pa.float32()),
        "emb": pa.array([[i, i + 0.5, -i] for i in ids.tolist()], pa.list_(pa.float16(), 3)),
        "vec": pa.array([[i, 2.0 * i] for i in ids.tolist()], pa.list_(pa.float64())),
        "label": pa.array(ids % 4, pa.uint8()),
        "name": pa.array([f"row-{i}" for i in ids]),
    })


def test_round_trips_by_suffix(one, tmp_path):
    voter, c = one
    # A plain .npy: the same dtype (big-endian too) and shape, not records.
    x = np.random.default_rng(0).normal(size=(300, 4, 3)).astype(">f4")
    np.save(tmp_path / "plain.npy", x)
    c.put_dataset(tmp_path / "plain.npy", "plain", shards=3, replicas=1)
    c.get_dataset("plain", tmp_path / "plain-out.npy")
    back = np.load(tmp_path / "plain-out.npy")
    assert back.dtype == x.dtype and back.shape == x.shape
    np.testing.assert_array_equal(back, x)

    # A structured .npy comes back as the same records.
    recs = np.zeros(50, dtype=[("x", "<i2", (2,)), ("y", "<f8")])
    recs["x"] = np.arange(100).reshape(50, 2)
    recs["y"] = np.arange(50) / 3
    np.save(tmp_path / "recs.npy", recs)
    c.put_dataset(tmp_path / "recs.npy", "recs", shards=2, replicas=1)
    c.get_dataset("recs", tmp_path / "recs-out.npy")
    got = np.load(tmp_path / "recs-out.npy")
    assert got.dtype == recs.dtype
    np.testing.assert_array_equal(got, recs)

    # An .npz: the same names, dtypes and shapes.
    feats = np.arange(600, dtype=np.uint16).reshape(100, 2, 3)
    labels = (np.arange(100) % 3).astype(np.int8)
    np.savez(tmp_path / "arrays.npz", features=feats, labels=labels)
    c.put_dataset(tmp_path / "arrays.npz", "arrays", shards=4, replicas=1)
    c.get_dataset("arrays", tmp_path / "arrays-out.npz")
    with np.load(tmp_path / "arrays-out.npz") as z:
        assert sorted(z.files) == ["features", "labels"]
        assert z["features"].dtype == feats.dtype and z["labels"].dtype == labels.dtype
        np.testing.assert_array_equal(z["features"], feats)
        np.testing.assert_array_equal(z["labels"], labels)

    # Parquet: the chosen columns with their types and nulls, rows in order, across shards
    # and row groups; the string column was left out by --features.
    table = a_table()
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=37)
    out = ctl(voter.address, "data", "put", str(tmp_path / "t.parquet"), "--name", "tab",
              "--features", "id,f_count,f_score,emb,vec", "--label", "label", "--shards", "3",
              "--replicas", "1")
    assert out.returncode == 0, out.stderr
    shown = c.dataset("tab")
    assert shown.rows == 200 and shown.shape == [1 + 1 + 1 + 3 + 2]
    assert ctl(voter.address, "data", "get", "tab", str(tmp_path / "t-out.parquet")).returncode == 0
    back = pq.read_table(tmp_path / "t-out.parquet")
    want = table.drop(["name"])
    assert back.schema.equals(want.schema), back.schema
    assert back.equals(want)
    assert back.column("f_count").null_count == table.column("f_count").null_count > 0

    # The same dataset as Arrow IPC, CSV and .npz.
    c.get_dataset("tab", tmp_path / "t-out.arrow")
    assert pa.ipc.open_file(tmp_path / "t-out.arrow").read_all().equals(want)
    c.get_dataset("tab", tmp_path / "t-out.csv")
    lines = (tmp_path / "t-out.csv").read_text().splitlines()
    assert lines[0] == "id,f_count,f_score,emb_0,emb_1,emb_2,vec_0,vec_1,label"
    assert lines[1] == "0,,,0,0.5,0,0,0,0" and len(lines) == 201
    c.get_dataset("tab", tmp_path / "t-out.npz")
    with np.load(tmp_path / "t-out.npz") as z:
        assert z["x"].shape == (200, 8) and z["y"].dtype == np.uint8
        assert np.isnan(z["x"][0, 1]) and z["x"][1, 1] == 3.0

    # --features-prefix, and a Feather (Arrow IPC) input coming back as Parquet.
    feather.write_feather(table.select(["f_count", "f_score", "label"]), tmp_path / "f.feather",
                          chunksize=64)
    c.put_dataset(tmp_path / "f.feather", "fea", features_prefix="f_", shards=2, replicas=1)
    c.get_dataset("fea", tmp_path / "fea.parquet")
    assert pq.read_table(tmp_path / "fea.parquet").equals(table.select(["f_count", "f_score", "label"]))

    # CSV: the same header, cells and label column position.
    text = "a,label,b\n1,0,2\n3,1,\n5.5,2,6\n"
    (tmp_path / "in.csv").write_text(text)
    c.put_dataset(tmp_path / "in.csv", "csv", replicas=1)
    c.get_dataset("csv", tmp_path / "csv-out.csv")
    assert (tmp_path / "csv-out.csv").read_text() == text

    # The description travels with GetDataset only; listings stay small.
    assert json.loads(c.dataset("tab").schema)["kind"] == "table"
    assert {d.name: d.schema for d in c.datasets()} == dict.fromkeys(
        ["arrays", "csv", "fea", "plain", "recs", "tab"], "")


def test_refusals_change_nothing(one, tmp_path):
    voter, c = one
    np.save(tmp_path / "x.npy", np.arange(40, dtype=np.float32).reshape(10, 4))
    c.put_dataset(tmp_path / "x.npy", "x", replicas=1)

    # No suffix: an error listing the choices, no folder written.
    out = ctl(voter.address, "data", "get", "x", str(tmp_path / "out"))
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert ".parquet" in out.stderr and ".npy" in out.stderr and ".csv" in out.stderr
    assert not (tmp_path / "out").exists()
    # An existing output needs --force; without it the file is untouched.
    (tmp_path / "keep.npy").write_bytes(b"mine")
    out = ctl(voter.address, "data", "get", "x", str(tmp_path / "keep.npy"))
    assert out.returncode != 0 and "--force" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert (tmp_path / "keep.npy").read_bytes() == b"mine"
    out = ctl(voter.address, "data", "get", "x", str(tmp_path / "keep.npy"), "--force")
    assert out.returncode == 0, out.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "keep.npy"), np.load(tmp_path / "x.npy"))

    pq.write_table(a_table(20), tmp_path / "t.parquet")
    pq.write_table(pa.table({"v": pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float64()))}),
                   tmp_path / "ragged.parquet")
    pq.write_table(a_table(0), tmp_path / "empty.parquet")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "words.csv").write_text("a,b\n1,x\n")
    bad = [
        (["t.parquet", "--features", "id,nope"], "no column 'nope'"),
        (["t.parquet", "--features", "id,name"], "'name' is string, not numbers"),
        (["t.parquet"], "'name' is string"),  # every column but the label, the string too
        (["t.parquet", "--features-prefix", "zz_"], "no column starts with 'zz_'"),
        (["t.parquet", "--features", "id", "--label", "emb"], "one number per row"),
        (["ragged.parquet"], "ragged"),
        (["empty.parquet", "--features", "id"], "no rows"),
        (["empty.csv"], "empty file"),
        (["words.csv"], "invalid value 'x'"),
        (["x.txt"], "unsupported format .txt"),
        (["missing.npy"], "no such file"),
    ]
    for args, why in bad:
        out = ctl(voter.address, "data", "put", str(tmp_path / args[0]), *args[1:],
                  "--name", "bad", "--replicas", "1")
        assert out.returncode != 0, args
        assert why in out.stderr and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert [d.name for d in c.datasets()] == ["x"]

    # A URL whose fsspec backend is not installed names the package.
    with pytest.raises(InvalidArgument, match="s3fs"):
        c.put_dataset("s3://bucket/data.parquet", "s3", replicas=1)


def test_memory_urls_in_process(one, tmp_path, capsys):
    voter, c = one
    table = a_table(60).drop(["name"])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    mem = fsspec.filesystem("memory")
    mem.pipe("/h6/in.parquet", buf.getvalue())
    try:
        c.put_dataset("memory://h6/in.parquet", "mem", shards=2, replicas=1)
        assert c.dataset("mem").source == "in.parquet"
        c.get_dataset("mem", "memory://h6/out.parquet")
        assert pq.read_table(io.BytesIO(mem.cat("/h6/out.parquet"))).equals(table)
        # The CLI run in this process sees the same memory filesystem; --force to replace.
        assert ctl_main(["--server", voter.address, "data", "get", "mem", "memory://h6/out.parquet"]) != 0
        assert "--force" in capsys.readouterr().err
        assert ctl_main(["--server", voter.address, "data", "get", "mem", "memory://h6/out.npz",
                         "--force"]) == 0
        with np.load(io.BytesIO(mem.cat("/h6/out.npz"))) as z:
            assert z["x"].shape == (60, 8) and list(z["y"]) == list(np.arange(60) % 4)
    finally:
        mem.rm("/h6", recursive=True)


def test_split_parts_come_back_in_the_input_format(one, tmp_path):
    from lepton.client.processor import DataProcessor

    _, c = one
    table = a_table(90).drop(["name"])
    pq.write_table(table, tmp_path / "t.parquet")
    c.put_dataset(tmp_path / "t.parquet", "whole", shards=3, replicas=1)
    DataProcessor(c).split_data("whole", [0.6, 0.4], ["part-a", "part-b"], seed=3)
    parts = []
    for name in ("part-a", "part-b"):
        c.get_dataset(name, tmp_path / f"{name}.parquet")
        part = pq.read_table(tmp_path / f"{name}.parquet")
        assert part.schema.equals(table.schema)
        parts.append(part)
    assert [len(p) for p in parts] == [54, 36]
    both = pa.concat_tables(parts).sort_by("id")
    assert both.equals(table)
