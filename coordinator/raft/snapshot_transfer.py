"""InstallSnapshot in chunks: the state may exceed any single message (issue 14).

The leader sends a snapshot `chunk_bytes` at a time, one chunk in flight per follower: the
follower answers each chunk but the last with a `SnapshotAck` naming the offset it wants
next, and the leader sends that. A lost chunk or ack stalls the transfer until the
leader's stall timeout probes the follower again, which restarts the transfer at offset
0; the follower still holds what it got and answers with its own offset, so the transfer
resumes where it stopped. The last chunk installs the whole snapshot, which the driver
persists (`messages.persist`) before the follower's answer leaves.

A follower assembles one snapshot at a time, keyed by (leader, term, index, snapshot
term): the same leader in the same term sends the same bytes for an index (a leader never
snapshots twice at one index), so chunks of one transfer never mix with another's.
"""

from __future__ import annotations

from lepton.coordinator.raft.messages import SnapshotRequest
from lepton.coordinator.storage.log_store import Snapshot

DEFAULT_CHUNK_BYTES = 1 << 20


def snapshot_chunk(frm: str, to: str, term: int, snap: Snapshot, offset: int, size: int) -> SnapshotRequest:
    """The chunk of `snap` at `offset` (at most `size` bytes of its data)."""
    piece = snap.data[offset:offset + size]
    done = offset + len(piece) >= len(snap.data)
    return SnapshotRequest(frm, to, term, Snapshot(snap.index, snap.term, piece, snap.config), offset, done)


class SnapshotSender:
    """Leader: the snapshot each follower is being sent. Holds a reference, never a copy."""

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self.chunk_bytes = chunk_bytes
        self._out: dict[str, Snapshot] = {}

    def start(self, frm: str, to: str, term: int, snap: Snapshot) -> SnapshotRequest:
        """Begin sending `snap` to `to`: its first chunk."""
        self._out[to] = snap
        return self._chunk(frm, to, term, snap, 0)

    def next_chunk(self, frm: str, to: str, term: int, index: int, offset: int) -> SnapshotRequest | None:
        """The chunk `to` asks for, or None when it is not being sent that snapshot."""
        snap = self._out.get(to)
        if snap is None or snap.index != index or not 0 <= offset < len(snap.data):
            return None
        return self._chunk(frm, to, term, snap, offset)

    def _chunk(self, frm: str, to: str, term: int, snap: Snapshot, offset: int) -> SnapshotRequest:
        chunk = snapshot_chunk(frm, to, term, snap, offset, self.chunk_bytes)
        if chunk.done:
            # Nothing more is asked for after the last chunk (it is sent only once the rest
            # is acknowledged); a lost one restarts the transfer, which starts over here.
            self._out.pop(to, None)
        return chunk

    def forget(self, peer: str) -> None:
        self._out.pop(peer, None)

    def clear(self) -> None:
        self._out.clear()


class SnapshotAssembly:
    """Follower: the chunks of one snapshot, in order."""

    def __init__(self) -> None:
        self._key: tuple[str, int, int, int] | None = None
        self._buf = bytearray()

    @property
    def received(self) -> int:
        return len(self._buf)

    def add(self, m: SnapshotRequest) -> Snapshot | int:
        """The whole snapshot once `m` completes it; otherwise the offset wanted next."""
        s = m.snapshot
        key = (m.frm, m.term, s.index, s.term)
        if key != self._key:
            if m.offset != 0:
                return 0  # a chunk of a transfer we never saw begin: ask for its start
            self._key, self._buf = key, bytearray()
        if m.offset != len(self._buf):
            return len(self._buf)  # a gap or a repeat: resume from what we hold
        self._buf += s.data
        if not m.done:
            return len(self._buf)
        whole = Snapshot(s.index, s.term, bytes(self._buf), s.config)
        self.reset()
        return whole

    def reset(self) -> None:
        self._key, self._buf = None, bytearray()
