"""Reconciliation of the dataset table with agents' inventories: the pure decisions
(`classify`, `plan_reconcile`), the leader's Reconciler with a fake agent pool, and the
agent's InventoryReporter sweeping a real store through a fake leader."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from lepton.agent.inventory import InventoryReporter, digest
from lepton.common.errors import NotFound
from lepton.coordinator.loops.reconcile import (
    PLAN_TTL_S,
    Reconciler,
    ShardView,
    Snapshot,
    classify,
    plan_reconcile,
)
from lepton.coordinator.state.state_machine import NodeState
from lepton.dataplane.shards import ShardStore
from lepton.v1 import datasets_pb2 as dpb
from lepton.v1 import state_pb2
from tests.unit.test_datasets import World, replicas

A, B, C, D = "a" * 64, "b" * 64, "c" * 64, "d" * 64
ALL = frozenset({"n1", "n2", "n3"})


def snap(shards, live=ALL, ready=ALL, held=frozenset(), candidates=None):
    views = {s: ShardView(100, ((want, tuple(r)),)) for s, (want, r) in shards.items()}
    return Snapshot(views, frozenset(live), frozenset(ready), frozenset(held), candidates or {})


# -- the pure decisions ------------------------------------------------------------------
def test_classify_each_kind_of_blob():
    s = snap({A: (2, ["n1", "n2"]), B: (2, ["n1"]), C: (2, ["n1", "n2"])}, held={D})
    v = classify(s, "n3", [(A, 100), (B, 100), (C, 99), (D, 100), ("e" * 64, 5)])
    assert v.orphans == [A, "e" * 64]  # a surplus copy; an unreferenced blob
    assert v.candidates == {B: 100}  # under-replicated: verify, then list
    assert v.held == 1  # a put in progress: never an orphan
    # Listed copies are kept; a size the manifest disagrees with is left alone (C).
    assert classify(s, "n1", [(A, 100), (B, 100)]).orphans == []


def test_classify_is_careful_with_suspect_holders_and_unready_nodes():
    s = snap({A: (2, ["n1", "n2"]), B: (2, ["n1"])}, ready={"n1", "n3"})  # n2 suspect
    v = classify(s, "n3", [(A, 100), (B, 100)])
    assert v.orphans == [] and v.candidates == {B: 100}  # A's wanted copies are not all ready
    s = snap({B: (2, ["n1"])}, ready={"n1", "n2"})  # n3 is live but draining (not ready)
    assert classify(s, "n3", [(B, 100)]).candidates == {}


def test_plan_relists_only_up_to_the_wanted_count_and_only_ready_nodes():
    s = snap({A: (3, ["n1"]), B: (2, ["n1"])}, live={"n1", "n2", "n3", "n4"}, ready={"n1", "n2", "n3"},
             candidates={"n2": {A: 100, B: 100}, "n3": {A: 100, B: 100}, "n4": {A: 100}})
    plan = plan_reconcile(s)
    assert plan.relist == {"n2": {A: 100, B: 100}, "n3": {A: 100}} and plan.trim == []
    stale = snap({A: (2, ["n1", "n2"])}, candidates={"n2": {A: 100}, "n3": {A: 100, B: 100}})
    assert plan_reconcile(stale).relist == {}  # listed already / full / unreferenced


def test_plan_trims_surplus_never_below_target_nor_with_a_suspect_holder():
    s = snap({A: (2, ["n1", "n2", "n3"]), B: (1, ["n2", "n3"]), C: (3, ["n1", "n2", "n3"])})
    assert plan_reconcile(s).trim == [(A, "n3"), (B, "n3")]
    assert plan_reconcile(snap({A: (2, ["n1", "n2", "n3"])}, ready={"n1", "n2"})).trim == []
    # A dead holder is not a replica: two live copies of a shard that wants two stay.
    assert plan_reconcile(snap({A: (2, ["n1", "n2", "n3"])}, live={"n1", "n2"})).trim == []


def test_each_datasets_replica_list_is_judged_against_its_own_replication():
    # One shard id in two datasets: "a" wants 2 on [n1, n2], "b" wants 1 on [n3].
    two = ShardView(100, ((2, ("n1", "n2")), (1, ("n3",))))
    s = Snapshot({A: two}, frozenset({"n1", "n2", "n3", "n4"}), frozenset({"n1", "n2", "n3", "n4"}))
    assert plan_reconcile(s).trim == []  # any drop would leave one list short
    assert classify(s, "n3", [(A, 100)]).orphans == []  # listed in "b"
    assert classify(s, "n4", [(A, 100)]).orphans == [A]  # both lists are full
    short = ShardView(100, ((2, ("n1",)), (1, ("n2",))))
    s = Snapshot({A: short}, ALL, ALL, candidates={"n2": {A: 100}})
    assert classify(s, "n2", [(A, 100)]).candidates == {A: 100}  # listed in one, needed in the other
    assert plan_reconcile(s).relist == {"n2": {A: 100}}


# -- the leader's Reconciler ---------------------------------------------------------------
class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class StatPool:
    def __init__(self, present: dict[str, dict[str, int]]):
        self.present = present  # address -> {shard: size} a verify finds good
        self.calls: list[tuple[str, list[str]]] = []

    async def call(self, address, method, request, timeout):
        assert method == "StatShards" and request.verify
        self.calls.append((address, list(request.shard_ids)))
        have = self.present.get(address, {})
        return dpb.StatShardsResponse(present={s: have[s] for s in request.shard_ids if s in have})


def make(w: World, pool, clock=None, grace_s=0.0) -> Reconciler:
    clock = clock or Clock()
    r = Reconciler(w.sm, w.propose, pool, is_leader=lambda: True, term=lambda: 7, monotonic=clock)
    w.sm.add_listener(r.on_node_change)
    clock.t += grace_s  # has led long enough
    return r


def page(node, entries, first=True, last=True, dig="0" * 64, grace_ms=0, count=1):
    return dpb.ReportInventoryRequest(node_id=node, digest=dig, count=count, first=first, last=last,
                                      grace_ms=grace_ms, shards=[dpb.ShardEntry(id=s, size=z) for s, z in entries])


async def test_a_returning_node_is_verified_then_relisted():
    w = World()
    w.put("d", [(A, ["n1", "n2", "n3"]), (B, ["n1", "n2", "n3"])], replication=3)
    w.set_state("n3", NodeState.SUSPECT)
    w.set_state("n3", NodeState.DOWN)
    assert replicas(w, "d") == [["n1", "n2"], ["n1", "n2"]]
    w.set_state("n3", NodeState.READY)
    pool = StatPool({"n3:1": {A: 100}})  # B turns out corrupt: StatShards leaves it out
    r = make(w, pool)
    assert r.report(dpb.ReportInventoryRequest(node_id="n3", digest="1" * 64, count=2)).send_listing
    resp = r.report(page("n3", [(A, 100), (B, 100)], dig="1" * 64, count=2))
    assert (list(resp.orphans), resp.term) == ([], 7)
    assert await r.run_cycle() == "re-listed 1 verified shards on n3 (1 failed verification)"
    assert pool.calls == [("n3:1", [A, B])]
    assert replicas(w, "d") == [["n1", "n2", "n3"], ["n1", "n2"]]
    assert await r.run_cycle() == "table and inventories agree"  # candidates were consumed
    with pytest.raises(NotFound):
        r.report(page("nobody", []))


async def test_unchanged_digest_skips_the_listing_until_the_table_changes():
    w = World()
    w.put("d", [(A, ["n1", "n2"])])
    r = make(w, StatPool({}))
    digest_only = dpb.ReportInventoryRequest(node_id="n1", digest="2" * 64, count=1)
    assert r.report(digest_only).send_listing
    r.report(page("n1", [(A, 100)], first=True, last=False, dig="2" * 64))
    assert r.report(digest_only).send_listing  # the listing is not complete yet
    r.report(page("n1", [], first=False, last=True, dig="2" * 64))
    assert not r.report(digest_only).send_listing
    w.apply(delete_dataset=state_pb2.DeleteDatasetCmd(name="d"))
    assert r.report(digest_only).send_listing
    assert list(r.report(page("n1", [(A, 100)], dig="2" * 64)).orphans) == [A]
    assert not r.report(digest_only).send_listing
    w.set_state("n2", NodeState.SUSPECT)  # readiness decides surplus verdicts
    assert r.report(digest_only).send_listing


async def test_holds_and_a_new_leaders_restraint_protect_puts_in_progress():
    w = World()
    clock = Clock()
    r = make(w, StatPool({}), clock)
    # A new leader knows no holds of the old one: no verdicts for the agent's grace.
    resp = r.report(page("n1", [(A, 100)], grace_ms=60_000))
    assert resp.orphans_withheld and list(resp.orphans) == []
    clock.t += 60
    r.holds.hold("put", [A])
    resp = r.report(page("n1", [(A, 100), (B, 100)], grace_ms=60_000))
    assert (list(resp.orphans), resp.held) == ([B], 1)
    r.holds.release("put")
    assert list(r.report(page("n1", [(A, 100)])).orphans) == [A]
    r.holds.hold("put", [A])
    clock.t += PLAN_TTL_S  # an abandoned put's hold expires
    assert list(r.report(page("n1", [(A, 100)])).orphans) == [A]
    r.on_leadership(True, 8)
    assert r.report(page("n1", [(A, 100)], grace_ms=1000)).orphans_withheld


async def test_trim_drops_the_newest_surplus_replica():
    w = World()
    w.put("d", [(A, ["n1", "n2"])], replication=2)
    w.apply(add_replicas=state_pb2.AddReplicasCmd(replicas=[state_pb2.ReplicaChange(shard_id=A, node_id="n3")]))
    r = make(w, StatPool({}))
    assert await r.run_cycle() == "trimmed 1 surplus replicas"
    assert replicas(w, "d") == [["n1", "n2"]]
    assert list(r.report(page("n3", [(A, 100)])).orphans) == [A]  # swept after the grace


# -- the agent's reporter --------------------------------------------------------------------
class FakeLeader:
    """Answers like the Reconciler: `orphans` are orphans, digest changes ask for a listing."""

    def __init__(self, orphans=(), term=3):
        self.orphans = set(orphans)
        self.term = term
        self.requests: list[dpb.ReportInventoryRequest] = []
        self.seen = ""

    async def call(self, method, req, timeout):
        assert method == "ReportInventory"
        self.requests.append(req)
        if not (req.shards or req.first or req.last):
            return dpb.ReportInventoryResponse(send_listing=req.digest != self.seen, term=self.term)
        if req.last:
            self.seen = req.digest
        return dpb.ReportInventoryResponse(orphans=[s.id for s in req.shards if s.id in self.orphans],
                                           term=self.term)


def put_blob(store: ShardStore, data: bytes) -> str:
    sid = hashlib.sha256(data).hexdigest()
    with store.writer(sid, len(data)) as w:
        w.write(data)
        w.commit()
    return sid


async def test_reporter_sweeps_old_orphans_and_rechecks_young_ones(tmp_path):
    clock = Clock()
    store = ShardStore(tmp_path / "s", clock=clock)
    old, kept = put_blob(store, b"old"), put_blob(store, b"kept")
    clock.t += 100
    young = put_blob(store, b"young")
    leader = FakeLeader(orphans={old, young})
    rep = InventoryReporter(store, leader, "n1", interval_s=60, grace_s=30, clock=clock)
    assert await rep.run_cycle() == "3 shards; swept 1 orphans, 1 within their grace"
    assert leader.requests[0].count == 3 and leader.requests[1].grace_ms == 30_000
    assert not store.has(old) and store.has(young) and store.has(kept)
    # Unchanged digest: no listing; the young orphan is re-checked once it is due.
    # The digest changed (a blob went): listed again, the young orphan still within its grace.
    assert await rep.run_cycle() == "2 shards; swept 0 orphans, 1 within their grace"
    assert len(leader.requests[-1].shards) == 2
    assert await rep.run_cycle() == "2 shards" and len(leader.requests[-1].shards) == 0
    assert rep._young[young] == clock.t + 30  # due once its grace has passed
    clock.t += 30
    assert await rep.run_cycle() == "2 shards; swept 1 orphans"
    assert [s.id for s in leader.requests[-1].shards] == [young] and not store.has(young)
    assert store.has(kept)


async def test_reporter_ignores_stale_terms_and_touched_blobs_and_grace_zero(tmp_path):
    clock = Clock()
    store = ShardStore(tmp_path / "s", clock=clock)
    sid = put_blob(store, b"x")
    clock.t += 100
    rep = InventoryReporter(store, FakeLeader(orphans={sid}, term=5), "n1", interval_s=60, grace_s=30,
                            clock=clock)
    rep._term = 6  # a newer leader was seen: this answer may miss a newer dataset
    await rep.run_cycle()
    assert store.has(sid)
    # An upload (or pull) that finds the blob stored touches it: spared for another grace.
    with pytest.raises(Exception, match="already stored"):
        store.writer(sid, 1)
    assert not store.sweep(sid, 30)
    clock.t += 100
    off = InventoryReporter(store, FakeLeader(orphans={sid}), "n1", interval_s=60, grace_s=0, clock=clock)
    assert await off.run_cycle() == "1 shards; swept 0 orphans, 1 within their grace"
    assert store.has(sid) and store.sweep(sid, 30) and not store.has(sid)


def test_digest_is_order_sensitive_and_stable():
    assert digest([]) == hashlib.sha256(b"").hexdigest()
    assert digest([(A, 1), (B, 2)]) != digest([(A, 1), (B, 3)])


async def test_reporter_backs_off_while_a_new_leader_withholds_verdicts(tmp_path):
    clock = Clock()
    store = ShardStore(tmp_path / "s", clock=clock)
    sid = put_blob(store, b"w")
    clock.t += 100
    leader = FakeLeader(orphans={sid})
    rep = InventoryReporter(store, leader, "n1", interval_s=60, grace_s=30, clock=clock)
    rep._young[sid] = 0.0  # due now

    async def withheld(method, req, timeout):
        return dpb.ReportInventoryResponse(term=4, orphans_withheld=bool(req.shards), send_listing=False)

    leader.call = withheld
    assert await rep.run_cycle() == "1 shards"
    assert store.has(sid) and rep._young[sid] >= clock.t + 29  # asked again later, not at once


async def test_a_wall_clock_jump_sweeps_no_orphan_early(tmp_path, monkeypatch):
    store = ShardStore(tmp_path / "s")  # the real clocks
    sid = put_blob(store, b"new orphan")
    day_ahead = time.time() + 24 * 3600
    monkeypatch.setattr(time, "time", lambda: day_ahead)  # the wall clock moved forward a day
    os.utime(store.path(sid), (day_ahead - 7 * 24 * 3600,) * 2)  # and its file looks a week old
    rep = InventoryReporter(store, FakeLeader(orphans={sid}), "n1", interval_s=60, grace_s=600)
    assert await rep.run_cycle() == "1 shards; swept 0 orphans, 1 within their grace"
    assert store.has(sid)


async def test_blobs_found_at_start_count_as_new(tmp_path):
    clock = Clock()
    sid = put_blob(ShardStore(tmp_path / "s", clock=clock), b"from before a restart")
    clock.t += 10_000
    store = ShardStore(tmp_path / "s", clock=clock)  # the restarted agent's
    assert store.age_s(sid) == 0 and not store.sweep(sid, 600)
    clock.t += 600
    assert store.sweep(sid, 600) and not store.has(sid)
