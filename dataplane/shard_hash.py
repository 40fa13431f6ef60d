"""Shard content ids: which hash names a blob, and the running hash that checks it.

Two kinds of id, told apart by their form:

    b3-<64 hex>   BLAKE3-256 of the bytes: every new shard (`new_hash`, `content_id`)
    <64 hex>      SHA-256 of the bytes: shards stored before BLAKE3 (and code archives,
                  whose id is their SHA-256 code digest); still read, served, pulled and
                  verified with SHA-256, never rewritten

Why BLAKE3: a puller hashes every byte it receives, and on the 2-core development VM one
core hashes SHA-256 at ~1.7 GB/s (SHA-NI) against BLAKE3's ~6 GB/s (AVX-512), while raw
loopback TCP runs at 4-5 GB/s: with SHA-256 the hash alone caps a pull under half the wire
(docs/data.md, Benchmark). Both are 256-bit collision-resistant hashes; a running BLAKE3
hash can give its digest at any point and go on, as checkpoints need.

Checkpoints (`.sums`, transfer frames) are digests of the id's own algorithm, 32 bytes
either way. The algorithm is a property of the id, so stores, wire and manifests need no
other field, and a blob can never be checked with the wrong hash.
"""

from __future__ import annotations

import hashlib
import re

import blake3

from lepton.common.errors import InvalidArgument

BLAKE3_PREFIX = "b3-"
DIGEST = 32
_ID_RE = re.compile(r"^(?:b3-)?[0-9a-f]{64}$")


def check_shard_id(value: str) -> str:
    """A shard id is `b3-` + 64 lowercase hex digits (BLAKE3) or 64 lowercase hex digits
    (SHA-256, older shards); the form also keeps it out of path tricks. Raises
    InvalidArgument."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidArgument(f"shard id {str(value)[:70]!r} is neither b3-<64 hex> (BLAKE3) nor <64 hex> (SHA-256)")
    return value


def is_shard_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


def digest_hex(shard_id: str) -> str:
    """The id's 64 hex digits (without the algorithm prefix)."""
    return shard_id[-2 * DIGEST:]


def id_bytes(shard_id: str) -> bytes:
    """The id as bytes, for binding it into keys and AAD: the raw SHA-256 digest for an
    older id (what sealed blobs written before BLAKE3 were bound to), the id's text for any
    other (a different length: the two kinds can never collide)."""
    return bytes.fromhex(shard_id) if len(shard_id) == 2 * DIGEST else shard_id.encode()


class ContentHash:
    """A running hash of a shard's bytes under its id's algorithm. `digest()` may be taken
    at any point (a checkpoint) and hashing goes on. Big updates release the GIL."""

    __slots__ = ("_h", "_prefix")

    def __init__(self, blake: bool, _h=None):
        self._prefix = BLAKE3_PREFIX if blake else ""
        self._h = _h if _h is not None else (blake3.blake3() if blake else hashlib.sha256())

    def update(self, data) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest()

    def copy(self) -> ContentHash:
        return ContentHash(bool(self._prefix), self._h.copy())

    def shard_id(self) -> str:
        """The id of the bytes hashed so far."""
        return self._prefix + self._h.hexdigest()

    def matches(self, shard_id: str) -> bool:
        return self.shard_id() == shard_id


def new_hash() -> ContentHash:
    """The hash a new shard's id is made with (BLAKE3)."""
    return ContentHash(True)


def hash_for(shard_id: str) -> ContentHash:
    """The running hash that checks `shard_id`'s bytes (its own algorithm)."""
    return ContentHash(check_shard_id(shard_id).startswith(BLAKE3_PREFIX))


def content_id(data) -> str:
    """The id a new shard with these bytes gets."""
    h = new_hash()
    h.update(data)
    return h.shard_id()


__all__ = ["BLAKE3_PREFIX", "DIGEST", "ContentHash", "check_shard_id", "content_id", "digest_hex", "hash_for",
           "id_bytes", "is_shard_id", "new_hash"]
