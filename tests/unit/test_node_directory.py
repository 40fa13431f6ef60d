"""NodeDirectory: PullShards source node ids -> addresses from the node table (issue 12c)."""

from __future__ import annotations

import pytest

from lepton.agent.node_directory import NodeDirectory
from lepton.common.errors import FailedPrecondition, NotFound, NotLeader
from lepton.common.states import NodeState
from lepton.v1 import common_pb2


class FakeCoordinator:
    def __init__(self, nodes: dict[str, common_pb2.Node], not_leader_first: int = 0):
        self.nodes = nodes
        self.asked: list[str] = []
        self._not_leader = not_leader_first

    async def call(self, method, request, timeout):
        assert method == "GetNode"
        self.asked.append(request.node_id)
        if self._not_leader:
            self._not_leader -= 1
            raise NotLeader("not the leader")
        if request.node_id not in self.nodes:
            raise NotFound(f'node "{request.node_id}" not found')
        return self.nodes[request.node_id]


def node(node_id: str, state: NodeState = NodeState.READY) -> common_pb2.Node:
    return common_pb2.Node(id=node_id, address=f"{node_id}.example:7070", state=state.proto)


async def test_ids_resolve_to_registered_addresses_and_are_cached():
    now = [0.0]
    fake = FakeCoordinator({"n1": node("n1"), "n2": node("n2", NodeState.DOWN)}, not_leader_first=1)
    d = NodeDirectory(fake, ttl_s=30, clock=lambda: now[0])
    assert await d.addresses(["n1", "n2"]) == {"n1": "n1.example:7070", "n2": "n2.example:7070"}
    assert await d.addresses(["n1"]) == {"n1": "n1.example:7070"}
    assert fake.asked == ["n1", "n1", "n2"]  # one retry after NotLeader, then the cache
    now[0] = 31
    fake.nodes["n1"].address = "moved:7070"
    assert await d.addresses(["n1"]) == {"n1": "moved:7070"}


async def test_unknown_or_departed_nodes_are_refused():
    d = NodeDirectory(FakeCoordinator({"gone": node("gone", NodeState.LEFT)}))
    with pytest.raises(FailedPrecondition, match="not a node of this cluster"):
        await d.addresses(["stranger"])
    with pytest.raises(FailedPrecondition, match="has left"):
        await d.addresses(["gone"])
