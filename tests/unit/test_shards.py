"""The shard store: content addressing, atomic writes, verification, quota."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from lepton.common.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from lepton.dataplane import shard_format as fmt
from lepton.dataplane.shards import CHUNK, ShardCorrupt, ShardStore, checkpoint_offsets


def blob(n: int, seed: int = 0) -> tuple[str, bytes]:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    return hashlib.sha256(data).hexdigest(), data


def put(store: ShardStore, data: bytes, step: int = 1 << 20) -> str:
    sid = hashlib.sha256(data).hexdigest()
    with store.writer(sid, len(data)) as w:
        for i in range(0, len(data), step):
            w.write(data[i : i + step])
        w.commit()
    return sid


def test_write_read_roundtrip_with_checkpoints(tmp_path):
    store = ShardStore(tmp_path)
    sid, data = blob(2 * CHUNK + 123)
    put(store, data, step=3_000_001)  # writes straddle checkpoint boundaries
    assert store.has(sid) and store.size(sid) == len(data)
    assert store.path(sid).read_bytes() == data
    frames = list(store.read_chunks(sid))
    assert b"".join(f[1] for f in frames) == data
    assert [f[0] for f in frames] == [0, CHUNK, 2 * CHUNK]
    assert frames[-1][2].hex() == sid
    assert [f[2] for f in frames] == store.checkpoints(sid)
    resumed = list(store.read_chunks(sid, CHUNK))
    assert resumed == frames[1:]
    with pytest.raises(InvalidArgument):
        list(store.read_chunks(sid, 5))


def test_empty_shard_and_offsets():
    assert checkpoint_offsets(0) == [0]
    assert checkpoint_offsets(CHUNK) == [CHUNK]
    assert checkpoint_offsets(CHUNK + 1) == [CHUNK, CHUNK + 1]


def test_partial_write_is_never_visible_and_truncation_fails(tmp_path):
    store = ShardStore(tmp_path)
    sid, data = blob(1000)
    with store.writer(sid, len(data)) as w:
        w.write(data[:500])
        assert not store.has(sid)
        with pytest.raises(InvalidArgument, match="truncated"):
            w.commit()
    assert not store.has(sid) and not list(store.tmp.iterdir()) and store.used_bytes == 0
    with pytest.raises(InvalidArgument, match="more bytes"):
        with store.writer(sid, 10) as w:
            w.write(data)


def test_wrong_bytes_are_not_stored(tmp_path):
    store = ShardStore(tmp_path)
    sid, data = blob(1000)
    with pytest.raises(ShardCorrupt):
        with store.writer(sid, len(data)) as w:
            w.write(b"x" + data[1:])
            w.commit()
    assert not store.has(sid) and not list(store.tmp.iterdir())


def test_bad_ids_are_refused(tmp_path):
    store = ShardStore(tmp_path)
    for bad in ("../../etc/passwd", "ABC", "a" * 63, ""):
        with pytest.raises(InvalidArgument):
            store.writer(bad, 1)
        with pytest.raises(InvalidArgument):
            store.size(bad)
    with pytest.raises(NotFound):
        store.size("0" * 64)


def test_quota_refuses_before_writing(tmp_path):
    store = ShardStore(tmp_path, quota_bytes=1500)
    put(store, blob(1000)[1])
    sid, data = blob(1000, seed=1)
    with pytest.raises(ResourceExhausted, match="full"):
        store.writer(sid, len(data))
    assert not list(store.tmp.iterdir()) and not store.has(sid)
    with pytest.raises(AlreadyExists):
        store.writer(blob(1000)[0], 1000)


def test_reserve_keeps_disk_space_free_for_the_log(tmp_path):
    free = [10_000]  # what the file system has left
    store = ShardStore(tmp_path, reserve_bytes=6_000, free_bytes=lambda: free[0])
    sid, data = blob(3_000)
    writer = store.writer(sid, len(data))  # 10,000 - 3,000 leaves 7,000: over the reserve
    other, more = blob(1_500, seed=1)
    with pytest.raises(ResourceExhausted, match="kept for the Raft log") as err:
        store.writer(other, len(more))  # the first write's 3,000 count as taken already
    assert str(tmp_path) in str(err.value) and "--shard-reserve" in str(err.value)
    writer.abort()
    free[0] = 7_500
    put(store, more)  # 7,500 - 1,500 = 6,000: exactly the reserve is still free


def test_corruption_on_disk_is_detected_when_read(tmp_path):
    store = ShardStore(tmp_path)
    sid, data = blob(CHUNK + 10)
    put(store, data)
    lost = []
    store.on_quarantine = lost.append
    with open(store.path(sid), "r+b") as f:
        f.seek(CHUNK + 3)
        f.write(bytes([data[CHUNK + 3] ^ 1]))
    frames = store.read_chunks(sid)
    assert next(frames)[0] == 0  # the first chunk is still good
    with pytest.raises(ShardCorrupt):
        next(frames)
    assert not store.has(sid) and lost == [sid]


def test_verify_and_reopen(tmp_path):
    store = ShardStore(tmp_path)
    sid = put(store, blob(5000)[1])
    assert store.verify(sid)
    (store.tmp / "junk.part").write_bytes(b"partial")
    again = ShardStore(tmp_path)
    assert again.list() == {sid: 5000} and not list(again.tmp.iterdir())
    os.truncate(again.path(sid), 10)
    assert not again.verify(sid) and not again.has(sid)


def test_load_is_memory_mapped_records(tmp_path):
    store = ShardStore(tmp_path)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    y = np.array([0, 1, 0, 1])
    recs = fmt.make_records(x, y)
    sid = put(store, fmt.shard_bytes(recs))
    arr = store.load(sid)
    assert isinstance(arr, np.memmap)
    np.testing.assert_array_equal(arr["x"], x)
    np.testing.assert_array_equal(arr["y"], y)
    assert fmt.describe(arr) == {"rows": 4, "dtype": "<f4", "shape": [3], "label_dtype": "<i8"}


def test_shard_plan(tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32)
    y = np.arange(10)
    assert fmt.plan_shards(10, 8, shards=3) == [(0, 3), (3, 7), (7, 10)]
    assert len(fmt.plan_shards(1000, 8, shard_size=800)) == 10
    paths = []
    for i, (a, b) in enumerate(fmt.plan_shards(10, 8, shards=3)):
        paths.append(tmp_path / f"s{i}.npy")
        fmt.write_shard(fmt.make_records(x[a:b], y[a:b]), paths[-1])
    joined = np.concatenate([np.load(p) for p in paths])
    np.testing.assert_array_equal(joined["x"], x)
