"""The Shards gRPC service every agent serves: upload, read, side-channel tickets, pulls
from peers, inventory, deletes, and the per-shard halves of processing.

Blocking work (disk, hashing, numpy) runs in threads so the event loop keeps serving
heartbeats. Reference: docs/data.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import grpc

from lepton.common import validation as v
from lepton.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from lepton.common.grpc_util import register_service, rpc_boundary
from lepton.common.served_certs import CoordinatorCheck
from lepton.common.tls import peer_identity
from lepton.dataplane.shards import ShardStore, check_shard_id
from lepton.dataplane.transfer import ByteCounter, Puller, SideChannel
from lepton.v1 import datasets_pb2 as dpb
from lepton.v1 import datasets_pb2_grpc

logger = logging.getLogger(__name__)

MAX_IDS = 10_000
MAX_SOURCES = 16
MAX_SPEC = 64 * 1024

# Node ids -> their addresses in the cluster's node table. Raises FailedPrecondition naming
# an id that is not a node of the cluster.
ResolveNodes = Callable[[list[str]], Awaitable[dict[str, str]]]


class ShardService(datasets_pb2_grpc.ShardsServicer):
    def __init__(
        self, store: ShardStore, side: SideChannel | None, puller: Puller, node_id: str = "",
        on_bytes: ByteCounter | None = None, resolve_nodes: ResolveNodes | None = None,
        coordinators_only: CoordinatorCheck | None = None,
    ):
        self._store = store
        # A node may order deletes and pulls here only if it is a coordinator (node restriction).
        self._coordinators_only = coordinators_only
        self._on_bytes = on_bytes  # uploads in, ReadShard out (metrics)
        self._side = side
        self._puller = puller
        self._node_id = node_id
        # PullShards sources come from the node table, never from the caller: a named
        # address would make this agent send its credentials wherever a caller points it.
        self._resolve_nodes = resolve_nodes

    @rpc_boundary
    async def WriteShard(self, request_iterator, context):
        writer = None
        try:
            async for req in request_iterator:
                if writer is None:
                    try:
                        writer = self._store.writer(check_shard_id(req.shard_id), req.size)
                    except AlreadyExists:  # same bytes already here: done
                        yield dpb.WriteShardResponse(shard_id=req.shard_id, size=req.size)
                        return
                elif req.shard_id and req.shard_id != writer.shard_id:
                    raise InvalidArgument("one upload carries one shard")
                if req.data:
                    await asyncio.to_thread(writer.write, req.data)
                    if self._on_bytes is not None:
                        self._on_bytes("in", len(req.data))
            if writer is None:
                raise InvalidArgument("empty upload: the first message must name the shard")
            await asyncio.to_thread(writer.commit)
            logger.info("stored shard %s (%d bytes) from an upload", writer.shard_id[:12], writer.size)
            yield dpb.WriteShardResponse(shard_id=writer.shard_id, size=writer.size)
        finally:
            if writer is not None:
                writer.abort()  # no-op after a commit

    @rpc_boundary
    async def ReadShard(self, request, context):
        check_shard_id(request.shard_id)
        chunks = self._store.read_chunks(request.shard_id, request.offset)
        try:
            while True:
                item = await asyncio.to_thread(next, chunks, None)
                if item is None:
                    return
                offset, data, digest = item
                yield dpb.ShardChunk(offset=offset, data=data, digest=digest)
                if self._on_bytes is not None:
                    self._on_bytes("out", len(data))
        finally:
            chunks.close()

    @rpc_boundary
    async def OpenTransfer(self, request, context):
        check_shard_id(request.shard_id)
        if self._side is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no side channel on this node")
        # With TLS, only the certificate asking may redeem the ticket on the side channel.
        v.check_text(request.sealed_key_id, "sealed_key_id", 64)  # only compared with this node's
        return self._side.issue(request.shard_id, request.offset, holder=peer_identity(context),
                                sealed_key_id=request.sealed_key_id)

    @rpc_boundary
    async def PullShards(self, request, context):
        if self._coordinators_only is not None:
            await self._coordinators_only("PullShards")
        if len(request.shards) > MAX_IDS:
            raise InvalidArgument(f"{len(request.shards)} shards; at most {MAX_IDS} per call")
        for s in request.shards:
            check_shard_id(s.shard_id)
            if not s.source_nodes or len(s.source_nodes) > MAX_SOURCES:
                raise InvalidArgument(f"shard {s.shard_id[:12]}: give 1-{MAX_SOURCES} source nodes")
            for node_id in s.source_nodes:
                v.require_id(node_id, "source_nodes")
        if self._resolve_nodes is None:
            raise FailedPrecondition("this node cannot look source nodes up (no coordinator link)")
        # Every source resolved before any connection: one outside the cluster refuses the call.
        addresses = await self._resolve_nodes(sorted({n for s in request.shards for n in s.source_nodes}))
        items = [(s.shard_id, s.size, [addresses[n] for n in s.source_nodes]) for s in request.shards]
        result = await asyncio.to_thread(self._puller.pull_many, items)
        if result.pulled:
            logger.info("pulled %d shards (%d bytes) from peers", len(result.pulled), result.bytes)
        for shard_id, why in result.failed.items():
            logger.warning("could not pull shard %s: %s", shard_id[:12], why)
        return dpb.PullShardsResponse(pulled=result.pulled, failed=result.failed, bytes=result.bytes)

    @rpc_boundary
    async def StatShards(self, request, context):
        _check_ids(request.shard_ids)
        present = {}
        for shard_id in request.shard_ids:
            if not self._store.has(shard_id):
                continue
            if request.verify and not await asyncio.to_thread(self._store.verify, shard_id):
                continue
            present[shard_id] = self._store.size(shard_id)
        return dpb.StatShardsResponse(
            present=present, used_bytes=self._store.used_bytes, quota_bytes=self._store.quota_bytes or 0
        )

    @rpc_boundary
    async def DeleteShards(self, request, context):
        if self._coordinators_only is not None:
            await self._coordinators_only("DeleteShards")
        _check_ids(request.shard_ids)
        # Off the loop: unlinking 64 MiB blobs frees their pages, milliseconds each.
        deleted = await asyncio.to_thread(lambda: sum(self._store.delete(s) for s in request.shard_ids))
        if deleted:
            logger.info("deleted %d shards", deleted)
        return dpb.DeleteShardsResponse(deleted=deleted)

    @rpc_boundary
    async def ShardStats(self, request, context):
        from lepton.dataplane import process

        check_shard_id(request.shard_id)
        spec = _spec(request.spec)
        stats = await asyncio.to_thread(process.shard_stats, self._store, request.shard_id, spec)
        return dpb.ShardStatsResponse(stats=json.dumps(stats))

    @rpc_boundary
    async def TransformShard(self, request, context):
        from lepton.dataplane import process

        check_shard_id(request.shard_id)
        spec = _spec(request.spec)
        shard, report = await asyncio.to_thread(
            process.transform_shard, self._store, request.shard_id, spec, request.seed
        )
        shard.replicas.append(self._node_id)
        return dpb.TransformShardResponse(shard=shard, report=json.dumps(report))


def _check_ids(ids) -> None:
    if len(ids) > MAX_IDS:
        raise InvalidArgument(f"{len(ids)} shard ids; at most {MAX_IDS}")
    for shard_id in ids:
        check_shard_id(shard_id)


def _spec(text: str) -> dict:
    if len(text) > MAX_SPEC:
        raise InvalidArgument(f"spec is {len(text)} bytes; at most {MAX_SPEC}")
    try:
        spec = json.loads(text or "{}")
    except ValueError as err:
        raise InvalidArgument(f"spec is not JSON: {err}") from None
    if not isinstance(spec, dict):
        raise InvalidArgument("spec must be a JSON object")
    return spec


def add_to_server(service: ShardService, server) -> str:
    desc = dpb.DESCRIPTOR.services_by_name["Shards"]
    register_service(server, service, desc)
    return desc.full_name


QuarantineHook = Callable[[str], None]
