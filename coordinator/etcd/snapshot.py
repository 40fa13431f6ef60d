"""The leader's snapshots in etcd, and keeping the keyspace and etcd's history bounded.

A snapshot is written as chunks under P/snap/c/<index>/, each put guarded by the leader's
term; then one txn (guarded too) points P/snap/ptr at it and deletes the log batches it
covers and the older snapshots' chunks. A leader that dies half-way leaves chunks that no
pointer names; the next snapshot's txn deletes them. Then etcd's history is compacted up
to the *previous* snapshot's revision: a watcher more than a whole snapshot interval
behind has to reload (from the snapshot), one that is merely slow does not.
"""

from __future__ import annotations

import json
import logging

from aetcd import rpc

from lepton.common.errors import LeptonError, NotLeader
from lepton.coordinator.etcd.connection import Compacted, EtcdConnection
from lepton.coordinator.etcd.log import Keys, LogApplier, SnapshotPointer

logger = logging.getLogger(__name__)

CHUNK_BYTES = 512 << 10  # well under etcd's 1.5 MiB request limit, one put per request


class Snapshotter:
    """Writes one snapshot at a time for the leader of `term`."""

    def __init__(self, conn: EtcdConnection, keys: Keys, applier: LogApplier, *, timeout: float):
        self._conn = conn
        self._keys = keys
        self._applier = applier
        self._timeout = timeout

    def _guard(self, term: int) -> list:
        return [rpc.Compare(key=self._keys.leader, target=rpc.Compare.CREATE,
                            result=rpc.Compare.EQUAL, create_revision=term)]

    async def _txn(self, term: int, ops: list) -> int:
        resp = await self._conn.call(self._conn.kv.Txn, rpc.TxnRequest(compare=self._guard(term), success=ops),
                                     timeout=self._timeout)
        if not resp.succeeded:
            raise NotLeader(f"leader key of term {term} is gone; snapshot abandoned")
        return resp.header.revision

    async def write(self, term: int, index: int, data: bytes) -> None:
        """Store `data` (the state at `index`, a batch boundary) and drop what it covers.
        Atomic where it matters: the pointer moves and the covered log is deleted in one
        txn, and only while `term` leads. Raises NotLeader, Unavailable."""
        keys = self._keys
        chunks = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
        for n, chunk in enumerate(chunks):
            await self._txn(term, [rpc.RequestOp(request_put=rpc.PutRequest(key=keys.chunk_key(index, n), value=chunk))])
        pointer = json.dumps({"index": index, "chunks": len(chunks), "size": len(data)}).encode()
        previous = self._applier.snapshot
        revision = await self._txn(term, [
            rpc.RequestOp(request_put=rpc.PutRequest(key=keys.snap_ptr, value=pointer)),
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                key=keys.log_key(0), range_end=keys.log_key(index + 1))),
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                key=keys.chunks, range_end=keys.chunk_prefix(index))),
        ])
        self._applier.snapshot = SnapshotPointer(index, len(chunks), len(data), revision)
        logger.info("etcd: snapshot at index %d (%d bytes, %d chunks); log compacted", index, len(data), len(chunks))
        if previous is not None:
            await self._compact(previous.revision)

    async def _compact(self, revision: int) -> None:
        try:
            await self._conn.call(self._conn.kv.Compact, rpc.CompactionRequest(revision=revision),
                                  timeout=self._timeout)
        except Compacted:
            pass  # someone (etcd's auto-compaction, another tenant) compacted further already
        except LeptonError as err:
            logger.warning("etcd: compaction at revision %d failed: %s", revision, err)
