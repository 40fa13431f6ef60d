"""The leader's replication loop, and the pool of gRPC channels it uses to reach agents.

`ReplicationLoop.run_cycle()` finds shards with fewer live replicas than their dataset's
replication factor (a node went DOWN or LEFT, or a copy was found corrupt), asks a ready
node that lacks each one to pull it straight from a live holder (`Shards.PullShards`; the
bytes never pass through the coordinator), and commits the copies that arrived as one
`AddReplicasCmd`. It returns the sentence it logs, e.g. `re-replicated 3 shards`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

import grpc

from lepton.common.channels import TlsConfig, make_channel
from lepton.common.errors import LeptonError, from_rpc_error
from lepton.common.loops import run_cycles
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import common_pb2, datasets_pb2, state_pb2
from lepton.v1.datasets_pb2_grpc import ShardsStub

logger = logging.getLogger(__name__)

Commit = Callable[[state_pb2.Command], Awaitable[object]]
# Bounds one cycle: this many shards asked for, per target node at most PER_NODE.
MAX_PER_CYCLE = 256
PER_NODE = 32
PULL_TIMEOUT_S = 600.0


class AgentPool:
    """Async channels to agents by address, made on first use."""

    def __init__(self, *, tls: TlsConfig | None = None) -> None:
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def shards(self, address: str) -> ShardsStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = make_channel(address, tls=self._tls)
        return ShardsStub(ch)

    async def call(self, address: str, method: str, request, timeout: float):
        """Raises the call's LeptonError."""
        try:
            return await getattr(self.shards(address), method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


def ready_nodes(sm: ClusterStateMachine) -> list[common_pb2.Node]:
    return sorted(
        (n for n in sm.nodes.values() if n.state == common_pb2.NODE_STATE_READY and not n.draining),
        key=lambda n: n.id,
    )


def stored_bytes(sm: ClusterStateMachine) -> dict[str, int]:
    """Bytes of distinct shards each node holds, per the manifests."""
    seen: set[tuple[str, str]] = set()
    load: dict[str, int] = defaultdict(int)
    for ds in sm.datasets.datasets.values():
        for shard in ds.shards:
            for node_id in shard.replicas:
                if (node_id, shard.id) not in seen:
                    seen.add((node_id, shard.id))
                    load[node_id] += shard.size
    return load


def pick_nodes(candidates: list[str], count: int, load: dict[str, int], size: int) -> list[str]:
    """The `count` least-loaded candidates (ties by id); their load grows by `size`."""
    chosen = sorted(candidates, key=lambda n: (load[n], n))[:count]
    for n in chosen:
        load[n] += size
    return chosen


class ReplicationLoop:
    """Runs `run_cycle()` on every node change and every `interval_s` (leader only)."""

    def __init__(
        self,
        state: ClusterStateMachine,
        commit: Commit,
        pool: AgentPool,
        *,
        is_leader: Callable[[], bool],
        interval_s: float = 2.0,
    ):
        self._state = state
        self._commit = commit
        self._pool = pool
        self._is_leader = is_leader
        self._interval_s = interval_s
        self._wakeup = asyncio.Event()
        # Failures per (shard, target) this leader has seen: such targets are tried last.
        self._failures: dict[tuple[str, str], int] = defaultdict(int)

    def wake(self, *_: object) -> None:
        self._wakeup.set()

    async def run_cycle(self) -> str:
        """One pass: plan copies, have targets pull them, commit what arrived."""
        if not self._is_leader():
            return "not the leader: nothing to replicate"
        sm = self._state
        wanted = sm.datasets.under_replicated()
        if not wanted:
            return "all shards fully replicated"
        nodes = {n.id: n for n in ready_nodes(sm)}
        load = stored_bytes(sm)
        per_target: dict[str, list[datasets_pb2.ShardSource]] = defaultdict(list)
        stuck = 0
        for shard, want in wanted[:MAX_PER_CYCLE]:
            # Sources: any live holder (a draining or suspect node still serves its copies).
            holders = [sm.nodes[n] for n in shard.replicas if sm.datasets._live(n)]
            if not holders:
                stuck += 1  # no live copy left: wait for a holder to come back
                continue
            free = [n for n in nodes if n not in shard.replicas and len(per_target.get(n, ())) < PER_NODE]
            free.sort(key=lambda n: (self._failures.get((shard.id, n), 0), load.get(n, 0), n))
            for target in free[: want - len(holders)]:
                load[target] += shard.size
                per_target[target].append(datasets_pb2.ShardSource(
                    shard_id=shard.id, size=shard.size, source_nodes=[h.id for h in holders]))
        if not per_target:
            return f"{len(wanted)} shards under-replicated, none can be copied now ({stuck} with no live copy)"
        results = await asyncio.gather(*(
            self._pull(nodes[target], sources) for target, sources in per_target.items()
        ))
        adds = [rc for rcs in results for rc in rcs]
        failed = sum(len(s) for s in per_target.values()) - len(adds)
        if adds:
            await self._commit(state_pb2.Command(add_replicas=state_pb2.AddReplicasCmd(replicas=adds)))
        sentence = f"re-replicated {len(adds)} shards"
        if failed:
            sentence += f", {failed} failed"
        if stuck:
            sentence += f", {stuck} with no live copy"
        return sentence

    async def _pull(self, node: common_pb2.Node, sources: list[datasets_pb2.ShardSource]):
        try:
            resp = await self._pool.call(
                node.address, "PullShards", datasets_pb2.PullShardsRequest(shards=sources), PULL_TIMEOUT_S
            )
        except LeptonError as err:
            logger.warning("replication: %s could not pull: %s", node.name, err.message)
            for s in sources:
                self._failures[(s.shard_id, node.id)] += 1
            return []
        for shard_id in resp.failed:
            self._failures[(shard_id, node.id)] += 1
        return [state_pb2.ReplicaChange(shard_id=s, node_id=node.id) for s in resp.pulled]

    async def run(self) -> None:
        await run_cycles("replication", self.run_cycle, interval_s=self._interval_s, wakeup=self._wakeup,
                         logger=logger)
