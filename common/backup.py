"""Backup files of the cluster state: a state machine snapshot with a header and a checksum.

Layout (big-endian):

    magic        8 bytes   b"LEPTONBK"
    version      u16       FORMAT_VERSION
    reserved     u16       0
    index        u64       last log index the snapshot covers
    term         u64       term of that entry
    created_ms   u64       wall clock when written
    cluster_len  u16       length of the cluster id
    payload_len  u64
    cluster_id   cluster_len bytes, UTF-8
    payload      payload_len bytes (ClusterStateMachine.snapshot(), opaque here)
    sha256       32 bytes over everything above

A file is written to a temporary name in the same folder, fsync'd, and then linked into
place (so a crash leaves either no backup or a whole one), then the folder is fsync'd.
`load` checks everything before returning anything: a truncated, corrupt, foreign or
too-new file is refused with a message that says which.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from lepton.common.durable import write_atomic
from lepton.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

logger = logging.getLogger(__name__)

MAGIC = b"LEPTONBK"
FORMAT_VERSION = 1
_HEAD = struct.Struct("!8sHHQQQHQ")
_DIGEST = 32
MAX_CLUSTER_ID = 255
_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Backup:
    payload: bytes
    index: int
    term: int
    cluster_id: str
    created_ms: int
    version: int = FORMAT_VERSION


def _check_cluster_id(cluster_id: str) -> bytes:
    raw = cluster_id.encode() if isinstance(cluster_id, str) else b""
    if not raw or len(raw) > MAX_CLUSTER_ID:
        raise InvalidArgument(f"cluster id must be 1-{MAX_CLUSTER_ID} bytes of UTF-8")
    return raw


def encode(payload: bytes, index: int, term: int, cluster_id: str, created_ms: int) -> bytes:
    """The file's bytes. Raises InvalidArgument for out-of-range values."""
    cid = _check_cluster_id(cluster_id)
    for name, value in (("index", index), ("term", term), ("created_ms", created_ms)):
        if not isinstance(value, int) or not 0 <= value <= _U64:
            raise InvalidArgument(f"{name} {value!r} is not an unsigned 64-bit integer")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise InvalidArgument("the snapshot payload must be bytes")
    payload = bytes(payload)
    body = _HEAD.pack(MAGIC, FORMAT_VERSION, 0, index, term, created_ms, len(cid), len(payload)) + cid + payload
    return body + hashlib.sha256(body).digest()


def save(state_machine_snapshot_bytes: bytes, index: int, term: int, cluster_id: str,
         path: str | os.PathLike[str], *, created_ms: int | None = None,
         overwrite: bool = False) -> Path:
    """Write a backup to `path` atomically (0600: it holds the whole cluster state).

    Raises InvalidArgument (bad values), AlreadyExists (`path` exists and not `overwrite`),
    OSError (disk full, no permission: nothing is left behind but the old file, if any).
    """
    p = Path(path)
    created_ms = int(time.time() * 1000) if created_ms is None else created_ms
    data = encode(state_machine_snapshot_bytes, index, term, cluster_id, created_ms)
    exists = AlreadyExists(f"{p} already exists; choose another name or overwrite")
    if not overwrite and p.exists():
        raise exists  # before writing it all out
    try:
        write_atomic(p, data, exclusive=not overwrite)  # exclusive: never clobbers one made meanwhile
    except FileExistsError:
        raise exists from None
    logger.info("wrote backup %s: cluster %s, index %d, term %d, %d bytes", p, cluster_id, index, term, len(data))
    return p


def decode(data: bytes, expected_cluster_id: str | None = None, *, source: str = "backup") -> Backup:
    """Verify and parse a backup's bytes. Raises InvalidArgument (not a backup, truncated,
    checksum mismatch) or FailedPrecondition (newer format, another cluster's)."""
    if len(data) < _HEAD.size + _DIGEST or data[:8] != MAGIC:
        raise InvalidArgument(f"{source} is not a Lepton backup (bad magic or too short)")
    magic, version, _reserved, index, term, created_ms, cid_len, payload_len = _HEAD.unpack_from(data)
    if version > FORMAT_VERSION:
        raise FailedPrecondition(
            f"{source} has format version {version}; this Lepton reads up to {FORMAT_VERSION}: upgrade first"
        )
    if version < 1:
        raise InvalidArgument(f"{source} has an invalid format version {version}")
    expected = _HEAD.size + cid_len + payload_len + _DIGEST
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise InvalidArgument(f"{source} is {what}: {len(data)} bytes, header says {expected}")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise InvalidArgument(f"{source} is corrupt: SHA-256 checksum mismatch")
    start = _HEAD.size
    try:
        cluster_id = body[start:start + cid_len].decode()
    except UnicodeDecodeError:
        raise InvalidArgument(f"{source} has an invalid cluster id") from None
    if expected_cluster_id is not None and cluster_id != expected_cluster_id:
        raise FailedPrecondition(
            f"{source} belongs to cluster {cluster_id!r}, not {expected_cluster_id!r}; refusing to restore it here"
        )
    payload = body[start + cid_len:]
    return Backup(payload, index, term, cluster_id, created_ms, version)


def load(path: str | os.PathLike[str], expected_cluster_id: str | None = None) -> Backup:
    """Read and verify a backup file. Raises NotFound (no such file), InvalidArgument (not a
    backup, truncated, corrupt), FailedPrecondition (another cluster's, a newer format)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(_HEAD.size)
            if len(head) == _HEAD.size and head[:8] == MAGIC:
                _m, version, _r, _i, _t, _c, cid_len, payload_len = _HEAD.unpack(head)
                # Check the declared size against the file before reading it all: a garbage
                # header must not make us read (or allocate) an arbitrary amount.
                expected = _HEAD.size + cid_len + payload_len + _DIGEST
                size = os.fstat(f.fileno()).st_size
                if 1 <= version <= FORMAT_VERSION and size != expected:
                    what = "truncated" if size < expected else "has trailing bytes"
                    raise InvalidArgument(f"{p} is {what}: {size} bytes, header says {expected}")
            data = head + f.read()
    except FileNotFoundError:
        raise NotFound(f"backup {p} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{p} is a directory, not a backup") from None
    return decode(data, expected_cluster_id, source=str(p))
