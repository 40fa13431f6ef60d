"""Raft's safety properties, checked incrementally while a simulation runs.

Each hook is called by the simulation right after the event that could break the
property, so a violation is reported at the step that caused it:
  - election safety: at most one leader per term;
  - log matching: two logs holding an entry with the same index and term hold the same
    payload and the same term just before it (by induction, identical prefixes);
  - leader completeness: a new leader's log holds every entry known to be committed;
  - committed entries never change;
  - state-machine safety: no two nodes apply different payloads at one index, and each
    node applies indexes consecutively;
  - linearizable reads: a read reflects every command acknowledged before it began;
and at the end (`check_final`): no acknowledged command is lost, and every node applied
each command exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from lepton.coordinator.raft.core import RaftCore
from lepton.coordinator.storage.log_store import Entry


class InvariantViolation(AssertionError):
    """A safety property of Raft does not hold."""


class Checker:
    def __init__(self) -> None:
        self.leaders: dict[int, str] = {}
        self._entries: dict[tuple[int, int], tuple[bytes, int]] = {}
        self.committed: dict[int, tuple[int, bytes]] = {}
        self._max_committed = 0
        self._applied: dict[int, bytes] = {}
        self._node_applied: dict[str, int] = {}
        self.acked: dict[int, int] = {}  # command id -> log index
        self.max_acked_index = 0
        self.reads_checked = 0

    @staticmethod
    def fail(msg: str) -> None:
        raise InvariantViolation(msg)

    # -- per-step hooks --------------------------------------------------------------
    def on_leader(self, node: str, core: RaftCore) -> None:
        term = core.term
        other = self.leaders.setdefault(term, node)
        if other != node:
            self.fail(f"election safety: {other} and {node} both lead term {term}")
        for index in range(core.first_index, self._max_committed + 1):
            want = self.committed.get(index)
            if want is None:
                continue
            e = core.entry_at(index)
            if e is None or e.term != want[0] or e.data != want[1]:
                self.fail(
                    f"leader completeness: {node} leads term {term} without committed "
                    f"entry {index} (term {want[0]}); has {e}"
                )

    def on_persist(self, node: str, core: RaftCore, entries: list[Entry]) -> None:
        entries_seen = self._entries
        for e in entries:
            rec = (e.data, core.term_at(e.index - 1))
            old = entries_seen.setdefault((e.index, e.term), rec)
            if old != rec:
                self.fail(
                    f"log matching: {node} holds ({e.index}, term {e.term}) with "
                    f"(data, prev term) {rec}, another node {old}"
                )

    def on_commit(self, node: str, core: RaftCore, old: int, new: int) -> None:
        committed = self.committed
        for index in range(old + 1, new + 1):
            e = core.entry_at(index)
            if e is None:
                continue  # compacted or installed from a snapshot
            rec = (e.term, e.data)
            had = committed.setdefault(index, rec)
            if had != rec:
                self.fail(f"committed entry {index} changed: {had} then {rec} on {node}")
        if new > self._max_committed:
            self._max_committed = new

    def on_restore(self, node: str, index: int) -> None:
        self._node_applied[node] = index

    def on_apply(self, node: str, index: int, data: bytes) -> None:
        expected = self._node_applied.get(node, 0) + 1
        if index != expected:
            self.fail(f"{node} applied index {index}, expected {expected}")
        self._node_applied[node] = index
        had = self._applied.setdefault(index, data)
        if had != data:
            self.fail(f"state-machine safety: index {index} applied as {had!r} and {data!r} ({node})")

    def on_ack(self, cid: int, index: int) -> None:
        if cid in self.acked:
            self.fail(f"command {cid} acknowledged twice")
        self.acked[cid] = index
        if index > self.max_acked_index:
            self.max_acked_index = index

    def on_read(self, node: str, required: int, applied: int) -> None:
        self.reads_checked += 1
        if applied < required:
            self.fail(
                f"stale read on {node}: applied {applied} but a command at {required} "
                "was acknowledged before the read began"
            )

    # -- end of run ------------------------------------------------------------------
    def check_final(self, states: Iterable[tuple[str, list[int]]]) -> None:
        """`states`: each node's applied command ids in order, after convergence."""
        reference: list[int] | None = None
        for node, ids in states:
            counts = Counter(ids)
            dup = [cid for cid, n in counts.items() if n > 1]
            if dup:
                self.fail(f"{node} applied commands more than once: {dup[:5]}")
            lost = [cid for cid in self.acked if cid not in counts]
            if lost:
                self.fail(f"{node} lost acknowledged commands {lost[:5]} (of {len(lost)})")
            if reference is None:
                reference = ids
            elif ids != reference:
                self.fail(f"{node} applied a different command sequence")
