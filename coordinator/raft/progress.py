"""What a leader knows about each follower's log (etcd-raft's "Progress")."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum


class PeerState(str, Enum):
    """How the leader replicates to one follower.

    Legal transitions:
      PROBE     -> REPLICATE  an append was accepted: stream optimistically from match + 1
      PROBE     -> SNAPSHOT   the entries it needs are compacted away
      REPLICATE -> PROBE      an append was rejected, or nothing acked for an election timeout
      REPLICATE -> SNAPSHOT   (via PROBE) the entries it needs are compacted away
      SNAPSHOT  -> REPLICATE  acked at or past the snapshot's index
      SNAPSHOT  -> PROBE      no answer for an election timeout (the snapshot was lost)
    """

    PROBE = "probe"  # one append at a time, waiting for the answer to find the match point
    REPLICATE = "replicate"  # pipelined appends, at most max_inflight unacknowledged
    SNAPSHOT = "snapshot"  # an InstallSnapshot is outstanding


@dataclass(slots=True)
class Progress:
    match: int = 0  # highest index known replicated there (durably)
    next: int = 1  # next index to send
    state: PeerState = PeerState.PROBE
    probe_sent: bool = False  # PROBE: an append is outstanding
    inflight: deque[int] = field(default_factory=deque)  # REPLICATE: last index of each append
    snapshot_index: int = 0  # SNAPSHOT: index of the snapshot sent
    last_ack: float = 0.0  # when match last advanced or the state last changed
    recent_active: bool = False  # heard from since the last CheckQuorum
    read_ack: int = 0  # highest ReadIndex sequence it acknowledged this term
    sent_commit: int = 0  # highest commit index sent to it

    def become_probe(self, now: float) -> None:
        self.state = PeerState.PROBE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()
        self.last_ack = now

    def become_replicate(self, now: float) -> None:
        self.state = PeerState.REPLICATE
        self.next = self.match + 1
        self.inflight.clear()
        self.last_ack = now
