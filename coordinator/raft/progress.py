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


class ProgressTracker:
    """The leader's replication targets (the other voters and a learner) and their
    Progress, with the majority arithmetic over them (etcd-raft's tracker): the commit
    index a quorum holds, CheckQuorum's activity count, ReadIndex acknowledgements.
    Empty while not leading."""

    def __init__(self) -> None:
        self.prs: dict[str, Progress] = {}
        self.targets: list[str] = []  # sorted ids of `prs`: whom the leader replicates to

    def __contains__(self, peer: str) -> bool:
        return peer in self.prs

    def __getitem__(self, peer: str) -> Progress:
        return self.prs[peer]

    def get(self, peer: str) -> Progress | None:
        return self.prs.get(peer)

    def reset(self, peers: list[str], next_index: int, now: float) -> None:
        """A new leader: every peer is probed from just past the leader's last index."""
        self.prs = {p: Progress(next=next_index, last_ack=now) for p in peers}
        self.targets = list(peers)

    def clear(self) -> None:
        self.prs, self.targets = {}, []

    def track(self, peers: list[str], next_index: int, now: float) -> list[str]:
        """Track exactly `peers` (a new configuration): new ones are probed from
        `next_index`, the others keep their Progress. Returns the ids dropped."""
        for p in peers:
            if p not in self.prs:
                self.prs[p] = Progress(next=next_index, last_ack=now)
        keep = set(peers)
        dropped = [p for p in self.prs if p not in keep]
        for p in dropped:
            del self.prs[p]
        self.targets = sorted(self.prs)
        return dropped

    def add(self, peer: str, next_index: int, now: float) -> None:
        """Replicate to `peer` too (a learner), probing from `next_index`."""
        self.prs[peer] = Progress(next=next_index, last_ack=now)
        self.targets = sorted(self.prs)

    def remove(self, peer: str) -> bool:
        if self.prs.pop(peer, None) is None:
            return False
        self.targets = sorted(self.prs)
        return True

    def quorum_match(self, voters: list[str], own_match: int | None, quorum: int) -> int:
        """The highest index that `quorum` voters hold: `voters` (the others) by their
        match, the leader by `own_match` (None: it does not count itself, removed)."""
        matches = [self.prs[p].match for p in voters]
        if own_match is not None:
            matches.append(own_match)
        matches.sort(reverse=True)
        return matches[quorum - 1]

    def quorum_read_ack(self, voters: list[str], need: int) -> int:
        """The highest ReadIndex sequence that `need` of `voters` have acknowledged."""
        acks = sorted((self.prs[p].read_ack for p in voters), reverse=True)
        return acks[need - 1]

    def recently_active(self, voters: list[str]) -> int:
        """How many of `voters` were heard from since the last call; starts a new round."""
        active = sum(1 for p in voters if self.prs[p].recent_active)
        for pr in self.prs.values():
            pr.recent_active = False
        return active
