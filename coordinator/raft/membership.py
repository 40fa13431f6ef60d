"""Changing the voter set, one server at a time (Ongaro's dissertation, section 4.1).

A configuration is the map voter id -> address. It travels as a log entry whose payload
starts with `CONFIG_PREFIX` (a byte no serialized `Command` starts with, and longer than
any simulated command), and inside every snapshot (`Snapshot.config`). The rules:

- a server uses the latest configuration in its log, committed or not: it takes effect on
  append, and reverts when a conflicting leader truncates the entry away;
- before any configuration entry (or snapshot carrying one) exists, the bootstrap voters
  (`--peers`) are the configuration; a server outside its configuration never campaigns;
- a leader has at most one change in flight, and starts one only once it has committed an
  entry of its own term (the no-op) and the previous configuration is committed: two
  configurations in a row then always differ by one server, so their majorities overlap;
- a new voter first catches up as a non-voting learner (the leader replicates to it; only
  leader-local state, lost with leadership), and is added by a configuration entry once its
  match index is within `Config.learner_slack` of the leader's last index; a learner that
  makes no progress for `Config.learner_timeout` is dropped and the change fails;
- a leader outside the configuration it appended keeps leading without counting itself,
  and steps down (handing leadership to a caught-up voter) once that entry commits.

`Configuration` owns this state (etcd-raft's confchange and tracker.Config): the voters,
the configuration entries still in the log, the snapshot's, and the leader's one pending
change. `MembershipMixin` is `RaftCore`'s half that acts on it: the leader's change
requests and the moments a configuration takes effect.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from lepton.common.errors import AlreadyExists, FailedPrecondition, NotFound, NotLeader
from lepton.coordinator.raft.messages import Config, Message, Role, TimeoutNow
from lepton.coordinator.raft.progress import ProgressTracker
from lepton.coordinator.storage.log_store import Entry, Snapshot

logger = logging.getLogger(__name__)

CONFIG_PREFIX = b"\x00lepton.raft.config\x00"
ADD, REMOVE = "add", "remove"


def encode_config(voters: Mapping[str, str]) -> bytes:
    return CONFIG_PREFIX + json.dumps(dict(sorted(voters.items())), separators=(",", ":")).encode()


def is_config(data: bytes) -> bool:
    # The first-byte test keeps the common case (a Command) to one comparison.
    return data[:1] == b"\x00" and data.startswith(CONFIG_PREFIX)


def decode_config(data: bytes) -> dict[str, str]:
    """Raises ValueError for anything `encode_config` did not produce."""
    if not is_config(data):
        raise ValueError("not a Raft configuration")
    doc = json.loads(data[len(CONFIG_PREFIX) :])
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise ValueError("malformed Raft configuration")
    return doc


class Configuration:
    """Who votes now (the latest configuration in the log, committed or not), what to fall
    back to when entries are truncated or compacted, and the leader's pending change."""

    def __init__(self, node_id: str, peers: Mapping[str, str], snap: Snapshot | None):
        self._id = node_id
        self.bootstrap = dict(peers)  # the voters before any configuration entry
        self.addresses = dict(peers)  # every voter's and learner's address ever seen
        # (index, voters) of the configuration the snapshot carries; None: none yet.
        self._snap: tuple[int, dict[str, str]] | None = (
            (snap.index, decode_config(snap.config)) if snap is not None and snap.config else None)
        self._entries: list[tuple[int, dict[str, str]]] = []  # configuration entries in the log
        self.voters: dict[str, str] = {}
        self.index = 0  # of the entry that set the voters (0: bootstrap)
        self.quorum = 0
        self.others: list[str] = []  # voters other than this node: whom a candidate asks
        self._set_once = False
        # Leader-local: the change requested and not yet appended, as (op, id).
        self.change: tuple[str, str] | None = None
        self.learner_seen = 0.0  # when the learner's match index last grew
        self.change_error = ""  # why the last change failed ("" if it did not)

    def initial(self) -> tuple[dict[str, str], int]:
        """The configuration before the log's entries: the snapshot's, else the bootstrap."""
        return (self._snap[1], self._snap[0]) if self._snap is not None else (self.bootstrap, 0)

    def set(self, voters: Mapping[str, str], index: int) -> None:
        """`voters`, set by the entry at `index`, take effect."""
        old = self.voters if self._set_once else None
        self._set_once = True
        self.voters = dict(voters)
        self.index = index
        self.addresses.update(voters)
        self.quorum = len(voters) // 2 + 1
        self.others = sorted(p for p in voters if p != self._id)
        if old is not None and old != self.voters:
            logger.info("%s: voters now %s (entry %d)", self._id, sorted(voters), index)

    def appended(self, entries: list[Entry]) -> list[tuple[dict[str, str], int]]:
        """`entries` were appended to the log: the configurations among them, in order
        (the last takes effect)."""
        found = []
        for e in entries:
            if e.data[:1] == b"\x00" and is_config(e.data):
                voters = decode_config(e.data)
                self._entries.append((e.index, voters))
                found.append((voters, e.index))
        return found

    def truncated(self, from_index: int) -> tuple[dict[str, str], int] | None:
        """Entries from `from_index` on were removed: the configuration to fall back to,
        or None when none of them was a configuration."""
        entries = self._entries
        if not entries or entries[-1][0] < from_index:
            return None
        while entries and entries[-1][0] >= from_index:
            entries.pop()
        index, voters = self.at_or_before(from_index - 1)
        logger.info("%s: configuration entry truncated; back to %s", self._id, sorted(voters))
        return voters, index

    def at_or_before(self, index: int) -> tuple[int, dict[str, str]]:
        for at, voters in reversed(self._entries):
            if at <= index:
                return at, voters
        if self._snap is not None:
            return self._snap
        return 0, self.bootstrap

    def compacted(self, snap_index: int) -> bytes:
        """The log up to `snap_index` becomes a snapshot: returns the configuration it
        must carry, and forgets the entries it covers."""
        _, voters = self.at_or_before(snap_index)
        self._snap = (snap_index, voters)
        self._entries = [c for c in self._entries if c[0] > snap_index]
        return encode_config(voters)

    def installed(self, snap: Snapshot) -> tuple[dict[str, str], int] | None:
        """The whole log was replaced by `snap`: the configuration that takes effect, or
        None when the current one still holds."""
        self._entries = []
        if snap.config:
            self._snap = (snap.index, decode_config(snap.config))
            return self._snap[1], snap.index
        if self.index > snap.index:  # a snapshot from before configurations
            self._snap = None
            return self.bootstrap, 0
        self._snap = (snap.index, dict(self.voters))  # ours holds, but its entry is gone
        return None


class MembershipMixin:
    id: str
    term: int
    commit: int
    role: Role
    term_start_index: int
    _cfg: Config
    _now: float
    _log: list[Entry]
    _conf: Configuration
    _tracker: ProgressTracker
    _bcast: bool
    _dirty: set[str]
    _transferee: str

    if TYPE_CHECKING:  # provided by RaftCore

        def last_index(self) -> int: ...
        def _send(self, m: Message) -> None: ...
        def _become_follower(self, term: int, leader: str) -> None: ...
        def _enter(self, now: float) -> None: ...
        def leader_address(self) -> str: ...

    # -- views -----------------------------------------------------------------------
    @property
    def voters(self) -> list[str]:
        """The current configuration (the latest in the log, committed or not)."""
        return sorted(self._conf.voters)

    @property
    def learners(self) -> list[str]:
        """Leader only: the server catching up before it is added."""
        ch = self._conf.change
        return [ch[1]] if ch is not None and ch[0] == ADD and ch[1] in self._tracker else []

    @property
    def config_index(self) -> int:
        return self._conf.index

    @property
    def is_voter(self) -> bool:
        return self.id in self._conf.voters

    @property
    def change_error(self) -> str:
        """Why the last change failed ("" if it did not)."""
        return self._conf.change_error

    def pending_change(self) -> tuple[str, str] | None:
        """Leader: the change requested and not yet appended as an entry, as (op, id)."""
        return self._conf.change

    def address_of(self, node_id: str) -> str:
        return self._conf.addresses.get(node_id, "")

    # -- a configuration takes effect -------------------------------------------------
    def _scan_config(self, entries: list[Entry]) -> None:
        """`entries` were just appended to the log."""
        for voters, index in self._conf.appended(entries):
            self._set_config(voters, index)

    def _config_truncated(self, from_index: int) -> None:
        back = self._conf.truncated(from_index)
        if back is not None:
            self._set_config(*back)

    def _config_installed(self, snap: Snapshot) -> None:
        now = self._conf.installed(snap)
        if now is not None:
            self._set_config(*now)

    def _set_config(self, voters: Mapping[str, str], index: int) -> None:
        """The one place a configuration takes effect; a leader replicates to the new
        voters (and its learner) from here on."""
        conf = self._conf
        conf.set(voters, index)
        if self.role is Role.LEADER:
            dropped = self._tracker.track(conf.others + self.learners, self.last_index() + 1, self._now)
            self._dirty.difference_update(dropped)
            if self._transferee and self._transferee not in conf.voters:
                self._transferee = ""  # proposals would wait for a transfer that cannot happen
            self._bcast = True

    # -- leader: changes -------------------------------------------------------------
    def add_voter(self, node_id: str, address: str) -> None:
        """Start adding `node_id` at `address`: replicate to it as a learner, then append
        the configuration that adds it once it has caught up. Watch `pending_change()`,
        `voters`, `config_index` and `change_error` for the outcome.
        Raises NotLeader, AlreadyExists, FailedPrecondition (a change is in progress)."""
        self._enter(self._now)
        self._check_change()
        conf = self._conf
        if node_id in conf.voters:
            raise AlreadyExists(f"{node_id} is already a voter")
        conf.change = (ADD, node_id)
        conf.change_error = ""
        conf.addresses[node_id] = address
        conf.learner_seen = self._now
        self._tracker.add(node_id, self.last_index() + 1, self._now)
        self._bcast = True
        logger.info("%s: catching up %s (%s) as a learner", self.id, node_id, address)

    def remove_voter(self, node_id: str) -> None:
        """Remove `node_id` (this leader included) by a configuration entry, appended as
        soon as the rules allow. Raises NotLeader, NotFound, FailedPrecondition (a change
        in progress, or it is the last voter)."""
        self._enter(self._now)
        self._check_change()
        conf = self._conf
        if node_id not in conf.voters:
            raise NotFound(f"{node_id} is not a voter")
        if len(conf.voters) == 1:
            raise FailedPrecondition(f"{node_id} is the last voter; the cluster needs one")
        conf.change = (REMOVE, node_id)
        conf.change_error = ""
        self._maybe_change()

    def abort_change(self, reason: str) -> bool:
        """Drop a change not yet appended (the caller gave up). True when one was dropped."""
        self._enter(self._now)
        if self._conf.change is None:
            return False
        self._fail_change(reason)
        return True

    def _check_change(self) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(f"{self.id} is not the leader", leader=self.leader_address())
        if self._conf.change is not None or self._conf.index > self.commit:
            raise FailedPrecondition("a voter change is already in progress; retry when it is done")

    def _fail_change(self, reason: str) -> None:
        conf = self._conf
        op, node_id = conf.change  # type: ignore[misc]
        conf.change = None
        conf.change_error = reason
        logger.info("%s: %s %s abandoned: %s", self.id, op, node_id, reason)
        if op == ADD and node_id not in conf.voters and self._tracker.remove(node_id):
            self._dirty.discard(node_id)

    def _maybe_change(self) -> None:
        """Append the requested configuration once the rules allow (see the module doc)."""
        conf = self._conf
        ch = conf.change
        if ch is None or self.role is not Role.LEADER:
            return
        if self.commit < self.term_start_index or conf.index > self.commit:
            return
        op, node_id = ch
        if op == ADD:
            pr = self._tracker[node_id]
            if pr.match < self.term_start_index or self.last_index() - pr.match > self._cfg.learner_slack:
                return
            voters = {**conf.voters, node_id: conf.addresses[node_id]}
        else:
            voters = {p: a for p, a in conf.voters.items() if p != node_id}
        conf.change = None
        index = self.last_index() + 1
        entry = Entry(index, self.term, encode_config(voters))
        self._log.append(entry)
        self._scan_config([entry])
        self._bcast = True

    def _learner_progress(self, node_id: str) -> None:
        """The learner's match index grew."""
        ch = self._conf.change
        if ch is not None and ch[1] == node_id and ch[0] == ADD:
            self._conf.learner_seen = self._now
            self._maybe_change()

    def _learner_tick(self, now: float) -> None:
        ch = self._conf.change
        if ch is not None and ch[0] == ADD:
            limit = self._cfg.learner_timeout or 10 * self._cfg.election_timeout
            if now - self._conf.learner_seen >= limit:
                self._fail_change(f"{ch[1]} did not catch up within {limit:.3g}s "
                                  "(unreachable, or not running a Raft node)")

    def _maybe_resign(self) -> None:
        """A leader that removed itself leaves once that is committed, handing over to
        the most caught-up voter so the cluster need not wait for an election timeout."""
        conf, tracker = self._conf, self._tracker
        if self.id in conf.voters or self.commit < conf.index:
            return
        logger.info("%s: removed from the voters (entry %d committed); stepping down", self.id, conf.index)
        last = self.last_index()
        best = max(conf.others, key=lambda p: tracker[p].match, default="")
        if best and tracker[best].match == last:
            self._send(TimeoutNow(self.id, best, self.term))
        self._become_follower(self.term, "")
