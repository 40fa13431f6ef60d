"""EtcdConsensus beyond the shared contract, on real etcd: fencing of a deposed leader,
stepping down before another can lead, snapshots bounding the keyspace, errors."""

from __future__ import annotations

import asyncio
import time

import pytest
from aetcd import rpc

from lepton.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotLeader,
    Unavailable,
)
from lepton.coordinator.etcd import consensus as etcd_consensus
from lepton.coordinator.etcd.connection import EtcdConnection, prefix_end
from lepton.coordinator.etcd.consensus import EtcdConsensus
from lepton.coordinator.etcd.tls import EtcdTls
from tests.etcd_server import EtcdCluster, Proxy, free_port
from tests.unit.test_consensus_contract import CountingMachine
from tests.unit.test_etcd_contract import EtcdHarness, wait_for_leader

WITHIN = 30.0


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), n=1)
    yield cluster
    cluster.stop()


@pytest.fixture
async def raw(etcd):
    conn = EtcdConnection(etcd.endpoints, None)
    yield conn
    await conn.close()


async def count_keys(conn: EtcdConnection, prefix: str, sub: str = "/") -> int:
    start = (prefix + sub).encode()
    resp = await conn.call(conn.kv.Range, rpc.RangeRequest(key=start, range_end=prefix_end(start), count_only=True), timeout=5)
    return resp.count


async def eventually(predicate, what: str, within: float = WITHIN) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_leader_whose_lease_is_revoked_steps_down_and_its_late_append_is_refused(etcd, raw):
    h = EtcdHarness(etcd, prefix="/lepton/revoked")
    await h.start()
    try:
        old = h.leader()
        old_term = old.term()
        assert await old.propose(b"before", timeout=10) == 1
        old_id = next(i for i, n in h.nodes.items() if n is old)
        await raw.call(raw.lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=old._election.lease_id), timeout=5)
        await eventually(lambda: (False, old_term) in h.node_events[old_id], "the old leader did not step down")
        new_id = await wait_for_leader(h.nodes)
        new = h.nodes[new_id]
        assert new.term() > old_term
        logs_before = await count_keys(raw, h.prefix, "/log/")
        # The deposed leader appends at the next free index with its old term: fenced.
        assert await old.append(old_term, new._sm.applied_index + 1, [b"late"]) is False
        assert await count_keys(raw, h.prefix, "/log/") == logs_before
        assert await new.propose(b"after", timeout=10) == 2
        await eventually(lambda: h.sms[old_id].log == [b"before", b"after"], "the old leader did not follow")
    finally:
        await h.stop()


async def test_a_leader_cut_off_from_etcd_steps_down_before_another_leads(etcd, raw):
    proxy = Proxy(etcd.endpoints[0])
    h = EtcdHarness(etcd, prefix="/lepton/cut")
    changes: list[tuple[float, str, bool]] = []
    try:
        cut_off = h.make("c1", [proxy.address])
        cut_off.add_leadership_listener(lambda lead, term: changes.append((time.monotonic(), "c1", lead)))
        await cut_off.start()
        await wait_for_leader(h.nodes)
        other = h.make("c2")
        other.add_leadership_listener(lambda lead, term: changes.append((time.monotonic(), "c2", lead)))
        await other.start()
        term = cut_off.term()
        await cut_off.propose(b"one", timeout=10)
        proxy.cut(blackhole=True)
        await eventually(other.is_leader, "the other candidate did not take over")
        down = [t for t, who, lead in changes if who == "c1" and not lead]
        up = [t for t, who, lead in changes if who == "c2" and lead]
        assert down and up and down[0] < up[0], changes
        assert other.term() > term
        proxy.heal()
        logs_before = await count_keys(raw, h.prefix, "/log/")
        assert await cut_off.append(term, 2, [b"late"]) is False
        assert await count_keys(raw, h.prefix, "/log/") == logs_before
        assert await other.propose(b"two", timeout=10) == 2
        # Healed, the one cut off follows again (its lease loop and watch recovered).
        await eventually(lambda: h.sms["c1"].log == [b"one", b"two"], "the healed node does not follow")
        assert cut_off.leader()[0] == "c2"
    finally:
        await h.stop()
        proxy.close()


async def test_a_leader_whose_event_loop_is_blocked_keeps_its_lease(etcd):
    """The keep-alives run on their own thread: a loop busy for 1.8 s of a 2 s TTL (longer
    than the 1.6 s a keep-alive sent just before could vouch for) costs no leadership."""
    h = EtcdHarness(etcd, prefix="/lepton/busy")
    await h.start()
    try:
        leader = h.leader()
        term = leader.term()
        leader_id = next(i for i, n in h.nodes.items() if n is leader)
        await leader.propose(b"before", timeout=10)
        end = time.monotonic() + 1.8
        while time.monotonic() < end:  # busy, holding the GIL as a scheduling cycle would
            sum(range(1000))
        await asyncio.sleep(0.5)  # the watchdog, overdue, runs now
        assert leader.is_leader() and leader.term() == term
        assert (False, term) not in h.node_events[leader_id]
        assert await leader.propose(b"after", timeout=10) == 2
    finally:
        await h.stop()


async def test_snapshots_keep_the_keyspace_bounded_and_a_new_candidate_starts_from_one(etcd, raw):
    h = EtcdHarness(etcd, candidates=1, prefix="/lepton/snap", snapshot_every=10)
    await h.start()
    try:
        for i in range(120):
            await h.leader().propose(f"v{i}".encode(), timeout=10)
        await eventually(lambda: h.leader()._applier.snapshot is not None
                         and h.leader()._applier.snapshot.index >= 100, "no recent snapshot")
        # leader key + pointer + chunk(s) + the batches since the last snapshot
        assert await count_keys(raw, h.prefix) <= 3 + 2 * 10
        assert await count_keys(raw, h.prefix, "/log/") <= 2 * 10
        with pytest.raises(Unavailable, match="compacted"):  # etcd's history was compacted too
            await raw.call(raw.kv.Range, rpc.RangeRequest(key=b"/lepton/snap/", revision=2), timeout=5)
        late = h.make("c9")
        await late.start()
        assert h.sms["c9"].log == [f"v{i}".encode() for i in range(120)]
        assert h.sms["c9"].applied_index == 120
    finally:
        await h.stop()


async def test_bad_requests_get_clear_errors(etcd):
    h = EtcdHarness(etcd, candidates=1, prefix="/lepton/errors")
    await h.start()
    try:
        leader = h.leader()
        limit = etcd_consensus.DEFAULT_MAX_COMMAND_BYTES
        with pytest.raises(InvalidArgument, match=f"a log entry holds at most {limit}"):
            await leader.propose(b"x" * (limit + 1), timeout=5)
        assert await leader.propose(b"x" * limit, timeout=10) == 1  # the limit itself fits etcd's
        with pytest.raises(FailedPrecondition, match="etcdctl"):
            await leader.add_voter("127.0.0.1:1", timeout=5)
        await leader.read_barrier(timeout=5)
        await eventually(lambda: leader.status().voters, "no etcd members in status")
        status = leader.status()
        assert [(v.role, v.address) for v in status.voters] == [("leader", etcd.endpoints[0])]
        assert status.leader_id == "c1"
        assert status.term == leader.term() > 0 and status.applied_index == 1
    finally:
        await h.stop()
    follower = EtcdConsensus("f", "f:1", etcd.endpoints, "/lepton/errors", CountingMachine())
    await follower.start()
    try:
        await eventually(lambda: follower.leader()[0] != "" or follower.is_leader(), "no leader seen")
        if not follower.is_leader():
            with pytest.raises(NotLeader):
                await follower.propose(b"y", timeout=5)
    finally:
        await follower.stop()


async def test_a_prefix_holds_one_clusters_state(etcd, raw):
    """The first candidate records its cluster in <prefix>/meta; a candidate of another
    cluster pointed at the same prefix is refused at start, before it campaigns."""
    prefix = "/lepton/claimed"
    first = EtcdConsensus("a", "a:1", etcd.endpoints, prefix, CountingMachine(), cluster="alpha")
    await first.start()
    try:
        await eventually(first.is_leader, "the first candidate did not lead")
        same = EtcdConsensus("b", "b:1", etcd.endpoints, prefix, CountingMachine(), cluster="alpha")
        await same.start()
        await same.stop()
        other = EtcdConsensus("x", "x:1", etcd.endpoints, prefix, CountingMachine(), cluster="beta")
        with pytest.raises(FailedPrecondition, match="holds the state of cluster 'alpha', not 'beta'"):
            await other.start()
        assert first.is_leader() and first.leader()[0] == "a"
    finally:
        await first.stop()
    await raw.call(raw.kv.Put, rpc.PutRequest(key=b"/lepton/foreign/meta", value=b"not ours"), timeout=5)
    foreign = EtcdConsensus("f", "f:1", etcd.endpoints, "/lepton/foreign", CountingMachine(), cluster="alpha")
    with pytest.raises(FailedPrecondition, match="lepton did not write"):
        await foreign.start()


async def test_unreachable_etcd_is_unavailable_naming_the_endpoints(monkeypatch):
    monkeypatch.setattr(etcd_consensus, "START_WITHIN", 1.0)
    endpoint = f"127.0.0.1:{free_port()}"
    node = EtcdConsensus("n", "n:1", [endpoint], "/lepton/none", CountingMachine())
    with pytest.raises(Unavailable, match=endpoint):
        await node.start()
    with pytest.raises(InvalidArgument):
        EtcdConsensus("n", "n:1", [endpoint], "no-slash", CountingMachine())


async def test_tls_and_failover_between_members(tmp_path):
    with EtcdCluster(tmp_path, n=3, tls=True) as etcd:
        tls = EtcdTls(etcd.tls.ca, etcd.tls.cert, etcd.tls.key)
        sm = CountingMachine()
        node = EtcdConsensus("t", "t:1", etcd.endpoints, "/lepton/tls", sm, tls=tls)
        await node.start()
        try:
            await eventually(node.is_leader, "no leader over TLS")
            assert await node.propose(b"a", timeout=10) == 1
            etcd.kill9(0)  # the member the node talks to first
            deadline = time.monotonic() + WITHIN
            while True:  # it fails over to another member (re-elected if it had to step down)
                try:
                    await node.propose(b"b", timeout=5)  # a retry after "outcome unknown" may apply twice
                    break
                except (Unavailable, DeadlineExceeded):  # outcome unknown: ask again
                    assert time.monotonic() < deadline, "no failover to another etcd member"
                    await asyncio.sleep(0.1)
            assert sm.log[0] == b"a" and b"b" in sm.log
        finally:
            await node.stop()


async def test_an_append_asked_again_after_a_lost_answer_applies_once(etcd):
    h = EtcdHarness(etcd, candidates=1, prefix="/lepton/again")
    await h.start()
    try:
        leader = h.leader()
        term, first = leader.term(), h.sm.applied_index + 1
        assert await leader.append(term, first, [b"x"]) is True
        # The same batch again, as after a lost answer: the refusal shows it landed.
        assert await leader.append(term, first, [b"x"]) is True
        assert h.sm.log == [b"x"] and leader.is_leader()
        # A different batch at a taken index is not ours: refused, and leadership ends.
        assert await leader.append(term, first, [b"other"]) is False
        assert h.sm.log == [b"x"] and (False, term) in h.events
    finally:
        await h.stop()


async def test_a_watch_compacted_past_reloads_from_the_snapshot(etcd):
    h = EtcdHarness(etcd, candidates=2, prefix="/lepton/behind", snapshot_every=10)
    await h.start()
    try:
        follower_id = next(i for i in h.ids if i != h._lead)
        follower = h.nodes[follower_id]
        watch = next(t for t in follower._tasks if "watch" in t.get_name())
        watch.cancel()  # the follower stops hearing the log at revision ~2
        for i in range(45):
            await h.leader().propose(f"w{i}".encode(), timeout=10)
        await eventually(lambda: h.leader()._applier.snapshot is not None
                         and h.leader()._applier.snapshot.index >= 30, "no second snapshot")
        sm = h.sms[follower_id]
        assert sm.applied_index < 45
        restored: list[int] = []
        restore = sm.restore
        sm.restore = lambda data, index: (restored.append(index), restore(data, index))
        follower._tasks.append(asyncio.create_task(follower._watch_loop(2)))  # from long ago
        await eventually(lambda: sm.log == [f"w{i}".encode() for i in range(45)],
                         "the follower did not catch up from the snapshot")
        assert restored and restored[0] >= 30  # history was compacted: it had to reload
    finally:
        await h.stop()


class ExplodingMachine(CountingMachine):
    def apply(self, index: int, data: bytes) -> object:
        if data == b"boom":
            raise RuntimeError("a bug in apply")
        return super().apply(index, data)


async def test_a_failing_loop_stops_the_node_for_good(etcd):
    node = EtcdConsensus("x", "x:1", etcd.endpoints, "/lepton/boom", ExplodingMachine())
    failures: list[Exception] = []
    node.add_failure_listener(failures.append)
    await node.start()
    try:
        await eventually(node.is_leader, "no leader")
        with pytest.raises(Unavailable):
            await node.propose(b"boom", timeout=10)
        await eventually(lambda: failures, "the failure listener did not hear")
        assert not node.is_leader() and node.failure is failures[0]
        with pytest.raises(Unavailable):
            await node.propose(b"ok", timeout=1)
    finally:
        await node.stop()
