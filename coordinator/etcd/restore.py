"""Offline access to a cluster's state in etcd: read it, or install a backup's snapshot.

For `snapshot restore` in etcd mode (the caller, above the state layer, brings the state
machine and checks the backup's cluster). Both need every candidate of the prefix stopped
for `install_snapshot`; reading is safe at any time.
"""

from __future__ import annotations

import json
import logging

from aetcd import rpc

from lepton.common.errors import FailedPrecondition
from lepton.coordinator.consensus import StateMachine
from lepton.coordinator.etcd.connection import Compacted, EtcdConnection, prefix_end
from lepton.coordinator.etcd.log import Keys, LogApplier
from lepton.coordinator.etcd.snapshot import CHUNK_BYTES
from lepton.coordinator.etcd.tls import EtcdTls

logger = logging.getLogger(__name__)

TIMEOUT = 10.0


async def load_state(endpoints: list[str], prefix: str, tls: EtcdTls | None, sm: StateMachine) -> int:
    """Load the latest snapshot and the log after it into `sm`; returns the last index
    (0 for an empty prefix). Raises Unavailable naming the endpoints."""
    conn = EtcdConnection(endpoints, tls)
    try:
        applier = LogApplier(conn, Keys(prefix), sm, timeout=TIMEOUT)
        while True:
            try:
                await applier.load()
                return sm.applied_index
            except Compacted:
                continue
    finally:
        await conn.close()


async def install_snapshot(endpoints: list[str], prefix: str, tls: EtcdTls | None,
                           data: bytes, index: int) -> None:
    """Make `data` (the state at `index`) the cluster's whole state under `prefix`: its
    chunks, then one txn that points at them and deletes every log batch and other
    snapshot. Every write requires that no candidate holds the leader key. Raises
    FailedPrecondition (a candidate is running), Unavailable."""
    keys = Keys(prefix)
    no_leader = [rpc.Compare(key=keys.leader, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0)]
    conn = EtcdConnection(endpoints, tls)

    async def guarded(ops: list) -> None:
        resp = await conn.call(conn.kv.Txn, rpc.TxnRequest(compare=no_leader, success=ops), timeout=TIMEOUT)
        if not resp.succeeded:
            raise FailedPrecondition(f"a candidate leads {prefix} in etcd at {conn.described}: "
                                     "stop every lepton-agent of this cluster first")

    try:
        chunks = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
        own = keys.chunk_prefix(index)
        # Chunks left from an earlier snapshot at this same index would be read as ours.
        await guarded([rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=own, range_end=prefix_end(own)))])
        for n, chunk in enumerate(chunks):
            await guarded([rpc.RequestOp(request_put=rpc.PutRequest(key=keys.chunk_key(index, n), value=chunk))])
        pointer = json.dumps({"index": index, "chunks": len(chunks), "size": len(data)}).encode()
        await guarded([
            rpc.RequestOp(request_put=rpc.PutRequest(key=keys.snap_ptr, value=pointer)),
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=keys.log, range_end=prefix_end(keys.log))),
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=keys.chunks, range_end=own)),
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                key=prefix_end(own), range_end=prefix_end(keys.chunks))),
        ])
        logger.info("etcd: installed a snapshot at index %d (%d bytes) under %s", index, len(data), prefix)
    finally:
        await conn.close()
