"""The one door through which cluster state changes: propose a command, get its result.

`Consensus` is the interface (Patroni's `AbstractDCS` in spirit). Implementations:
- `SingleVoterConsensus` (here): one voter, a local fsync'd log; dev mode and small setups.
- `lepton.coordinator.raft.node.RaftConsensus`: 3 or 5 voters.
- `lepton.coordinator.etcd.consensus.EtcdConsensus`: candidates on an existing etcd
  cluster (leader key on a lease, the log as fenced etcd txns; `--state etcd://...`).
`tests/unit/test_consensus_contract.py` runs the same contract against each.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from lepton.common.errors import DeadlineExceeded, FailedPrecondition, NotLeader, Unavailable
from lepton.coordinator.storage.log_store import Entry, LogStore, Snapshot

logger = logging.getLogger(__name__)


class StateMachine(Protocol):
    """What consensus feeds. `apply` must be deterministic and must not raise for bad input.
    With `answered=False` nobody waits for the result (a follower's apply): the state
    machine may skip building it and return None; the state it leaves is the same."""

    applied_index: int

    def apply(self, index: int, data: bytes, answered: bool = True) -> object: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes, index: int) -> None: ...


@dataclass(frozen=True, slots=True)
class VoterStatus:
    id: str
    address: str
    role: str  # leader | follower | candidate | unknown | learner (catching up, leader only)
    match_index: int
    lag: int


@dataclass(frozen=True, slots=True)
class ConsensusStatus:
    term: int
    leader_id: str
    leader_address: str
    commit_index: int
    applied_index: int
    voters: list[VoterStatus] = field(default_factory=list)


async def await_within(fut: asyncio.Future, timeout: float, what: str) -> object:
    """`await fut`, or DeadlineExceeded ("outcome unknown") after `timeout` seconds: the
    timer settles `fut` itself, so whoever would resolve it later finds it done and drops
    the late outcome. One timer and no extra turns of the event loop: wait_for over shield
    took two more turns and about 50 us per proposal. Cancelling the caller cancels `fut`
    (a proposal not yet appended is then never appended)."""
    timer = asyncio.get_running_loop().call_later(timeout, _expire, fut, what, timeout)
    try:
        return await fut
    finally:
        timer.cancel()


def _expire(fut: asyncio.Future, what: str, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(DeadlineExceeded(f"{what} within {timeout:.3g}s; outcome unknown"))


LeadershipListener = Callable[[bool, int], None]
FailureListener = Callable[[Exception], None]


class Consensus(ABC):
    """Orders commands into one log and applies them to the state machine.

    Calls are made from one asyncio event loop.
    """

    def __init__(self) -> None:
        self._leadership_listeners: list[LeadershipListener] = []
        self._failure_listeners: list[FailureListener] = []
        self.failure: Exception | None = None  # set once the node has stopped for good

    @abstractmethod
    async def start(self) -> None:
        """Open storage, restore the snapshot and replay the committed log into the state
        machine before returning. Raises OSError when storage cannot be read."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop serving. Pending proposals fail with Unavailable (outcome unknown)."""

    @abstractmethod
    async def propose(self, command: bytes, *, timeout: float) -> object:
        """Commit one command and return what `StateMachine.apply` returned for it.

        Atomic: the command is applied exactly once on every replica, or never.
        Durable: returns only after the entry is fsync'd on a majority of voters and
        applied locally; "acknowledged" means this returned.
        Raises:
          NotLeader: this node does not lead (nothing was appended); `.leader` names the
            leader when known.
          DeadlineExceeded: not committed within `timeout`; the outcome is unknown.
          Unavailable: leadership was lost or the node is stopping; outcome unknown.
        """

    @abstractmethod
    async def read_barrier(self, *, timeout: float) -> None:
        """Return once the local state reflects every write acknowledged before the call,
        so that a read made next is linearizable. Raises NotLeader, DeadlineExceeded."""

    @abstractmethod
    def is_leader(self) -> bool: ...

    @abstractmethod
    def leader(self) -> tuple[str, str]:
        """(node id, advertised host:port) of the leader, or ("", "") when unknown."""

    @abstractmethod
    def term(self) -> int:
        """The current term; orders carry it so agents can fence off older leaders."""

    @abstractmethod
    def status(self) -> ConsensusStatus: ...

    async def add_voter(self, address: str, *, timeout: float) -> None:
        """Add the server advertising `address` to the voters (Raft only; see
        `RaftConsensus.add_voter`). Raises FailedPrecondition here: one voter, no Raft."""
        raise FailedPrecondition("this cluster runs a single voter without Raft; its voter set cannot change")

    async def remove_voter(self, address: str, *, timeout: float) -> None:
        """Remove voter `address` (Raft only). Raises FailedPrecondition here."""
        raise FailedPrecondition("this cluster runs a single voter without Raft; its voter set cannot change")

    def add_leadership_listener(self, listener: LeadershipListener) -> None:
        """`listener(is_leader, term)` is called on the loop whenever leadership changes."""
        self._leadership_listeners.append(listener)

    def add_failure_listener(self, listener: FailureListener) -> None:
        """`listener(error)` is called on the loop, once, when this node stops for good
        because its log store failed (a write or fsync error, a full disk): it no longer
        votes, leads or acknowledges. The process should stop (crash-stop) and be
        restarted, which re-reads the log from disk."""
        self._failure_listeners.append(listener)

    def _notify_leadership(self, is_leader: bool, term: int) -> None:
        for listener in list(self._leadership_listeners):
            try:
                listener(is_leader, term)
            except Exception:
                logger.exception("leadership listener failed")

    def _notify_failure(self, err: Exception) -> None:
        if self.failure is not None:
            return
        self.failure = err
        for listener in list(self._failure_listeners):
            try:
                listener(err)
            except Exception:
                logger.exception("failure listener failed")


class SingleVoterConsensus(Consensus):
    """One voter: a command is committed once it is fsync'd to the local log.

    Group commit: proposals that arrive while an fsync is in flight are appended together
    and made durable by the next single fsync.
    Each start takes a new term (persisted first), so orders stamped with the old term
    can be fenced off exactly as under Raft.
    """

    def __init__(
        self,
        node_id: str,
        address: str,
        store: LogStore,
        state_machine: StateMachine,
        *,
        snapshot_every: int = 10_000,
    ):
        super().__init__()
        self._id = node_id
        self._address = address
        self._store = store
        self._sm = state_machine
        self._snapshot_every = snapshot_every
        self._term = 0
        self._queue: list[tuple[bytes, asyncio.Future[object]]] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._running = False

    async def start(self) -> None:
        last = self._store.last_index()
        try:
            snap = self._store.snapshot()
            if snap is not None:
                self._sm.restore(snap.data, snap.index)
            if last >= self._store.first_index():
                # Everything in a single voter's log is committed: it was fsync'd before ack,
                # and an entry fsync'd without an ack had an unknown outcome; applying it is legal.
                for entry in self._store.entries(self._store.first_index(), last + 1):
                    self._sm.apply(entry.index, entry.data)
        except Exception as err:  # noqa: BLE001 - the state machine raised on a stored entry
            # It must not lead on a state it could not take; the agent says why in one line
            # (the traceback is in the log at DEBUG), as the other backends do.
            at = self._sm.applied_index
            logger.error("single voter %s: loading the stored state failed after index %d: %r",
                         self._id, at, err, exc_info=logger.isEnabledFor(logging.DEBUG))
            self._store.close()
            raise FailedPrecondition(f"cannot start: loading the stored cluster state failed after index {at}: "
                                     f"{type(err).__name__}: {err}") from None
        term, _ = self._store.hard_state()
        self._term = term + 1
        await asyncio.to_thread(self._store.set_hard_state, self._term, self._id)
        self._running = True
        self._writer = asyncio.create_task(self._write_loop(), name="single-voter-writer")
        logger.info("single voter %s: term %d, replayed to index %d", self._id, self._term, last)
        self._notify_leadership(True, self._term)

    async def stop(self) -> None:
        self._running = False
        if self._writer is not None:
            self._wakeup.set()
            await self._writer
            self._writer = None
        for _, fut in self._queue:
            if not fut.done():
                fut.set_exception(Unavailable("coordinator is stopping"))
        self._queue.clear()
        self._store.close()

    async def propose(self, command: bytes, *, timeout: float) -> object:
        if not self._running:
            raise Unavailable("coordinator is not running")
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._queue.append((command, fut))
        self._wakeup.set()
        return await await_within(fut, timeout, "command not committed")

    async def _write_loop(self) -> None:
        while self._running:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    await self._commit(batch)
                except Exception as err:  # an I/O error: nothing in the batch is acknowledged
                    logger.critical("single voter %s: log write failed; no longer leading: %s", self._id, err)
                    self._running = False
                    for _, fut in batch + self._queue:
                        if not fut.done():
                            fut.set_exception(Unavailable(f"log write failed: {err}"))
                    self._queue.clear()
                    self._notify_leadership(False, self._term)
                    self._notify_failure(err)
                    return

    async def _commit(self, batch: list[tuple[bytes, asyncio.Future[object]]]) -> None:
        first = self._store.last_index() + 1
        entries = [Entry(first + i, self._term, data) for i, (data, _) in enumerate(batch)]
        self._store.append(entries)
        await asyncio.to_thread(self._store.sync)
        for entry, (_, fut) in zip(entries, batch, strict=True):
            result = self._sm.apply(entry.index, entry.data)
            if not fut.done():
                fut.set_result(result)
        await self._maybe_snapshot()

    async def _maybe_snapshot(self) -> None:
        snap = self._store.snapshot()
        since = self._sm.applied_index - (snap.index if snap else 0)
        if since < self._snapshot_every:
            return
        index = self._sm.applied_index
        data = self._sm.snapshot()
        await asyncio.to_thread(self._store.save_snapshot, Snapshot(index, self._term, data))
        logger.info("snapshot at index %d (%d bytes); log compacted", index, len(data))

    async def read_barrier(self, *, timeout: float) -> None:
        if not self._running:
            raise NotLeader("coordinator is not running")

    def is_leader(self) -> bool:
        return self._running

    def leader(self) -> tuple[str, str]:
        return (self._id, self._address) if self._running else ("", "")

    def term(self) -> int:
        return self._term

    def status(self) -> ConsensusStatus:
        applied = self._sm.applied_index
        return ConsensusStatus(
            term=self._term,
            leader_id=self._id if self._running else "",
            leader_address=self._address if self._running else "",
            commit_index=applied,
            applied_index=applied,
            voters=[VoterStatus(self._id, self._address, "leader", applied, 0)],
        )
