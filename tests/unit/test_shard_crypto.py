"""Shards encrypted at rest (issue 7): the sealed format round-trips, and every kind of
tampering with a sealed blob is detected, quarantined and never returned."""

from __future__ import annotations

import base64
import hashlib
import os
import struct

import numpy as np
import pytest

from lepton.common import cluster_secret
from lepton.common.config import load_config
from lepton.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from lepton.dataplane import shard_crypto as sc
from lepton.dataplane import shard_format as fmt
from lepton.dataplane.shards import CHUNK, KEY_ID_FILE, ShardCorrupt, ShardStore
from tests.unit.test_shards import blob, put  # the same helpers

KEY = sc.ShardCipher(bytes(range(32)))
OTHER = sc.ShardCipher(bytes(range(1, 33)))
SLOT = CHUNK + sc.TAG  # one sealed full chunk on disk


def read_all(store: ShardStore, sid: str) -> bytes:
    return b"".join(frame[1] for frame in store.read_chunks(sid))


@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1, 2 * CHUNK + 123])
def test_round_trip_keeps_ids_and_hides_the_plaintext(tmp_path, size):
    sealed, plain = ShardStore(tmp_path / "s", cipher=KEY), ShardStore(tmp_path / "p")
    sid, data = blob(size)
    assert put(sealed, data, step=3_000_001) == put(plain, data) == sid  # same content address
    path = sealed.path(sid)
    assert path.suffix == ".enc" and sealed.encrypted(sid) and not plain.encrypted(sid)
    raw = path.read_bytes()
    assert len(raw) == sc.sealed_size(size, CHUNK) and hashlib.sha256(raw).hexdigest() != sid
    if size >= 64:  # (one byte may turn up in ciphertext by chance)
        assert data[:64] not in raw and data[-64:] not in raw
    assert read_all(sealed, sid) == data
    assert [f[2] for f in sealed.read_chunks(sid)] == [f[2] for f in plain.read_chunks(sid)]
    assert sealed.verify(sid)
    reopened = ShardStore(tmp_path / "s", cipher=KEY)  # sizes come back from the file sizes
    assert reopened.list() == {sid: size} and reopened.encrypted(sid)
    if size > CHUNK:
        assert b"".join(f[1] for f in reopened.read_chunks(sid, CHUNK)) == data[CHUNK:]
    assert list(reopened.read_chunks(sid, size)) == ([] if size else [(0, b"", bytes.fromhex(sid))])


def test_two_seals_of_one_shard_differ(tmp_path):
    sid, data = blob(1000)
    a, b = ShardStore(tmp_path / "a", cipher=KEY), ShardStore(tmp_path / "b", cipher=KEY)
    put(a, data), put(b, data)
    # A fresh salt (so a fresh key) and nonce prefix per blob: no nonce is ever reused.
    assert a.path(sid).read_bytes()[16:] != b.path(sid).read_bytes()[16:]


def test_load_and_plain_path_decrypt(tmp_path):
    store = ShardStore(tmp_path / "s", cipher=KEY)
    x = np.arange(1_200_000, dtype=np.float32).reshape(-1, 3)  # 4.8 MB: two sealed chunks
    y = np.arange(len(x)) % 7
    sid = put(store, fmt.shard_bytes(fmt.make_records(x, y)))
    arr = store.load(sid)
    assert not arr.flags.writeable
    np.testing.assert_array_equal(arr["x"], x)
    np.testing.assert_array_equal(arr["y"], y)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    p = store.plain_path(sid, scratch)
    assert p.parent == scratch and oct(p.stat().st_mode & 0o777) == "0o600"
    np.testing.assert_array_equal(np.load(p, mmap_mode="r")["x"], x)
    empty = put(store, fmt.shard_bytes(fmt.make_records(np.empty((0, 3), np.float32), None)))
    assert store.load(empty)["x"].shape == (0, 3)


def test_rollback_mid_blob_then_resume(tmp_path):
    store = ShardStore(tmp_path, cipher=KEY)
    sid, data = blob(2 * CHUNK + 5)
    with store.writer(sid, len(data)) as w:
        w.write(data[:CHUNK])
        w.mark_verified()
        w.write(b"\0" * (CHUNK + 2))  # a bad frame (one whole chunk sealed, part pending)
        assert w.rollback() == CHUNK
        w.write(data[CHUNK:])
        w.commit()
    assert read_all(store, sid) == data and store.verify(sid)


# -- tampering -------------------------------------------------------------------------------


def _flip(raw: bytearray, at: int) -> None:
    raw[at] ^= 0x01


def _swap_chunks(raw: bytearray) -> None:
    h = sc.HEADER.size
    raw[h:h + SLOT], raw[h + SLOT:h + 2 * SLOT] = raw[h + SLOT:h + 2 * SLOT], raw[h:h + SLOT]


TAMPERS = {
    "ciphertext byte": lambda raw: _flip(raw, sc.HEADER.size + SLOT + 1000),
    "tag byte": lambda raw: _flip(raw, sc.HEADER.size + SLOT - 1),
    "nonce prefix": lambda raw: _flip(raw, sc.HEADER.size - 3),
    "salt": lambda raw: _flip(raw, 30),
    "size in header": lambda raw: raw.__setitem__(slice(8, 16), struct.pack("!Q", 3 * CHUNK - 1)),
    "magic": lambda raw: _flip(raw, 0),
    "two chunks swapped": _swap_chunks,
    "last chunk dropped": lambda raw: raw.__delitem__(slice(len(raw) - SLOT, None)),
    "truncated mid-chunk": lambda raw: raw.__delitem__(slice(len(raw) - 100, None)),
    "bytes appended": lambda raw: raw.extend(b"\0" * 100),
    "a whole chunk appended": lambda raw: raw.extend(raw[sc.HEADER.size:sc.HEADER.size + SLOT]),
    "header only": lambda raw: raw.__delitem__(slice(sc.HEADER.size, None)),
}


@pytest.mark.parametrize("reopen", [False, True], ids=["live", "reopened"])
@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_every_tamper_is_detected_quarantined_and_never_returned(tmp_path, tamper, reopen):
    store = ShardStore(tmp_path, cipher=KEY)
    sid, data = blob(3 * CHUNK)
    put(store, data)
    raw = bytearray(store.path(sid).read_bytes())
    TAMPERS[tamper](raw)
    store.path(sid).write_bytes(raw)
    if reopen:  # the size is then guessed from the damaged file's length
        store = ShardStore(tmp_path, cipher=KEY)
    lost = []
    store.on_quarantine = lost.append
    served = []
    with pytest.raises(ShardCorrupt, match="corrupt on this node"):
        for _, chunk, _ in store.read_chunks(sid):
            served.append(chunk)
    # What came out before the failure is authenticated plaintext of this shard, in place.
    assert b"".join(served) == data[: len(b"".join(served))]
    assert not store.has(sid) and lost == [sid] and not list(store.blobs.glob(f"*/{sid}.*"))


@pytest.mark.parametrize("how", ["load", "verify", "plain_path"])
def test_tamper_fails_every_reader(tmp_path, how):
    store = ShardStore(tmp_path, cipher=KEY)
    sid, data = blob(CHUNK + 10)
    put(store, data)
    raw = bytearray(store.path(sid).read_bytes())
    _flip(raw, sc.HEADER.size + SLOT + 3)  # the second chunk
    store.path(sid).write_bytes(raw)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if how == "verify":
        assert not store.verify(sid)
    else:
        with pytest.raises(ShardCorrupt):
            store.load(sid) if how == "load" else store.plain_path(sid, scratch)
    assert not store.has(sid) and not list(scratch.iterdir())


def test_a_blob_moved_to_another_shard_id_fails(tmp_path):
    store = ShardStore(tmp_path, cipher=KEY)
    a, data_a = blob(CHUNK, seed=1)
    b, data_b = blob(CHUNK, seed=2)
    put(store, data_a), put(store, data_b)
    store.path(b).write_bytes(store.path(a).read_bytes())  # same size, another shard's bytes
    with pytest.raises(ShardCorrupt):
        read_all(store, b)
    assert read_all(store, a) == data_a


def test_a_blob_sealed_with_another_key_is_refused(tmp_path):
    mine, theirs = ShardStore(tmp_path / "m", cipher=KEY), ShardStore(tmp_path / "t", cipher=OTHER)
    sid, data = blob(5000)
    put(mine, data)
    put(theirs, data)
    mine.path(sid).write_bytes(theirs.path(sid).read_bytes())
    with pytest.raises(ShardCorrupt, match=f"key id {OTHER.key_id}"):
        mine.load(sid)
    assert not mine.has(sid)


# -- keys, mixed settings ------------------------------------------------------------------


def test_a_store_refuses_a_missing_or_different_key(tmp_path):
    store = ShardStore(tmp_path, cipher=KEY)
    sid, data = blob(1000)
    put(store, data)
    assert (tmp_path / KEY_ID_FILE).read_text().strip() == KEY.key_id
    with pytest.raises(FailedPrecondition, match="is encrypted .*--shard-key-file"):
        ShardStore(tmp_path)
    with pytest.raises(FailedPrecondition, match=f"key id {KEY.key_id}.* key id {OTHER.key_id}"):
        ShardStore(tmp_path, cipher=OTHER)
    (tmp_path / KEY_ID_FILE).unlink()  # the marker lost: the blobs' headers still tell
    with pytest.raises(FailedPrecondition, match=KEY.key_id):
        ShardStore(tmp_path, cipher=OTHER)
    with pytest.raises(FailedPrecondition, match="is encrypted"):
        ShardStore(tmp_path)
    assert read_all(ShardStore(tmp_path, cipher=KEY), sid) == data  # nothing was lost


def test_turning_encryption_on_keeps_old_blobs_readable(tmp_path):
    old_sid, old = blob(1000, seed=1)
    put(ShardStore(tmp_path), old)
    store = ShardStore(tmp_path, cipher=KEY)
    new_sid, new = blob(1000, seed=2)
    put(store, new)
    assert not store.encrypted(old_sid) and store.encrypted(new_sid)
    assert read_all(store, old_sid) == old and read_all(store, new_sid) == new
    with pytest.raises(FailedPrecondition):  # and it cannot silently be turned off again
        ShardStore(tmp_path)


def test_secret_files(tmp_path):
    path = cluster_secret.create(tmp_path / "cluster.secret")
    assert oct(path.stat().st_mode & 0o777) == "0o600" and not cluster_secret.loosely_readable(path)
    assert len(base64.b64decode(path.read_text())) == 32
    with pytest.raises(AlreadyExists):
        cluster_secret.create(path)
    assert sc.ShardCipher.from_file(path).key_id == sc.ShardCipher(cluster_secret.read(path)).key_id
    short = tmp_path / "short"
    short.write_text(base64.b64encode(b"x" * 16).decode())
    junk = tmp_path / "junk"
    junk.write_text("not base64!\n")
    for bad, why in ((tmp_path / "none", "no such file"), (short, "16 bytes"), (junk, "not base64")):
        with pytest.raises(InvalidArgument, match=why):
            sc.ShardCipher.from_file(bad)
        with pytest.raises(InvalidArgument, match=why):  # the agent fails at start
            load_config(env={"LEPTON_SHARD_KEY_FILE": str(bad)})
    os.chmod(path, 0o644)
    assert cluster_secret.loosely_readable(path)
    cfg = load_config(flags={"shard_key_file": str(path)}, env={})
    text = path.read_text().strip()
    assert cfg.shard_key_file == str(path) and text not in repr(cfg.as_dict())
    assert text not in repr(sc.ShardCipher.from_file(path))
