"""Raft's in-process types: configuration, roles, wire messages and the `Ready` batch.

Messages are cheap slotted dataclasses; `transport.py` converts them to and from the
protobuf messages of `lepton/v1/raft.proto` at the gRPC boundary. They are never mutated
after construction, so a simulated network may deliver one object twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from lepton.coordinator.storage.log_store import Entry, LogStore, Snapshot


class Role(str, Enum):
    """What a node is in its current term.

    Legal transitions:
      FOLLOWER      -> PRE_CANDIDATE  election timeout (PreVote on)
      FOLLOWER      -> CANDIDATE      election timeout (PreVote off) or TimeoutNow from the leader
      PRE_CANDIDATE -> CANDIDATE      a majority granted the pre-vote (only now is the term bumped)
      PRE_CANDIDATE -> FOLLOWER       a majority refused, a higher term, or a leader of this term
      PRE_CANDIDATE -> PRE_CANDIDATE  election timeout again
      CANDIDATE     -> LEADER         a majority granted the vote
      CANDIDATE     -> FOLLOWER       a majority refused, a higher term, or a leader of this term
      CANDIDATE     -> PRE_CANDIDATE  election timeout (PreVote on; CANDIDATE again otherwise)
      LEADER        -> FOLLOWER       a higher term, or CheckQuorum failed
    """

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class Config:
    """Timings in seconds. The election timeout is drawn uniformly from
    [election_timeout, 2 * election_timeout) each time the timer is reset."""

    heartbeat_interval: float = 0.1
    election_timeout: float = 1.0
    pre_vote: bool = True
    check_quorum: bool = True
    max_msg_bytes: int = 1 << 20  # payload bytes per AppendEntries (at least one entry)
    # AppendEntries in flight per follower while replicating. One: what arrives while an
    # append is out goes in the next, so under load one message (and one follower fsync and
    # answer) carries many proposals. In Python each message costs more CPU than the entries
    # in it: 3 voters, 16 one-task clients, same run: voters' CPU per call 1.67 ms vs 2.18 ms
    # with 64, and a lower median latency (20.5 vs 27 ms); at worst an entry waits one
    # round trip longer when idle. The simulation also runs 4 and 64.
    max_inflight: int = 1
    max_apply_bytes: int = 16 << 20  # committed payload handed out per Ready
    snapshot_chunk_bytes: int = 1 << 20  # InstallSnapshot data per message (snapshot_transfer.py)
    # A new commit index that no append carries reaches the followers this much later (or
    # sooner, with the next append or heartbeat): under load, appends carry it and a commit
    # costs no message; 0 tells them at once (a heartbeat and its answer per commit).
    commit_notify_delay: float = 0.02
    noop_data: bytes = b""  # payload of the entry a new leader appends (an empty Command)
    # A learner is added as a voter once its match index is this close to the leader's
    # last index; dropped (the change fails) when it makes no progress for learner_timeout
    # seconds (0: ten election timeouts).
    learner_slack: int = 64
    learner_timeout: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.election_timeout:
            raise ValueError("need 0 < heartbeat_interval < election_timeout")
        if self.max_inflight < 1 or self.max_msg_bytes < 1 or self.snapshot_chunk_bytes < 1:
            raise ValueError("max_inflight, max_msg_bytes and snapshot_chunk_bytes must be >= 1")
        if self.learner_slack < 0 or self.learner_timeout < 0 or self.commit_notify_delay < 0:
            raise ValueError("learner_slack, learner_timeout and commit_notify_delay must be >= 0")


# -- wire messages ---------------------------------------------------------------------
# Every message carries its sender, receiver and the sender's term.


@dataclass(slots=True)
class VoteRequest:
    frm: str
    to: str
    term: int  # for a pre-vote: the term the sender would campaign in (its term + 1)
    last_index: int
    last_term: int
    pre_vote: bool = False
    transfer: bool = False  # leadership transfer: voters ignore their leader lease


@dataclass(slots=True)
class VoteResponse:
    frm: str
    to: str
    term: int  # a granted pre-vote echoes the request's term; otherwise the voter's term
    granted: bool
    pre_vote: bool = False


@dataclass(slots=True)
class AppendRequest:
    frm: str
    to: str
    term: int
    prev_index: int
    prev_term: int
    entries: list[Entry]
    commit: int


@dataclass(slots=True)
class AppendResponse:
    """Answers AppendRequest and SnapshotRequest.

    success: `index` is the highest index known to match the leader's log.
    reject: `index` is the rejected prev_index; (hint_index, hint_term) let the leader skip
    a whole conflicting term at once (hint_term 0: the follower's log ends at hint_index-1).
    """

    frm: str
    to: str
    term: int
    success: bool
    index: int
    hint_index: int = 0
    hint_term: int = 0


@dataclass(slots=True)
class Heartbeat:
    frm: str
    to: str
    term: int
    commit: int  # min(leader commit, follower match): safe to commit without a log check
    ctx: int  # highest ReadIndex sequence issued when sent; echoed back


@dataclass(slots=True)
class HeartbeatResponse:
    frm: str
    to: str
    term: int
    ctx: int


@dataclass(slots=True)
class SnapshotRequest:
    """One chunk of InstallSnapshot (`snapshot_transfer.py`): `snapshot` carries the
    snapshot's index, term and configuration, and as `data` only the bytes at `offset`;
    `done`: the last chunk, which installs the whole."""

    frm: str
    to: str
    term: int
    snapshot: Snapshot
    offset: int = 0
    done: bool = True


@dataclass(slots=True)
class SnapshotAck:
    """A follower got a chunk of the snapshot at `index` and wants the bytes from `offset`."""

    frm: str
    to: str
    term: int
    index: int
    offset: int


@dataclass(slots=True)
class TimeoutNow:
    """Leadership transfer: the leader asks a caught-up follower to campaign at once."""

    frm: str
    to: str
    term: int


Message = (
    VoteRequest
    | VoteResponse
    | AppendRequest
    | AppendResponse
    | Heartbeat
    | HeartbeatResponse
    | SnapshotRequest
    | SnapshotAck
    | TimeoutNow
)


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state the driver may want to react to (leadership listeners, status)."""

    term: int
    role: Role
    leader: str


@dataclass(slots=True)
class Ready:
    """Work the driver must do, in this order, then call `RaftCore.advance()`:

    0. send `eager_messages` (a leader's appends and heartbeats: they may go before its own
       fsync, Raft dissertation 10.2.1, so the followers' fsyncs overlap the leader's);
    1. persist (see `persist()`): hard state; snapshot; truncate the store from
       entries[0].index if it holds that index, then append `entries`; `sync()` if must_sync;
    2. send `messages` (they may depend on step 1, so never before it completes);
    3. if `install`: restore the state machine from `snapshot`;
    4. apply `committed` in order; serve `read_states` (ctx, index) once applied >= index;
       fail `aborted_reads` (leadership lost: NotLeader);
    5. `advance()`.
    """

    hard_state: tuple[int, str] | None = None
    snapshot: Snapshot | None = None
    install: bool = False
    entries: list[Entry] = field(default_factory=list)
    must_sync: bool = False
    eager_messages: list[Message] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    committed: list[Entry] = field(default_factory=list)
    read_states: list[tuple[object, int]] = field(default_factory=list)
    aborted_reads: list[object] = field(default_factory=list)
    soft_state: SoftState | None = None
    commit_index: int = 0


def persist(store: LogStore, rd: Ready, *, sync: bool = True) -> None:
    """Step 1 of a Ready against a `LogStore`. Blocking I/O: run it off the event loop.

    Raises OSError from the store; the node must then stop (nothing of this Ready may be
    sent or applied).
    """
    if rd.hard_state is not None:
        store.set_hard_state(*rd.hard_state)
    if rd.snapshot is not None:
        store.save_snapshot(rd.snapshot)
        if rd.install and store.last_index() > rd.snapshot.index:
            # The store kept entries after a matching snapshot index that our log dropped.
            store.truncate_suffix(rd.snapshot.index + 1)
    if rd.entries:
        first = rd.entries[0].index
        if first <= store.last_index():
            store.truncate_suffix(first)
        store.append(rd.entries)
    if sync and rd.must_sync:
        store.sync()
