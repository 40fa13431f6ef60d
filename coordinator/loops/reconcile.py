"""The leader's half of keeping the dataset table and the agents' disks in agreement.

Agents report what their shard stores hold (`Datasets.ReportInventory`: a digest first, the
listing in pages only when the leader asks). For each reported blob the leader decides,
from the replicated state, one of:

- **listed** (or held by a put in progress): keep;
- **candidate**: a dataset's replica list lacks this node and has fewer live replicas
  than that dataset's replication (a node that came back after DOWN). `Reconciler.run_cycle()`
  asks the node to re-hash it (`Shards.StatShards` with verify) and only then lists it with
  an `AddReplicasCmd`;
- **orphan**: no dataset references it, or no list names this copy and every list has
  its replication on ready nodes. The answer names it; the agent deletes it once
  its file is older than the agent's grace (`agent/inventory.py`).

`run_cycle()` also trims shards with more live replicas than wanted (a re-listing raced a
re-replication): it drops the newest extra replicas with a `DropReplicasCmd`, only when
every live holder is ready, never leaving a list below its replication; the dropped
copies become orphans and are swept after the grace. Decisions are pure functions (`classify`,
`plan_reconcile`) of a `Snapshot`; the rest is leader-local soft state, reset on every
leadership change.

Puts in progress: `PlanPut` holds the put's shard ids for `PLAN_TTL_S` (and
`CommitDataset` while it checks and commits); held blobs are never called orphans. Holds
are soft state, so a new leader gives no orphan verdicts until it has led for the
reporting agent's grace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from lepton.common.errors import LeptonError, NotFound
from lepton.common.loops import run_cycles
from lepton.coordinator.state.state_machine import ClusterStateMachine, NodeChange
from lepton.v1 import common_pb2, datasets_pb2, state_pb2

logger = logging.getLogger(__name__)

Commit = Callable[[state_pb2.Command], Awaitable[object]]
PLAN_TTL_S = 3600.0  # a put's blobs are held this long after PlanPut (or until it commits)
MAX_HOLDS = 10_000  # puts held at once; the oldest hold goes first beyond this
MAX_CANDIDATES = 10_000  # per node, waiting to be verified and listed
VERIFY_PER_NODE = 64  # blobs one StatShards(verify) call re-hashes, per cycle
VERIFY_PER_CYCLE = 512
VERIFY_TIMEOUT_S = 600.0
MAX_TRIM_PER_CYCLE = 1000


@dataclass(frozen=True, slots=True)
class ShardView:
    """One shard id. Each dataset naming it has its own replica list (a put lists where it
    placed the shard; a replica change applies to every list), so each list is judged
    against its own dataset's replication."""

    size: int
    entries: tuple[tuple[int, tuple[str, ...]], ...]  # (replication, replicas) per dataset

    def listed(self, node_id: str) -> bool:
        return any(node_id in reps for _, reps in self.entries)

    def short(self, node_id: str, live: frozenset[str], adding: int = 0) -> bool:
        """Some list lacking the node has fewer live replicas than its dataset wants."""
        return any(node_id not in reps and sum(1 for n in reps if n in live) + adding < want
                   for want, reps in self.entries)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the decisions read: every referenced shard, node readiness, holds, candidates."""

    shards: Mapping[str, ShardView]
    live: frozenset[str]  # ready or suspect: their replicas count
    ready: frozenset[str]  # ready and not draining: may be listed, their copies are trusted
    held: frozenset[str] = frozenset()
    candidates: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # node -> {shard: size}


@dataclass(slots=True)
class Verdicts:
    orphans: list[str] = field(default_factory=list)
    candidates: dict[str, int] = field(default_factory=dict)
    held: int = 0


@dataclass(slots=True)
class Plan:
    relist: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> {shard: size} to verify
    trim: list[tuple[str, str]] = field(default_factory=list)  # (shard, node) replicas to drop


def snapshot(sm: ClusterStateMachine, held: frozenset[str] = frozenset(),
             candidates: Mapping[str, Mapping[str, int]] | None = None) -> Snapshot:
    entries: dict[str, list[tuple[int, tuple[str, ...]]]] = defaultdict(list)
    sizes: dict[str, int] = {}
    for name in sorted(sm.datasets.datasets):
        ds = sm.datasets.datasets[name]
        for s in ds.shards:
            entries[s.id].append((ds.replication, tuple(s.replicas)))
            sizes[s.id] = s.size
    shards = {sid: ShardView(sizes[sid], tuple(e)) for sid, e in entries.items()}
    live = frozenset(n.id for n in sm.nodes.values()
                     if n.state in (common_pb2.NODE_STATE_READY, common_pb2.NODE_STATE_SUSPECT))
    ready = frozenset(n.id for n in sm.nodes.values()
                      if n.state == common_pb2.NODE_STATE_READY and not n.draining)
    return Snapshot(shards, live, ready, held, candidates or {})


def classify(snap: Snapshot, node_id: str, entries: list[tuple[str, int]]) -> Verdicts:
    """The verdict on each blob a node reported (see the module docstring)."""
    out = Verdicts()
    for shard_id, size in entries:
        if shard_id in snap.held:
            out.held += 1
            continue
        view = snap.shards.get(shard_id)
        if view is None:
            out.orphans.append(shard_id)
        elif size != view.size:
            continue  # a size the manifest disagrees with: leave it alone
        elif view.short(node_id, snap.live):
            if node_id in snap.ready:
                out.candidates[shard_id] = size
        elif not view.listed(node_id) and all(
                sum(1 for n in reps if n in snap.ready) >= want for want, reps in view.entries):
            out.orphans.append(shard_id)  # a surplus copy: the wanted ones are on ready nodes
    return out


def plan_reconcile(snap: Snapshot) -> Plan:
    """Which candidates to verify and list, which surplus replicas to drop."""
    plan = Plan()
    adding: dict[str, int] = defaultdict(int)  # shard -> listings planned this pass
    for node_id in sorted(snap.candidates):
        if node_id not in snap.ready:
            continue
        for shard_id, size in sorted(snap.candidates[node_id].items()):
            view = snap.shards.get(shard_id)
            if view is not None and size == view.size and view.short(node_id, snap.live, adding[shard_id]):
                plan.relist.setdefault(node_id, {})[shard_id] = size
                adding[shard_id] += 1
    for shard_id in sorted(snap.shards):
        plan.trim += [(shard_id, n) for n in _surplus(snap.shards[shard_id], snap)]
    return plan


def _surplus(view: ShardView, snap: Snapshot) -> list[str]:
    """Replicas to drop (from every list): the newest first, while every list keeps its
    dataset's replication in ready nodes. Nothing while any live holder is not ready (a
    suspect one may be about to go DOWN and leave fewer than wanted)."""
    lists = [(want, [n for n in reps if n in snap.live]) for want, reps in view.entries]
    if any(n not in snap.ready for _, live in lists for n in live):
        return []
    order = list(dict.fromkeys(n for _, live in lists for n in live))
    dropped: list[str] = []
    for node_id in reversed(order):
        if all(node_id not in live or len(live) - 1 - sum(1 for d in dropped if d in live) >= want
               for want, live in lists):
            dropped.append(node_id)
    return dropped


class PutHolds:
    """Shard ids of puts in progress, by dataset name, until they commit or expire."""

    def __init__(self, monotonic: Callable[[], float]):
        self._now = monotonic
        self._holds: dict[str, tuple[float, set[str]]] = {}

    def hold(self, name: str, shard_ids: list[str], ttl_s: float = PLAN_TTL_S) -> None:
        until, ids = self._holds.pop(name, (0.0, set()))
        self._holds[name] = (max(until, self._now() + ttl_s), ids | set(shard_ids))
        while len(self._holds) > MAX_HOLDS:
            del self._holds[next(iter(self._holds))]

    def release(self, name: str) -> None:
        self._holds.pop(name, None)

    def held(self) -> frozenset[str]:
        now = self._now()
        for name in [n for n, (until, _) in self._holds.items() if until <= now]:
            del self._holds[name]
        return frozenset().union(*(ids for _, ids in self._holds.values()))

    def clear(self) -> None:
        self._holds.clear()


@dataclass(slots=True)
class _NodeBook:
    clean: tuple | None = None  # (digest, count, generation) of the last complete listing
    listing: tuple | None = None  # the same, for the listing in progress
    candidates: dict[str, int] = field(default_factory=dict)


class Reconciler:
    """Answers inventory reports; `run_cycle()` verifies and lists candidates and trims."""

    def __init__(self, state: ClusterStateMachine, commit: Commit, pool, *,
                 is_leader: Callable[[], bool], term: Callable[[], int],
                 monotonic: Callable[[], float], interval_s: float = 5.0):
        self._state = state
        self._commit = commit
        self._pool = pool
        self._is_leader = is_leader
        self._term = term
        self._now = monotonic
        self._interval_s = interval_s
        self.holds = PutHolds(monotonic)
        self._books: dict[str, _NodeBook] = {}
        self._node_changes = 0
        self._since = monotonic()  # when this leadership began
        self._snap: tuple[tuple[int, int], Snapshot] | None = None  # by generation
        self._wakeup = asyncio.Event()

    # -- soft state ------------------------------------------------------------------
    def on_leadership(self, is_leader: bool, term: int) -> None:
        self._books.clear()
        self.holds.clear()
        self._since = self._now()

    def on_node_change(self, change: NodeChange) -> None:
        self._node_changes += 1  # readiness changes surplus verdicts: listings are stale

    def _generation(self) -> tuple[int, int]:
        return (self._state.datasets.changes, self._node_changes)

    def wake(self, *_: object) -> None:
        self._wakeup.set()

    def _snapshot(self) -> Snapshot:
        """Built once per generation: every page of every report would otherwise walk
        every dataset."""
        gen = self._generation()
        if self._snap is None or self._snap[0] != gen:
            self._snap = (gen, snapshot(self._state))
        return self._snap[1]

    # -- reports ---------------------------------------------------------------------
    def report(self, req: datasets_pb2.ReportInventoryRequest) -> datasets_pb2.ReportInventoryResponse:
        """Judge one inventory request (validated by the caller, after a read barrier).
        Raises NotFound for a node that is not registered."""
        if req.node_id not in self._state.nodes:
            raise NotFound(f'node "{req.node_id}" is not registered')
        out = datasets_pb2.ReportInventoryResponse(term=self._term())
        book = self._books.setdefault(req.node_id, _NodeBook())
        key = (req.digest, req.count, self._generation())
        if not (req.shards or req.first or req.last):
            out.send_listing = book.clean != key or bool(book.candidates)
            return out
        if req.first:
            book.listing, book.candidates = key, {}
        snap = dataclasses.replace(self._snapshot(), held=self.holds.held())
        verdicts = classify(snap, req.node_id, [(s.id, s.size) for s in req.shards])
        out.held = verdicts.held
        # A new leader does not know the holds of puts planned before it.
        if self._now() - self._since < min(req.grace_ms / 1000, PLAN_TTL_S):
            out.orphans_withheld = True
        else:
            out.orphans.extend(verdicts.orphans)
        if verdicts.held or out.orphans_withheld and verdicts.orphans:
            book.listing = None  # not settled: the next report lists again
        room = MAX_CANDIDATES - len(book.candidates)
        for shard_id, size in list(verdicts.candidates.items())[:max(0, room)]:
            book.candidates[shard_id] = size
        if req.last:
            book.clean = key if book.listing == key else None
            book.listing = None
        if verdicts.candidates:
            self.wake()
        return out

    # -- the loop --------------------------------------------------------------------
    async def run_cycle(self) -> str:
        """Verify and list candidates, trim surplus replicas; returns the logged sentence."""
        if not self._is_leader():
            return "not the leader: nothing to reconcile"
        sm = self._state
        candidates = {n: dict(b.candidates) for n, b in self._books.items() if b.candidates}
        plan = plan_reconcile(dataclasses.replace(self._snapshot(), candidates=candidates))
        asks: dict[str, dict[str, int]] = {}
        budget = VERIFY_PER_CYCLE
        for node_id, shards in plan.relist.items():
            take = dict(list(shards.items())[:min(VERIFY_PER_NODE, budget)])
            if take:
                asks[node_id] = take
                budget -= len(take)
        # Candidates not planned are stale (listed meanwhile, dataset gone, node not ready);
        # those asked are done either way: the next inventory brings back what remains.
        for node_id, book in self._books.items():
            keep = plan.relist.get(node_id, {})
            book.candidates = {s: z for s, z in book.candidates.items()
                               if s in keep and s not in asks.get(node_id, {})}
        results = await asyncio.gather(*(self._verify(n, ids) for n, ids in asks.items()))
        adds = [state_pb2.ReplicaChange(shard_id=s, node_id=n) for n, ok in zip(asks, results, strict=True)
                for s in ok]
        if adds:
            await self._commit(state_pb2.Command(add_replicas=state_pb2.AddReplicasCmd(replicas=adds)))
        trims = plan.trim[:MAX_TRIM_PER_CYCLE]
        if trims:
            await self._commit(state_pb2.Command(drop_replicas=state_pb2.DropReplicasCmd(
                replicas=[state_pb2.ReplicaChange(shard_id=s, node_id=n) for s, n in trims],
                reason="surplus replica")))
        if not asks and not trims:
            return "table and inventories agree"
        parts = []
        if asks:
            names = sorted(sm.nodes[n].name or n for n in asks if n in sm.nodes)
            failed = sum(len(v) for v in asks.values()) - len(adds)
            parts.append(f"re-listed {len(adds)} verified shards on {', '.join(names)}"
                         + (f" ({failed} failed verification)" if failed else ""))
        if trims:
            parts.append(f"trimmed {len(trims)} surplus replicas")
        return "; ".join(parts)

    async def _verify(self, node_id: str, shards: dict[str, int]) -> list[str]:
        """The shards the node re-hashed and holds at the right size (a corrupt one is
        removed there and left out)."""
        node = self._state.nodes.get(node_id)
        if node is None:
            return []
        try:
            resp = await self._pool.call(node.address, "StatShards", datasets_pb2.StatShardsRequest(
                shard_ids=list(shards), verify=True), VERIFY_TIMEOUT_S)
        except LeptonError as err:
            logger.warning("reconcile: %s could not verify %d shards: %s", node.name, len(shards), err.message)
            return []
        return [s for s, size in shards.items() if resp.present.get(s) == size]

    async def run(self) -> None:
        await run_cycles("reconcile", self.run_cycle, interval_s=self._interval_s, wakeup=self._wakeup,
                         logger=logger)
