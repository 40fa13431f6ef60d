"""The Raft state machine: deterministic, single-threaded, no I/O, no clock, no global RNG.

A driver feeds it inputs (`tick`, `step`, `propose`, `read_index`, `compact`,
`transfer_leadership`), then drains `ready()` and performs it in order (see `Ready`), then
calls `advance()`. No input may be given between `ready()` and `advance()`: the driver
queues them (which is what batches many proposals into one fsync).

Implements leader election with randomised timeouts, PreVote, CheckQuorum with a leader
lease, log replication with batched and pipelined AppendEntries, fast backtracking with
conflict-term hints, commit counting for own-term entries only (plus a no-op on election),
ReadIndex, snapshots (local compaction; InstallSnapshot in chunks, `snapshot_transfer.py`),
leadership transfer and single-server changes of the voter set (`membership.py`).
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Mapping

from lepton.common.errors import NotLeader
from lepton.coordinator.raft.leader import LeaderMixin
from lepton.coordinator.raft.membership import Configuration, MembershipMixin, is_config
from lepton.coordinator.raft.messages import (
    AppendRequest,
    AppendResponse,
    Config,
    Heartbeat,
    HeartbeatResponse,
    Message,
    Ready,
    Role,
    SnapshotAck,
    SnapshotRequest,
    SoftState,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from lepton.coordinator.raft.progress import PeerState, ProgressTracker
from lepton.coordinator.raft.snapshot_transfer import SnapshotAssembly, SnapshotSender
from lepton.coordinator.storage.log_store import Entry, LogStore, Snapshot

logger = logging.getLogger(__name__)

# After the leader's connection drops, campaign within this fraction of an election timeout.
FAST_ELECTION_FRACTION = 0.15

_FOLLOWER, _PRE, _CAND, _LEADER = Role.FOLLOWER, Role.PRE_CANDIDATE, Role.CANDIDATE, Role.LEADER
_FROM_LEADER = (AppendRequest, Heartbeat, SnapshotRequest)
_EAGER = frozenset((AppendRequest, Heartbeat))  # a leader may send them before its fsync


class RaftCore(LeaderMixin, MembershipMixin):
    """One server's Raft state. Not thread-safe; every method runs to completion.

    `peers` maps the bootstrap voters' ids to their advertised addresses: the voter set
    until a configuration in the log or snapshot replaces it (`membership.py`). A node
    outside it (a server waiting to be added) never campaigns. Raises ValueError for a bad
    store; inputs raise RuntimeError when called between `ready()` and `advance()`.
    """

    def __init__(
        self,
        node_id: str,
        peers: Mapping[str, str],
        store: LogStore,
        *,
        now: float,
        rng: random.Random,
        config: Config | None = None,
    ):
        self.id = node_id
        self._cfg = config or Config()
        self._rng = rng
        self._now = now
        self.term, self.voted_for = store.hard_state()
        snap = store.snapshot()
        self._snapshot: Snapshot | None = snap
        self._snap_index = snap.index if snap else 0
        self._snap_term = snap.term if snap else 0
        first, last = store.first_index(), store.last_index()
        if first != self._snap_index + 1:
            raise ValueError(f"store's first index {first} does not follow its snapshot")
        self._log: list[Entry] = store.entries(first, last + 1) if last >= first else []
        self.role = _FOLLOWER
        self.leader = ""
        # Leader: index of its no-op; once applied, the state machine reflects every
        # entry committed before this term.
        self.term_start_index = 0
        self.commit = self._snap_index  # not persisted: relearned from the leader
        self._applied = self._snap_index  # highest index handed out in a Ready
        self._stable_last = last  # highest index known durable here (the leader's own vote)
        self._unstable_from = last + 1  # entries from here on are not yet handed to persist
        self._unstable_sent = False  # leader: this ready() sends entries not yet persisted
        self._tracker = ProgressTracker()  # leader: each peer's replication progress
        self._snap_sender = SnapshotSender(self._cfg.snapshot_chunk_bytes)  # leader: snapshots in chunks
        self._snap_assembly = SnapshotAssembly()  # follower: the chunks of one it is being sent
        self._conf = Configuration(node_id, peers, snap)  # who votes
        self._conf.set(*self._conf.initial())
        self._scan_config(self._log)
        self._votes: dict[str, bool] = {}
        self._msgs: list[Message] = []
        self._hs_dirty = False
        self._snap_pending: Snapshot | None = None
        self._snap_install = False
        self._pending_reads: deque[list] = deque()  # [ctx, seq, index or None]
        self._ready_reads: list[tuple[object, int]] = []
        self._aborted_reads: list[object] = []
        self._read_seq = 0
        self._bcast = False  # leader: push entries/commit to every follower at the next ready()
        self._dirty: set[str] = set()  # leader: ... to these followers
        self._hb_now = False  # leader: a heartbeat round is wanted (ReadIndex)
        self._transferee = ""
        self._transfer_deadline = 0.0
        self._leader_contact = -math.inf
        self._election_deadline = now + self._election_timeout()
        self._hb_deadline = math.inf
        self._cq_deadline = math.inf
        self._commit_notify_at = math.inf  # leader: tell followers a commit no append carried
        self._soft = (self.term, self.role, self.leader)
        self._in_ready = False

    # -- read-only views -------------------------------------------------------------
    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def commit_index(self) -> int:
        return self.commit

    @property
    def first_index(self) -> int:
        return self._snap_index + 1

    def last_index(self) -> int:
        return self._snap_index + len(self._log)

    def term_at(self, index: int) -> int:
        """Term of the entry at `index`, or -1 when compacted or past the end."""
        off = index - self._snap_index
        if off == 0:
            return self._snap_term
        if off < 0 or off > len(self._log):
            return -1
        return self._log[off - 1].term

    def entry_at(self, index: int) -> Entry | None:
        off = index - self._snap_index
        return self._log[off - 1] if 0 < off <= len(self._log) else None

    def leader_address(self) -> str:
        return self._conf.addresses.get(self.leader, "")

    def progress(self) -> dict[str, tuple[int, int]]:
        """Leader only ({} otherwise): id -> (match index, lag behind our last index), for
        itself, the other voters and a learner."""
        if self.role is not _LEADER:
            return {}
        last = self.last_index()
        out = {self.id: (self._stable_last, last - self._stable_last)}
        for p, pr in self._tracker.prs.items():
            out[p] = (pr.match, last - pr.match)
        return out

    def next_deadline(self) -> float:
        """The earliest time at which `tick` has something to do."""
        if self.role is _LEADER:
            return min(self._hb_deadline, self._cq_deadline, self._commit_notify_at)
        return self._election_deadline

    # -- inputs ----------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Advance time: elections for non-leaders; heartbeats and CheckQuorum for a leader."""
        self._enter(now)
        cfg = self._cfg
        if self.role is not _LEADER:
            if now >= self._election_deadline:
                if self.id in self._conf.voters:
                    self._campaign(pre=cfg.pre_vote)
                else:  # not a voter (yet, or any more): never disrupt the voters
                    self._election_deadline = now + self._election_timeout()
            return
        if now >= self._hb_deadline:
            self._hb_deadline = now + cfg.heartbeat_interval
            self._broadcast_heartbeat()
            for p, pr in self._tracker.prs.items():
                # A lost append or snapshot would stall a peer forever: probe again.
                stalled = (pr.state is PeerState.REPLICATE and pr.inflight) or (
                    pr.state is PeerState.SNAPSHOT
                )
                if stalled and now - pr.last_ack >= cfg.election_timeout:
                    pr.become_probe(now)
                    self._dirty.add(p)
            if self._transferee and now >= self._transfer_deadline:
                logger.info("%s: leadership transfer to %s timed out", self.id, self._transferee)
                self._transferee = ""
            self._learner_tick(now)
        if now >= self._commit_notify_at:
            self._commit_notify_at = math.inf
            self._bcast = True  # sends the commit to whoever lacks it (nothing to the rest)
        if now >= self._cq_deadline:
            self._cq_deadline = now + cfg.election_timeout
            if cfg.check_quorum:
                conf = self._conf
                active = (self.id in conf.voters) + self._tracker.recently_active(conf.others)
                if active < conf.quorum:
                    logger.info("%s: CheckQuorum failed in term %d; stepping down", self.id, self.term)
                    self._become_follower(self.term, "")

    def leader_unreachable(self, peer: str, now: float) -> bool:
        """The transport saw its connection to `peer` drop (the process died, the host
        reset it). If `peer` is our leader, stop trusting its lease and campaign after a
        short random delay instead of a whole election timeout. Only liveness changes:
        the election itself follows the usual rules, so safety is untouched, and a false
        alarm costs one election at most. Returns True when it acted."""
        self._enter(now)
        if self.role is _LEADER or not self.leader or self.leader != peer:
            return False
        self._leader_contact = -math.inf
        soon = now + self._rng.uniform(0.0, FAST_ELECTION_FRACTION * self._cfg.election_timeout)
        self._election_deadline = min(self._election_deadline, soon)
        return True

    def step(self, m: Message, now: float) -> None:
        """Handle one message from a peer; stale terms are ignored. Senders outside the
        configuration are heard too: a leader replicating to a learner, a candidate whose
        configuration adds us (a vote from us may be needed, dissertation 4.2.1)."""
        self._enter(now)
        if m.frm == self.id:
            return
        kind = type(m)
        if m.term > self.term:
            if kind is VoteRequest:
                if self._in_lease() and not m.transfer:
                    return  # we hear from a live leader: ignore a disruptive candidate
                if not m.pre_vote:
                    self._become_follower(m.term, "")
            elif kind is VoteResponse and m.pre_vote and m.granted:
                pass  # a granted pre-vote carries the term we would campaign in
            else:
                self._become_follower(m.term, m.frm if kind in _FROM_LEADER else "")
        elif m.term < self.term:
            if kind in _FROM_LEADER:
                # Tell a stale leader about the new term so it steps down.
                self._send(AppendResponse(self.id, m.frm, self.term, False, 0))
            elif kind is VoteRequest and m.pre_vote:
                self._send(VoteResponse(self.id, m.frm, self.term, False, True))
            return
        handler = self._handlers.get(kind)
        if handler is not None:
            handler(self, m)

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append `data` to the leader's log; returns (index, term).

        The entry is committed once `committed` in a Ready holds (index, term); an entry of
        another term at that index means it was lost. Raises NotLeader (nothing appended).
        """
        self._enter(self._now)
        if self.role is not _LEADER:
            raise NotLeader(f"{self.id} is not the leader", leader=self.leader_address())
        if self._transferee:
            raise NotLeader(f"{self.id} is transferring leadership to {self._transferee}")
        if is_config(data):
            raise ValueError("a command may not look like a Raft configuration")
        index = self.last_index() + 1
        self._log.append(Entry(index, self.term, data))
        self._bcast = True
        return index, self.term

    def compact(self, index: int, data: bytes) -> bool:
        """The state machine at `index` (<= applied) serialised as `data`: drop the log up
        to it. Returns False when a snapshot at or after `index` exists. Raises ValueError."""
        self._enter(self._now)
        if index <= self._snap_index:
            return False
        if index > self._applied:
            raise ValueError(f"cannot snapshot at {index}: only {self._applied} applied")
        term = self.term_at(index)
        snap = Snapshot(index, term, data, self._conf.compacted(index))
        del self._log[: index - self._snap_index]
        self._snap_index, self._snap_term, self._snapshot = index, term, snap
        self._snap_pending, self._snap_install = snap, False
        self._unstable_from = max(self._unstable_from, index + 1)
        return True

    # -- output ----------------------------------------------------------------------
    def has_ready(self) -> bool:
        return bool(
            self._msgs
            or self._bcast
            or self._dirty
            or self._hb_now
            or self._hs_dirty
            or self._snap_pending is not None
            or (self._unstable_from <= self.last_index() and not self._persist_can_wait())
            or self.commit > self._applied
            or self._ready_reads
            or self._aborted_reads
            or self._soft != (self.term, self.role, self.leader)
        )

    def ready(self) -> Ready:
        """What to persist, send and apply now (see `Ready` for the order)."""
        if self._in_ready:
            raise RuntimeError("ready() called twice without advance()")
        if self.role is _LEADER:
            tracker = self._tracker
            if self._bcast:
                self._bcast = False
                self._dirty.clear()
                for p in tracker.targets:
                    self._send_append(p, tracker[p], notify_commit=True)
            elif self._dirty:
                for p in sorted(self._dirty):  # sorted: deterministic message order
                    self._send_append(p, tracker[p], notify_commit=False)
                self._dirty.clear()
            if self._hb_now:
                self._hb_now = False
                self._broadcast_heartbeat()
            self._maybe_resign()  # after the sends: they carry the commit that removed us
        rd = Ready(commit_index=self.commit)
        if self._hs_dirty:
            rd.hard_state = (self.term, self.voted_for)
        if self._snap_pending is not None:
            rd.snapshot, rd.install = self._snap_pending, self._snap_install
        if self._unstable_from <= self.last_index() and (self._unstable_sent or not self._persist_can_wait()):
            rd.entries = self._log[self._unstable_from - self._snap_index - 1 :]
            rd.must_sync = True
        self._unstable_sent = False
        rd.messages, self._msgs = self._msgs, []
        if self.role is _LEADER and rd.hard_state is None and rd.snapshot is None:
            # A leader's appends and heartbeats need nothing of this Ready on its disk: it
            # counts itself towards a commit only once its own entries are synced
            # (`_stable_last`), so they may go before its fsync. Anything else waits.
            eager = [m for m in rd.messages if type(m) in _EAGER]
            if eager:
                rd.eager_messages = eager
                rd.messages = [m for m in rd.messages if type(m) not in _EAGER]
        if self.commit > self._applied:
            rd.committed = self._slice(self._applied + 1, self.commit + 1, self._cfg.max_apply_bytes)
        rd.read_states, self._ready_reads = self._ready_reads, []
        rd.aborted_reads, self._aborted_reads = self._aborted_reads, []
        soft = (self.term, self.role, self.leader)
        if soft != self._soft:
            self._soft = soft
            rd.soft_state = SoftState(*soft)
        self._in_ready = True
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver finished `rd`: its entries are durable and its committed entries applied."""
        self._in_ready = False
        if rd.hard_state is not None:
            self._hs_dirty = False
        self._snap_pending = None
        if rd.entries or rd.snapshot is not None:
            self._stable_last = self.last_index()
            self._unstable_from = self._stable_last + 1
        if rd.committed:
            self._applied = max(self._applied, rd.committed[-1].index)
        if self.role is _LEADER and rd.entries:
            self._maybe_commit()

    # -- roles -----------------------------------------------------------------------
    def _enter(self, now: float) -> None:
        if self._in_ready:
            raise RuntimeError("input between ready() and advance()")
        self._now = now

    def _election_timeout(self) -> float:
        t = self._cfg.election_timeout
        return self._rng.uniform(t, 2 * t)

    def _in_lease(self) -> bool:
        if not self._cfg.check_quorum:
            return False
        if self.role is _LEADER:
            return True
        return bool(self.leader) and self._now - self._leader_contact < self._cfg.election_timeout

    def _become_follower(self, term: int, leader: str) -> None:
        if term > self.term:
            self.term, self.voted_for, self._hs_dirty = term, "", True
        if self.role is _LEADER:
            if self._conf.change is not None:
                self._fail_change("leadership was lost")
            self._tracker.clear()
            self._snap_sender.clear()
            self._transferee = ""
            self._bcast = self._hb_now = False
            self._commit_notify_at = math.inf
            self._dirty.clear()
        self._abort_reads()
        if self.role is not _FOLLOWER or self.leader != leader:
            logger.debug("%s: follower in term %d (leader %r)", self.id, term, leader)
        self.role, self.leader = _FOLLOWER, leader
        if leader:
            self._leader_contact = self._now
        self._election_deadline = self._now + self._election_timeout()

    def _follow(self, leader: str) -> None:
        """A message from the leader of our term: reset the election timer."""
        if self.role is not _FOLLOWER or self.leader != leader:
            self._become_follower(self.term, leader)
        else:
            self._leader_contact = self._now
            self._election_deadline = self._now + self._election_timeout()

    def _campaign(self, *, pre: bool, transfer: bool = False) -> None:
        self._abort_reads()
        if pre:
            self.role, self.leader = _PRE, ""
            term = self.term + 1
        else:
            self.term += 1
            self.voted_for, self._hs_dirty = self.id, True
            self.role, self.leader = _CAND, ""
            term = self.term
        logger.debug("%s: %s for term %d", self.id, self.role.value, term)
        self._votes = {self.id: True}
        self._election_deadline = self._now + self._election_timeout()
        if self._conf.quorum == 1:  # we are the only voter (_campaign is for voters only)
            self._won(pre)
            return
        li = self.last_index()
        lt = self.term_at(li)
        for p in self._conf.others:
            self._send(VoteRequest(self.id, p, term, li, lt, pre, transfer))

    def _won(self, pre: bool) -> None:
        if pre:
            self._campaign(pre=False)
            return
        logger.info("%s: leader in term %d", self.id, self.term)
        self.role, self.leader = _LEADER, self.id
        last = self.last_index()
        self._tracker.reset(self._conf.others, last + 1, self._now)
        self._hb_deadline = self._now + self._cfg.heartbeat_interval
        self._cq_deadline = self._now + self._cfg.election_timeout
        self._transferee = ""
        # The no-op: commit counting only works for own-term entries (Raft paper 5.4.2).
        self._log.append(Entry(last + 1, self.term, self._cfg.noop_data))
        self.term_start_index = last + 1
        self._bcast = True

    def _log_up_to_date(self, last_term: int, last_index: int) -> bool:
        mine = self.last_index()
        my_term = self.term_at(mine)
        return last_term > my_term or (last_term == my_term and last_index >= mine)

    # -- message handlers ------------------------------------------------------------
    def _on_vote_request(self, m: VoteRequest) -> None:
        can = (
            self.voted_for == m.frm
            or (not self.voted_for and not self.leader)
            or (m.pre_vote and m.term > self.term)
        )
        if can and self._log_up_to_date(m.last_term, m.last_index):
            self._send(VoteResponse(self.id, m.frm, m.term, True, m.pre_vote))
            if not m.pre_vote:
                self.voted_for, self._hs_dirty = m.frm, True
                self._election_deadline = self._now + self._election_timeout()
        else:
            self._send(VoteResponse(self.id, m.frm, self.term, False, m.pre_vote))

    def _on_vote_response(self, m: VoteResponse) -> None:
        if m.pre_vote:
            if self.role is not _PRE or (m.granted and m.term != self.term + 1):
                return
        elif self.role is not _CAND or m.term != self.term:
            return
        conf = self._conf
        if m.frm not in conf.voters:
            return  # only our configuration's voters make our majority
        self._votes.setdefault(m.frm, m.granted)
        granted = sum(1 for v in self._votes.values() if v)
        if granted >= conf.quorum:
            self._won(m.pre_vote)
        elif len(self._votes) - granted > len(conf.voters) - conf.quorum:
            self._become_follower(self.term, "")

    def _on_timeout_now(self, m: TimeoutNow) -> None:
        if self.role is _FOLLOWER and m.frm == self.leader and self.id in self._conf.voters:
            logger.info("%s: campaigning at once (leadership transfer from %s)", self.id, m.frm)
            self._campaign(pre=False, transfer=True)

    def _on_append(self, m: AppendRequest) -> None:
        if self.role is _LEADER:
            logger.error("%s: append from %s in my own term %d", self.id, m.frm, self.term)
            return
        self._follow(m.frm)
        if m.prev_index < self.commit:
            # Everything up to our commit index matches; skip what we have.
            self._send(AppendResponse(self.id, m.frm, self.term, True, self.commit))
            return
        prev_term = self.term_at(m.prev_index)
        if prev_term != m.prev_term:
            if prev_term < 0:  # our log ends before prev_index
                hint_index, hint_term = self.last_index() + 1, 0
            else:  # skip back over the whole conflicting term
                hint_term, i = prev_term, m.prev_index
                floor = max(self.commit, self._snap_index) + 1
                while i > floor and self.term_at(i - 1) == prev_term:
                    i -= 1
                hint_index = i
            self._send(AppendResponse(self.id, m.frm, self.term, False, m.prev_index, hint_index, hint_term))
            return
        if m.entries:
            self._accept(m.entries)
        last_new = m.prev_index + len(m.entries)
        if m.commit > self.commit:
            self.commit = max(self.commit, min(m.commit, last_new))
        self._send(AppendResponse(self.id, m.frm, self.term, True, last_new))

    def _accept(self, entries: list[Entry]) -> None:
        """Append after a matching prev entry, truncating at the first conflict."""
        last = self.last_index()
        for k, e in enumerate(entries):
            if e.index > last:
                self._log.extend(entries[k:])
                self._scan_config(entries[k:])
                return
            if self.term_at(e.index) != e.term:
                if e.index <= self.commit:
                    raise AssertionError(f"{self.id}: conflict at committed index {e.index}")
                del self._log[e.index - self._snap_index - 1 :]
                self._config_truncated(e.index)
                self._unstable_from = min(self._unstable_from, e.index)
                self._stable_last = min(self._stable_last, e.index - 1)
                self._log.extend(entries[k:])
                self._scan_config(entries[k:])
                return

    def _on_heartbeat(self, m: Heartbeat) -> None:
        if self.role is _LEADER:
            return
        self._follow(m.frm)
        c = min(m.commit, self.last_index())
        if c > self.commit:
            self.commit = c
        self._send(HeartbeatResponse(self.id, m.frm, self.term, m.ctx))

    def _on_snapshot(self, m: SnapshotRequest) -> None:
        if self.role is _LEADER:
            return
        self._follow(m.frm)
        s = m.snapshot
        if s.index <= self.commit:
            self._send(AppendResponse(self.id, m.frm, self.term, True, self.commit))
            return
        if self.term_at(s.index) == s.term:
            self.commit = s.index  # our log already holds it: just fast-forward
            self._snap_assembly.reset()
            self._send(AppendResponse(self.id, m.frm, self.term, True, s.index))
            return
        got = self._snap_assembly.add(m)
        if isinstance(got, int):  # more to come: ask for the bytes from `got` on
            self._send(SnapshotAck(self.id, m.frm, self.term, s.index, got))
            return
        logger.info("%s: installing snapshot at %d (term %d, %d bytes)", self.id, got.index, got.term, len(got.data))
        self._log = []
        self._snap_index, self._snap_term, self._snapshot = got.index, got.term, got
        self._config_installed(got)
        self._snap_pending, self._snap_install = got, True
        self.commit = self._applied = got.index
        self._unstable_from = got.index + 1
        self._stable_last = min(self._stable_last, got.index)
        self._send(AppendResponse(self.id, m.frm, self.term, True, got.index))

    def _on_snapshot_ack(self, m: SnapshotAck) -> None:
        """Leader: send the chunk the follower asks for, if it is still being sent that one."""
        if self.role is not _LEADER:
            return
        pr = self._tracker.get(m.frm)
        if pr is None:
            return
        pr.recent_active = True
        if pr.state is not PeerState.SNAPSHOT or pr.snapshot_index != m.index:
            return  # stale: the transfer ended or another began
        chunk = self._snap_sender.next_chunk(self.id, m.frm, self.term, m.index, m.offset)
        if chunk is not None:
            pr.last_ack = self._now  # progress: the stall timeout counts from here
            self._send(chunk)

    _handlers = {
        VoteRequest: _on_vote_request,
        VoteResponse: _on_vote_response,
        AppendRequest: _on_append,
        AppendResponse: LeaderMixin._on_append_response,
        Heartbeat: _on_heartbeat,
        HeartbeatResponse: LeaderMixin._on_heartbeat_response,
        SnapshotRequest: _on_snapshot,
        SnapshotAck: _on_snapshot_ack,
        TimeoutNow: _on_timeout_now,
    }

    # -- helpers ---------------------------------------------------------------------
    def _send(self, m: Message) -> None:
        self._msgs.append(m)

    def _slice(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries [lo, hi) up to max_bytes of payload, at least one."""
        log, base = self._log, self._snap_index + 1
        start = i = lo - base
        end = hi - base
        total = 0
        while i < end:
            total += len(log[i].data)
            if total > max_bytes and i > start:
                break
            i += 1
        return log[start:i]

    def _abort_reads(self) -> None:
        if self._pending_reads:
            self._aborted_reads.extend(r[0] for r in self._pending_reads)
            self._pending_reads.clear()
