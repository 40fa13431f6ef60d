"""The shared `Consensus` contract (test_consensus_contract.py), run against RaftConsensus:
three voters over real gRPC; the harness hands out whichever node leads."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from lepton.coordinator.raft.messages import Config
from lepton.coordinator.raft.node import RaftConsensus
from lepton.coordinator.raft.transport import add_raft_servicer
from lepton.coordinator.storage.log_store import FileLogStore
from tests.unit.test_consensus_contract import (  # noqa: F401 - collected here with our fixture
    CountingMachine,
    test_concurrent_proposals_apply_once_each_in_one_order,
    test_leadership_listener_hears_about_leadership,
    test_propose_returns_the_state_machine_result,
    test_restart_replays_exactly_the_acknowledged_commands,
    test_state_machine_errors_come_back_as_values,
    test_stopped_consensus_refuses,
)

# Loose enough that a loaded CI machine stalling the shared event loop does not depose leaders.
CFG = Config(heartbeat_interval=0.05, election_timeout=0.5)


class RaftHarness:
    def __init__(self, path: Path, n: int = 3):
        self.path = path
        self.ids = [f"r{i}" for i in range(1, n + 1)]
        self.voters: dict[str, str] = {}
        self.nodes: dict[str, RaftConsensus] = {}
        self.sms: dict[str, CountingMachine] = {}
        self.servers: dict[str, grpc.aio.Server] = {}
        self.node_events: dict[str, list[tuple[bool, int]]] = {i: [] for i in self.ids}
        self._lead = ""

    async def start(self) -> None:
        for i in self.ids:
            server = grpc.aio.server()
            port = server.add_insecure_port(self.voters.get(i, "127.0.0.1:0"))
            self.voters[i] = f"127.0.0.1:{port}"
            self.servers[i] = server
        for i in self.ids:
            sm = CountingMachine()
            node = RaftConsensus(i, self.voters, FileLogStore(self.path / i), sm, config=CFG)
            node.add_leadership_listener(lambda lead, term, i=i: self.node_events[i].append((lead, term)))
            add_raft_servicer(self.servers[i], node)
            await self.servers[i].start()
            await node.start()
            self.nodes[i], self.sms[i] = node, sm
        deadline = time.monotonic() + 10
        while not any(n.is_leader() for n in self.nodes.values()):
            assert time.monotonic() < deadline, "no leader"
            await asyncio.sleep(0.01)
        self._lead = next(i for i, n in self.nodes.items() if n.is_leader())

    def leader(self) -> RaftConsensus:
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
        for i, node in self.nodes.items():
            await node.stop()
            await self.servers[i].stop(0)
        self.nodes.clear()


@pytest.fixture
async def harness(tmp_path: Path):
    h = RaftHarness(tmp_path / "raft")
    await h.start()
    yield h
    await h.stop()
