"""Offline access to a cluster's state in etcd: read it, or install a backup's snapshot.

For `snapshot restore --etcd` (coordinator/restore.py brings the state machine and checks
the backup's cluster). Installing needs every candidate of the prefix stopped; reading is
safe at any time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from aetcd import rpc

from lepton.common.errors import FailedPrecondition
from lepton.coordinator.consensus import StateMachine
from lepton.coordinator.etcd.connection import Compacted, EtcdConnection, prefix_end
from lepton.coordinator.etcd.log import Keys, LogApplier, claim_prefix
from lepton.coordinator.etcd.snapshot import CHUNK_BYTES
from lepton.coordinator.etcd.tls import EtcdTls

logger = logging.getLogger(__name__)

TIMEOUT = 10.0


def described(endpoints: list[str], prefix: str) -> str:
    """How restore names its target: "etcd://HOST:PORT,... under /lepton/<cluster>"."""
    return f"etcd://{','.join(endpoints)} under {Keys(prefix).prefix.decode()}"


async def _load(conn: EtcdConnection, keys: Keys, sm: StateMachine) -> None:
    applier = LogApplier(conn, keys, sm, timeout=TIMEOUT)
    while True:
        try:
            await applier.load()
            return
        except Compacted:
            continue


async def load_state(endpoints: list[str], prefix: str, tls: EtcdTls | None, sm: StateMachine) -> int:
    """Load the latest snapshot and the log after it into `sm`; returns the last index
    (0 for an empty prefix). Raises Unavailable naming the endpoints."""
    conn = EtcdConnection(endpoints, tls)
    try:
        await _load(conn, Keys(prefix), sm)
        return sm.applied_index
    finally:
        await conn.close()


async def install_snapshot(endpoints: list[str], prefix: str, tls: EtcdTls | None, data: bytes, index: int,
                           *, cluster: str, current: StateMachine | None = None,
                           check: Callable[[StateMachine], None] | None = None) -> None:
    """Make `data` (the state at `index`) the cluster's whole state under `prefix`.

    First, as a candidate's start does (claim_prefix), `<prefix>/meta` is created for
    `cluster` (the --cluster-name) or checked: another cluster's prefix is refused before
    anything is written. Then `current`, when given, is loaded with the prefix's present
    state and handed to `check` (which raises to refuse, e.g. another cluster's backup).
    Then the chunks, and one txn that points at them and deletes every log batch and other
    snapshot. Every write requires that no candidate holds the leader key. Raises
    FailedPrecondition (a candidate is running, another cluster's prefix), Unavailable."""
    keys = Keys(prefix)
    no_leader = [rpc.Compare(key=keys.leader, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0)]
    conn = EtcdConnection(endpoints, tls)

    async def guarded(ops: list) -> None:
        resp = await conn.call(conn.kv.Txn, rpc.TxnRequest(compare=no_leader, success=ops), timeout=TIMEOUT)
        if not resp.succeeded:
            raise FailedPrecondition(f"a candidate leads the cluster at {described(endpoints, prefix)}: stop every "
                                     "candidate of this cluster (agents with --state etcd) first; the restore is "
                                     "offline")

    try:
        await guarded([])
        await claim_prefix(conn, keys, cluster, timeout=TIMEOUT)
        if current is not None:
            await _load(conn, keys, current)
            if check is not None:
                check(current)
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
