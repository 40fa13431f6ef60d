"""`RaftConsensus`: the asyncio driver of `RaftCore`, over gRPC and a `LogStore`.

One task owns the core. It feeds queued inputs (messages from the `Raft` servicer,
proposals, reads, timer ticks) into the core, then performs one `Ready`: persist (on
its log writer thread, never the loop's, so a leader answers what already committed
meanwhile; everything queued meanwhile goes into the next Ready, so N concurrent proposals
share one fsync: group commit), send, apply, `advance()`. Timers are
`loop.call_at` on the event loop's clock.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Mapping, Sequence

from lepton.common.channels import TlsConfig
from lepton.common.errors import NotLeader, Unavailable
from lepton.common.validation import check_entry_size
from lepton.coordinator.consensus import (
    Consensus,
    ConsensusStatus,
    StateMachine,
    VoterStatus,
    await_within,
)
from lepton.coordinator.raft.core import RaftCore
from lepton.coordinator.raft.log_writer import LogWriter
from lepton.coordinator.raft.membership import is_config
from lepton.coordinator.raft.messages import Config, Message, Ready, Role
from lepton.coordinator.raft.node_membership import VoterChanges
from lepton.coordinator.raft.transport import GrpcTransport, Transport
from lepton.coordinator.storage.log_store import LogStore

logger = logging.getLogger(__name__)

_STATUS_ROLE = {
    Role.LEADER: "leader",
    Role.FOLLOWER: "follower",
    Role.CANDIDATE: "candidate",
    Role.PRE_CANDIDATE: "candidate",
}


class RaftConsensus(VoterChanges, Consensus):
    """Raft among a changing set of voters. All methods must be called on one event loop.

    `voters` maps the bootstrap voters' node ids to their advertised host:port (in Lepton
    the id *is* the address); the configuration in the log or snapshot, once there is
    one, replaces it. A node not among them waits to be added (`add_voter` on the leader).
    Register the transport's server side with `add_raft_servicer(server, node)`.
    Empty commands are Raft no-ops: never passed to `StateMachine.apply` (the driver sets
    `applied_index` past them), and `propose(b"")` returns None.
    """

    def __init__(
        self,
        node_id: str,
        voters: Mapping[str, str],
        store: LogStore,
        state_machine: StateMachine,
        *,
        config: Config | None = None,
        snapshot_every: int = 10_000,
        transport: Transport | None = None,
        rng: random.Random | None = None,
        tls: TlsConfig | None = None,
        peer_key: bytes | None = None,
        contacts: Sequence[str] = (),
    ):
        super().__init__()
        self.node_id = node_id
        self.peer_key = peer_key  # proves us to the other voters without TLS (peer_auth)
        self.peer_check = None  # the Raft servicer's PeerCheck, set when it is registered
        self._contacts = tuple(contacts)  # --join: who may speak Raft to us before we have a configuration
        self._voters = dict(voters)
        self._store = store
        self._sm = state_machine
        self._config = config or Config()
        self._snapshot_every = snapshot_every
        self._transport = transport
        self._tls = tls  # for the default GrpcTransport's channels
        self._rng = rng or random.Random()
        self._core: RaftCore | None = None
        self._inbox: deque[Message] = deque()
        self._lost_peers: deque[str] = deque()  # peers whose connection dropped
        self._proposals: deque[tuple[bytes, asyncio.Future[object]]] = deque()
        self._read_requests: deque[asyncio.Future[None]] = deque()
        self._transfers: deque[str] = deque()
        self._member_ops: deque = deque()  # voter changes for the loop (node_membership.py)
        self._change_waiters: list = []
        self._waiters: dict[int, tuple[int, asyncio.Future[object]]] = {}  # index -> (term, fut)
        self._reads: list[tuple[int, asyncio.Future[None]]] = []  # (read index, fut)
        self._wakeup = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._writer: LogWriter | None = None  # the log writer thread, from its first use
        self._running = False
        self._serving_leader = False
        self._leader_term = 0

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Restore the snapshot into the state machine and start the Raft loop.

        The log's entries after the snapshot are applied as soon as this node learns they
        are committed (from the leader, usually within one heartbeat): the commit index is
        not part of the LogStore's durable hard state. Raises OSError from storage.
        """
        snap = self._store.snapshot()
        if snap is not None and snap.index > self._sm.applied_index:
            self._sm.restore(snap.data, snap.index)
        loop = asyncio.get_running_loop()
        self._core = RaftCore(self.node_id, self._voters, self._store, now=loop.time(),
                              rng=self._rng, config=self._config)
        if self._transport is None:
            others = {p: a for p, a in self._voters.items() if p != self.node_id}
            self._transport = GrpcTransport(others, on_peer_lost=self._peer_lost, tls=self._tls,
                                            resolve=self._address_of, me=self.node_id,
                                            peer_key=self.peer_key)
        self._running = True
        self._task = asyncio.create_task(self._run(), name=f"raft-{self.node_id}")
        logger.info("raft %s: started at term %d, log %d..%d", self.node_id, self._core.term,
                    self._core.first_index, self._core.last_index())

    async def stop(self) -> None:
        """Stop the loop and the transport; fail what is pending with Unavailable."""
        if not self._running and self._task is None:
            return
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._wakeup.set()
            try:
                await self._task
            except Exception:  # noqa: BLE001 - already logged by the loop
                pass
            self._task = None
        if self._writer is not None:
            self._writer.close()  # before the store closes: a write queued runs to its end
            self._writer = None
        self._fail_all(Unavailable(f"raft {self.node_id} is stopping"))
        self._fail_changes(Unavailable(f"raft {self.node_id} is stopping; outcome unknown"))
        if self._transport is not None:
            await self._transport.close()
        self._store.close()
        if self._serving_leader:
            self._serving_leader = False
            self._notify_leadership(False, self._leader_term)

    # -- Consensus -------------------------------------------------------------------
    async def propose(self, command: bytes, *, timeout: float) -> object:
        check_entry_size(len(command))  # every entry must reach a follower in one message
        core = self._require_running()
        if core.role is not Role.LEADER:
            raise NotLeader(f"{self.node_id} is not the leader", leader=core.leader_address())
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._proposals.append((command, fut))
        self._wakeup.set()
        return await self._wait(fut, timeout, "command not committed")

    async def read_barrier(self, *, timeout: float) -> None:
        core = self._require_running()
        if core.role is not Role.LEADER:
            raise NotLeader(f"{self.node_id} is not the leader", leader=core.leader_address())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._read_requests.append(fut)
        self._wakeup.set()
        await self._wait(fut, timeout, "leadership not confirmed")

    def is_leader(self) -> bool:
        """True once this node leads *and* has applied its term's first entry, i.e. its
        state machine reflects everything committed before it became leader."""
        return self._running and self._serving_leader

    def leader(self) -> tuple[str, str]:
        core = self._core
        if core is None or not self._running or not core.leader:
            return "", ""
        return core.leader, core.leader_address()

    def term(self) -> int:
        """The current Raft term (0 before start)."""
        return self._core.term if self._core is not None else 0

    def status(self) -> ConsensusStatus:
        """The current voter set (and, on the leader, a learner catching up, role
        "learner"). Match index and lag are known only on the leader; elsewhere other
        voters show role "unknown" (or "leader") with match 0, and this one its own last
        index."""
        core = self._core
        if core is None:
            return ConsensusStatus(0, "", "", 0, self._sm.applied_index, [])
        progress = core.progress()
        voters = []
        learners = core.learners
        for vid in core.voters + learners:
            addr = core.address_of(vid)
            if vid in progress:
                match, lag = progress[vid]
                role = "leader" if vid == core.id else "learner" if vid in learners else "follower"
            elif vid == core.id:
                match, lag, role = core.last_index(), 0, _STATUS_ROLE[core.role]
            else:
                match, lag, role = 0, 0, "leader" if vid == core.leader else "unknown"
            voters.append(VoterStatus(vid, addr, role, match, lag))
        return ConsensusStatus(
            term=core.term,
            leader_id=core.leader,
            leader_address=core.leader_address(),
            commit_index=core.commit_index,
            applied_index=self._sm.applied_index,
            voters=voters,
        )

    def transfer_leadership(self, to: str) -> None:
        """Ask the leader to hand over to voter `to`. Raises NotLeader, ValueError."""
        core = self._require_running()
        if core.role is not Role.LEADER:
            raise NotLeader(f"{self.node_id} is not the leader", leader=core.leader_address())
        if to not in core.voters:
            raise ValueError(f"unknown voter {to!r}")
        self._transfers.append(to)
        self._wakeup.set()

    # -- transport side --------------------------------------------------------------
    def _peer_lost(self, peer: str) -> None:
        """The transport's connection to `peer` dropped; the loop tells the core."""
        if self._running:
            self._lost_peers.append(peer)
            self._wakeup.set()

    def _address_of(self, peer: str) -> str:
        """Where to send to a peer outside the bootstrap set (ids are addresses here)."""
        core = self._core
        address = core.address_of(peer) if core is not None else ""
        return address or (peer if ":" in peer else "")

    def raft_members(self) -> set[str]:
        """Who may speak Raft to us: the voters of our configuration and the learner we
        replicate to; before we have any configuration, the bootstrap voters and --join."""
        core = self._core
        members = set(core.voters) | set(core.learners) if core is not None else set()
        return members or set(self._voters) | set(self._contacts)

    def receive(self, messages: list[Message]) -> None:
        """Called by the Raft servicer: queue messages for the loop."""
        if self._running:
            self._inbox.extend(messages)
            self._wakeup.set()

    # -- internals -------------------------------------------------------------------
    def _require_running(self) -> RaftCore:
        if not self._running or self._core is None:
            raise Unavailable(f"raft {self.node_id} is not running")
        return self._core

    async def _wait(self, fut: asyncio.Future, timeout: float, what: str) -> object:
        return await await_within(fut, timeout, what)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        core = self._core
        assert core is not None
        try:
            while self._running:
                self._feed(core, loop.time())
                if core.has_ready():
                    await self._handle(core, core.ready())
                    continue
                self._arm_timer(loop, core.next_deadline())
                await self._wakeup.wait()
                # One more turn of the event loop first: requests that arrived together
                # then go out as one Ready (one write, one AppendEntries per follower).
                await asyncio.sleep(0)
                self._wakeup.clear()
        except Exception as err:
            # Most likely the log store (a write or fsync error, a full disk). Stop voting
            # and leading at once; the process must restart (crash-stop), not linger.
            logger.critical("raft %s: loop failed; no longer voting: %s", self.node_id, err,
                            exc_info=not isinstance(err, OSError))
            self._running = False
            self._fail_all(Unavailable(f"raft {self.node_id} failed: {err}"))
            if self._serving_leader:
                self._serving_leader = False
                self._notify_leadership(False, self._leader_term)
            self._notify_failure(err)
            raise

    def _arm_timer(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None and self._timer_at == at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._wakeup.set)

    def _feed(self, core: RaftCore, now: float) -> None:
        """Give the core everything queued since the last Ready."""
        inbox = self._inbox
        while inbox:
            core.step(inbox.popleft(), now)
        while self._lost_peers:
            peer = self._lost_peers.popleft()
            if core.leader_unreachable(peer, now):
                logger.info("raft %s: lost the connection to leader %s; campaigning soon",
                            self.node_id, peer)
        if now >= core.next_deadline():
            core.tick(now)
        if self._member_ops or self._change_waiters:
            self._run_member_ops(core)
        while self._transfers:
            to = self._transfers.popleft()
            try:
                core.transfer_leadership(to)
            except (NotLeader, ValueError) as err:
                logger.info("raft %s: transfer to %s refused: %s", self.node_id, to, err)
        while self._proposals:
            data, fut = self._proposals.popleft()
            if fut.done():
                continue
            try:
                index, term = core.propose(data)
            except NotLeader as err:
                fut.set_exception(err)  # nothing was appended
                continue
            self._waiters[index] = (term, fut)
        while self._read_requests:
            fut = self._read_requests.popleft()
            if fut.done():
                continue
            try:
                core.read_index(fut)
            except NotLeader as err:
                fut.set_exception(err)

    async def _handle(self, core: RaftCore, rd: Ready) -> None:
        if rd.eager_messages:  # the leader's appends: the followers' fsyncs overlap ours
            self._transport.send(rd.eager_messages)  # type: ignore[union-attr]
        committed = rd.committed
        if rd.hard_state is not None or rd.snapshot is not None or rd.entries:
            # OSError escapes: the store is unusable and nothing of this Ready may go out.
            # On the log writer thread, never the loop's: a voter is also an agent, whose
            # loop serves heartbeats, attempt leases, Predict and shards, and an fsync on a
            # busy disk takes tens of ms. (Writing a follower's appends inline saved ~10 %
            # of the voters' CPU per one-task call; the stall was not worth it.)
            if self._writer is None:
                self._writer = LogWriter(self._store, f"raft-log-{self.node_id}")
            write = self._writer.write(rd)
            try:
                if rd.snapshot is None and committed:
                    # Committed entries already on our disk (before this Ready's) are
                    # applied while it writes: their callers need not wait for the fsync
                    # of later entries (on a busy leader, each round's answers would
                    # wait a round's).
                    first_new = rd.entries[0].index if rd.entries else committed[-1].index + 1
                    stable = max(0, min(len(committed), first_new - committed[0].index))
                    self._apply(committed[:stable])
                    committed = committed[stable:]
            finally:
                await write
        if rd.messages:
            self._transport.send(rd.messages)  # type: ignore[union-attr]
        sm = self._sm
        if rd.install and rd.snapshot is not None:
            sm.restore(rd.snapshot.data, rd.snapshot.index)
            for index in [i for i in self._waiters if i <= rd.snapshot.index]:
                _, fut = self._waiters.pop(index)
                _fail(fut, Unavailable("replaced by a snapshot; outcome unknown"))
        self._apply(committed)
        for ctx, index in rd.read_states:
            self._reads.append((index, ctx))  # type: ignore[arg-type]
        for ctx in rd.aborted_reads:
            _fail(ctx, NotLeader("leadership was lost", leader=core.leader_address()))  # type: ignore[arg-type]
        if self._reads:
            self._serve_reads()
        core.advance(rd)
        if rd.soft_state is not None and rd.soft_state.role is not Role.LEADER:
            self._lost_leadership(core)
        self._update_serving(core)
        first = core.first_index
        if sm.applied_index - first + 1 >= self._snapshot_every and sm.applied_index >= first:
            core.compact(sm.applied_index, sm.snapshot())  # saved by the next Ready

    def _apply(self, committed: list) -> None:
        """Apply committed entries in order and answer their proposers."""
        sm = self._sm
        for e in committed:
            if e.index <= sm.applied_index:
                continue  # already in the restored snapshot
            if e.data and not is_config(e.data):
                # A follower's entries have no waiter: their results (copies) are not built.
                result = sm.apply(e.index, e.data, answered=e.index in self._waiters)
            else:  # a no-op or a voter configuration (Raft's, not the state machine's)
                sm.applied_index = e.index
                result = None
            waiter = self._waiters.pop(e.index, None)
            if waiter is not None:
                term, fut = waiter
                if term == e.term:
                    if not fut.done():
                        fut.set_result(result)
                else:
                    _fail(fut, Unavailable("leadership was lost; the command was not committed"))

    def _serve_reads(self) -> None:
        applied = self._sm.applied_index
        keep = []
        for index, fut in self._reads:
            if index <= applied:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((index, fut))
        self._reads = keep

    def _lost_leadership(self, core: RaftCore) -> None:
        # Entries we appended may still commit under the next leader: outcome unknown.
        for _, fut in self._waiters.values():
            _fail(fut, Unavailable("leadership was lost; outcome unknown"))
        self._waiters.clear()
        for _, fut in self._reads:
            _fail(fut, NotLeader("leadership was lost", leader=core.leader_address()))
        self._reads = []

    def _update_serving(self, core: RaftCore) -> None:
        serving = core.role is Role.LEADER and self._sm.applied_index >= core.term_start_index
        if serving == self._serving_leader and (not serving or core.term == self._leader_term):
            return
        if self._serving_leader:
            self._serving_leader = False
            self._notify_leadership(False, self._leader_term)
        if serving:
            self._serving_leader, self._leader_term = True, core.term
            logger.info("raft %s: leading term %d", self.node_id, core.term)
            self._notify_leadership(True, core.term)

    def _fail_all(self, err: Exception) -> None:
        for _, fut in self._waiters.values():
            _fail(fut, err)
        self._waiters.clear()
        for _, fut in self._proposals:
            _fail(fut, err)
        self._proposals.clear()
        for fut in self._read_requests:
            _fail(fut, err)
        self._read_requests.clear()
        for _, fut in self._reads:
            _fail(fut, err)
        self._reads = []


def _fail(fut: asyncio.Future, err: Exception) -> None:
    if not fut.done():
        fut.set_exception(err)
