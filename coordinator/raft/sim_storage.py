"""A `LogStore` for the deterministic simulation that models what a crash loses.

Appends and truncations are buffered until `sync()`. On `crash(rng)` the store keeps what
was synced plus a random *prefix* of the unsynced writes (a disk may write back early, in
order), and loses the rest. `set_hard_state` and `save_snapshot` are durable on return, as
the `LogStore` protocol promises. `fsync=False` makes `sync()` a no-op: a deliberately
broken disk, for checking that the simulation's invariant checker notices.
"""

from __future__ import annotations

import random

from lepton.coordinator.storage.log_store import CompactedError, Entry, Snapshot, limit_bytes


class _Log:
    """A snapshot plus the entries after it."""

    __slots__ = ("snap", "entries")

    def __init__(self, snap: Snapshot | None = None, entries: list[Entry] | None = None):
        self.snap = snap
        self.entries: list[Entry] = entries if entries is not None else []

    @property
    def base(self) -> int:
        return self.snap.index if self.snap else 0

    def last(self) -> int:
        return self.base + len(self.entries)

    def append(self, entries: list[Entry]) -> None:
        if entries and entries[0].index != self.last() + 1:
            raise ValueError(f"append at {entries[0].index} after {self.last()}")
        self.entries.extend(entries)

    def truncate(self, from_index: int) -> None:
        if from_index <= self.base:
            raise CompactedError(from_index)
        del self.entries[from_index - self.base - 1 :]

    def save_snapshot(self, snap: Snapshot) -> None:
        pos = snap.index - self.base - 1
        if 0 <= pos < len(self.entries) and self.entries[pos].term == snap.term:
            self.entries = self.entries[pos + 1 :]
        else:
            self.entries = []
        self.snap = snap

    def copy(self) -> _Log:
        return _Log(self.snap, list(self.entries))


class SimLogStore:
    """`LogStore` with a durable image and a pending-write list (see module docstring)."""

    def __init__(self, *, fsync: bool = True):
        self.fsync = fsync
        self._term = 0
        self._vote = ""
        self._mem = _Log()
        self._durable = _Log()
        self._pending: list[tuple[str, object]] = []
        self.syncs = 0

    # -- LogStore --------------------------------------------------------------------
    def hard_state(self) -> tuple[int, str]:
        return self._term, self._vote

    def set_hard_state(self, term: int, voted_for: str) -> None:
        self._term, self._vote = term, voted_for

    def first_index(self) -> int:
        return self._mem.base + 1

    def last_index(self) -> int:
        return self._mem.last()

    def term_at(self, index: int) -> int:
        m = self._mem
        if index == m.base:
            return m.snap.term if m.snap else 0
        if index < m.base:
            raise CompactedError(index)
        if index > m.last():
            raise IndexError(index)
        return m.entries[index - m.base - 1].term

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        m = self._mem
        if lo <= m.base:
            raise CompactedError(lo)
        if hi > m.last() + 1 or lo > hi:
            raise IndexError((lo, hi))
        return limit_bytes(m.entries[lo - m.base - 1 : hi - m.base - 1], max_bytes)

    def append(self, entries: list[Entry]) -> None:
        self._mem.append(entries)
        self._pending.append(("a", list(entries)))

    def truncate_suffix(self, from_index: int) -> None:
        self._mem.truncate(from_index)
        self._pending.append(("t", from_index))

    def sync(self) -> None:
        self.syncs += 1
        if not self.fsync:
            return
        self._durable = _replay(self._durable, self._pending, len(self._pending))
        self._pending.clear()

    def snapshot(self) -> Snapshot | None:
        return self._mem.snap

    def save_snapshot(self, snap: Snapshot) -> None:
        self._mem.save_snapshot(snap)
        # Durable now, but ordered after the pending writes: a crash replays them first.
        self._pending.append(("s", snap))

    def close(self) -> None:
        pass

    # -- simulation ------------------------------------------------------------------
    def crash(self, rng: random.Random) -> None:
        """Lose unsynced writes: keep a random prefix of them (snapshots always survive)."""
        plain = sum(1 for kind, _ in self._pending if kind != "s")
        keep = rng.randint(0, plain) if self.fsync else 0
        self._durable = _replay(self._durable, self._pending, keep)
        self._pending.clear()
        self._mem = self._durable.copy()

    def durable_last_index(self) -> int:
        return self._durable.last()

    def durably_holds(self, index: int, term: int) -> bool:
        """The entry (index, term) survives a crash here (a snapshot covering it counts)."""
        log = self._durable
        if index <= log.base or any(k == "s" and a.index >= index for k, a in self._pending):
            return True  # snapshots are durable on return (a crash replays them)
        return index <= log.last() and log.entries[index - log.base - 1].term == term


def _replay(base: _Log, ops: list[tuple[str, object]], keep: int) -> _Log:
    """`base` plus the first `keep` appends/truncations of `ops` and every snapshot in it.

    Mutates and returns `base`.
    """
    log = base
    kept = 0
    for kind, arg in ops:
        if kind == "s":
            log.save_snapshot(arg)  # type: ignore[arg-type]
            continue
        if kept >= keep:
            continue
        kept += 1
        if kind == "a":
            entries: list[Entry] = arg  # type: ignore[assignment]
            skip = log.last() + 1 - entries[0].index
            if skip > 0:  # a snapshot that survived covers their start
                entries = entries[skip:]
            if entries:
                log.append(entries)
        elif arg > log.base:  # type: ignore[operator]
            log.truncate(arg)  # type: ignore[arg-type]
    return log
