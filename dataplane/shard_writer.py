"""Writing one blob into the shard store: `ShardWriter`, and the chunk grid it shares with
reads and transfers (`CHUNK`, `checkpoint_offsets`). The store (`dataplane/shards.py`)
makes writers and publishes what they commit; layout and ids: its docstring.
"""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING

import grpc

from lepton.common.errors import InvalidArgument, LeptonError, ResourceExhausted
from lepton.dataplane import shard_crypto as sc
from lepton.dataplane.shard_hash import hash_for

if TYPE_CHECKING:
    from lepton.dataplane.shards import ShardStore

# Checkpoint spacing, the unit of every transfer frame, and the sealed chunk size.
CHUNK = 4 << 20


class ShardCorrupt(LeptonError):
    """The bytes do not hash to the shard's id, or a sealed chunk fails authentication
    (on disk or in transit)."""

    code = grpc.StatusCode.DATA_LOSS


def checkpoint_offsets(size: int) -> list[int]:
    """Where checkpoints fall: every CHUNK, and the end (once, also for an empty blob)."""
    offsets = list(range(CHUNK, size, CHUNK))
    offsets.append(size)
    return offsets


class ShardWriter:
    """One blob being written: append in order, then `commit()` or `abort()`.

    Hashes as it goes and records the checkpoints; with a cipher, seals each CHUNK as it
    fills (the plaintext of a partial chunk waits in memory, never on disk). For transfers:
    `digest()` is the running hash, `mark_verified()` remembers the current point and
    `rollback()` returns to it (the file truncated), so a stream broken or corrupted
    mid-way resumes there. Use as a context manager: leaving it without `commit()` aborts.

    Sealed copies (`start_over(header)`, then `write_sealed`): a puller whose store has the
    same key as the holder keeps the holder's sealed chunks as they came (its header,
    salt and nonces: no new encryption, so no nonce is ever used for other bytes), after
    authenticating and decrypting each one to hash its plaintext like any write.
    """

    def __init__(self, store: ShardStore, shard_id: str, size: int):
        self.store = store
        self.shard_id = shard_id
        self.size = size
        self.tmp_path = store.tmp / f"{shard_id}.{secrets.token_hex(4)}.part"
        self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._next = checkpoint_offsets(size)
        self._done = False
        self.received = 0  # plaintext bytes appended over the writer's life (rollbacks too)
        self._out: bytearray | None = None  # sealing's output buffer, made on first use
        try:
            self.start_over(None)
        except BaseException:
            os.close(self._fd)
            self.tmp_path.unlink(missing_ok=True)
            raise

    def start_over(self, header: bytes | None) -> None:
        """Empty the blob and begin again: with `header` (a holder's, of this store's key)
        as a sealed copy, else sealing afresh (with a cipher) or in plaintext. Raises
        ShardCorrupt when `header` is not one of this key's for this blob."""
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self.offset = 0
        self._file_len = 0
        self._h = hash_for(self.shard_id)
        self._digests: list[bytes] = []
        self._pending = bytearray()  # a sealed blob's unfinished chunk
        self._chunks = 0  # chunks sealed (or copied) so far
        self._sealer: sc.Sealer | None = None
        self._opener: sc.Opener | None = None  # set for a sealed copy
        cipher = self.store.cipher
        if header is not None:
            if cipher is None:
                raise InvalidArgument("this store has no shard key for a sealed copy")
            try:
                self._opener = cipher.opener(self.shard_id, self.size, CHUNK, header)
            except sc.SealError as err:
                raise ShardCorrupt(f"sealed header of shard {self.shard_id[:12]}: {err}") from None
            self._append(memoryview(header))
        elif cipher is not None:
            self._sealer = cipher.sealer(self.shard_id, self.size, CHUNK)
            self._append(memoryview(self._sealer.header))
        self._verified = self._mark()

    @property
    def sealed(self) -> bool:
        return self._sealer is not None or self._opener is not None

    @property
    def copied_header(self) -> bytes | None:
        """The holder's header this blob copies, or None (sealed here, or plaintext)."""
        return self._opener.header if self._opener is not None else None

    @property
    def done(self) -> bool:
        """Committed or aborted."""
        return self._done

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()

    def write(self, data) -> None:
        """Append; raises InvalidArgument past the declared size, ResourceExhausted on ENOSPC."""
        if self._opener is not None:
            raise InvalidArgument("a sealed copy takes sealed chunks (write_sealed)")
        view = memoryview(data).cast("B")
        if self.offset + len(view) > self.size:
            raise InvalidArgument(f"more bytes than the declared {self.size}")
        while len(view):
            # Split at checkpoint boundaries so each one is recorded exactly.
            boundary = self._next[len(self._digests)]
            part = view[: boundary - self.offset]
            end = self.offset + len(part)
            if self._sealer is None:
                self._append(part)
            elif end == boundary:  # the chunk is complete: seal it (whole frames: no copy)
                if self._pending:
                    self._pending += part
                self._seal(self._pending or part)
            else:
                self._pending += part
            self._h.update(part)
            self.received += len(part)
            self.offset = end
            view = view[len(part):]
            if self.offset == boundary and boundary != self.size:
                self._digests.append(self._h.digest())

    def write_sealed(self, sealed, plain_buf) -> memoryview:
        """Append the next sealed chunk of a sealed copy as it is, once it authenticates;
        its plaintext goes into `plain_buf` (CHUNK bytes) to be hashed, and is returned
        (a view). Raises ShardCorrupt (nothing appended) or ResourceExhausted."""
        opener = self._opener
        if opener is None:
            raise InvalidArgument("not a sealed copy")
        index = self._chunks
        start, end = opener.span(index)
        plain = memoryview(plain_buf)[: end - start]
        try:
            opener.open_into(index, sealed, plain)
        except sc.SealError as err:
            raise ShardCorrupt(f"chunk at byte {start}: {err}") from None
        self._h.update(plain)
        self._append(memoryview(sealed))
        self._chunks += 1
        self.received += end - start
        self.offset = end
        if end != self.size:
            self._digests.append(self._h.digest())
        return plain

    def _seal(self, chunk) -> None:
        if self._out is None:  # not for a plaintext blob or a sealed copy: 4 MiB to fault in
            self._out = bytearray(CHUNK + sc.TAG)
        self._append(self._sealer.seal_into(self._chunks, chunk, self._out))
        self._chunks += 1
        del self._pending[:]

    def _append(self, data: memoryview) -> None:
        write_all(self._fd, data)
        self._file_len += len(data)

    def digest(self) -> bytes:
        return self._h.digest()

    def _mark(self) -> tuple:
        return (self.offset, self._h.copy(), len(self._digests), self._file_len, self._chunks,
                bytes(self._pending))

    def mark_verified(self) -> None:
        self._verified = self._mark()

    def rollback(self) -> int:
        """Back to the last verified point; returns its offset."""
        offset, h, n, file_len, chunks, pending = self._verified
        os.ftruncate(self._fd, file_len)
        os.lseek(self._fd, file_len, os.SEEK_SET)
        self.offset, self._h, self._digests = offset, h.copy(), self._digests[:n]
        self._file_len, self._chunks, self._pending = file_len, chunks, bytearray(pending)
        return offset

    def commit(self) -> None:
        """fsync, check the whole hash, rename into place. Raises InvalidArgument
        (truncated) and ShardCorrupt; either way nothing is stored."""
        try:
            if self.offset != self.size:
                raise InvalidArgument(f"truncated: {self.offset} of {self.size} bytes")
            count = sc.chunk_count(self.size, CHUNK)
            if self._opener is not None and self._chunks < count:
                raise InvalidArgument(f"truncated: {self._chunks} of {count} sealed chunks")
            if not self._h.matches(self.shard_id):
                raise ShardCorrupt(f"bytes do not hash to shard {self.shard_id[:12]}")
            if self._sealer is not None and self._chunks < count:
                self._seal(self._pending)  # an empty blob's one (empty) chunk
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


def write_all(fd: int, data: memoryview) -> None:
    """os.write until all is written; ENOSPC and EDQUOT raise ResourceExhausted."""
    try:
        while len(data):
            n = os.write(fd, data)
            data = data[n:]
    except OSError as err:
        if err.errno in (28, 122):  # ENOSPC, EDQUOT
            raise ResourceExhausted(f"no space left for the shard: {err.strerror}") from None
        raise


__all__ = ["CHUNK", "ShardCorrupt", "ShardWriter", "checkpoint_offsets", "write_all"]
