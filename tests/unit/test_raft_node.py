"""RaftConsensus with real gRPC on 127.0.0.1, real FileLogStores in tmp dirs, ms timings."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from pathlib import Path

import grpc
import pytest

from lepton.common.errors import NotLeader
from lepton.coordinator.raft.messages import Config
from lepton.coordinator.raft.node import RaftConsensus
from lepton.coordinator.raft.transport import add_raft_servicer
from lepton.coordinator.storage.log_store import FileLogStore

CFG = Config(heartbeat_interval=0.05, election_timeout=0.5)  # robust on a loaded machine


class ListStateMachine:
    """Appends each non-empty command; apply returns (index, number of items)."""

    def __init__(self) -> None:
        self.applied_index = 0
        self.items: list[bytes] = []
        self.answered: list[bool] = []  # per applied item: whether a proposer waited for it

    def apply(self, index: int, data: bytes, answered: bool = True) -> object:
        if index <= self.applied_index:
            raise ValueError(f"index {index} applied twice")
        self.applied_index = index
        if data:
            self.items.append(data)
            self.answered.append(answered)
        return index, len(self.items)

    def snapshot(self) -> bytes:
        return b"".join(struct.pack("<I", len(x)) + x for x in self.items)

    def restore(self, data: bytes, index: int) -> None:
        items, pos = [], 0
        while pos < len(data):
            (n,) = struct.unpack_from("<I", data, pos)
            items.append(data[pos + 4 : pos + 4 + n])
            pos += 4 + n
        self.items, self.applied_index = items, index


class CountingStore(FileLogStore):
    syncs = 0
    sync_threads: set[int] = frozenset()  # the threads that fsync'd

    def sync(self) -> None:
        self.syncs += 1
        self.sync_threads = self.sync_threads | {threading.get_ident()}
        super().sync()


class Cluster:
    make_store = CountingStore  # a test may inject a store whose I/O fails

    def __init__(self, root: Path, n: int = 3, snapshot_every: int = 10_000):
        self.root = root
        self.ids = [f"v{i}" for i in range(1, n + 1)]
        self.snapshot_every = snapshot_every
        self.servers: dict[str, grpc.aio.Server] = {}
        self.nodes: dict[str, RaftConsensus] = {}
        self.sms: dict[str, ListStateMachine] = {}
        self.stores: dict[str, CountingStore] = {}
        self.events: dict[str, list[tuple[bool, int]]] = {i: [] for i in self.ids}
        self.voters: dict[str, str] = {}

    async def start(self) -> None:
        for i in self.ids:
            server = grpc.aio.server()
            port = server.add_insecure_port("127.0.0.1:0")
            self.servers[i] = server
            self.voters[i] = f"127.0.0.1:{port}"
        for i in self.ids:
            await self._start_node(i, self.servers[i])

    async def _start_node(self, i: str, server: grpc.aio.Server) -> None:
        store = self.make_store(self.root / i)
        sm = ListStateMachine()
        node = RaftConsensus(i, self.voters, store, sm, config=CFG, snapshot_every=self.snapshot_every)
        node.add_leadership_listener(lambda lead, term, i=i: self.events[i].append((lead, term)))
        add_raft_servicer(server, node)
        await server.start()
        await node.start()
        self.nodes[i], self.sms[i], self.stores[i] = node, sm, store

    async def stop_node(self, i: str) -> None:
        await self.nodes[i].stop()
        await self.servers[i].stop(0)
        del self.nodes[i]

    async def restart_node(self, i: str) -> None:
        server = grpc.aio.server()
        server.add_insecure_port(self.voters[i])
        self.servers[i] = server
        await self._start_node(i, server)

    async def stop(self) -> None:
        for i in list(self.nodes):
            await self.stop_node(i)

    async def leader(self, timeout: float = 10.0) -> RaftConsensus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leaders = [n for n in self.nodes.values() if n.is_leader()]
            if len(leaders) == 1:
                return leaders[0]
            await asyncio.sleep(0.01)
        raise AssertionError("no single leader")

    async def converge(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lead = next((n for n in self.nodes.values() if n.is_leader()), None)
            if lead is not None:
                target = lead.status().commit_index
                if all(self.sms[i].applied_index == target for i in self.nodes):
                    return
            await asyncio.sleep(0.01)
        raise AssertionError(f"no convergence: { {i: self.sms[i].applied_index for i in self.nodes} }")


@pytest.fixture
async def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    await c.start()
    yield c
    await c.stop()


async def test_elects_replicates_and_serves_linearizable_reads(cluster: Cluster) -> None:
    lead = await cluster.leader()
    result = await lead.propose(b"first", timeout=5)
    assert result[1] == 1
    results = await asyncio.gather(*(lead.propose(b"c%d" % k, timeout=5) for k in range(50)))
    assert sorted(r[1] for r in results) == list(range(2, 52))
    await lead.read_barrier(timeout=5)
    await cluster.converge()
    items = [cluster.sms[i].items for i in cluster.ids]
    assert items[0] == items[1] == items[2] and len(items[0]) == 51
    assert cluster.events[lead.node_id][0] == (True, lead.status().term)

    follower = next(n for n in cluster.nodes.values() if n is not lead)
    with pytest.raises(NotLeader) as err:
        await follower.propose(b"x", timeout=1)
    assert err.value.leader == cluster.voters[lead.node_id]
    with pytest.raises(NotLeader):
        await follower.read_barrier(timeout=1)
    assert follower.leader() == (lead.node_id, cluster.voters[lead.node_id])

    status = lead.status()
    assert status.leader_id == lead.node_id and status.commit_index >= 52
    assert {v.id for v in status.voters} == set(cluster.ids)
    assert all(v.match_index > 0 for v in status.voters)
    assert [v.role for v in status.voters].count("leader") == 1


async def test_concurrent_proposals_share_fsyncs(cluster: Cluster) -> None:
    lead = await cluster.leader()
    store = cluster.stores[lead.node_id]
    before = store.syncs
    await asyncio.gather(*(lead.propose(b"%d" % k, timeout=10) for k in range(300)))
    assert store.syncs - before < 150  # group commit: far fewer fsyncs than proposals


async def test_followers_apply_unanswered_and_no_voter_writes_on_its_loop(cluster: Cluster) -> None:
    """Only the leader builds results (it has the waiters). Every voter persists on its
    writer thread: a voter's loop is also its agent's, and must not wait out an fsync."""
    lead = await cluster.leader()
    await cluster.converge()
    for store in cluster.stores.values():
        store.sync_threads = frozenset()
    for k in range(5):
        await lead.propose(b"p%d" % k, timeout=10)
    await cluster.converge()
    loop_thread = threading.get_ident()
    for i in cluster.ids:
        sm, store = cluster.sms[i], cluster.stores[i]
        assert sm.items[-5:] == [b"p%d" % k for k in range(5)]
        assert sm.answered[-5:] == [i == lead.node_id] * 5
        assert store.sync_threads and loop_thread not in store.sync_threads


async def test_failover_then_restart_catches_up(cluster: Cluster) -> None:
    lead = await cluster.leader()
    for k in range(10):
        await lead.propose(b"a%d" % k, timeout=5)
    old = lead.node_id
    term = lead.status().term
    await cluster.stop_node(old)
    assert cluster.events[old][-1] == (False, term)
    lead2 = await cluster.leader()
    assert lead2.node_id != old and lead2.status().term > term
    for k in range(10):
        await lead2.propose(b"b%d" % k, timeout=5)
    await cluster.restart_node(old)
    await cluster.converge()
    assert cluster.sms[old].items == cluster.sms[lead2.node_id].items
    assert len(cluster.sms[old].items) == 20


async def test_lagging_follower_installs_a_snapshot(tmp_path: Path) -> None:
    c = Cluster(tmp_path, snapshot_every=8)
    await c.start()
    try:
        lead = await c.leader()
        lagging = next(i for i in c.ids if i != lead.node_id)
        await c.stop_node(lagging)
        for k in range(40):
            await lead.propose(b"s%d" % k, timeout=5)
        assert c.stores[lead.node_id].snapshot() is not None
        assert c.stores[lead.node_id].first_index() > 2  # compacted past what it lacks
        await c.restart_node(lagging)
        await c.converge()
        assert c.stores[lagging].snapshot() is not None
        assert c.sms[lagging].items == c.sms[lead.node_id].items and len(c.sms[lagging].items) == 40
    finally:
        await c.stop()


async def test_leadership_transfer(cluster: Cluster) -> None:
    lead = await cluster.leader()
    await lead.propose(b"x", timeout=5)
    await cluster.converge()
    target = next(i for i in cluster.ids if i != lead.node_id)
    lead.transfer_leadership(target)
    deadline = time.monotonic() + 5
    while not cluster.nodes[target].is_leader():
        assert time.monotonic() < deadline, "transfer did not happen"
        await asyncio.sleep(0.01)
    assert not lead.is_leader()


class HeldSyncs(FileLogStore):
    """A store whose chosen sync() calls (1-based) wait until the test releases them."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.count = 0
        self.holds: dict[int, tuple[threading.Event, threading.Event]] = {}

    def hold(self, number: int) -> tuple[threading.Event, threading.Event]:
        """(entered, release) for sync number `number`."""
        self.holds[number] = (threading.Event(), threading.Event())
        return self.holds[number]

    def sync(self) -> None:
        self.count += 1
        held = self.holds.get(self.count)
        if held is not None:
            held[0].set()
            held[1].wait(30)
        super().sync()


async def test_a_committed_entry_is_answered_while_a_later_write_syncs(tmp_path: Path) -> None:
    store = HeldSyncs(tmp_path / "v1")
    node = RaftConsensus("v1", {"v1": "127.0.0.1:1"}, store, ListStateMachine(), config=CFG)
    await node.start()
    try:
        deadline = time.monotonic() + 10
        while not node.is_leader() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert node.is_leader()
        (b_entered, b_release), (c_entered, c_release) = store.hold(store.count + 1), store.hold(store.count + 2)
        b = asyncio.create_task(node.propose(b"b", timeout=30))
        assert await asyncio.to_thread(b_entered.wait, 10)
        c = asyncio.create_task(node.propose(b"c", timeout=30))  # queued behind b's write
        await asyncio.sleep(0)
        b_release.set()
        assert await asyncio.to_thread(c_entered.wait, 10)
        # b is committed and on disk; its answer does not wait for c's fsync.
        assert (await asyncio.wait_for(b, 10))[1] == 1
        assert not c.done()
        c_release.set()
        assert (await asyncio.wait_for(c, 10))[1] == 2
    finally:
        for _, release in store.holds.values():
            release.set()
        await node.stop()
