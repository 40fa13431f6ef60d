"""The replicated log as etcd keys, and applying it to the state machine in index order.

Layout under the prefix P (the leader key and the log sort together, so one watch over
[P/l, P/m) sees both in revision order; snapshot chunks under P/snap stay out of it):
  P/meta                       {"format", "cluster"}: whose state this prefix holds
  P/leader                     {"id", "address"}, bound to the leader's lease
  P/log/<first index, 20 digits>  one batch: the entries first, first+1, ... framed
  P/snap/ptr                   {"index", "chunks", "size"}: the latest complete snapshot
  P/snap/c/<index>/<n>         its chunks (< 1 MiB each)
One key per batch rather than per entry: a group commit is then one put, so etcd's
--max-txn-ops (128 by default) never limits a batch, only its request size does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from dataclasses import dataclass

from aetcd import rpc

from lepton.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from lepton.coordinator.consensus import StateMachine
from lepton.coordinator.etcd.connection import EtcdConnection, prefix_end

logger = logging.getLogger(__name__)

_MAGIC = b"LB1"  # lepton batch, format 1
_LEN = struct.Struct(">I")
_PAGE = 32  # log batches (<= 1.5 MiB each) per range page: under the 64 MiB receive limit


class Keys:
    """Every key of one cluster's keyspace under `prefix`."""

    def __init__(self, prefix: str):
        base = prefix.rstrip("/")
        if not base.startswith("/") or len(base) < 2:
            raise InvalidArgument(f"etcd prefix {prefix!r} must start with / and name something")
        self.prefix = base.encode()
        self.leader = self.prefix + b"/leader"
        self.meta = self.prefix + b"/meta"
        self.log = self.prefix + b"/log/"
        self.snap_ptr = self.prefix + b"/snap/ptr"
        self.chunks = self.prefix + b"/snap/c/"
        # The one watch: [P/l, P/m) holds P/leader and P/log/ and nothing else of ours.
        self.watch_start = self.prefix + b"/l"
        self.watch_end = self.prefix + b"/m"
        self.all_end = prefix_end(self.prefix + b"/")

    def log_key(self, first: int) -> bytes:
        return self.log + b"%020d" % first

    def log_index(self, key: bytes) -> int:
        return int(key[len(self.log):])

    def chunk_prefix(self, index: int) -> bytes:
        return self.chunks + b"%020d/" % index

    def chunk_key(self, index: int, n: int) -> bytes:
        return self.chunk_prefix(index) + b"%06d" % n


def frame(entries: list[bytes]) -> bytes:
    return _MAGIC + b"".join(_LEN.pack(len(e)) + e for e in entries)


def framed_size(entries_bytes: int, count: int) -> int:
    return len(_MAGIC) + entries_bytes + _LEN.size * count


def unframe(value: bytes) -> list[bytes]:
    """Raises ValueError for a value this version did not write."""
    if not value.startswith(_MAGIC):
        raise ValueError("not a lepton log batch")
    out, pos = [], len(_MAGIC)
    while pos < len(value):
        (n,) = _LEN.unpack_from(value, pos)
        pos += _LEN.size
        if pos + n > len(value):
            raise ValueError("truncated log batch")
        out.append(value[pos:pos + n])
        pos += n
    return out


def append_request(keys: Keys, term: int, first: int, value: bytes):
    """The fenced append: put the batch at `first` only while the leader key is the one
    created at `term` and the index is free; when refused, read both back (append_refusal)."""
    key = keys.log_key(first)
    return rpc.TxnRequest(
        compare=[
            rpc.Compare(key=keys.leader, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=term),
            rpc.Compare(key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0),
        ],
        success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))],
        failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=keys.leader)),
                 rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
    )


def append_refusal(resp, term: int, value: bytes) -> tuple[bool, bool]:
    """(still leading, batch committed) from a refused append_request. Committed means an
    earlier try of this same append landed: the index holds our value, written after our
    term began and before any later leader's (only the leader of `term` writes then)."""
    leader = resp.responses[0].response_range.kvs
    at_index = resp.responses[1].response_range.kvs
    mine = bool(leader) and leader[0].create_revision == term
    if not at_index:
        return mine, False
    kv = at_index[0]
    later_leader = leader[0].create_revision if leader and not mine else None
    landed = (kv.value == value and kv.create_revision > term
              and (later_leader is None or kv.create_revision < later_leader))
    return mine, landed


META_FORMAT = "lepton-etcd/1"


async def claim_prefix(conn: EtcdConnection, keys: Keys, cluster: str, *, timeout: float) -> None:
    """Record whose state the prefix holds (`P/meta`), or check it: a candidate of another
    cluster pointed at this prefix by mistake would otherwise campaign and append into it.
    One txn: create the marker if absent, else read it. Raises FailedPrecondition naming
    the owner, Unavailable."""
    value = json.dumps({"format": META_FORMAT, "cluster": cluster}).encode()
    resp = await conn.call(conn.kv.Txn, rpc.TxnRequest(
        compare=[rpc.Compare(key=keys.meta, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0)],
        success=[rpc.RequestOp(request_put=rpc.PutRequest(key=keys.meta, value=value))],
        failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=keys.meta))],
    ), timeout=timeout)
    if resp.succeeded:
        return
    where = f"etcd prefix {keys.prefix.decode()} at {conn.described}"
    kvs = resp.responses[0].response_range.kvs
    try:
        meta = json.loads(kvs[0].value) if kvs else {}
        owner, fmt = str(meta["cluster"]), meta["format"]
    except (ValueError, KeyError, TypeError):
        raise FailedPrecondition(f"{where} holds a {keys.meta.decode()} key lepton did not write: "
                                 "choose another --etcd-prefix") from None
    if fmt != META_FORMAT:
        raise FailedPrecondition(f"{where} holds state in format {fmt!r}; this version reads {META_FORMAT!r}")
    if cluster and owner and owner != cluster:
        raise FailedPrecondition(f"{where} holds the state of cluster {owner!r}, not {cluster!r}: "
                                 f"start with --cluster-name {owner} to join it, or give this cluster "
                                 "its own --etcd-prefix")


@dataclass(frozen=True, slots=True)
class SnapshotPointer:
    index: int
    chunks: int
    size: int
    revision: int  # the pointer's mod_revision: history before it is safe to compact


class LogApplier:
    """Applies batches in index order, exactly once each, and settles the futures of the
    leader's proposals for the indexes it applies (whichever of the txn's answer and the
    watch's event comes first). Owns `waiters`, `last_index` and the latest snapshot seen."""

    def __init__(self, conn: EtcdConnection, keys: Keys, sm: StateMachine, *, timeout: float):
        self._conn = conn
        self._keys = keys
        self._sm = sm
        self._timeout = timeout
        self.waiters: dict[int, asyncio.Future[object]] = {}
        self.last_index = 0  # the highest index known committed
        self.snapshot: SnapshotPointer | None = None

    @property
    def applied(self) -> int:
        return self._sm.applied_index

    def apply_batch(self, first: int, entries: list[bytes]) -> bool:
        """Apply what is new in the batch. False when it starts past the next index (a gap:
        reload from the snapshot); already applied entries are skipped."""
        sm = self._sm
        for offset, data in enumerate(entries):
            index = first + offset
            if index <= sm.applied_index:
                continue
            if index != sm.applied_index + 1:
                return False
            result = sm.apply(index, data)
            fut = self.waiters.pop(index, None)
            if fut is not None and not fut.done():
                fut.set_result(result)
        self.last_index = max(self.last_index, first + len(entries) - 1, sm.applied_index)
        return True

    def fail_waiters(self, err: Exception) -> None:
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(err)
        self.waiters.clear()

    async def load(self) -> int:
        """Bring the state machine up to date from etcd: the latest snapshot if it is ahead
        of what was applied, then every log batch after. All reads are pinned to one
        revision, which is returned (watch from the next). Raises Unavailable (Compacted
        when etcd compacted that revision away meanwhile: call again)."""
        kv = self._conn.kv
        resp = await self._conn.call(kv.Range, rpc.RangeRequest(key=self._keys.snap_ptr),
                                     timeout=self._timeout)
        revision = resp.header.revision
        if resp.kvs:
            ptr = json.loads(resp.kvs[0].value)
            self.snapshot = SnapshotPointer(ptr["index"], ptr["chunks"], ptr["size"],
                                            resp.kvs[0].mod_revision)
            if self.snapshot.index > self.applied:
                data = await self._read_snapshot(self.snapshot, revision)
                self._sm.restore(data, self.snapshot.index)
                logger.info("etcd: restored the snapshot at index %d (%d bytes)", self.snapshot.index, len(data))
        start = self._keys.log_key(0)
        while True:
            page = await self._conn.call(kv.Range, rpc.RangeRequest(
                key=start, range_end=prefix_end(self._keys.log), revision=revision, limit=_PAGE,
            ), timeout=self._timeout)
            for item in page.kvs:
                if not self.apply_batch(self._keys.log_index(item.key), unframe(item.value)):
                    raise Unavailable(f"etcd log has a gap before index {self._keys.log_index(item.key)}")
            if not page.more or not page.kvs:
                break
            start = page.kvs[-1].key + b"\0"
        self.last_index = max(self.last_index, self.applied)
        return revision

    async def _read_snapshot(self, ptr: SnapshotPointer, revision: int) -> bytes:
        parts: list[bytes] = []
        start = self._keys.chunk_key(ptr.index, 0)
        end = prefix_end(self._keys.chunk_prefix(ptr.index))
        while True:
            page = await self._conn.call(self._conn.kv.Range, rpc.RangeRequest(
                key=start, range_end=end, revision=revision, limit=16,
            ), timeout=self._timeout)
            parts.extend(item.value for item in page.kvs)
            if not page.more or not page.kvs:
                break
            start = page.kvs[-1].key + b"\0"
        data = b"".join(parts)
        if len(parts) != ptr.chunks or len(data) != ptr.size:
            raise Unavailable(f"etcd snapshot at index {ptr.index} is incomplete "
                              f"({len(parts)}/{ptr.chunks} chunks, {len(data)}/{ptr.size} bytes)")
        return data
