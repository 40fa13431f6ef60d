"""Node id -> address, from the cluster's node table: where `Shards.PullShards` may connect.

A pull names its sources by node id and the agent looks each up with `Coordinator.GetNode`
through its link to the leader, so it only ever connects to (and sends its node credentials
to) addresses that nodes of the cluster registered, never to one a caller typed. Answers are
kept for `ttl_s`, so a replication cycle asks once per source node.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from lepton.common.errors import DeadlineExceeded, FailedPrecondition, NotFound, Unavailable
from lepton.common.states import NodeState
from lepton.v1 import coordinator_pb2

LOOKUP_TIMEOUT_S = 5.0
ATTEMPTS = 3  # the link re-aims after a failure; a leader change costs one attempt


class CoordinatorCalls(Protocol):
    async def call(self, method: str, request: Any, timeout: float) -> Any: ...


class NodeDirectory:
    def __init__(self, coordinator: CoordinatorCalls, *, ttl_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self._coordinator = coordinator
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[str, float]] = {}  # node id -> (address, expiry)

    async def addresses(self, node_ids: list[str]) -> dict[str, str]:
        """Each id's registered address. Raises FailedPrecondition for an id that is not a
        node of the cluster (or has left it), Unavailable when the leader cannot be asked."""
        return {node_id: await self._address(node_id) for node_id in node_ids}

    async def _address(self, node_id: str) -> str:
        hit = self._cache.get(node_id)
        if hit is not None and hit[1] > self._clock():
            return hit[0]
        node = await self._get_node(node_id)
        if node.state == NodeState.LEFT.proto or not node.address:
            raise FailedPrecondition(f'source node "{node_id}" has left the cluster')
        self._cache[node_id] = (node.address, self._clock() + self._ttl_s)
        return node.address

    async def _get_node(self, node_id: str):
        request = coordinator_pb2.GetNodeRequest(node_id=node_id)
        for attempt in range(ATTEMPTS):
            try:
                return await self._coordinator.call("GetNode", request, timeout=LOOKUP_TIMEOUT_S)
            except NotFound:
                raise FailedPrecondition(f'source node "{node_id}" is not a node of this cluster') from None
            except (Unavailable, DeadlineExceeded):  # NotLeader included
                if attempt == ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")
