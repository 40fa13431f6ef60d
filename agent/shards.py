"""The shard store: content-addressed blobs in the agent's data dir.

A shard's id is the SHA-256 hex of its bytes. Layout under `<data_dir>/shards`:

    blobs/ab/<id>.npy    the blob (visible only once complete and verified)
    blobs/ab/<id>.sums   running-hash checkpoints: SHA-256 of bytes [0, k*CHUNK) for each
                         k, then of the whole blob; 32 bytes each (see `checkpoint_offsets`)
    tmp/                 writes in progress; emptied at open (a crash leaves partials here)

A write goes to `tmp/`, is hashed as it arrives, fsync'd, then renamed into `blobs/`:
a partial or corrupt shard is never visible. The checkpoints let a reader verify a stream
chunk by chunk and resume from the last good checkpoint, at no extra hashing cost.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from lepton.common.durable import fsync_dir as _fsync_dir
from lepton.common.errors import (
    AlreadyExists,
    InvalidArgument,
    LeptonError,
    NotFound,
    ResourceExhausted,
)

logger = logging.getLogger(__name__)

# Checkpoint spacing, and the unit of every transfer frame.
CHUNK = 4 << 20
DIGEST = 32
_ID_RE = re.compile(r"^[0-9a-f]{64}$")


class ShardCorrupt(LeptonError):
    """The bytes do not hash to the shard's id (on disk or in transit)."""

    code = grpc.StatusCode.DATA_LOSS


def check_shard_id(value: str) -> str:
    """A shard id is 64 lowercase hex digits (which also keeps it out of path tricks).
    Raises InvalidArgument."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidArgument(f"shard id {str(value)[:70]!r} is not a SHA-256 hex digest")
    return value


def checkpoint_offsets(size: int) -> list[int]:
    """Where checkpoints fall: every CHUNK, and the end (once, also for an empty blob)."""
    offsets = list(range(CHUNK, size, CHUNK))
    offsets.append(size)
    return offsets


class ShardStore:
    """Blobs on disk with a byte quota. Thread-safe: transfers run in threads.

    `quota_bytes`: None = only the disk limits; a write that would pass it is refused with
    ResourceExhausted before a byte is written.
    """

    def __init__(self, root: Path | str, quota_bytes: int | None = None):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.quota_bytes = quota_bytes
        self._lock = threading.Lock()
        self._reserved = 0
        # Told (from any thread) when a corrupt blob is removed: the agent reports it.
        self.on_quarantine: Callable[[str], None] | None = None
        self.blobs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)  # partial writes of a crashed process
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._sizes: dict[str, int] = {}
        for path in self.blobs.glob("*/*.npy"):
            if _ID_RE.match(path.stem):
                self._sizes[path.stem] = path.stat().st_size

    # -- reads ------------------------------------------------------------------------
    def path(self, shard_id: str) -> Path:
        check_shard_id(shard_id)
        return self.blobs / shard_id[:2] / f"{shard_id}.npy"

    def has(self, shard_id: str) -> bool:
        with self._lock:
            return shard_id in self._sizes

    def size(self, shard_id: str) -> int:
        """Raises NotFound."""
        with self._lock:
            size = self._sizes.get(check_shard_id(shard_id))
        if size is None:
            raise NotFound(f"shard {shard_id[:12]} is not on this node")
        return size

    def list(self) -> dict[str, int]:
        with self._lock:
            return dict(self._sizes)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def checkpoints(self, shard_id: str) -> list[bytes]:
        """The shard's checkpoint digests (recomputed from the blob if the file is bad)."""
        size = self.size(shard_id)
        want = len(checkpoint_offsets(size))
        sums = self.path(shard_id).with_suffix(".sums")
        try:
            raw = sums.read_bytes()
        except OSError:
            raw = b""
        if len(raw) == want * DIGEST:
            return [raw[i : i + DIGEST] for i in range(0, len(raw), DIGEST)]
        logger.warning("shard %s: checkpoint file missing or bad; recomputing", shard_id[:12])
        digests = _hash_checkpoints(self.path(shard_id), size)
        _write_atomic(sums, b"".join(digests))
        return digests

    def read_chunks(self, shard_id: str, offset: int = 0) -> Iterator[tuple[int, bytes, bytes]]:
        """(offset, data, checkpoint digest) frames from `offset` (a multiple of CHUNK),
        each verified against the stored checkpoint before it is yielded.

        Raises NotFound, InvalidArgument (bad offset) and ShardCorrupt; a corrupt shard is
        removed from the store first."""
        size = self.size(shard_id)
        _check_offset(offset, size)
        digests = self.checkpoints(shard_id)
        h = hashlib.sha256()
        with open(self.path(shard_id), "rb") as f:
            if offset:
                _hash_prefix(f, h, offset)  # the running hash needs the bytes before
            ends = checkpoint_offsets(size)
            for i, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
                if start < offset:
                    continue
                data = f.read(end - start)
                h.update(data)
                if len(data) != end - start or h.digest() != digests[i]:
                    self.quarantine(shard_id, f"checkpoint at {end} does not match")
                    raise ShardCorrupt(f"shard {shard_id[:12]} is corrupt on this node (at byte {start})")
                yield start, data, digests[i]

    def verify(self, shard_id: str) -> bool:
        """Re-hash the blob; a corrupt one is removed. False when corrupt or absent."""
        try:
            size = self.size(shard_id)
        except NotFound:
            return False
        digest = _hash_checkpoints(self.path(shard_id), size)[-1]
        if digest.hex() != shard_id:
            self.quarantine(shard_id, "hash mismatch")
            return False
        return True

    def load(self, shard_id: str, *, verify: bool = True):
        """The shard as a read-only memory-mapped numpy array, its hash checked first.
        Raises NotFound, ShardCorrupt."""
        import numpy as np

        if verify and not self.verify(shard_id):
            raise ShardCorrupt(f"shard {shard_id[:12]} is corrupt or missing on this node")
        return np.load(self.path(shard_id), mmap_mode="r", allow_pickle=False)

    # -- writes -----------------------------------------------------------------------
    def writer(self, shard_id: str, size: int) -> ShardWriter:
        """A writer for a new blob of exactly `size` bytes. Raises InvalidArgument,
        AlreadyExists (already stored; nothing to do) and ResourceExhausted (quota)."""
        check_shard_id(shard_id)
        if size < 0 or size > 1 << 44:
            raise InvalidArgument(f"shard size {size} is out of range")
        with self._lock:
            if shard_id in self._sizes:
                raise AlreadyExists(f"shard {shard_id[:12]} is already stored")
            used = sum(self._sizes.values()) + self._reserved
            if self.quota_bytes is not None and used + size > self.quota_bytes:
                raise ResourceExhausted(
                    f"shard store full: {used} of {self.quota_bytes} bytes used, {size} more needed"
                )
            self._reserved += size
        return ShardWriter(self, shard_id, size)

    def _release(self, size: int) -> None:
        with self._lock:
            self._reserved -= size

    def _publish(self, writer: ShardWriter, digests: list[bytes]) -> None:
        final = self.path(writer.shard_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(final.with_suffix(".sums"), b"".join(digests))
        os.replace(writer.tmp_path, final)  # the commit point: the blob is now visible
        _fsync_dir(final.parent)
        with self._lock:
            self._reserved -= writer.size
            self._sizes[writer.shard_id] = writer.size

    def delete(self, shard_id: str) -> bool:
        with self._lock:
            present = self._sizes.pop(check_shard_id(shard_id), None) is not None
        path = self.path(shard_id)
        for p in (path, path.with_suffix(".sums")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        return present

    def quarantine(self, shard_id: str, why: str) -> None:
        logger.error("shard %s is corrupt (%s): removed from the store", shard_id[:12], why)
        if self.delete(shard_id) and self.on_quarantine is not None:
            self.on_quarantine(shard_id)


class ShardWriter:
    """One blob being written: append in order, then `commit()` or `abort()`.

    Hashes as it goes and records the checkpoints. For transfers: `digest()` is the
    running hash, `mark_verified()` remembers the current point and `rollback()` returns
    to it (the file truncated), so a stream broken or corrupted mid-way resumes there.
    Use as a context manager: leaving it without `commit()` aborts.
    """

    def __init__(self, store: ShardStore, shard_id: str, size: int):
        self.store = store
        self.shard_id = shard_id
        self.size = size
        self.offset = 0
        self.tmp_path = store.tmp / f"{shard_id}.{secrets.token_hex(4)}.part"
        self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._h = hashlib.sha256()
        self._digests: list[bytes] = []
        self._next = checkpoint_offsets(size)
        self._verified = (0, self._h.copy(), 0)
        self._done = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()

    def write(self, data) -> None:
        """Append; raises InvalidArgument past the declared size, ResourceExhausted on ENOSPC."""
        view = memoryview(data)
        if self.offset + len(view) > self.size:
            raise InvalidArgument(f"more bytes than the declared {self.size}")
        while len(view):
            # Split at checkpoint boundaries so each one is recorded exactly.
            boundary = self._next[len(self._digests)]
            part = view[: boundary - self.offset]
            _write_all(self._fd, part)
            self._h.update(part)
            self.offset += len(part)
            view = view[len(part):]
            if self.offset == boundary and boundary != self.size:
                self._digests.append(self._h.digest())

    def digest(self) -> bytes:
        return self._h.digest()

    def mark_verified(self) -> None:
        self._verified = (self.offset, self._h.copy(), len(self._digests))

    def rollback(self) -> int:
        """Back to the last verified point; returns its offset."""
        offset, h, n = self._verified
        os.ftruncate(self._fd, offset)
        os.lseek(self._fd, offset, os.SEEK_SET)
        self.offset, self._h, self._digests = offset, h.copy(), self._digests[:n]
        return offset

    def commit(self) -> None:
        """fsync, check the whole hash, rename into place. Raises InvalidArgument
        (truncated) and ShardCorrupt; either way nothing is stored."""
        try:
            if self.offset != self.size:
                raise InvalidArgument(f"truncated: {self.offset} of {self.size} bytes")
            if self._h.hexdigest() != self.shard_id:
                raise ShardCorrupt(f"bytes do not hash to shard {self.shard_id[:12]}")
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._digests.append(self._h.digest())
            if self.store.has(self.shard_id):  # another writer finished first: same bytes
                self.abort()
                return
            self.store._publish(self, self._digests)
            self._done = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass
        self.store._release(self.size)


# -- helpers ---------------------------------------------------------------------------


def _check_offset(offset: int, size: int) -> None:
    if offset < 0 or offset > size or (offset % CHUNK and offset != size):
        raise InvalidArgument(f"offset {offset} is not a multiple of {CHUNK} within {size}")


def _write_all(fd: int, data: memoryview) -> None:
    try:
        while len(data):
            n = os.write(fd, data)
            data = data[n:]
    except OSError as err:
        if err.errno in (28, 122):  # ENOSPC, EDQUOT
            raise ResourceExhausted(f"no space left for the shard: {err.strerror}") from None
        raise


def _hash_prefix(f, h, length: int) -> None:
    left = length
    while left:
        data = f.read(min(CHUNK, left))
        if not data:
            break
        h.update(data)
        left -= len(data)


def _hash_checkpoints(path: Path, size: int) -> list[bytes]:
    h = hashlib.sha256()
    out = []
    with open(path, "rb") as f:
        pos = 0
        for end in checkpoint_offsets(size):
            data = f.read(end - pos)
            h.update(data)
            pos = end
            out.append(h.digest())
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
