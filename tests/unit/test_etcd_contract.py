"""The shared `Consensus` contract (test_consensus_contract.py), run against EtcdConsensus:
candidates on a real etcd (tests/etcd_server.py); the harness hands out whichever leads."""

from __future__ import annotations

import asyncio
import time

import pytest

from lepton.coordinator.etcd.consensus import EtcdConsensus
from tests.etcd_server import EtcdCluster
from tests.unit.test_consensus_contract import (  # noqa: F401 - collected here with our fixture
    CountingMachine,
    test_concurrent_proposals_apply_once_each_in_one_order,
    test_leadership_listener_hears_about_leadership,
    test_propose_returns_the_state_machine_result,
    test_restart_replays_exactly_the_acknowledged_commands,
    test_state_machine_errors_come_back_as_values,
    test_stopped_consensus_refuses,
)

LEADS_WITHIN = 30.0  # generous: the test box is shared and loaded


async def wait_for_leader(nodes: dict, within: float = LEADS_WITHIN) -> str:
    deadline = time.monotonic() + within
    while not any(n.is_leader() for n in nodes.values()):
        assert time.monotonic() < deadline, "no leader"
        await asyncio.sleep(0.02)
    return next(i for i, n in nodes.items() if n.is_leader())


class EtcdHarness:
    """`candidates` EtcdConsensus nodes sharing one etcd cluster and prefix."""

    def __init__(self, etcd: EtcdCluster, candidates: int = 2, prefix: str = "/lepton/test",
                 snapshot_every: int = 10_000):
        self.etcd = etcd
        self.prefix = prefix
        self.snapshot_every = snapshot_every
        self.ids = [f"c{i}" for i in range(1, candidates + 1)]
        self.nodes: dict[str, EtcdConsensus] = {}
        self.sms: dict[str, CountingMachine] = {}
        self.node_events: dict[str, list[tuple[bool, int]]] = {i: [] for i in self.ids}
        self._lead = ""

    def make(self, i: str, endpoints: list[str] | None = None) -> EtcdConsensus:
        sm = CountingMachine()
        node = EtcdConsensus(i, f"{i}.test:7000", endpoints or self.etcd.endpoints, self.prefix, sm,
                             tls=None, lease_ttl=2.0, snapshot_every=self.snapshot_every)
        node.add_leadership_listener(lambda lead, term, i=i: self.node_events[i].append((lead, term)))
        self.nodes[i], self.sms[i] = node, sm
        return node

    async def start(self) -> None:
        for i in self.ids:
            await self.make(i).start()
        self._lead = await wait_for_leader(self.nodes)

    def leader(self) -> EtcdConsensus:
        return self.nodes[self._lead]

    @property
    def sm(self) -> CountingMachine:
        return self.sms[self._lead]

    @property
    def events(self) -> list[tuple[bool, int]]:
        return self.node_events[self._lead]

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def stop(self) -> None:
        for node in self.nodes.values():
            await node.stop()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), n=1)
    yield cluster
    cluster.stop()


@pytest.fixture
async def harness(etcd, request):
    h = EtcdHarness(etcd, prefix=f"/lepton/{request.node.name}")
    await h.start()
    yield h
    await h.stop()


async def test_restart_on_a_three_member_etcd(tmp_path):
    """The contract's restart case where etcd itself replicates: 3 members."""
    with EtcdCluster(tmp_path, n=3) as etcd:
        h = EtcdHarness(etcd, prefix="/lepton/three")
        await h.start()
        try:
            await test_restart_replays_exactly_the_acknowledged_commands(h)
        finally:
            await h.stop()
