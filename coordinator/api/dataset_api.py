"""The Datasets gRPC API, served by every voter; the leader answers.

Putting a dataset takes three steps, so that the coordinator never carries shard bytes:
`PlanPut` says which nodes take each shard; the client uploads each shard to the first
node and has the others pull it from there (`Shards.WriteShard`, `Shards.PullShards`);
`CommitDataset` checks with every named node that its copies are stored, then commits
the manifest. A put that fails before the commit leaves no dataset; its uploaded blobs are
removed with `ReleaseShards` (only those no dataset references). `PlanPut` and
`CommitDataset` hold the put's shard ids so that the orphan sweep leaves them alone, and
`ReportInventory` hands agents' inventories to the Reconciler (`coordinator/loops/reconcile.py`).
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from lepton.common import validation as v
from lepton.common.auth import Role, current_principal, effective_owner
from lepton.common.errors import FailedPrecondition, InvalidArgument, LeptonError
from lepton.common.grpc_util import register_service, rpc_boundary
from lepton.common.paging import decode_token, page_size, take_page
from lepton.common.validation import DEFAULT_REPLICATION, MAX_REPLICATION, check_dataset_name
from lepton.coordinator.api.service import CoordinatorContext
from lepton.coordinator.loops.reconcile import Reconciler
from lepton.coordinator.loops.replication import AgentPool, pick_nodes, ready_nodes, stored_bytes
from lepton.coordinator.state.datasets import (
    MAX_SHARDS,
    check_kind_and_labels,
    check_owner,
    copy_dataset,
)
from lepton.coordinator.state.security_state import check_node_caller
from lepton.dataplane.code_archive import check_code_dataset
from lepton.dataplane.shards import check_shard_id
from lepton.v1 import datasets_pb2 as dpb
from lepton.v1 import datasets_pb2_grpc, state_pb2

logger = logging.getLogger(__name__)

MAX_SHAPE_DIMS = 8
MAX_SHARD_SIZE = 1 << 40
STAT_TIMEOUT_S = 30.0
MAX_INVENTORY_PAGE = 5000  # about 400 KB a page: far below gRPC's 4 MiB message limit
MAX_GRACE_MS = 30 * 24 * 3600 * 1000


_SHARD_RECORD_FLOOR = 68  # a shard's least bytes in a record: its 64-hex id, tags and lengths


def _check_record_size(shards: int, record: int) -> None:
    """The commit records every shard and its replicas in one log entry: refuse at PlanPut,
    before any upload, a dataset whose record could never be logged (MAX_ENTRY_BYTES)."""
    if record > v.MAX_ENTRY_BYTES - (64 << 10):
        raise InvalidArgument(
            f"{shards} shards make a dataset record of at least {record} bytes; a log entry holds at "
            f"most {v.MAX_ENTRY_BYTES} (use fewer, bigger shards)"
        )


def check_shard_meta(s: dpb.Shard, *, replicas: bool) -> None:
    """Raises InvalidArgument naming the shard and the bad field."""
    check_shard_id(s.id)
    if s.size > MAX_SHARD_SIZE:
        raise InvalidArgument(f"shard {s.id[:12]}: size {s.size} is too large")
    v.check_text(s.dtype, "shard.dtype", 32, required=True)
    v.check_text(s.label_dtype, "shard.label_dtype", 32)
    if len(s.shape) > MAX_SHAPE_DIMS:
        raise InvalidArgument(f"shard {s.id[:12]}: shape has {len(s.shape)} dimensions; at most {MAX_SHAPE_DIMS}")
    if replicas:
        if not s.replicas:
            raise InvalidArgument(f"shard {s.id[:12]}: no replicas")
        for n in s.replicas:
            v.require_id(n, "shard.replicas")


def only_owner() -> str:
    """Whose datasets the caller may replace or delete: its own name, or "" for anyone's
    (an admin, or auth off, where everything has one owner)."""
    p = current_principal()
    return "" if p is None or p.role == Role.ADMIN else p.name


def _replication(value: int) -> int:
    r = value or DEFAULT_REPLICATION
    if not 1 <= r <= MAX_REPLICATION:
        raise InvalidArgument(f"replication must be 1-{MAX_REPLICATION}, got {r}")
    return r


class DatasetService(datasets_pb2_grpc.DatasetsServicer):
    def __init__(self, ctx: CoordinatorContext, pool: AgentPool, reconciler: Reconciler | None = None):
        self._ctx = ctx
        self._pool = pool
        self._reconciler = reconciler
        self._gc: set[asyncio.Task[None]] = set()

    @property
    def _sm(self):
        return self._ctx.state

    @rpc_boundary
    async def PlanPut(self, request, context):
        check_dataset_name(request.name)
        r = _replication(request.replication)
        if len(request.shards) > MAX_SHARDS:
            raise InvalidArgument(f"{len(request.shards)} shards; at most {MAX_SHARDS}")
        # First by count alone: checking each of tens of thousands of shards holds the loop.
        _check_record_size(len(request.shards), len(request.shards) * (_SHARD_RECORD_FLOOR + 3 * r))
        for s in request.shards:
            check_shard_meta(s, replicas=False)
        check_code_dataset(request.name, [s.id for s in request.shards])  # before any upload
        await self._ctx.read()
        old = self._sm.datasets.datasets.get(request.name)
        if old is not None:  # refused before any bytes are uploaded
            check_owner(old, only_owner())
        self._sm.quotas.check_dataset_bytes(effective_owner(""), request.name, sum(s.size for s in request.shards))
        nodes = {n.id: n for n in ready_nodes(self._sm)}
        if len(nodes) < r:
            raise FailedPrecondition(
                f"replication {r} needs {r} ready nodes; {len(nodes)} ready (use a lower --replicas)"
            )
        node_id_bytes = max(len(n) for n in nodes) + 2
        _check_record_size(len(request.shards), request.ByteSize() + len(request.shards) * r * node_id_bytes)
        load = stored_bytes(self._sm)
        out = dpb.PlanPutResponse(replication=r)
        for s in request.shards:
            chosen = pick_nodes(list(nodes), r, load, s.size)
            out.placements.append(dpb.ShardPlacement(
                shard_id=s.id, node_ids=chosen, addresses=[nodes[n].address for n in chosen]))
        if self._reconciler is not None:  # its blobs land before the commit: not orphans
            self._reconciler.holds.hold(request.name, [s.id for s in request.shards])
        return out

    @rpc_boundary
    async def CommitDataset(self, request, context):
        ds = copy_dataset(request.dataset)
        check_dataset_name(ds.name)
        ds.replication = _replication(ds.replication)
        v.check_text(ds.source, "source", 1024)
        v.check_text(ds.schema, "schema", v.MAX_DATASET_SCHEMA)
        check_kind_and_labels(ds)
        if len(ds.shards) > MAX_SHARDS:
            raise InvalidArgument(f"{len(ds.shards)} shards; at most {MAX_SHARDS}")
        for s in ds.shards:
            check_shard_meta(s, replicas=True)
        check_code_dataset(ds.name, [s.id for s in ds.shards])
        requested_owner = ds.owner
        ds.owner = effective_owner(requested_owner)  # the caller, with auth on
        only = only_owner()
        await self._ctx.read()
        old = self._sm.datasets.datasets.get(ds.name)
        if old is not None:
            check_owner(old, only)  # early; applying the command checks it again
            if not requested_owner:
                ds.owner = old.owner  # an admin replacing someone's dataset keeps its owner
        holds = self._reconciler.holds if self._reconciler is not None else None
        if holds is not None:  # not swept between the check below and the commit
            holds.hold(ds.name, [s.id for s in ds.shards])
        try:
            await self._check_stored(ds)
            old = self._sm.datasets.datasets.get(ds.name)
            old = copy_dataset(old) if old is not None else None
            result = await self._ctx.commit(state_pb2.Command(
                put_dataset=state_pb2.PutDatasetCmd(dataset=ds, only_owner=only)))
        finally:
            if holds is not None:  # committed: referenced now; failed: the client releases
                holds.release(ds.name)
        if old is not None:  # the replaced version's blobs, unless still used
            self._spawn_gc(_placements(old))
        logger.info("dataset %s v%d: %d shards, %d bytes", result.name, result.version,
                    len(result.shards), result.size)
        return result

    async def _check_stored(self, ds: dpb.Dataset) -> None:
        """Every replica named must be on a known node that has the blob at that size."""
        wanted: dict[str, dict[str, int]] = {}
        for s in ds.shards:
            for n in s.replicas:
                wanted.setdefault(n, {})[s.id] = s.size
        for node_id in wanted:
            if node_id not in self._sm.nodes:
                raise FailedPrecondition(f'node "{node_id}" is not registered')

        async def ask(node_id: str, ids: dict[str, int]) -> None:
            node = self._sm.nodes[node_id]
            resp = await self._pool.call(node.address, "StatShards",
                                         dpb.StatShardsRequest(shard_ids=list(ids)), STAT_TIMEOUT_S)
            for shard_id, size in ids.items():
                if resp.present.get(shard_id) != size:
                    raise FailedPrecondition(f"shard {shard_id[:12]} is not stored on {node.name}")

        await asyncio.gather(*(ask(n, ids) for n, ids in wanted.items()))

    @rpc_boundary
    async def GetDataset(self, request, context):
        check_dataset_name(request.name)
        await self._ctx.read()
        ds = copy_dataset(self._sm.datasets.get(request.name))
        addresses = {n: self._sm.nodes[n].address for s in ds.shards for n in s.replicas
                     if n in self._sm.nodes}
        under = {s.id for s, _ in self._sm.datasets.under_replicated()}
        return dpb.DatasetView(dataset=ds, addresses=addresses,
                               under_replicated=sum(1 for s in ds.shards if s.id in under))

    @rpc_boundary
    async def ListDatasets(self, request, context):
        after = decode_token(request.page_token, (str,))
        size = page_size(request.page_size)
        await self._ctx.read()
        datasets = self._sm.datasets.datasets

        def select(key):
            ds = copy_dataset(datasets[key[0]])
            del ds.shards[:]  # `show` has them; a listing stays small
            ds.ClearField("schema")  # up to 64 KiB each; `data get` reads it from GetDataset
            return ds

        page, token = take_page([(name,) for name in sorted(datasets)], after, size=size, select=select,
                                size_of=lambda ds: ds.ByteSize())
        return dpb.ListDatasetsResponse(datasets=page, next_page_token=token)

    @rpc_boundary
    async def DeleteDataset(self, request, context):
        check_dataset_name(request.name)
        only = only_owner()
        await self._ctx.read()
        check_owner(self._sm.datasets.get(request.name), only)  # NotFound, PermissionDenied first
        self._sm.deployments.check_unserved(request.name)  # applying checks again
        ds = await self._ctx.commit(state_pb2.Command(
            delete_dataset=state_pb2.DeleteDatasetCmd(name=request.name, only_owner=only)))
        self._spawn_gc(_placements(ds))
        return ds

    @rpc_boundary
    async def ReleaseShards(self, request, context):
        if len(request.shard_ids) > MAX_SHARDS or len(request.node_ids) > 1000:
            raise InvalidArgument("too many shards or nodes")
        for s in request.shard_ids:
            check_shard_id(s)
        for n in request.node_ids:
            v.require_id(n, "node_ids")
        await self._ctx.read()
        deleted = await self._delete_unreferenced({n: set(request.shard_ids) for n in request.node_ids})
        return dpb.ReleaseShardsResponse(deleted=deleted)

    @rpc_boundary
    async def DropReplica(self, request, context):
        check_shard_id(request.shard_id)
        v.require_id(request.node_id, "node_id")
        v.check_text(request.reason, "reason", 256)
        check_node_caller(self._sm, request.node_id)  # a node drops only its own copies
        cmd = state_pb2.DropReplicasCmd(
            replicas=[state_pb2.ReplicaChange(shard_id=request.shard_id, node_id=request.node_id)],
            reason=request.reason,
        )
        changed = await self._ctx.commit(state_pb2.Command(drop_replicas=cmd))
        if changed:
            logger.warning("shard %s lost its copy on %s: %s", request.shard_id[:12], request.node_id,
                           request.reason)
        return dpb.DropReplicaResponse()

    @rpc_boundary
    async def ReportInventory(self, request, context):
        v.require_id(request.node_id, "node_id")
        check_node_caller(self._sm, request.node_id)
        if request.digest and (len(request.digest) != 64 or request.digest.strip("0123456789abcdef")):
            raise InvalidArgument("digest must be a SHA-256 hex digest")
        if len(request.shards) > MAX_INVENTORY_PAGE:
            raise InvalidArgument(f"{len(request.shards)} shards in one page; at most {MAX_INVENTORY_PAGE}")
        if request.grace_ms > MAX_GRACE_MS:
            raise InvalidArgument(f"grace_ms {request.grace_ms} is more than 30 days")
        for s in request.shards:
            check_shard_id(s.id)
            if s.size > MAX_SHARD_SIZE:
                raise InvalidArgument(f"shard {s.id[:12]}: size {s.size} is too large")
        if self._reconciler is None:
            raise FailedPrecondition("this coordinator does not reconcile inventories")
        await self._ctx.read()
        return self._reconciler.report(request)

    # -- garbage ---------------------------------------------------------------------------
    def _spawn_gc(self, where: dict[str, set[str]]) -> None:
        task = asyncio.ensure_future(self._delete_unreferenced(where))
        self._gc.add(task)
        task.add_done_callback(self._gc.discard)

    async def _delete_unreferenced(self, where: dict[str, set[str]]) -> int:
        """Delete blobs no dataset references from the nodes named; best effort."""
        deleted = 0
        for node_id, ids in where.items():
            node = self._sm.nodes.get(node_id)
            garbage = [s for s in ids if not self._sm.datasets.referenced(s)]
            if node is None or not garbage:
                continue
            try:
                resp = await self._pool.call(node.address, "DeleteShards",
                                             dpb.DeleteShardsRequest(shard_ids=garbage), STAT_TIMEOUT_S)
                deleted += resp.deleted
            except LeptonError as err:
                logger.info("could not delete %d blobs on %s: %s", len(garbage), node.name, err.message)
        return deleted


def _placements(ds: dpb.Dataset) -> dict[str, set[str]]:
    where: dict[str, set[str]] = {}
    for s in ds.shards:
        for n in s.replicas:
            where.setdefault(n, set()).add(s.id)
    return where


def add_to_server(service: DatasetService, server: grpc.aio.Server) -> str:
    desc = dpb.DESCRIPTOR.services_by_name["Datasets"]
    register_service(server, service, desc)
    return desc.full_name
