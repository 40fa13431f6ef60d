"""The LogStore contract, run against every implementation."""

from __future__ import annotations

import errno
import os

import pytest

from lepton.coordinator.storage.log_store import (
    CompactedError,
    CorruptLogError,
    Entry,
    FileLogStore,
    MemoryLogStore,
    Snapshot,
    StorageFailedError,
)


@pytest.fixture(params=["memory", "file"])
def make_store(request, tmp_path):
    def make():
        return MemoryLogStore() if request.param == "memory" else FileLogStore(tmp_path / "log")

    make.durable = request.param == "file"
    return make


def entries(lo, hi, term=1):
    return [Entry(i, term, f"cmd{i}".encode()) for i in range(lo, hi)]


def test_append_read_and_terms(make_store):
    s = make_store()
    assert (s.first_index(), s.last_index(), s.term_at(0)) == (1, 0, 0)
    s.append(entries(1, 4))
    s.sync()
    assert [e.index for e in s.entries(1, 4)] == [1, 2, 3]
    assert s.term_at(3) == 1
    with pytest.raises(IndexError):
        s.term_at(4)
    with pytest.raises(ValueError):
        s.append([Entry(9, 1, b"gap")])


def test_max_bytes_returns_at_least_one(make_store):
    s = make_store()
    s.append(entries(1, 6))
    assert len(s.entries(1, 6, max_bytes=1)) == 1
    assert len(s.entries(1, 6, max_bytes=9)) == 2


def test_truncate_suffix_then_reappend(make_store):
    s = make_store()
    s.append(entries(1, 5))
    s.truncate_suffix(3)
    s.append(entries(3, 4, term=2))
    s.sync()
    assert [(e.index, e.term) for e in s.entries(1, 4)] == [(1, 1), (2, 1), (3, 2)]


def test_snapshot_compacts_and_keeps_the_suffix(make_store):
    s = make_store()
    s.append(entries(1, 6))
    s.save_snapshot(Snapshot(3, 1, b"state@3"))
    assert (s.first_index(), s.last_index(), s.term_at(3)) == (4, 5, 1)
    with pytest.raises(CompactedError):
        s.entries(2, 4)
    # A snapshot that conflicts with the log (InstallSnapshot) drops the whole log.
    s.save_snapshot(Snapshot(9, 4, b"state@9"))
    assert (s.first_index(), s.last_index()) == (10, 9)


def test_hard_state(make_store):
    s = make_store()
    assert s.hard_state() == (0, "")
    s.set_hard_state(3, "n2")
    assert s.hard_state() == (3, "n2")


def test_file_store_survives_reopen(tmp_path):
    s = FileLogStore(tmp_path)
    s.append(entries(1, 4))
    s.sync()
    s.set_hard_state(2, "me")
    s.save_snapshot(Snapshot(2, 1, b"snap"))
    s.append(entries(4, 6))
    s.sync()
    s.close()
    r = FileLogStore(tmp_path)
    assert r.hard_state() == (2, "me")
    assert r.snapshot() == Snapshot(2, 1, b"snap")
    assert [e.index for e in r.entries(3, 6)] == [3, 4, 5]


def test_torn_tail_is_cut_but_earlier_records_survive(tmp_path):
    s = FileLogStore(tmp_path)
    s.append(entries(1, 4))
    s.sync()
    s.close()
    with open(tmp_path / "log", "r+b") as f:
        f.seek(0, 2)
        size = f.tell()
        f.truncate(size - 3)  # a crash mid-write of the last record
    r = FileLogStore(tmp_path)
    assert r.last_index() == 2
    r.append(entries(3, 4, term=5))
    r.sync()
    r.close()
    assert FileLogStore(tmp_path).term_at(3) == 5


def test_corrupt_snapshot_refuses_to_open(tmp_path):
    s = FileLogStore(tmp_path)
    s.save_snapshot(Snapshot(1, 1, b"precious state"))
    s.close()
    raw = bytearray((tmp_path / "snapshot").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "snapshot").write_bytes(bytes(raw))
    with pytest.raises(OSError, match="corrupt"):
        FileLogStore(tmp_path)


def _record_offset(index):
    """Byte offset of entry `index`'s record in a log of entries(1, n) (no snapshot)."""
    return sum(24 + len(f"cmd{i}".encode()) for i in range(1, index))


def test_flipped_byte_before_the_last_record_refuses_naming_file_and_offset(tmp_path):
    s = FileLogStore(tmp_path)
    s.append(entries(1, 11))
    s.sync()
    s.close()
    offset = _record_offset(4)
    raw = bytearray((tmp_path / "log").read_bytes())
    raw[offset + 24] ^= 0x01  # one bit of entry 4's payload
    (tmp_path / "log").write_bytes(bytes(raw))
    with pytest.raises(CorruptLogError) as err:
        FileLogStore(tmp_path)
    assert str(tmp_path / "log") in str(err.value)
    assert f"offset {offset} " in str(err.value)
    # Nothing was cut: the acknowledged entries after it are still in the file.
    assert (tmp_path / "log").read_bytes() == bytes(raw)


def test_flipped_length_field_before_the_last_record_refuses(tmp_path):
    # A corrupt length makes the record look torn (it runs past the end of the file);
    # the valid records after it still give the corruption away.
    s = FileLogStore(tmp_path)
    s.append(entries(1, 11))
    s.sync()
    s.close()
    offset = _record_offset(4)
    raw = bytearray((tmp_path / "log").read_bytes())
    raw[offset + 3] ^= 0x10
    (tmp_path / "log").write_bytes(bytes(raw))
    with pytest.raises(CorruptLogError, match=f"offset {offset} "):
        FileLogStore(tmp_path)


def test_torn_last_record_with_its_full_length_is_cut(tmp_path):
    s = FileLogStore(tmp_path)
    s.append(entries(1, 11))
    s.sync()
    s.close()
    raw = bytearray((tmp_path / "log").read_bytes())
    raw[-1] ^= 0xFF  # the last record's bytes all arrived, but not as written
    (tmp_path / "log").write_bytes(bytes(raw))
    r = FileLogStore(tmp_path)
    assert r.last_index() == 9
    assert len((tmp_path / "log").read_bytes()) == _record_offset(10)


def test_zeroed_tail_is_cut(tmp_path):
    s = FileLogStore(tmp_path)
    s.append(entries(1, 4))
    s.sync()
    s.close()
    with open(tmp_path / "log", "ab") as f:
        f.write(b"\0" * 4096)  # a file system that extended the file but lost the page
    assert FileLogStore(tmp_path).last_index() == 3


class _FailingFsync:
    """os.fsync until `fail` is set, then ENOSPC, as a full disk gives."""

    def __init__(self):
        self.fail = False

    def __call__(self, fd):
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)


def test_failed_fsync_poisons_the_store(tmp_path):
    fsync = _FailingFsync()
    s = FileLogStore(tmp_path, fsync=fsync)
    s.append(entries(1, 3))
    s.sync()
    s.append(entries(3, 4))
    fsync.fail = True
    with pytest.raises(OSError, match="No space"):
        s.sync()
    fsync.fail = False  # space freed: a retried fsync would "succeed" and prove nothing
    with pytest.raises(StorageFailedError, match="failed earlier"):
        s.sync()
    with pytest.raises(StorageFailedError):
        s.append(entries(4, 5))
    with pytest.raises(StorageFailedError):
        s.set_hard_state(9, "x")
    s.close()
    # A restart re-reads what is on disk and works again.
    r = FileLogStore(tmp_path)
    assert r.last_index() >= 2
