"""The shard store: content-addressed blobs in the agent's data dir.

A shard's id is the hash of its bytes: `b3-<hex>` (BLAKE3) for new shards, plain `<hex>`
(SHA-256) for older ones (`dataplane/shard_hash.py`). Layout under `<data_dir>/shards`:

    blobs/ab/<id>.npy    the blob (visible only once complete and verified); ab: the first
                         two hex digits of the digest
    blobs/ab/<id>.enc    the blob sealed instead, when the store has a cipher (encryption
                         at rest: chunked AES-256-GCM, see `dataplane/shard_crypto.py`)
    blobs/ab/<id>.sums   running-hash checkpoints: hash of the plaintext [0, k*CHUNK) for
                         each k, then of the whole blob; 32 bytes each (`checkpoint_offsets`)
    key-id               the id of the key the store seals with (present once it had one)
    tmp/                 writes in progress; emptied at open (a crash leaves partials here)

A write goes to `tmp/`, is hashed as it arrives (and sealed chunk by chunk), fsync'd, then
renamed into `blobs/`: a partial or corrupt shard is never visible. The checkpoints let a
reader verify a stream chunk by chunk and resume from the last good checkpoint, at no extra
hashing cost. Sizes, offsets and checkpoints are always of the plaintext: the shard id is
the hash of the plaintext with encryption on or off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lepton.common.durable import fsync_dir as _fsync_dir
from lepton.common.durable import write_atomic
from lepton.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from lepton.dataplane import shard_crypto as sc
from lepton.dataplane.shard_hash import (
    DIGEST,
    ContentHash,
    check_shard_id,
    digest_hex,
    hash_for,
    is_shard_id,
)
from lepton.dataplane.shard_writer import (
    CHUNK,
    ShardCorrupt,
    ShardWriter,
    checkpoint_offsets,
    write_all,
)

logger = logging.getLogger(__name__)

KEY_ID_FILE = "key-id"


class ShardStore:
    """Blobs on disk with a byte quota. Thread-safe: transfers run in threads.

    `quota_bytes`: None = only the disk limits; a write that would pass it, or leave under
    `reserve_bytes` free on the disk (the Raft log's and task output's room; `free_bytes`
    measures), is refused with ResourceExhausted before a byte is written. Ages (the orphan
    grace) run on the monotonic `clock`, from when this process stored, touched or found
    each blob: a wall-clock jump changes nothing; a restart only delays sweeping.
    `cipher`: seal new blobs (encryption at rest); a store once used with a key refuses to
    open without it or with another one (FailedPrecondition), rather than finding every blob
    "corrupt". `clean_tmp=False` for a second process opening a live agent's store (a torch
    task): leave its writes alone.
    """

    def __init__(self, root: Path | str, quota_bytes: int | None = None,
                 cipher: sc.ShardCipher | None = None, *, clean_tmp: bool = True, reserve_bytes: int = 0,
                 free_bytes: Callable[[], int] | None = None, clock: Callable[[], float] = time.monotonic):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.quota_bytes = quota_bytes
        self.reserve_bytes = reserve_bytes
        self._free_bytes = free_bytes or (lambda: shutil.disk_usage(self.root).free)
        self._clock = clock
        self.cipher = cipher
        self._lock = threading.Lock()
        self._reserved = 0
        # Told (from any thread) when a corrupt blob is removed: the agent reports it.
        self.on_quarantine: Callable[[str], None] | None = None
        self.blobs.mkdir(parents=True, exist_ok=True)
        if clean_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)  # partial writes of a crashed process
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._sizes: dict[str, int] = {}
        self._sealed: set[str] = set()
        for path in self.blobs.glob("*/*.npy"):
            if is_shard_id(path.stem):
                self._sizes[path.stem] = path.stat().st_size
        for path in self.blobs.glob(f"*/*{sc.SUFFIX}"):
            if is_shard_id(path.stem):
                self._sizes[path.stem] = sc.plain_size(path.stat().st_size, CHUNK)
                self._sealed.add(path.stem)
        # Found at open: as if stored now (file times follow the wall clock; see the class).
        opened = clock()
        self._touched: dict[str, float] = dict.fromkeys(self._sizes, opened)
        self._check_key()

    def _check_key(self) -> None:
        marker = self.root / KEY_ID_FILE
        try:
            stored = marker.read_text().strip() or None
        except FileNotFoundError:
            stored = None
        if stored is None and self._sealed:  # the marker was lost: the blobs' headers tell
            ids = (sc.header_key_id(self._blob_path(s, True)) for s in self._sealed)
            stored = next((k for k in ids if k), None)
        if self.cipher is None:
            if stored is not None or self._sealed:
                raise FailedPrecondition(
                    f"shard store {self.root} is encrypted (key id {stored or 'unknown'}, {len(self._sealed)} "
                    "sealed shards): give the cluster secret with --shard-key-file (LEPTON_SHARD_KEY_FILE)")
            return
        if stored is not None and stored != self.cipher.key_id:
            raise FailedPrecondition(
                f"shard store {self.root} was encrypted with key id {stored}, but the shard key file "
                f"has key id {self.cipher.key_id}: give the secret the store was written with "
                "(keys cannot be rotated)")
        if not marker.exists():
            write_atomic(marker, (self.cipher.key_id + "\n").encode())
        if len(self._sealed) < len(self._sizes):
            logger.warning("shard store %s: %d shards written before encryption was on stay unencrypted",
                           self.root, len(self._sizes) - len(self._sealed))

    # -- reads ------------------------------------------------------------------------
    def path(self, shard_id: str) -> Path:
        """The blob's file: `.enc` when it is sealed (not a .npy then: see `plain_path`)."""
        check_shard_id(shard_id)
        with self._lock:
            sealed = shard_id in self._sealed
        return self._blob_path(shard_id, sealed)

    def _blob_path(self, shard_id: str, sealed: bool) -> Path:
        return self.blobs / digest_hex(shard_id)[:2] / f"{shard_id}{sc.SUFFIX if sealed else '.npy'}"

    def has(self, shard_id: str) -> bool:
        with self._lock:
            return shard_id in self._sizes

    def encrypted(self, shard_id: str) -> bool:
        """Whether the stored blob is sealed (reads must decrypt it)."""
        with self._lock:
            return shard_id in self._sealed

    def size(self, shard_id: str) -> int:
        """The plaintext size. Raises NotFound."""
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
        sums = self._blob_path(shard_id, False).with_suffix(".sums")
        try:
            raw = sums.read_bytes()
        except OSError:
            raw = b""
        if len(raw) == want * DIGEST:
            return [raw[i : i + DIGEST] for i in range(0, len(raw), DIGEST)]
        logger.warning("shard %s: checkpoint file missing or bad; recomputing", shard_id[:12])
        digests = self._hash_checkpoints(shard_id, size)
        write_atomic(sums, b"".join(digests))
        return digests

    def read_chunks(self, shard_id: str, offset: int = 0, *,
                    reuse: bool = False) -> Iterator[tuple[int, bytes, bytes]]:
        """(offset, plaintext, checkpoint digest) frames from `offset` (a multiple of CHUNK),
        each verified before it is yielded: against the stored checkpoint, or for a sealed
        blob by AES-GCM (which binds it to this shard, position and size). `reuse`: a sealed
        blob's frames are views of two buffers reused for every frame (no allocation per
        chunk), each valid only until the next one is asked for.

        Raises NotFound, InvalidArgument (bad offset) and ShardCorrupt; a corrupt shard is
        removed from the store first."""
        size = self.size(shard_id)
        _check_offset(offset, size)
        digests = self.checkpoints(shard_id)
        if self.encrypted(shard_id):
            with self._opened(shard_id, size) as (f, opener):
                first = -(-offset // CHUNK)  # the chunks that start at or after offset
                f.seek(opener.file_offset(first))
                bufs = (bytearray(CHUNK + sc.TAG), bytearray(CHUNK)) if reuse else None
                for i in range(first, opener.count):
                    data = self._open_chunk(shard_id, f, opener, i, bufs)
                    yield opener.span(i)[0], data, digests[i]
            return
        h = hash_for(shard_id)
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
        """Re-hash the blob (decrypting a sealed one); a corrupt one is removed, a wrong
        checkpoint file rewritten. False when corrupt or absent."""
        try:
            size = self.size(shard_id)
            digests = self._hash_checkpoints(shard_id, size)
        except NotFound:
            return False
        except ShardCorrupt:
            return False  # already quarantined
        if digests[-1].hex() != digest_hex(shard_id):
            self.quarantine(shard_id, "hash mismatch")
            return False
        sums = self._blob_path(shard_id, False).with_suffix(".sums")
        try:
            good = sums.read_bytes() == b"".join(digests)
        except OSError:
            good = False
        if not good:  # else every transfer from here would fail at the bad checkpoint
            logger.warning("shard %s: checkpoint file was wrong; rewritten", shard_id[:12])
            write_atomic(sums, b"".join(digests))
        return True

    def load(self, shard_id: str, *, verify: bool = True):
        """The shard as a read-only numpy array, its hash checked first: memory-mapped, or
        for a sealed blob decrypted (and authenticated) into memory; plaintext never
        touches the disk. Raises NotFound, ShardCorrupt."""
        import numpy as np

        if self.encrypted(shard_id):
            from lepton.dataplane.shard_format import array_from_buffer

            return array_from_buffer(self._decrypt_all(shard_id), f"shard {shard_id[:12]}")
        if verify and not self.verify(shard_id):
            raise ShardCorrupt(f"shard {shard_id[:12]} is corrupt or missing on this node")
        return np.load(self.path(shard_id), mmap_mode="r", allow_pickle=False)

    def plain_path(self, shard_id: str, scratch: Path) -> Path:
        """A plaintext .npy file of the shard, for readers that need a path (torch workers):
        the blob itself when it is not sealed, else a decrypted private copy (mode 0600) in
        `scratch`, which the caller removes. Raises NotFound, ShardCorrupt."""
        size = self.size(shard_id)
        if not self.encrypted(shard_id):
            return self.path(shard_id)
        dest = Path(scratch) / f"{shard_id}.npy"
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with self._opened(shard_id, size) as (f, opener):
                for i in range(opener.count):
                    write_all(fd, memoryview(self._open_chunk(shard_id, f, opener, i)))
        except BaseException:
            os.close(fd)
            dest.unlink(missing_ok=True)
            raise
        os.close(fd)
        return dest

    # -- sealed blobs -----------------------------------------------------------------
    def sealed_header(self, shard_id: str) -> bytes | None:
        """A sealed blob's header when it is whole and sealed with this store's key (so
        its chunks may be sent as they lie, to a peer with the same key), else None: read
        it through `read_chunks`, which authenticates and quarantines."""
        try:
            size = self.size(shard_id)
            if not self.encrypted(shard_id) or self.cipher is None:
                return None
            with open(self.path(shard_id), "rb") as f:
                if os.fstat(f.fileno()).st_size != sc.sealed_size(size, CHUNK):
                    return None
                header = f.read(sc.HEADER.size)
            self.cipher.opener(shard_id, size, CHUNK, header)  # ours, for this blob and size
            return header
        except (OSError, NotFound, sc.SealError):
            return None

    @contextlib.contextmanager
    def _opened(self, shard_id: str, size: int):
        """(file, opener) of a sealed blob, its length and header checked. Raises
        ShardCorrupt (quarantined first), NotFound."""
        try:
            f = open(self.path(shard_id), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise NotFound(f"shard {shard_id[:12]} is not on this node") from None
        with f:
            try:
                if self.cipher is None:
                    raise sc.SealError("it is sealed and this node has no shard key")
                length = os.fstat(f.fileno()).st_size
                if length != sc.sealed_size(size, CHUNK):
                    raise sc.SealError(f"the file has {length} bytes, not {sc.sealed_size(size, CHUNK)}")
                opener = self.cipher.opener(shard_id, size, CHUNK, f.read(sc.HEADER.size))
            except sc.SealError as err:
                self._corrupt(shard_id, str(err))
            yield f, opener

    def _open_chunk(self, shard_id: str, f, opener: sc.Opener, index: int, bufs=None):
        """Chunk `index`'s plaintext: new bytes, or with `bufs` (sealed, plain buffers) a
        view of the plain one. Raises ShardCorrupt (quarantined first)."""
        n = opener.sealed_length(index)
        try:
            if bufs is None:
                return opener.open(index, f.read(n))
            sealed = memoryview(bufs[0])[:n]
            got = f.readinto(sealed)
            out = memoryview(bufs[1])[: n - sc.TAG]
            opener.open_into(index, sealed[:got], out)  # raises before anything is returned
            return out
        except sc.SealError as err:
            self._corrupt(shard_id, str(err))

    def _corrupt(self, shard_id: str, why: str):
        self.quarantine(shard_id, why)
        raise ShardCorrupt(f"shard {shard_id[:12]} is corrupt on this node ({why})")

    def _decrypt_all(self, shard_id: str) -> bytearray:
        size = self.size(shard_id)
        out = bytearray(size)
        view = memoryview(out)
        with self._opened(shard_id, size) as (f, opener):
            for i in range(opener.count):
                start, end = opener.span(i)
                try:
                    opener.open_into(i, f.read(end - start + sc.TAG), view[start:end])
                except sc.SealError as err:  # `out` is dropped: no unauthenticated byte escapes
                    self._corrupt(shard_id, str(err))
        return out

    def _hash_checkpoints(self, shard_id: str, size: int) -> list[bytes]:
        if not self.encrypted(shard_id):
            return _hash_checkpoints(self.path(shard_id), size, hash_for(shard_id))
        h, out = hash_for(shard_id), []
        with self._opened(shard_id, size) as (f, opener):
            for i in range(opener.count):
                h.update(self._open_chunk(shard_id, f, opener, i))
                out.append(h.digest())
        return out

    # -- writes -----------------------------------------------------------------------
    def writer(self, shard_id: str, size: int) -> ShardWriter:
        """A writer for a new blob of exactly `size` bytes. Raises InvalidArgument,
        AlreadyExists (already stored; nothing to do) and ResourceExhausted (quota)."""
        check_shard_id(shard_id)
        if size < 0 or size > 1 << 44:
            raise InvalidArgument(f"shard size {size} is out of range")
        with self._lock:
            if shard_id in self._sizes:
                # Touched under the lock: the orphan sweep (`sweep`) spares it for a grace.
                self._touched[shard_id] = self._clock()
                raise AlreadyExists(f"shard {shard_id[:12]} is already stored")
            used = sum(self._sizes.values()) + self._reserved
            if self.quota_bytes is not None and used + size > self.quota_bytes:
                raise ResourceExhausted(
                    f"shard store full: {used} of {self.quota_bytes} bytes used, {size} more needed"
                )
            if self.reserve_bytes:
                # Writes in progress have not taken their space yet: count them as taken.
                free = self._free_bytes() - self._reserved
                if free - size < self.reserve_bytes:
                    raise ResourceExhausted(
                        f"shard store {self.root}: {size} more bytes would leave {max(0, free - size)} free on "
                        f"its disk, under the {self.reserve_bytes} kept for the Raft log and task output "
                        "(--shard-reserve)")
            self._reserved += size
        try:
            return ShardWriter(self, shard_id, size)
        except BaseException:
            self._release(size)
            raise

    def _release(self, size: int) -> None:
        with self._lock:
            self._reserved -= size

    def _publish(self, writer: ShardWriter, digests: list[bytes]) -> None:
        sealed = writer.sealed
        final = self._blob_path(writer.shard_id, sealed)
        final.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self._blob_path(writer.shard_id, False).with_suffix(".sums"), b"".join(digests))
        os.replace(writer.tmp_path, final)  # the commit point: the blob is now visible
        _fsync_dir(final.parent)
        with self._lock:
            self._reserved -= writer.size
            self._sizes[writer.shard_id] = writer.size
            self._touched[writer.shard_id] = self._clock()
            if sealed:
                self._sealed.add(writer.shard_id)

    def age_s(self, shard_id: str) -> float | None:
        """Seconds (on the store's monotonic clock) since the blob was stored or touched,
        or found at open; None: absent."""
        with self._lock:
            touched = self._touched.get(shard_id) if shard_id in self._sizes else None
            return None if touched is None else self._clock() - touched

    def sweep(self, shard_id: str, min_age_s: float) -> bool:
        """Delete the blob only if it was stored or touched (or found at open) at least
        `min_age_s` ago. Atomic with `writer()`, which touches a blob it finds stored."""
        with self._lock:
            if shard_id not in self._sizes:
                return False
            if self._clock() - self._touched.get(shard_id, self._clock()) < min_age_s:
                return False
            self._sizes.pop(shard_id)
            self._sealed.discard(shard_id)
            self._touched.pop(shard_id, None)
        self._unlink(shard_id)
        return True

    def delete(self, shard_id: str) -> bool:
        with self._lock:
            present = self._sizes.pop(check_shard_id(shard_id), None) is not None
            self._sealed.discard(shard_id)
            self._touched.pop(shard_id, None)
        self._unlink(shard_id)
        return present

    def _unlink(self, shard_id: str) -> None:
        plain = self._blob_path(shard_id, False)
        for p in (plain, self._blob_path(shard_id, True), plain.with_suffix(".sums")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def quarantine(self, shard_id: str, why: str) -> None:
        logger.error("shard %s is corrupt (%s): removed from the store", shard_id[:12], why)
        if self.delete(shard_id) and self.on_quarantine is not None:
            self.on_quarantine(shard_id)


# -- helpers ---------------------------------------------------------------------------


def _check_offset(offset: int, size: int) -> None:
    if offset < 0 or offset > size or (offset % CHUNK and offset != size):
        raise InvalidArgument(f"offset {offset} is not a multiple of {CHUNK} within {size}")


def _hash_prefix(f, h: ContentHash, length: int) -> None:
    left = length
    while left:
        data = f.read(min(CHUNK, left))
        if not data:
            break
        h.update(data)
        left -= len(data)


def _hash_checkpoints(path: Path, size: int, h: ContentHash) -> list[bytes]:
    out = []
    with open(path, "rb") as f:
        pos = 0
        for end in checkpoint_offsets(size):
            data = f.read(end - pos)
            h.update(data)
            pos = end
            out.append(h.digest())
    return out


__all__ = ["CHUNK", "KEY_ID_FILE", "ShardCorrupt", "ShardStore", "ShardWriter", "check_shard_id",
           "checkpoint_offsets"]
