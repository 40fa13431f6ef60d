"""A candidate's log watch on a frozen etcd member (SIGSTOP) moves to another member within
about the lease TTL, on real etcd (3 members); a quiet, healthy watch stays where it is."""

from __future__ import annotations

import asyncio
import time

import pytest

from lepton.coordinator.etcd import connection
from lepton.coordinator.etcd import consensus as etcd_consensus
from lepton.coordinator.etcd.consensus import EtcdConsensus
from tests.etcd_server import EtcdCluster
from tests.unit.test_consensus_contract import CountingMachine
from tests.unit.test_etcd_contract import wait_for_leader

WITHIN = 20.0  # generous for a loaded box, yet far below the slow ways out pushed away below
TTL = 2.0


@pytest.fixture(scope="module")
def etcd3(tmp_path_factory):
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), n=3)
    yield cluster
    cluster.stop()


@pytest.fixture
def only_the_watch_probe_moves(monkeypatch):
    """Other calls on the shared connection also leave a frozen member, late: gRPC's channel
    keep-alive (~7 s), the member-list refresh and the follower's periodic campaign txn (a
    5 s call timeout). Push each past WITHIN, so only the watch's own stall check can pass."""
    options = [(k, 600_000) if k in ("grpc.keepalive_time_ms", "grpc.keepalive_timeout_ms") else (k, v)
               for k, v in connection.CHANNEL_OPTIONS]
    monkeypatch.setattr(connection, "CHANNEL_OPTIONS", options)
    monkeypatch.setattr(etcd_consensus, "MEMBERS_EVERY", 600.0)


def candidate(name: str, endpoints: list[str], prefix: str, slow_calls: bool = False) -> EtcdConsensus:
    node = EtcdConsensus(name, f"{name}:1", endpoints, prefix, CountingMachine(), lease_ttl=TTL)
    if slow_calls:
        node._timeout = 600.0  # per-call timeout (campaign, member list): see only_the_watch_probe_moves
    return node


async def eventually(predicate, what: str, within: float = WITHIN) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_followers_watch_leaves_a_frozen_member(etcd3, only_the_watch_probe_moves):
    m0, m1, m2 = etcd3.endpoints
    leader = candidate("lead", [m1, m2, m0], "/lepton/frozen")
    await leader.start()
    follower = None
    try:
        await wait_for_leader({"lead": leader})
        follower = candidate("follow", [m0, m1, m2], "/lepton/frozen", slow_calls=True)
        await follower.start()
        assert await leader.propose(b"before", timeout=10) == 1
        await eventually(lambda: follower._sm.log == [b"before"], "the follower does not follow")
        assert follower._conn.current == m0

        etcd3.pause(0)
        frozen_at = time.monotonic()
        try:
            # etcd may elect a new leader of its own first (m0 may have led): ask until it lands.
            deadline = time.monotonic() + WITHIN
            while True:
                try:
                    assert await leader.propose(b"while frozen", timeout=10) == 2
                    break
                except Exception:  # noqa: BLE001 - only etcd's own election in the way
                    assert time.monotonic() < deadline, "the leader cannot append while m0 is frozen"
            await eventually(lambda: follower._sm.log == [b"before", b"while frozen"],
                             "the follower's watch stayed on the frozen member")
            assert follower._conn.current != m0
            print(f"the follower applied an entry {time.monotonic() - frozen_at:.1f}s after its member froze")
        finally:
            etcd3.resume(0)
    finally:
        if follower is not None:
            await follower.stop()
        await leader.stop()


async def test_a_quiet_healthy_watch_stays_on_its_member(etcd3):
    """etcd answers the progress requests: with nothing written for 4 TTLs the watch keeps its
    endpoint (unanswered probes move it every 2-3 s: 3 times or more here; one move is
    allowed for an answer a loaded box delayed)."""
    node = candidate("quiet", etcd3.endpoints, "/lepton/quiet")
    await node.start()
    try:
        await wait_for_leader({"quiet": node})
        generation = node._conn.generation
        await asyncio.sleep(4 * TTL)
        assert node._conn.generation - generation <= 1
        assert await node.propose(b"still here", timeout=10) == 1
    finally:
        await node.stop()
