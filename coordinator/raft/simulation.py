"""Deterministic simulation of whole Raft clusters in one thread, from one seed.

A seed draws a scenario (3 or 5 voters, message loss/duplication/delay, partitions
including one-way ones, crashes that lose unsynced writes, slow disks, snapshot
frequency, flow-control limits, leadership transfers, voters added from spare servers
and removed, one at a time) and runs it on a simulated clock
with an event queue. Clients propose commands with unique ids and issue ReadIndex reads.
`Checker` verifies Raft's safety properties after every step; at the end the faults stop,
the cluster must converge, and no acknowledged command may be lost or applied twice.

`run_seed(seed)` returns a `SimResult` or raises `SimulationFailure`, whose message ends
with a one-line command that replays the seed.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import random
import traceback
from array import array
from collections import deque
from dataclasses import dataclass

from lepton.common.errors import LeptonError, NotLeader
from lepton.coordinator.raft.core import RaftCore
from lepton.coordinator.raft.membership import ADD, REMOVE, is_config
from lepton.coordinator.raft.messages import Config, Ready, Role, persist
from lepton.coordinator.raft.sim_checker import Checker
from lepton.coordinator.raft.sim_storage import SimLogStore

_MAX_STEPS = 300_000  # ~100x a typical seed
REPLAY = "LEPTON_SIM_SEED={seed} .venv/bin/pytest tests/sim -q"

# Event kinds.
_DELIVER, _TICK, _SYNCED, _PROPOSE, _READ, _CRASH, _RESTART = range(7)
_PARTITION, _HEAL, _TRANSFER, _END_CHAOS, _PROBE, _GIVE_UP = range(7, 13)
# Inputs queued on a node while its disk is busy.
_IN_STEP, _IN_TICK, _IN_PROPOSE, _IN_READ, _IN_TRANSFER, _IN_LOST, _IN_MEMBER = range(7)
# A peer's connection is seen to drop (the driver's channel watch), as a node input.
_LOST = 13
# An operator asks the leader to add a spare server as a voter, or to remove one.
_MEMBER = 14
_CHUNK_FOR_MSG = {16: 64, 64: 512, 1 << 20: 1 << 20}  # snapshot chunk bytes by max_msg_bytes


class SimulationFailure(AssertionError):
    def __init__(self, seed: int, reason: str):
        super().__init__(f"seed {seed}: {reason}\nreplay: {REPLAY.format(seed=seed)}")
        self.seed = seed
        self.reason = reason


@dataclass(slots=True)
class SimResult:
    seed: int
    voters: int  # at the start
    steps: int
    sim_time: float
    acked: int
    proposed: int
    reads: int
    leaders: int  # terms that had a leader
    crashes: int
    snapshots_sent: int
    voter_changes: int = 0  # configuration entries committed


class SimStateMachine:
    """Records the command ids it applies; the empty payload is the leader's no-op."""

    __slots__ = ("applied_index", "ids")

    def __init__(self) -> None:
        self.applied_index = 0
        self.ids: list[int] = []

    def apply(self, index: int, data: bytes, answered: bool = True) -> None:
        if data and not is_config(data):
            self.ids.append(int.from_bytes(data, "big"))
        self.applied_index = index

    def snapshot(self) -> bytes:
        return array("Q", self.ids).tobytes()

    def restore(self, data: bytes, index: int) -> None:
        ids = array("Q")
        ids.frombytes(data)
        self.ids = ids.tolist()
        self.applied_index = index


class SimNode:
    __slots__ = (
        "id", "store", "core", "sm", "alive", "busy", "inbox", "epoch", "tick_at",
        "pending", "reads", "disk", "seen_commit", "rd", "seen_voters",
    )

    def __init__(self, node_id: str, disk: float, fsync: bool):
        self.id = node_id
        self.store = SimLogStore(fsync=fsync)
        self.core: RaftCore | None = None
        self.sm = SimStateMachine()
        self.alive = False
        self.busy = False
        self.inbox: deque[tuple[int, object]] = deque()
        self.epoch = 0
        self.tick_at = -1.0
        self.pending: dict[int, tuple[int, int]] = {}  # index -> (term, command id)
        self.reads: list[tuple[int, int]] = []  # (read index, required index)
        self.disk = disk  # fsync latency in seconds
        self.seen_commit = 0
        self.rd: Ready | None = None
        self.seen_voters: list[str] = []  # the configuration at the last Ready


class Simulation:
    def __init__(self, seed: int, *, core_cls: type[RaftCore] = RaftCore, fsync: bool = True):
        self.seed = seed
        rng = self.rng = random.Random(seed)
        self.core_cls = core_cls
        self.n = rng.choice((3, 3, 5))
        self.drop = rng.choice((0.0, 0.0, 0.01, 0.05, 0.15))
        self.dup = rng.choice((0.0, 0.02, 0.1))
        self.delay = (0.0005, rng.choice((0.002, 0.005, 0.02)))
        self.chaos = rng.uniform(1.0, 2.5)
        # After the faults stop: a slow configuration may take long to catch up, but no
        # progress at all for `stall` seconds is a liveness failure.
        self.settle = 60.0
        self.stall = 3.0
        self._mark = (-1, 0.0)  # (least applied index over the nodes, when it last grew)
        max_msg_bytes = rng.choice((16, 64, 1 << 20))  # payloads are 8 bytes
        self.config = Config(
            heartbeat_interval=0.02,
            election_timeout=0.1,
            max_msg_bytes=max_msg_bytes,
            max_inflight=rng.choice((1, 4, 64)),
            # Snapshots (8 bytes a command) go in many chunks on most seeds; tied to the
            # draw above so that adding chunks changed no seed's random sequence.
            snapshot_chunk_bytes=_CHUNK_FOR_MSG[max_msg_bytes],
            # Mostly the production setting; sometimes without the liveness extensions.
            pre_vote=rng.random() < 0.85,
            check_quorum=rng.random() < 0.85,
        )
        # Voter changes on most seeds; not without both PreVote and CheckQuorum, where a
        # removed server that missed its removal disrupts forever (dissertation 4.2.3).
        changes = (self.config.pre_vote or self.config.check_quorum) and rng.random() < 0.7
        self.spares = rng.choice((1, 1, 2)) if changes else 0
        self.member_events = rng.choice((1, 2, 3, 5)) if changes else 0
        if changes:
            self.config = dataclasses.replace(self.config, learner_slack=rng.choice((0, 4, 64)))
        self.snapshot_every = rng.choice((4, 16, 64, 1 << 30))
        self.clients = rng.choice((1, 3, 8))  # each has one request outstanding
        self.think = rng.choice((0.001, 0.01, 0.03))
        self.waiting: dict[int, int] = {}  # command id -> client
        ids = [f"n{i}" for i in range(1, self.n + self.spares + 1)]
        # The bootstrap voters; the spares start outside the configuration.
        self.peers = {i: f"sim://{i}" for i in ids[: self.n]}
        self.nodes = {
            i: SimNode(i, rng.choice((0.0, 0.0005, 0.002, 0.02)), fsync) for i in ids
        }
        self.checker = Checker()
        self.now = 0.0
        self.events: list[tuple] = []
        self._seq = 0
        self.steps = 0
        self.group: dict[str, int] = dict.fromkeys(ids, 0)
        self.oneway: set[tuple[str, str]] = set()
        self.in_chaos = True
        self.next_cid = 1
        self.proposed = 0
        self.crashes = 0
        self.snapshots_sent = 0
        self.members: frozenset[str] = frozenset(self.peers)  # whose progress counts at the end
        self.trace: deque[str] | None = deque(maxlen=200) if os.environ.get("LEPTON_SIM_TRACE") else None

    # -- event queue -----------------------------------------------------------------
    def _at(self, t: float, kind: int, a: object = None, b: object = None) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, a, b))

    def run(self) -> SimResult:
        rng = self.rng
        for node in self.nodes.values():
            self._start(node)
        # The fault schedule, drawn up front.
        ids = list(self.nodes)
        for _ in range(rng.choice((0, 1, 2, 4))):
            t = rng.uniform(0.1, self.chaos)
            victim = rng.choice(ids)
            self._at(t, _CRASH, victim)
            self._at(t + rng.uniform(0.05, 0.6), _RESTART, victim)
        for _ in range(rng.choice((0, 1, 2, 3))):
            t = rng.uniform(0.1, self.chaos)
            self._at(t, _PARTITION)
            self._at(t + rng.uniform(0.1, 0.8), _HEAL)
        for _ in range(rng.choice((0, 0, 1, 3))):
            self._at(rng.uniform(0.2, self.chaos), _TRANSFER, rng.choice(ids))
        for _ in range(self.member_events):
            self._at(rng.uniform(0.15, self.chaos), _MEMBER)
        for client in range(self.clients):
            self._at(rng.uniform(0.05, 0.1), _PROPOSE, client)
        self._at(0.1, _READ)
        self._at(self.chaos, _END_CHAOS)
        deadline = self.chaos + self.settle
        events = self.events
        heappop = heapq.heappop
        while events:
            t, _, kind, a, b = heappop(events)
            if t > deadline:
                break
            self.now = t
            self.steps += 1
            if self.steps > _MAX_STEPS:
                self.checker.fail(f"more than {_MAX_STEPS} events: a message storm or livelock")
            if self.trace is not None:
                self.trace.append(f"{t:.4f} {kind} {a!r} {b!r}")
            if kind == _DELIVER:
                node = self.nodes[a.to]
                if node.alive:
                    self._input(node, _IN_STEP, a)
            elif kind == _TICK:
                node = self.nodes[a]
                if node.alive and node.tick_at == b:
                    self._input(node, _IN_TICK, None)
            elif kind == _SYNCED:
                node = self.nodes[a]
                if node.alive and node.epoch == b:
                    rd, node.rd = node.rd, None
                    node.busy = False
                    self._finish(node, rd)
                    self._drive(node)
            elif kind == _PROBE:
                if self._converged():
                    return self._final()
                members = self._members()
                if members != self.members:  # a new member starts from behind
                    self.members, self._mark = members, (-1, t)
                least = min(self.nodes[i].sm.applied_index for i in members)
                if least > self._mark[0]:
                    self._mark = (least, t)
                elif t - self._mark[1] > self.stall:
                    self.checker.fail(f"no progress for {self.stall}s after the faults stopped: {self.describe()}")
                self._at(t + 0.05, _PROBE)
            else:
                self._control(kind, a, b)
        self.checker.fail(f"no convergence {self.settle}s after the faults stopped: {self.describe()}")
        raise AssertionError("unreachable")

    def describe(self) -> str:
        """One line per node: what each believes (for failure reports)."""
        out = []
        for n in self.nodes.values():
            c = n.core
            if c is None:
                out.append(f"{n.id}: down")
                continue
            out.append(
                f"{n.id}: {c.role.value} term={c.term} leader={c.leader!r} last={c.last_index()} "
                f"commit={c.commit_index} applied={n.sm.applied_index} busy={n.busy} "
                f"progress={c.progress()}"
            )
        return "\n  " + "\n  ".join(out)

    def _control(self, kind: int, a: object, b: object = None) -> None:
        rng = self.rng
        if kind == _PROPOSE:
            if self.in_chaos:
                self._client_propose(a)
        elif kind == _GIVE_UP:
            self._client_done(a)
        elif kind == _READ:
            self._client_read()
            if self.in_chaos:
                self._at(self.now + rng.expovariate(1 / 0.05), _READ)
        elif kind == _CRASH:
            self._crash(self.nodes[a])
            # The others see their connections to it drop, soon, most of the time.
            for other in self.nodes.values():
                if other.id != a and rng.random() < 0.8:
                    self._at(self.now + rng.uniform(0.0, 0.05), _LOST, other.id, a)
        elif kind == _LOST:
            node, peer = self.nodes[a], b
            if node.alive:
                self._input(node, _IN_LOST, peer)
        elif kind == _RESTART:
            node = self.nodes[a]
            if not node.alive:
                self._start(node)
        elif kind == _PARTITION:
            self._partition()
            # A cut connection may or may not be noticed; false alarms happen too.
            for x in self.nodes:
                for y in self.nodes:
                    if x != y and rng.random() < 0.2:
                        self._at(self.now + rng.uniform(0.0, 0.2), _LOST, x, y)
        elif kind == _HEAL:
            self.group = dict.fromkeys(self.nodes, 0)
            self.oneway.clear()
        elif kind == _TRANSFER:
            leader = self._leader()
            if leader is not None:
                self._input(leader, _IN_TRANSFER, a)
        elif kind == _MEMBER:
            self._change_voters()
            if self.in_chaos and rng.random() < 0.3:  # an impatient operator: often refused
                self._at(self.now + rng.uniform(0.0, 0.05), _MEMBER)
        elif kind == _END_CHAOS:
            self.in_chaos = False
            self.drop = self.dup = 0.0
            self.group = dict.fromkeys(self.nodes, 0)
            self.oneway.clear()
            for node in self.nodes.values():
                if not node.alive:
                    self._start(node)
            self._at(self.now + 0.05, _PROBE)

    def _change_voters(self) -> None:
        """Add a server outside the configuration, or remove a voter, keeping 2 to 5."""
        leader = self._leader()
        if leader is None:
            return
        voters = leader.core.voters
        outside = [i for i in self.nodes if i not in voters]
        rng = self.rng
        add = bool(outside) and (len(voters) <= 2 or (len(voters) < 5 and rng.random() < 0.5))
        if add:
            self._input(leader, _IN_MEMBER, (ADD, rng.choice(outside)))
        elif len(voters) > 1:
            self._input(leader, _IN_MEMBER, (REMOVE, rng.choice(voters)))

    def _partition(self) -> None:
        rng, ids = self.rng, list(self.nodes)
        shape = rng.randrange(3)
        if shape == 0:  # isolate one node
            lone = rng.choice(ids)
            self.group = {i: int(i == lone) for i in ids}
        elif shape == 1:  # a random split
            self.group = {i: rng.randrange(2) for i in ids}
        else:  # one-way: a node's messages out (or in) are lost
            x = rng.choice(ids)
            out = rng.random() < 0.5
            for i in ids:
                if i != x:
                    self.oneway.add((x, i) if out else (i, x))

    # -- nodes -----------------------------------------------------------------------
    def _start(self, node: SimNode) -> None:
        node.core = self.core_cls(
            node.id, self.peers, node.store, now=self.now,
            rng=random.Random(self.rng.random()), config=self.config,
        )
        node.sm = SimStateMachine()
        snap = node.store.snapshot()
        if snap is not None:
            node.sm.restore(snap.data, snap.index)
        self.checker.on_restore(node.id, node.sm.applied_index)
        node.seen_commit = node.core.commit_index
        node.alive = True
        node.busy = False
        node.tick_at = -1.0
        self._drive(node)

    def _crash(self, node: SimNode) -> None:
        if not node.alive:
            return
        self.crashes += 1
        node.alive = False
        node.store.crash(self.rng)
        node.epoch += 1
        node.core = None
        node.inbox.clear()
        node.pending.clear()
        node.reads.clear()
        node.rd = None

    def _input(self, node: SimNode, kind: int, arg: object) -> None:
        if node.busy:
            node.inbox.append((kind, arg))
            return
        self._apply_input(node, kind, arg)
        self._drive(node)

    def _apply_input(self, node: SimNode, kind: int, arg: object) -> None:
        core = node.core
        if kind == _IN_STEP:
            core.step(arg, self.now)
        elif kind == _IN_TICK:
            core.tick(self.now)
        elif kind == _IN_PROPOSE:
            try:
                index, term = core.propose(arg.to_bytes(8, "big"))
            except NotLeader:
                return
            node.pending[index] = (term, arg)
        elif kind == _IN_READ:
            try:
                core.read_index(arg)
            except NotLeader:
                pass
        elif kind == _IN_TRANSFER:
            try:
                core.transfer_leadership(arg)
            except (NotLeader, ValueError):  # not the leader any more; not a voter
                pass
        elif kind == _IN_MEMBER:
            op, target = arg
            try:
                if op == ADD:
                    core.add_voter(target, f"sim://{target}")
                else:
                    core.remove_voter(target)
            except LeptonError:  # not the leader, a change in progress, ...
                pass
        elif kind == _IN_LOST:
            core.leader_unreachable(arg, self.now)

    def _drive(self, node: SimNode) -> None:
        """Run the node's Ready loop until it waits for its disk or has nothing to do."""
        core = node.core
        while node.alive and not node.busy:
            if node.inbox:
                while node.inbox:  # everything that queued up goes into one Ready
                    self._apply_input(node, *node.inbox.popleft())
            if not core.has_ready():
                break
            rd = core.ready()
            self._observe(node, rd)
            for m in rd.eager_messages:  # before the disk: a crash meanwhile loses the writes
                self._send(m)
            persist(node.store, rd, sync=False)
            if rd.must_sync and node.disk > 0:
                node.busy = True
                node.rd = rd
                self._at(self.now + node.disk * self.rng.uniform(0.5, 1.5), _SYNCED, node.id, node.epoch)
                break
            self._finish(node, rd)
        if node.alive:
            d = core.next_deadline()
            if d != node.tick_at:
                node.tick_at = d
                self._at(d, _TICK, node.id, d)

    def _observe(self, node: SimNode, rd: Ready) -> None:
        core, checker = node.core, self.checker
        if rd.soft_state is not None and rd.soft_state.role is Role.LEADER:
            checker.on_leader(node.id, core)
        if rd.entries:
            checker.on_persist(node.id, core, rd.entries)
        if rd.commit_index > node.seen_commit:
            checker.on_commit(node.id, core, node.seen_commit, rd.commit_index)
            if core.role is Role.LEADER:
                self._check_majority(node, rd.commit_index)
            node.seen_commit = rd.commit_index
        node.seen_voters = core.voters

    def _check_majority(self, leader: SimNode, index: int) -> None:
        """A leader commits `index` only once a majority of its configuration holds the
        entry durably (configuration-aware: the leader may not be a voter). The commit
        may predate a configuration appended in the same Ready: either one will do."""
        core = leader.core
        term = core.term_at(index)
        if term != core.term:
            return  # learned from an earlier leader, not counted by this one
        nodes = self.nodes
        for voters in (core.voters, leader.seen_voters):
            holders = [v for v in voters if nodes[v].store.durably_holds(index, term)]
            if len(holders) > len(voters) // 2:
                return
        self.checker.fail(
            f"{leader.id} committed {index} (term {term}) held durably only by {holders} "
            f"of the voters {voters}"
        )

    def _finish(self, node: SimNode, rd: Ready) -> None:
        if rd.must_sync:
            node.store.sync()
        for m in rd.messages:
            self._send(m)
        sm, checker, pending = node.sm, self.checker, node.pending
        if rd.install:
            snap = rd.snapshot
            sm.restore(snap.data, snap.index)
            checker.on_restore(node.id, snap.index)
            for index in [i for i in pending if i <= snap.index]:
                del pending[index]  # outcome unknown to this client
        for e in rd.committed:
            sm.apply(e.index, e.data)
            checker.on_apply(node.id, e.index, e.data)
            p = pending.pop(e.index, None) if pending else None
            if p is not None and p[0] == e.term:
                if int.from_bytes(e.data, "big") != p[1]:
                    checker.fail(f"{node.id}: index {e.index} term {e.term} holds another command")
                checker.on_ack(p[1], e.index)
                self._client_done(p[1])
        for ctx, index in rd.read_states:
            node.reads.append((index, ctx))
        if node.reads:
            keep = []
            for index, required in node.reads:
                if index <= sm.applied_index:
                    checker.on_read(node.id, required, sm.applied_index)
                else:
                    keep.append((index, required))
            node.reads = keep
        node.core.advance(rd)
        if sm.applied_index - node.core.first_index >= self.snapshot_every:
            node.core.compact(sm.applied_index, sm.snapshot())

    # -- network and clients ---------------------------------------------------------
    def _send(self, m: object) -> None:
        rng = self.rng
        if self.group[m.frm] != self.group[m.to] or (m.frm, m.to) in self.oneway:
            return
        if self.drop and rng.random() < self.drop:
            return
        if type(m).__name__ == "SnapshotRequest" and m.offset == 0:
            self.snapshots_sent += 1
        lo, hi = self.delay
        self._at(self.now + rng.uniform(lo, hi), _DELIVER, m)
        if self.dup and rng.random() < self.dup:
            self._at(self.now + rng.uniform(lo, hi * 3), _DELIVER, m)

    def _leader(self) -> SimNode | None:
        best = None
        for node in self.nodes.values():
            if node.alive and node.core.role is Role.LEADER:
                if best is None or node.core.term > best.core.term:
                    best = node
        return best

    def _client_propose(self, client: int) -> None:
        cid = self.next_cid
        self.next_cid += 1
        self.proposed += 1
        self.waiting[cid] = client
        # No answer in time (not the leader, lost, crashed): outcome unknown; go on.
        self._at(self.now + 0.3, _GIVE_UP, cid)
        alive = [n for n in self.nodes.values() if n.alive]
        if not alive:
            return
        node = self.rng.choice(alive)
        # A client that hit a follower retries once at the leader it names.
        if node.core.role is not Role.LEADER and node.core.leader:
            hinted = self.nodes[node.core.leader]
            if hinted.alive:
                node = hinted
        self._input(node, _IN_PROPOSE, cid)

    def _client_done(self, cid: int) -> None:
        client = self.waiting.pop(cid, None)
        if client is not None:
            self._at(self.now + self.rng.expovariate(1 / self.think), _PROPOSE, client)

    def _client_read(self) -> None:
        node = self._leader()
        if node is not None:
            self._input(node, _IN_READ, self.checker.max_acked_index)

    # -- the end ---------------------------------------------------------------------
    def _members(self) -> frozenset[str]:
        """The voters of the leader's configuration (everyone while there is no leader)."""
        leader = self._leader()
        return frozenset(leader.core.voters) if leader is not None else frozenset(self.nodes)

    def _converged(self) -> bool:
        """The leader committed its whole log and every voter applied all of it. Servers
        outside the configuration (removed, or never added) may lag forever."""
        leader = self._leader()
        if leader is None or leader.busy:
            return False
        target = leader.core.last_index()
        if leader.core.commit_index != target:
            return False
        nodes = self.nodes
        return all(
            (n := nodes[i]).alive and not n.busy and n.sm.applied_index == target and n.core.commit_index == target
            for i in leader.core.voters
        )

    def _final(self) -> SimResult:
        members = self._members()
        self.checker.check_final((n.id, n.sm.ids) for n in self.nodes.values() if n.id in members)
        return SimResult(
            seed=self.seed, voters=self.n, steps=self.steps, sim_time=self.now,
            acked=len(self.checker.acked), proposed=self.proposed,
            reads=self.checker.reads_checked, leaders=len(self.checker.leaders),
            crashes=self.crashes, snapshots_sent=self.snapshots_sent,
            voter_changes=sum(1 for _, data in self.checker.committed.values() if is_config(data)),
        )


def run_seed(seed: int, *, core_cls: type[RaftCore] = RaftCore, fsync: bool = True) -> SimResult:
    """Run one seeded scenario. Raises SimulationFailure (with a replay line) on any
    violated invariant, lack of convergence, or exception inside the core."""
    sim = Simulation(seed, core_cls=core_cls, fsync=fsync)
    try:
        return sim.run()
    except Exception as err:  # noqa: BLE001 - anything wrong is a failure of this seed
        detail = "".join(traceback.format_exception_only(type(err), err)).strip()
        if not isinstance(err, AssertionError):
            detail += "\n" + "".join(traceback.format_tb(err.__traceback__)[-3:])
        if sim.trace is not None:
            detail += "\nlast events:\n" + "\n".join(sim.trace)
        raise SimulationFailure(seed, f"t={sim.now:.4f}: {detail}") from err
