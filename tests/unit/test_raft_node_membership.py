"""RaftConsensus.add_voter / remove_voter over real gRPC on 127.0.0.1 (ids are addresses,
as in the agent). Polling with generous deadlines; no timing assertions."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from lepton.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotLeader,
)
from lepton.coordinator.raft.node import RaftConsensus
from lepton.coordinator.raft.transport import add_raft_servicer
from lepton.coordinator.storage.log_store import FileLogStore
from tests.unit.test_raft_node import CFG, ListStateMachine


class Nodes:
    def __init__(self, root: Path):
        self.root = root
        self.servers: dict[str, grpc.aio.Server] = {}
        self.nodes: dict[str, RaftConsensus] = {}
        self.sms: dict[str, ListStateMachine] = {}
        self.bootstrap: dict[str, str] = {}

    async def reserve(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            server = grpc.aio.server()
            port = server.add_insecure_port("127.0.0.1:0")
            addr = f"127.0.0.1:{port}"
            self.servers[addr] = server
            out.append(addr)
        return out

    async def start(self, addr: str, bootstrap: dict[str, str]) -> RaftConsensus:
        sm = ListStateMachine()
        node = RaftConsensus(addr, bootstrap, FileLogStore(self.root / addr.replace(":", "_")), sm, config=CFG)
        add_raft_servicer(self.servers[addr], node)
        await self.servers[addr].start()
        await node.start()
        self.nodes[addr], self.sms[addr] = node, sm
        return node

    async def stop(self, addr: str) -> None:
        await self.nodes.pop(addr).stop()
        await self.servers[addr].stop(0)

    async def restart(self, addr: str, bootstrap: dict[str, str]) -> RaftConsensus:
        server = grpc.aio.server()
        server.add_insecure_port(addr)
        self.servers[addr] = server
        return await self.start(addr, bootstrap)

    async def leader(self, timeout: float = 20.0) -> RaftConsensus:
        return await until(lambda: (ls := [n for n in self.nodes.values() if n.is_leader()]) and
                           len(ls) == 1 and ls[0], timeout, "one leader")


async def until(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def voters(node: RaftConsensus) -> list[str]:
    return sorted(v.address for v in node.status().voters if v.role != "learner")


async def test_add_a_voter_lose_the_old_leader_then_remove_one(tmp_path: Path) -> None:
    c = Nodes(tmp_path)
    addrs = await c.reserve(4)
    boot = {a: a for a in addrs[:3]}
    spare = addrs[3]
    try:
        for a in addrs[:3]:
            await c.start(a, boot)
        new = await c.start(spare, {})  # --join-as-voter: no bootstrap voters
        lead = await c.leader()
        for k in range(5):
            await lead.propose(b"a%d" % k, timeout=10)
        assert not new.probe_info()[2]  # not a voter yet

        await lead.add_voter(spare, timeout=30)
        assert voters(lead) == sorted(addrs)
        await until(lambda: voters(new) == sorted(addrs), what="the new voter to learn the set")
        assert new.probe_info()[2]

        # The old leader dies: the remaining three (one of them new) still make a majority of 4.
        old = lead.node_id
        await c.stop(old)
        lead = await c.leader()
        assert lead.node_id != old
        await lead.propose(b"after", timeout=20)
        await until(lambda: c.sms[spare].items and c.sms[spare].items[-1] == b"after", what="new voter applies")

        # Remove the dead one: three voters, of which two make progress... and all three are up.
        await lead.remove_voter(old, timeout=20)
        assert old not in voters(lead) and len(voters(lead)) == 3
        await lead.propose(b"fewer", timeout=20)

        # A restarted voter knows the current set from its log, not from its bootstrap.
        await c.stop(spare)
        again = await c.restart(spare, {})
        assert voters(again) == sorted(a for a in addrs if a != old)
        await until(lambda: c.sms[spare].items[-1:] == [b"fewer"], what="restarted voter catches up")

        # The leader removes itself: acknowledged once committed, then it hands over.
        lead = await c.leader()
        gone = lead.node_id
        await lead.remove_voter(gone, timeout=20)
        lead = await c.leader()
        assert lead.node_id != gone and gone not in voters(lead) and len(voters(lead)) == 2
        await lead.propose(b"two", timeout=20)
    finally:
        for a in list(c.nodes):
            await c.stop(a)


async def test_bad_voter_changes_are_refused_and_change_nothing(tmp_path: Path) -> None:
    c = Nodes(tmp_path)
    addrs = await c.reserve(3)
    boot = {a: a for a in addrs}
    plain = grpc.aio.server()  # a gRPC server without Raft: a worker agent
    plain_addr = f"127.0.0.1:{plain.add_insecure_port('127.0.0.1:0')}"
    await plain.start()
    try:
        for a in addrs:
            await c.start(a, boot)
        lead = await c.leader()
        follower = next(n for n in c.nodes.values() if n is not lead)
        with pytest.raises(InvalidArgument):
            await lead.add_voter("not-an-address", timeout=5)
        with pytest.raises(NotLeader):
            await follower.add_voter(plain_addr, timeout=5)
        with pytest.raises(AlreadyExists):
            await lead.add_voter(follower.node_id, timeout=5)
        with pytest.raises(NotFound):
            await lead.remove_voter(plain_addr, timeout=5)
        with pytest.raises(FailedPrecondition, match="runs no Raft node"):
            await lead.add_voter(plain_addr, timeout=5)
        await plain.stop(0)
        with pytest.raises(FailedPrecondition, match="cannot reach"):
            await lead.add_voter(plain_addr, timeout=5)
        assert voters(lead) == sorted(addrs)
        assert lead.status().commit_index >= 1 and lead.is_leader()
    finally:
        await plain.stop(0)
        for a in list(c.nodes):
            await c.stop(a)
