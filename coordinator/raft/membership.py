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

`MembershipMixin` is `RaftCore`'s half that does this; it has no state of its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from lepton.common.errors import AlreadyExists, FailedPrecondition, NotFound, NotLeader
from lepton.coordinator.raft.messages import Config, Message, Role, TimeoutNow
from lepton.coordinator.raft.progress import Progress
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


class MembershipMixin:
    id: str
    term: int
    commit: int
    role: Role
    term_start_index: int
    _cfg: Config
    _now: float
    _log: list[Entry]
    _prs: dict[str, Progress]
    _bcast: bool
    _dirty: set[str]
    _transferee: str
    _snap_index: int
    _addresses: dict[str, str]
    # Configuration state, owned here.
    _bootstrap: dict[str, str]
    _voters: dict[str, str]
    _others: list[str]  # voters other than this node: whom a candidate asks
    _targets: list[str]  # leader: whom it replicates to (other voters and the learner)
    _quorum: int
    _conf_index: int  # index of the entry that set the configuration (0: bootstrap)
    _conf_log: list[tuple[int, dict[str, str]]]  # configuration entries in the log
    _snap_conf: dict[str, str] | None  # the snapshot's configuration
    _change: tuple[str, str] | None  # leader: requested, not yet appended
    _learner_seen: float  # leader: when the learner's match index last grew
    change_error: str  # why the last change failed ("" if it did not)

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
        return sorted(self._voters)

    @property
    def learners(self) -> list[str]:
        """Leader only: the server catching up before it is added."""
        ch = self._change
        return [ch[1]] if ch is not None and ch[0] == ADD and ch[1] in self._prs else []

    @property
    def config_index(self) -> int:
        return self._conf_index

    @property
    def is_voter(self) -> bool:
        return self.id in self._voters

    def pending_change(self) -> tuple[str, str] | None:
        """Leader: the change requested and not yet appended as an entry, as (op, id)."""
        return self._change

    def address_of(self, node_id: str) -> str:
        return self._addresses.get(node_id, "")

    # -- configuration tracking ------------------------------------------------------
    def _init_config(self, peers: Mapping[str, str], snap: Snapshot | None) -> None:
        self._bootstrap = dict(peers)
        self._addresses = dict(peers)
        self._snap_conf = decode_config(snap.config) if snap is not None and snap.config else None
        self._conf_log = []
        self._change = None
        self._learner_seen = 0.0
        self.change_error = ""
        self._targets = []
        self._set_config(self._snap_conf if self._snap_conf is not None else self._bootstrap, self._snap_index
                         if self._snap_conf is not None else 0)
        self._scan_config(self._log)

    def _scan_config(self, entries: list[Entry]) -> None:
        """`entries` were just appended to the log: the last configuration among them
        takes effect now."""
        for e in entries:
            if e.data[:1] == b"\x00" and is_config(e.data):
                voters = decode_config(e.data)
                self._conf_log.append((e.index, voters))
                self._set_config(voters, e.index)

    def _config_truncated(self, from_index: int) -> None:
        """Entries from `from_index` on were removed: fall back to the configuration before."""
        log = self._conf_log
        if not log or log[-1][0] < from_index:
            return
        while log and log[-1][0] >= from_index:
            log.pop()
        index, voters = self._config_at_or_before(from_index - 1)
        logger.info("%s: configuration entry truncated; back to %s", self.id, sorted(voters))
        self._set_config(voters, index)

    def _config_at_or_before(self, index: int) -> tuple[int, dict[str, str]]:
        for at, voters in reversed(self._conf_log):
            if at <= index:
                return at, voters
        if self._snap_conf is not None:
            return self._snap_index, self._snap_conf
        return 0, self._bootstrap

    def _config_compacted(self, snap_index: int) -> bytes:
        """The log up to `snap_index` becomes a snapshot: returns the configuration it
        must carry, and forgets the entries it covers."""
        _, voters = self._config_at_or_before(snap_index)
        self._snap_conf = voters
        self._conf_log = [c for c in self._conf_log if c[0] > snap_index]
        return encode_config(voters)

    def _config_installed(self, snap: Snapshot) -> None:
        """The whole log was replaced by `snap`."""
        self._conf_log = []
        if snap.config:
            self._snap_conf = decode_config(snap.config)
            self._set_config(self._snap_conf, snap.index)
        elif self._conf_index > snap.index:  # a snapshot from before configurations
            self._snap_conf = None
            self._set_config(self._bootstrap, 0)
        else:  # ours still holds at its index, but its entry is gone with the log
            self._snap_conf = dict(self._voters)

    def _set_config(self, voters: Mapping[str, str], index: int) -> None:
        old = getattr(self, "_voters", None)
        self._voters = dict(voters)
        self._conf_index = index
        self._addresses.update(voters)
        self._quorum = len(voters) // 2 + 1
        self._others = sorted(p for p in voters if p != self.id)
        if old is not None and old != self._voters:
            logger.info("%s: voters now %s (entry %d)", self.id, sorted(voters), index)
        if self.role is Role.LEADER:
            for p in self._others:
                if p not in self._prs:
                    self._prs[p] = Progress(next=self.last_index() + 1, last_ack=self._now)
            keep = set(self._others) | set(self.learners)
            for p in [p for p in self._prs if p not in keep]:
                del self._prs[p]
                self._dirty.discard(p)
            if self._transferee and self._transferee not in self._voters:
                self._transferee = ""  # proposals would wait for a transfer that cannot happen
            self._targets = sorted(self._prs)
            self._bcast = True

    # -- leader: changes -------------------------------------------------------------
    def add_voter(self, node_id: str, address: str) -> None:
        """Start adding `node_id` at `address`: replicate to it as a learner, then append
        the configuration that adds it once it has caught up. Watch `pending_change()`,
        `voters`, `config_index` and `change_error` for the outcome.
        Raises NotLeader, AlreadyExists, FailedPrecondition (a change is in progress)."""
        self._enter(self._now)
        self._check_change()
        if node_id in self._voters:
            raise AlreadyExists(f"{node_id} is already a voter")
        self._change = (ADD, node_id)
        self.change_error = ""
        self._addresses[node_id] = address
        self._learner_seen = self._now
        self._prs[node_id] = Progress(next=self.last_index() + 1, last_ack=self._now)
        self._targets = sorted(self._prs)
        self._bcast = True
        logger.info("%s: catching up %s (%s) as a learner", self.id, node_id, address)

    def remove_voter(self, node_id: str) -> None:
        """Remove `node_id` (this leader included) by a configuration entry, appended as
        soon as the rules allow. Raises NotLeader, NotFound, FailedPrecondition (a change
        in progress, or it is the last voter)."""
        self._enter(self._now)
        self._check_change()
        if node_id not in self._voters:
            raise NotFound(f"{node_id} is not a voter")
        if len(self._voters) == 1:
            raise FailedPrecondition(f"{node_id} is the last voter; the cluster needs one")
        self._change = (REMOVE, node_id)
        self.change_error = ""
        self._maybe_change()

    def abort_change(self, reason: str) -> bool:
        """Drop a change not yet appended (the caller gave up). True when one was dropped."""
        self._enter(self._now)
        if self._change is None:
            return False
        self._fail_change(reason)
        return True

    def _check_change(self) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(f"{self.id} is not the leader", leader=self.leader_address())
        if self._change is not None or self._conf_index > self.commit:
            raise FailedPrecondition("a voter change is already in progress; retry when it is done")

    def _fail_change(self, reason: str) -> None:
        op, node_id = self._change  # type: ignore[misc]
        self._change = None
        self.change_error = reason
        logger.info("%s: %s %s abandoned: %s", self.id, op, node_id, reason)
        if op == ADD and node_id not in self._voters and self._prs.pop(node_id, None) is not None:
            self._targets = sorted(self._prs)
            self._dirty.discard(node_id)

    def _maybe_change(self) -> None:
        """Append the requested configuration once the rules allow (see the module doc)."""
        ch = self._change
        if ch is None or self.role is not Role.LEADER:
            return
        if self.commit < self.term_start_index or self._conf_index > self.commit:
            return
        op, node_id = ch
        if op == ADD:
            pr = self._prs[node_id]
            if pr.match < self.term_start_index or self.last_index() - pr.match > self._cfg.learner_slack:
                return
            voters = {**self._voters, node_id: self._addresses[node_id]}
        else:
            voters = {p: a for p, a in self._voters.items() if p != node_id}
        self._change = None
        index = self.last_index() + 1
        entry = Entry(index, self.term, encode_config(voters))
        self._log.append(entry)
        self._scan_config([entry])
        self._bcast = True

    def _learner_progress(self, node_id: str) -> None:
        """The learner's match index grew."""
        ch = self._change
        if ch is not None and ch[1] == node_id and ch[0] == ADD:
            self._learner_seen = self._now
            self._maybe_change()

    def _learner_tick(self, now: float) -> None:
        ch = self._change
        if ch is not None and ch[0] == ADD:
            limit = self._cfg.learner_timeout or 10 * self._cfg.election_timeout
            if now - self._learner_seen >= limit:
                self._fail_change(f"{ch[1]} did not catch up within {limit:.3g}s "
                                  "(unreachable, or not running a Raft node)")

    def _maybe_resign(self) -> None:
        """A leader that removed itself leaves once that is committed, handing over to
        the most caught-up voter so the cluster need not wait for an election timeout."""
        if self.id in self._voters or self.commit < self._conf_index:
            return
        logger.info("%s: removed from the voters (entry %d committed); stepping down", self.id, self._conf_index)
        last = self.last_index()
        best = max(self._others, key=lambda p: self._prs[p].match, default="")
        if best and self._prs[best].match == last:
            self._send(TimeoutNow(self.id, best, self.term))
        self._become_follower(self.term, "")
