"""Durable storage for the replicated log, the hard state (term, vote) and snapshots.

One interface, `LogStore`, with two implementations: `FileLogStore` (real files, fsync) and
`MemoryLogStore` (pure logic tests). The single-voter consensus and Raft both sit on it,
so the state machine never knows which one feeds it.

Indices start at 1. A snapshot at index S replaces entries 1..S; the log then holds
S+1..last. Writes are buffered until `sync()`, which is the durability point: what was
appended or truncated before a `sync()` survives a crash, what came after may not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lepton.common.durable import fsync_dir as _fsync_dir
from lepton.common.durable import write_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    term: int
    data: bytes  # a serialized lepton.v1.Command; opaque here


@dataclass(frozen=True, slots=True)
class Snapshot:
    index: int  # last index the snapshot covers
    term: int  # term of that entry
    data: bytes  # a serialized state machine (lepton.v1.StateSnapshot); opaque here
    # Raft's voter configuration at `index` (raft/membership.py); opaque here. b"": none.
    config: bytes = b""


class CompactedError(LookupError):
    """The index asked for lies inside the snapshot; its entry is gone."""


class CorruptLogError(OSError):
    """A record before the log's last one fails its checksum: acknowledged entries may be
    damaged, so the store refuses to open rather than cut them (etcd does the same)."""


class StorageFailedError(OSError):
    """An earlier write or fsync failed; the store refuses everything after it. After a
    failed fsync the kernel may have dropped the dirty pages, so a retry that "succeeds"
    would prove nothing (PostgreSQL's fsyncgate): only a restart, which re-reads the
    file, can tell what is durable."""


class LogStore(Protocol):
    """Durable Raft log + hard state + latest snapshot.

    Atomicity: each call is all-or-nothing in memory. Durability: only `sync()`,
    `set_hard_state()` and `save_snapshot()` reach the disk; they return after fsync.
    Raises `OSError` on I/O failure (a full disk included); the store is then unusable and
    the process should stop rather than acknowledge anything more.
    """

    def hard_state(self) -> tuple[int, str]:
        """(current term, voted-for node id or "")."""

    def set_hard_state(self, term: int, voted_for: str) -> None:
        """Durable on return. Raft requires this before answering any vote or append."""

    def first_index(self) -> int:
        """First index held in the log: snapshot index + 1."""

    def last_index(self) -> int:
        """Last index in the log, or the snapshot's index when the log is empty."""

    def term_at(self, index: int) -> int:
        """Term of the entry at `index`; the snapshot's term at its index; 0 at index 0.

        Raises CompactedError below the snapshot and IndexError past the end.
        """

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [lo, hi). With max_bytes, stops early but returns at least one entry.

        Raises CompactedError when lo is inside the snapshot, IndexError past the end.
        """

    def append(self, entries: list[Entry]) -> None:
        """Append after last_index(); the first index must be last_index() + 1."""

    def truncate_suffix(self, from_index: int) -> None:
        """Remove from_index..last. Raft does this when a leader overrides a conflict."""

    def sync(self) -> None:
        """Make every earlier append and truncate durable."""

    def snapshot(self) -> Snapshot | None:
        """The latest saved snapshot, or None."""

    def save_snapshot(self, snap: Snapshot) -> None:
        """Save durably, then drop log entries the snapshot covers.

        If the log holds snap.index with snap.term, entries after it stay (compaction);
        otherwise the whole log is dropped (InstallSnapshot from a leader).
        """

    def close(self) -> None: ...


class _IndexedEntries:
    """What both stores keep in memory: the snapshot and the entries after it."""

    _snap: Snapshot | None
    _entries: list[Entry]

    def _base(self) -> int:
        return self._snap.index if self._snap else 0

    def first_index(self) -> int:
        return self._base() + 1

    def last_index(self) -> int:
        return self._base() + len(self._entries)

    def term_at(self, index: int) -> int:
        base = self._base()
        if index == base:
            return self._snap.term if self._snap else 0
        if index < base:
            raise CompactedError(index)
        if index > self.last_index():
            raise IndexError(index)
        return self._entries[index - base - 1].term

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        base = self._base()
        if lo <= base:
            raise CompactedError(lo)
        if hi > self.last_index() + 1 or lo > hi:
            raise IndexError((lo, hi))
        return limit_bytes(self._entries[lo - base - 1 : hi - base - 1], max_bytes)

    def snapshot(self) -> Snapshot | None:
        return self._snap


class MemoryLogStore(_IndexedEntries):
    """`LogStore` in memory, for pure-logic tests. Everything is durable at once."""

    def __init__(self) -> None:
        self._term = 0
        self._vote = ""
        self._snap: Snapshot | None = None
        self._entries: list[Entry] = []

    def hard_state(self) -> tuple[int, str]:
        return self._term, self._vote

    def set_hard_state(self, term: int, voted_for: str) -> None:
        self._term, self._vote = term, voted_for

    def append(self, entries: list[Entry]) -> None:
        _check_contiguous(entries, self.last_index())
        self._entries.extend(entries)

    def truncate_suffix(self, from_index: int) -> None:
        base = self._base()
        if from_index <= base:
            raise CompactedError(from_index)
        del self._entries[from_index - base - 1 :]

    def sync(self) -> None:
        pass

    def save_snapshot(self, snap: Snapshot) -> None:
        keep = _entries_after_snapshot(self._entries, self._base(), snap)
        self._snap = snap
        self._entries = keep

    def close(self) -> None:
        pass


def limit_bytes(out: list[Entry], max_bytes: int | None) -> list[Entry]:
    """The leading entries of `out` within `max_bytes` of data, at least one (None: all).
    Shared by every `LogStore`, the simulation's included."""
    if max_bytes is None or not out:
        return out
    total = 0
    for i, e in enumerate(out):
        total += len(e.data)
        if total > max_bytes and i > 0:
            return out[:i]
    return out


def _check_contiguous(entries: list[Entry], last: int) -> None:
    for offset, e in enumerate(entries):
        if e.index != last + 1 + offset:
            raise ValueError(f"entry index {e.index} is not contiguous after {last + offset}")


def _entries_after_snapshot(entries: list[Entry], base: int, snap: Snapshot) -> list[Entry]:
    pos = snap.index - base - 1
    if 0 <= pos < len(entries) and entries[pos].term == snap.term:
        return entries[pos + 1 :]
    return []


# Record header: payload length, crc32 of (index, term, payload), index, term.
_HEADER = struct.Struct("<IIQQ")
# Snapshot trailer: configuration length, crc32 of it.
_TRAILER = struct.Struct("<II")


def _crc(index: int, term: int, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(struct.pack("<QQ", index, term)))


class FileLogStore(_IndexedEntries):
    """`LogStore` on local files, fsync'd.

    Layout in `directory`: `log` (CRC'd records), `hardstate` (JSON), `snapshot` (CRC'd).
    A torn record at the log's tail (a crash mid-write) is cut off on open; a bad record
    with a valid one after it is corruption: `CorruptLogError`, naming file and offset.
    A failed write or fsync poisons the store (`StorageFailedError` from then on).
    `fsync` is the one call that makes the log durable; tests inject a failing one.
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: Callable[[int], None] = os.fsync):
        self._fsync = fsync
        self._failure: OSError | None = None
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._log_path = self._dir / "log"
        self._term, self._vote = self._load_hard_state()
        self._snap = self._load_snapshot()
        self._entries: list[Entry] = []
        self._offsets: list[int] = []  # byte offset of each entry's record in the log file
        stale_prefix = self._load_log()
        self._file = open(self._log_path, "ab")  # noqa: SIM115 - held open for appends
        if stale_prefix:
            # Entries the snapshot covers are still in the file (crash before the rewrite).
            self._rewrite_log(list(self._entries))

    # hard state -------------------------------------------------------------------------
    def _load_hard_state(self) -> tuple[int, str]:
        path = self._dir / "hardstate"
        if not path.exists():
            return 0, ""
        doc = json.loads(path.read_text())
        return int(doc["term"]), str(doc["vote"])

    def hard_state(self) -> tuple[int, str]:
        return self._term, self._vote

    def set_hard_state(self, term: int, voted_for: str) -> None:
        with self._failing_stops_the_store():
            write_atomic(self._dir / "hardstate", json.dumps({"term": term, "vote": voted_for}).encode())
        self._term, self._vote = term, voted_for

    # snapshot ---------------------------------------------------------------------------
    def _load_snapshot(self) -> Snapshot | None:
        path = self._dir / "snapshot"
        if not path.exists():
            return None
        raw = path.read_bytes()
        length, crc, index, term = _HEADER.unpack_from(raw)
        data = raw[_HEADER.size : _HEADER.size + length]
        if len(data) != length or _crc(index, term, data) != crc:
            raise OSError(f"snapshot {path} is corrupt (checksum mismatch)")
        # An optional trailer holds the configuration (files from before it have none).
        config = b""
        pos = _HEADER.size + length
        if pos < len(raw):
            if pos + _TRAILER.size > len(raw):
                raise OSError(f"snapshot {path} is corrupt (torn configuration)")
            clen, ccrc = _TRAILER.unpack_from(raw, pos)
            config = raw[pos + _TRAILER.size : pos + _TRAILER.size + clen]
            if len(config) != clen or zlib.crc32(config) != ccrc:
                raise OSError(f"snapshot {path} is corrupt (configuration checksum mismatch)")
        return Snapshot(index, term, data, config)

    def save_snapshot(self, snap: Snapshot) -> None:
        header = _HEADER.pack(len(snap.data), _crc(snap.index, snap.term, snap.data), snap.index, snap.term)
        trailer = _TRAILER.pack(len(snap.config), zlib.crc32(snap.config)) + snap.config if snap.config else b""
        with self._failing_stops_the_store():
            write_atomic(self._dir / "snapshot", header + snap.data + trailer)
            keep = _entries_after_snapshot(self._entries, self._base(), snap)
            self._snap = snap
            self._rewrite_log(keep)

    def _rewrite_log(self, keep: list[Entry]) -> None:
        """Replace the log file with exactly `keep`, atomically."""
        self._file.close()
        buf = bytearray()
        offsets = []
        for e in keep:
            offsets.append(len(buf))
            buf += _HEADER.pack(len(e.data), _crc(e.index, e.term, e.data), e.index, e.term) + e.data
        write_atomic(self._log_path, bytes(buf))
        self._entries, self._offsets = list(keep), offsets
        self._file = open(self._log_path, "ab")  # noqa: SIM115

    # log --------------------------------------------------------------------------------
    def _load_log(self) -> bool:
        """Read the log file; True when it still holds entries the snapshot covers.

        A bad record is cut only when no valid record follows it: a crash mid-append
        tears the last write, never one before it. Raises CorruptLogError otherwise.
        """
        if not self._log_path.exists():
            self._log_path.touch()
            _fsync_dir(self._dir)
            return False
        raw = self._log_path.read_bytes()
        pos = 0
        base = self._base()
        while pos < len(raw):
            record = _read_record(raw, pos)
            if record is None:
                break
            index, term, data, end = record
            if index > base:
                expected = base + len(self._entries) + 1
                if index != expected:
                    raise CorruptLogError(f"log {self._log_path} skips from {expected - 1} to {index} "
                                          f"at offset {pos}")
                self._entries.append(Entry(index, term, data))
                self._offsets.append(pos)
            pos = end
        if pos < len(raw):
            later = _next_valid_record(raw, pos + 1)
            if later is not None:
                raise CorruptLogError(
                    f"log {self._log_path} is corrupt at offset {pos} (the record after index "
                    f"{self.last_index()} fails its checksum; a valid record follows at offset "
                    f"{later}): refusing to start. Restore this voter from a backup, or remove its "
                    "data folder and add it back as a new voter")
            logger.warning("log %s: cutting %d bytes of torn tail at offset %d",
                           self._log_path, len(raw) - pos, pos)
            with open(self._log_path, "r+b") as f:
                f.truncate(pos)
                f.flush()
                self._fsync(f.fileno())
        return bool(self._entries) and self._offsets[0] != 0 or (not self._entries and pos > 0)

    def append(self, entries: list[Entry]) -> None:
        _check_contiguous(entries, self.last_index())
        with self._failing_stops_the_store():
            offset = self._file.tell()
            buf = bytearray()
            for e in entries:
                buf += _HEADER.pack(len(e.data), _crc(e.index, e.term, e.data), e.index, e.term) + e.data
            self._file.write(buf)
            self._offsets.extend(offset + off for off in _record_offsets(entries))
            self._entries.extend(entries)

    def truncate_suffix(self, from_index: int) -> None:
        base = self._base()
        if from_index <= base:
            raise CompactedError(from_index)
        pos = from_index - base - 1
        if pos >= len(self._entries):
            return
        with self._failing_stops_the_store():
            self._file.flush()
            self._file.truncate(self._offsets[pos])
            self._file.seek(self._offsets[pos])
        del self._entries[pos:]
        del self._offsets[pos:]

    def sync(self) -> None:
        with self._failing_stops_the_store():
            self._file.flush()
            self._fsync(self._file.fileno())

    @contextlib.contextmanager
    def _failing_stops_the_store(self) -> Iterator[None]:
        """Refuse once anything failed; turn a new OSError into the store's failure."""
        if self._failure is not None:
            raise StorageFailedError(f"log store {self._dir} failed earlier: {self._failure}")
        try:
            yield
        except OSError as err:
            self._failure = err
            logger.error("log store %s: write failed, refusing every later write: %s", self._dir, err)
            raise

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.close()  # flushes; what it could not write was never synced
        except OSError as err:
            logger.warning("log store %s: close failed: %s", self._dir, err)


def _record_offsets(entries: list[Entry]) -> list[int]:
    """Each entry's record offset, relative to the first record."""
    offsets, pos = [], 0
    for e in entries:
        offsets.append(pos)
        pos += _HEADER.size + len(e.data)
    return offsets


def _read_record(raw: bytes, pos: int) -> tuple[int, int, bytes, int] | None:
    """(index, term, payload, end offset) of a valid record at `pos`, or None."""
    if pos + _HEADER.size > len(raw):
        return None
    length, crc, index, term = _HEADER.unpack_from(raw, pos)
    start = pos + _HEADER.size
    if start + length > len(raw):
        return None
    data = raw[start : start + length]
    if _crc(index, term, data) != crc:
        return None
    return index, term, data, start + length


def _next_valid_record(raw: bytes, start: int) -> int | None:
    """Offset of the first valid record at or after `start`, or None. A torn tail holds
    none (zeros or a prefix of one write); a corrupt middle does. A random match needs
    a 32-bit CRC to agree, so this is safe to ask of garbage."""
    for pos in range(start, len(raw) - _HEADER.size + 1):
        if _read_record(raw, pos) is not None:
            return pos
    return None
