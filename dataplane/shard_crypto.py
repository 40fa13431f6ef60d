"""Shards encrypted at rest: the keys derived from the cluster secret, and the sealed blob
format (chunked AES-256-GCM). Pure format: the store (`dataplane/shards.py`) decides what a
failure means (quarantine, ShardCorrupt).

A sealed blob (`blobs/ab/<id>.enc`) is

    header   48 bytes: magic b"LPS1", version 1, log2(chunk size), 0 (u16),
             plaintext size (u64), key id (8), salt (16), nonce prefix (7), 0
    chunk i  AES-GCM ciphertext of plaintext bytes [i*C, min(size, (i+1)*C)) + 16-byte tag,
             for i in 0..n-1, n = max(1, ceil(size / C)): an empty blob has one empty chunk

Keys. `master = HKDF-SHA256(secret, info=b"lepton shard-at-rest v1")`; every blob has its own
key `HKDF-SHA256(master, salt=<its random salt>, info=... + shard id)`, so a nonce can never
repeat under one key however many blobs a cluster writes (random 96-bit nonces under one
key would have a birthday bound). The key id (8 bytes of another HKDF output) names the
secret in headers and error messages without revealing anything about the key.

Chunk i's nonce is `prefix || i (u32) || last (u8)`; its AAD is the header, the shard id,
i and the last flag. So a chunk cannot be altered, swapped, reordered, dropped, appended
to, or moved to another shard or position without failing authentication, and the header
(the size included) is bound to every chunk. The shard id stays the hash of the
plaintext (`shard_hash.py`): content addressing is the same with encryption on or off.
"""

from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path

from lepton.common import cluster_secret
from lepton.common.errors import InvalidArgument
from lepton.common.lazy import deferred
from lepton.dataplane.shard_hash import id_bytes

# cryptography loads on first use (~9 MB of RSS): a node without a shard key never needs it.
_errors = deferred("cryptography.exceptions")
_hashes = deferred("cryptography.hazmat.primitives.hashes")
_ciphers = deferred("cryptography.hazmat.primitives.ciphers.aead")
_kdf = deferred("cryptography.hazmat.primitives.kdf.hkdf")

MAGIC = b"LPS1"
VERSION = 1
HEADER = struct.Struct("!4sBBHQ8s16s7sx")
TAG = 16
SUFFIX = ".enc"
KEY_INFO = b"lepton shard-at-rest v1"
_KEY_ID_INFO = KEY_INFO + b" key id"
_BLOB_INFO = KEY_INFO + b" blob "
_POSITION = struct.Struct("!IB")  # chunk index, last-chunk flag


class SealError(Exception):
    """A sealed blob fails a check: its header, its length, or a chunk's authentication."""


def _hkdf(key: bytes, info: bytes, *, length: int = 32, salt: bytes | None = None) -> bytes:
    return _kdf.HKDF(algorithm=_hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def chunk_count(size: int, chunk: int) -> int:
    return max(1, -(-size // chunk))


def sealed_size(size: int, chunk: int) -> int:
    """The file size of a sealed blob of `size` plaintext bytes."""
    return HEADER.size + size + TAG * chunk_count(size, chunk)


def plain_size(file_size: int, chunk: int) -> int:
    """The plaintext size a sealed file of `file_size` bytes holds (a best guess for a
    damaged file: reads then find the mismatch with the authenticated header)."""
    body = max(0, file_size - HEADER.size)
    return max(0, body - TAG * max(1, -(-body // (chunk + TAG))))


def header_key_id(path: str | os.PathLike[str]) -> str | None:
    """The key id in a sealed blob's header, or None when it has no readable header."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
        if len(raw) == HEADER.size and raw[:4] == MAGIC:
            return HEADER.unpack(raw)[5].hex()
    except OSError:
        pass
    return None


class ShardCipher:
    """The cluster's shard key. Makes a `Sealer` per new blob and an `Opener` per read.
    Holds only derived keys; its repr names the key id, never a key."""

    def __init__(self, secret: bytes):
        if len(secret) != cluster_secret.SECRET_BYTES:
            raise InvalidArgument(f"a cluster secret has {cluster_secret.SECRET_BYTES} bytes, not {len(secret)}")
        self._master = _hkdf(secret, KEY_INFO)
        self.key_id = _hkdf(secret, _KEY_ID_INFO, length=8).hex()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ShardCipher:
        """Raises InvalidArgument (missing, unreadable, malformed file)."""
        return cls(cluster_secret.read(Path(path)))

    def __repr__(self) -> str:
        return f"ShardCipher(key_id={self.key_id})"

    def _aead(self, shard_id: str, salt: bytes) -> _ciphers.AESGCM:
        return _ciphers.AESGCM(_hkdf(self._master, _BLOB_INFO + id_bytes(shard_id), salt=salt))

    def sealer(self, shard_id: str, size: int, chunk: int) -> Sealer:
        """A new blob's header and chunk sealer (fresh salt and nonce prefix)."""
        salt, prefix = secrets.token_bytes(16), secrets.token_bytes(7)
        header = HEADER.pack(MAGIC, VERSION, chunk.bit_length() - 1, 0, size, bytes.fromhex(self.key_id),
                             salt, prefix)
        return Sealer(self._aead(shard_id, salt), header, shard_id, size, chunk)

    def opener(self, shard_id: str, size: int, chunk: int, header: bytes) -> Opener:
        """An opener for a blob whose header is `header`. Raises SealError when the header
        is not one of ours for this blob (every chunk's tag would fail too; this says why)."""
        if len(header) != HEADER.size:
            raise SealError("the header is truncated")
        magic, version, shift, _, psize, key_id, salt, _ = HEADER.unpack(header)
        if magic != MAGIC or version != VERSION:
            raise SealError("not a sealed shard (bad magic or version)")
        if 1 << shift != chunk:
            raise SealError(f"sealed in chunks of {1 << shift} bytes, not {chunk}")
        if psize != size:
            raise SealError(f"the header says {psize} bytes, the store {size}")
        if key_id.hex() != self.key_id:
            raise SealError(f"sealed with key id {key_id.hex()}, not this node's {self.key_id}")
        return Opener(self._aead(shard_id, salt), header, shard_id, size, chunk)


class _Blob:
    def __init__(self, aead: _ciphers.AESGCM, header: bytes, shard_id: str, size: int, chunk: int):
        self._aead = aead
        self.header = header
        self._prefix = header[-8:-1]
        self._bound = header + id_bytes(shard_id)
        self.size = size
        self.chunk = chunk
        self.count = chunk_count(size, chunk)

    def span(self, index: int) -> tuple[int, int]:
        """Plaintext [start, end) of chunk `index`."""
        start = index * self.chunk
        return start, min(self.size, start + self.chunk)

    def file_offset(self, index: int) -> int:
        """Where chunk `index` starts in the file."""
        return HEADER.size + index * (self.chunk + TAG)

    def _nonce_aad(self, index: int) -> tuple[bytes, bytes]:
        if not 0 <= index < self.count:
            raise SealError(f"chunk {index} is outside the blob's {self.count}")
        position = _POSITION.pack(index, index == self.count - 1)
        return self._prefix + position, self._bound + position


class Sealer(_Blob):
    def seal_into(self, index: int, data, out: bytearray | memoryview) -> memoryview:
        """Encrypt chunk `index` (exactly its plaintext) into `out`; returns the sealed
        bytes (a view of `out`, len(data) + TAG)."""
        start, end = self.span(index)
        if len(data) != end - start:
            raise ValueError(f"chunk {index} holds {end - start} bytes, not {len(data)}")
        nonce, aad = self._nonce_aad(index)
        view = memoryview(out)[: len(data) + TAG]
        self._aead.encrypt_into(nonce, data, aad, view)
        return view


class Opener(_Blob):
    def sealed_length(self, index: int) -> int:
        start, end = self.span(index)
        return end - start + TAG

    def open(self, index: int, sealed) -> bytes:
        """Chunk `index`'s plaintext. Raises SealError (short, or fails authentication)."""
        nonce, aad = self._nonce_aad(index)
        if len(sealed) != self.sealed_length(index):
            raise SealError(f"chunk {index} is truncated")
        try:
            return self._aead.decrypt(nonce, sealed, aad)
        except _errors.InvalidTag:
            raise SealError(f"chunk {index} fails authentication") from None

    def open_into(self, index: int, sealed, out: memoryview) -> None:
        """Like `open`, writing the plaintext into `out` (exactly the chunk's length)."""
        nonce, aad = self._nonce_aad(index)
        if len(sealed) != self.sealed_length(index):
            raise SealError(f"chunk {index} is truncated")
        try:
            self._aead.decrypt_into(nonce, sealed, aad, out)
        except _errors.InvalidTag:
            raise SealError(f"chunk {index} fails authentication") from None


__all__ = ["HEADER", "SUFFIX", "TAG", "Opener", "SealError", "Sealer", "ShardCipher", "chunk_count",
           "header_key_id", "plain_size", "sealed_size"]
