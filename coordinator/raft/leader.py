"""The leader's half of `RaftCore`: replication flow control, commit counting, ReadIndex,
leadership transfer. Majorities count the voters of the current configuration only (a
learner is replicated to but not counted; a leader removing itself does not count itself).

The state it works on has owners: each peer's replication progress and the majority
arithmetic over it are the `ProgressTracker`'s (progress.py), who votes is the
`Configuration`'s (membership.py). `LeaderMixin` holds the leader's steps; it is
meaningless without `RaftCore`, whose attributes it uses (declared below for type checkers).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

from lepton.common.errors import NotLeader
from lepton.coordinator.raft.messages import (
    AppendRequest,
    AppendResponse,
    Config,
    Heartbeat,
    HeartbeatResponse,
    Message,
    Role,
    TimeoutNow,
)
from lepton.coordinator.raft.progress import PeerState, Progress, ProgressTracker
from lepton.coordinator.storage.log_store import Entry, Snapshot

if TYPE_CHECKING:
    from lepton.coordinator.raft.membership import Configuration
    from lepton.coordinator.raft.snapshot_transfer import SnapshotSender

logger = logging.getLogger(__name__)


class LeaderMixin:
    id: str
    term: int
    commit: int
    role: Role
    _cfg: Config
    _now: float
    _tracker: ProgressTracker
    _conf: Configuration
    _dirty: set[str]
    _bcast: bool
    _snap_index: int
    _snapshot: Snapshot | None
    _snap_sender: SnapshotSender
    _stable_last: int
    _unstable_from: int
    _unstable_sent: bool
    _hs_dirty: bool
    _snap_pending: Snapshot | None
    _read_seq: int
    _pending_reads: deque[list]
    _ready_reads: list[tuple[object, int]]
    _transferee: str
    _transfer_deadline: float
    _hb_now: bool
    _commit_notify_at: float

    if TYPE_CHECKING:  # provided by RaftCore

        def last_index(self) -> int: ...
        def term_at(self, index: int) -> int: ...
        def _send(self, m: Message) -> None: ...
        def _slice(self, lo: int, hi: int, max_bytes: int) -> list[Entry]: ...
        def _enter(self, now: float) -> None: ...
        def leader_address(self) -> str: ...
        def _learner_progress(self, node_id: str) -> None: ...
        def _maybe_change(self) -> None: ...

    def read_index(self, ctx: object) -> None:
        """Start a linearizable read. A later Ready lists (ctx, index) in read_states once
        leadership is confirmed by a quorum; the read may be served when applied >= index.
        If leadership is lost first, ctx appears in aborted_reads. Raises NotLeader."""
        self._enter(self._now)
        if self.role is not Role.LEADER:
            raise NotLeader(f"{self.id} is not the leader", leader=self.leader_address())
        self._read_seq += 1
        own = self.term_at(self.commit) == self.term
        self._pending_reads.append([ctx, self._read_seq, self.commit if own else None])
        self._hb_now = True
        self._confirm_reads()

    def transfer_leadership(self, to: str) -> None:
        """Hand leadership to voter `to` once it is caught up; proposals fail meanwhile.
        Raises NotLeader, ValueError (not a voter)."""
        self._enter(self._now)
        if self.role is not Role.LEADER:
            raise NotLeader(f"{self.id} is not the leader", leader=self.leader_address())
        if to == self.id:
            return
        if to not in self._conf.voters:
            raise ValueError(f"unknown voter {to!r}")
        self._transferee = to
        self._transfer_deadline = self._now + self._cfg.election_timeout
        if self._tracker[to].match == self.last_index():
            self._send(TimeoutNow(self.id, to, self.term))
        self._bcast = True

    def _persist_can_wait(self) -> bool:
        """Leader: may its new entries stay off its disk for now? Yes while every other
        voter has a full append window: they cannot commit before an append carries them,
        which waits for an answer that frees a window (or for a silent follower to drop to
        probing); that ready() sends them and persists them, its fsync overlapping the
        follower's (eager messages). So the proposals that arrive during one replication
        round share one fsync here, as they share one on each follower; persisting each as
        it came cost the leader a thread hop and an fsync per proposal or two, and made
        nothing commit sooner. A leader alone, or with a follower it could send to now,
        persists at once."""
        if self.role is not Role.LEADER or self._hs_dirty or self._snap_pending is not None:
            return False
        conf = self._conf
        if not conf.others or self.id not in conf.voters:
            return False
        limit = self._cfg.max_inflight
        for p in conf.others:
            pr = self._tracker.get(p)
            if pr is None or pr.state is not PeerState.REPLICATE or len(pr.inflight) < limit:
                return False
        return True

    def _on_append_response(self, m: AppendResponse) -> None:
        if self.role is not Role.LEADER:
            return
        pr = self._tracker.get(m.frm)
        if pr is None:
            return  # no longer a voter or learner
        pr.recent_active = True
        if m.success:
            if m.index > pr.match:
                pr.match = m.index
                pr.last_ack = self._now
                if m.frm in self._conf.voters:
                    self._maybe_commit()
                else:
                    self._learner_progress(m.frm)
            if pr.state is PeerState.REPLICATE:
                inflight = pr.inflight
                while inflight and inflight[0] <= m.index:
                    inflight.popleft()
            elif pr.state is PeerState.PROBE or pr.match >= pr.snapshot_index:
                pr.become_replicate(self._now)
            if pr.next <= pr.match:
                pr.next = pr.match + 1
            self._dirty.add(m.frm)
            if self._transferee == m.frm and pr.match == self.last_index():
                self._send(TimeoutNow(self.id, m.frm, self.term))
            return
        if pr.state is PeerState.REPLICATE and m.index > pr.match:
            pr.become_probe(self._now)
        elif not (pr.state is PeerState.PROBE and m.index == pr.next - 1):
            return  # stale or reordered
        nxt = self._next_after_reject(m, pr)
        if nxt == pr.next and pr.probe_sent:
            # Nothing learned (the follower lost entries it had acknowledged?): retry on
            # the next heartbeat, never at once, or duplicated rejects would multiply.
            return
        pr.next = nxt
        pr.probe_sent = False
        self._dirty.add(m.frm)

    def _next_after_reject(self, m: AppendResponse, pr: Progress) -> int:
        nxt = m.hint_index
        if m.hint_term > 0:
            i = min(m.index, self.last_index())
            while i > self._snap_index and self.term_at(i) > m.hint_term:
                i -= 1
            if self.term_at(i) == m.hint_term:
                nxt = i + 1
        return max(min(nxt, m.index), pr.match + 1)

    def _on_heartbeat_response(self, m: HeartbeatResponse) -> None:
        if self.role is not Role.LEADER:
            return
        pr = self._tracker.get(m.frm)
        if pr is None:
            return
        pr.recent_active = True
        if m.ctx > pr.read_ack:
            pr.read_ack = m.ctx
            self._confirm_reads()
        if pr.state is PeerState.PROBE:
            pr.probe_sent = False  # the probe may have been lost: resend
        elif (
            pr.state is PeerState.REPLICATE
            and pr.inflight
            and self._now - pr.last_ack >= 2 * self._cfg.heartbeat_interval
        ):
            pr.become_probe(self._now)  # it answers heartbeats but not appends: they were lost
        if pr.match < self.last_index():
            self._dirty.add(m.frm)

    def _send_append(self, p: str, pr: Progress, *, notify_commit: bool) -> None:
        """Send what `p` lacks, within its flow-control window; else, with notify_commit,
        refresh its commit (a heartbeat)."""
        last = self.last_index()
        sent = False
        while pr.state is not PeerState.SNAPSHOT:
            if pr.state is PeerState.PROBE and pr.probe_sent:
                break
            if pr.state is PeerState.REPLICATE and (
                pr.next > last or len(pr.inflight) >= self._cfg.max_inflight
            ):
                break
            prev = pr.next - 1
            prev_term = self.term_at(prev)
            if prev_term < 0:
                self._send_snapshot(p, pr)
                return
            entries = self._slice(pr.next, last + 1, self._cfg.max_msg_bytes) if pr.next <= last else []
            self._send(AppendRequest(self.id, p, self.term, prev, prev_term, entries, self.commit))
            sent = True
            if entries and entries[-1].index >= self._unstable_from:
                self._unstable_sent = True  # so they are persisted in this Ready (core.ready)
            pr.sent_commit = max(pr.sent_commit, min(self.commit, prev + len(entries)))
            if pr.state is PeerState.PROBE:
                pr.probe_sent = True
                break
            pr.next = entries[-1].index + 1
            pr.inflight.append(pr.next - 1)
        if not sent and notify_commit:
            commit = min(pr.match, self.commit)
            if commit > pr.sent_commit:
                pr.sent_commit = commit
                self._send(Heartbeat(self.id, p, self.term, commit, self._read_seq))

    def _send_snapshot(self, p: str, pr: Progress) -> None:
        snap = self._snapshot
        assert snap is not None, "a compacted log always has a snapshot"
        logger.info("%s: sending snapshot at %d to %s", self.id, snap.index, p)
        pr.state = PeerState.SNAPSHOT
        pr.snapshot_index = snap.index
        pr.last_ack = self._now
        self._send(self._snap_sender.start(self.id, p, self.term, snap))  # chunk by chunk

    def _broadcast_heartbeat(self) -> None:
        tracker = self._tracker
        for p in tracker.targets:
            pr = tracker[p]
            commit = min(pr.match, self.commit)
            pr.sent_commit = max(pr.sent_commit, commit)
            self._send(Heartbeat(self.id, p, self.term, commit, self._read_seq))

    def _maybe_commit(self) -> None:
        conf = self._conf
        # A leader that removed itself keeps leading without counting itself.
        own = self._stable_last if self.id in conf.voters else None
        q = self._tracker.quorum_match(conf.others, own, conf.quorum)
        # Only own-term entries are committed by counting (Raft paper figure 8).
        if q > self.commit and self.term_at(q) == self.term:
            old, self.commit = self.commit, q
            delay = self._cfg.commit_notify_delay
            if delay <= 0 or conf.index > old or self.id not in conf.voters:
                self._bcast = True  # a committed configuration travels at once (resigning, learners)
            else:  # the next append carries it, or this deadline sends it
                self._commit_notify_at = min(self._commit_notify_at, self._now + delay)
            self._maybe_change()  # waits for our term's first commit and the last change's
            if self._pending_reads:
                for r in self._pending_reads:
                    if r[2] is None:
                        r[2] = q
                self._confirm_reads()

    def _confirm_reads(self) -> None:
        reads = self._pending_reads
        if not reads:
            return
        conf = self._conf
        need = conf.quorum - (self.id in conf.voters)  # acks from other voters
        if need:
            confirmed = self._tracker.quorum_read_ack(conf.others, need)
        else:
            confirmed = self._read_seq
        while reads and reads[0][1] <= confirmed and reads[0][2] is not None:
            ctx, _, index = reads.popleft()
            self._ready_reads.append((ctx, index))
