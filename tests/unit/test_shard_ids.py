"""Shard ids by algorithm: new shards are BLAKE3 (b3-<hex>), older SHA-256 ids (<hex>) stay
readable and verifiable in the same store, each checked with its own hash."""

from __future__ import annotations

import hashlib

import blake3
import numpy as np
import pytest

from lepton.common.errors import InvalidArgument
from lepton.dataplane import shard_format as fmt
from lepton.dataplane import shard_hash
from lepton.dataplane.shard_crypto import ShardCipher
from lepton.dataplane.shards import CHUNK, ShardCorrupt, ShardStore

ALGOS = ["b3", "sha256"]


def make_id(data: bytes, algo: str) -> str:
    if algo == "b3":
        return "b3-" + blake3.blake3(data).hexdigest()
    return hashlib.sha256(data).hexdigest()


def put(store: ShardStore, data: bytes, algo: str) -> str:
    sid = make_id(data, algo)
    with store.writer(sid, len(data)) as w:
        w.write(data)
        w.commit()
    return sid


def data_of(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_new_ids_are_blake3_and_both_forms_are_valid():
    data = b"rows"
    assert shard_hash.content_id(data) == make_id(data, "b3")
    for algo in ALGOS:
        assert shard_hash.check_shard_id(make_id(data, algo))
    for bad in ("b3-" + "0" * 63, "B3-" + "0" * 64, "b2-" + "0" * 64, "sha256-" + "0" * 64, "b3-../" + "0" * 60):
        with pytest.raises(InvalidArgument, match="BLAKE3"):
            shard_hash.check_shard_id(bad)
    # The two kinds bind differently into keys and AAD and can never collide.
    hexd = "ab" * 32
    assert shard_hash.id_bytes(hexd) == bytes.fromhex(hexd)
    assert shard_hash.id_bytes("b3-" + hexd) != shard_hash.id_bytes(hexd)


def test_write_shard_names_new_shards_with_blake3(tmp_path):
    recs = fmt.make_records(np.arange(12, dtype=np.float32).reshape(4, 3), None)
    sid, size = fmt.write_shard(recs, tmp_path / "s.npy")
    assert sid == make_id((tmp_path / "s.npy").read_bytes(), "b3") and size == (tmp_path / "s.npy").stat().st_size


@pytest.mark.parametrize("cipher", [None, ShardCipher(bytes(range(32)))], ids=["plain", "sealed"])
def test_both_kinds_live_in_one_store_and_verify_with_their_own_hash(tmp_path, cipher):
    store = ShardStore(tmp_path / "s", cipher=cipher)
    data = data_of(2 * CHUNK + 9)
    ids = {algo: put(store, data, algo) for algo in ALGOS}
    assert ids["b3"] != ids["sha256"] and set(store.list()) == set(ids.values())
    # The fan-out folder is the digest's, not the prefix's: b3 ids spread like the others.
    assert store.path(ids["b3"]).parent.name == ids["b3"][3:5]
    reopened = ShardStore(tmp_path / "s", cipher=cipher)
    for algo, sid in ids.items():
        assert reopened.verify(sid), algo
        assert b"".join(bytes(f[1]) for f in reopened.read_chunks(sid)) == data
        # Checkpoints are of the id's own hash.
        h = blake3.blake3() if algo == "b3" else hashlib.sha256()
        h.update(data[:CHUNK])
        assert reopened.checkpoints(sid)[0] == h.digest()


@pytest.mark.parametrize("algo", ALGOS)
def test_bytes_of_the_other_algorithm_are_refused(tmp_path, algo):
    """An id of one kind never accepts bytes that only match under the other hash."""
    store = ShardStore(tmp_path / "s")
    data = data_of(1000)
    other = "sha256" if algo == "b3" else "b3"
    hexd = make_id(data, other).removeprefix("b3-")
    forged = ("b3-" + hexd) if algo == "b3" else hexd
    with store.writer(forged, len(data)) as w:
        w.write(data)
        with pytest.raises(ShardCorrupt):
            w.commit()
    assert not store.has(forged) and not list(store.tmp.iterdir())


@pytest.mark.parametrize("algo", ALGOS)
def test_a_corrupt_byte_on_disk_is_caught_for_each_algorithm(tmp_path, algo):
    store = ShardStore(tmp_path / "s")
    sid = put(store, data_of(2 * CHUNK), algo)
    with open(store.path(sid), "r+b") as f:
        f.seek(CHUNK + 5)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(ShardCorrupt, match=f"at byte {CHUNK}"):
        list(store.read_chunks(sid))
    assert not store.has(sid)  # quarantined
