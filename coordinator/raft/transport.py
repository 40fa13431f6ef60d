"""Raft over gRPC: protobuf conversion, the `Raft` servicer and per-peer senders.

Messages are one-way (see raft.proto). Each peer has one sender task that drains a bounded
queue into `RaftBatch` writes on one long-lived client stream, so messages to a peer keep
their order and pile up into bigger batches while the peer is slow. A stream costs a
fraction of a unary call per batch, and a busy leader sends a batch per follower per
round. A broken stream loses what was written to it: Raft repairs lost messages itself
(retries would only deliver stale ones); the sender opens a new stream and goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Collection, Mapping
from typing import Protocol

import grpc

from lepton.common.channels import TlsConfig, make_channel
from lepton.common.errors import FailedPrecondition
from lepton.common.grpc_util import MAX_MESSAGE_BYTES, register_service, rpc_boundary
from lepton.coordinator.raft.messages import (
    AppendRequest,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    Message,
    SnapshotAck,
    SnapshotRequest,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from lepton.coordinator.raft.peer_auth import PeerCheck, peer_metadata
from lepton.coordinator.storage.log_store import Entry, Snapshot
from lepton.v1 import raft_pb2, raft_pb2_grpc, state_pb2

logger = logging.getLogger(__name__)

_PB = raft_pb2
_KINDS = frozenset(
    {AppendRequest, AppendResponse, Heartbeat, HeartbeatResponse, VoteRequest, VoteResponse,
     SnapshotRequest, SnapshotAck, TimeoutNow}
)


# -- conversion ------------------------------------------------------------------------
def to_proto(m: Message) -> raft_pb2.RaftMessage:
    """Raises TypeError for something that is not a Raft message."""
    kind = type(m)
    if kind not in _KINDS:
        raise TypeError(f"not a Raft message: {m!r}")
    pb = _PB.RaftMessage(from_id=m.frm, to_id=m.to, term=m.term)
    if kind is AppendRequest:
        pb.append.prev_index = m.prev_index
        pb.append.prev_term = m.prev_term
        pb.append.commit = m.commit
        pb.append.entries.extend(
            state_pb2.LogEntry(index=e.index, term=e.term, command=e.data) for e in m.entries
        )
    elif kind is AppendResponse:
        r = pb.append_response
        r.success, r.index, r.hint_index, r.hint_term = m.success, m.index, m.hint_index, m.hint_term
    elif kind is Heartbeat:
        pb.heartbeat.commit, pb.heartbeat.ctx = m.commit, m.ctx
    elif kind is HeartbeatResponse:
        pb.heartbeat_response.ctx = m.ctx
    elif kind is VoteRequest:
        v = pb.vote
        v.last_index, v.last_term, v.pre_vote, v.transfer = m.last_index, m.last_term, m.pre_vote, m.transfer
    elif kind is VoteResponse:
        pb.vote_response.granted, pb.vote_response.pre_vote = m.granted, m.pre_vote
    elif kind is SnapshotRequest:
        s = m.snapshot
        whole = m.offset == 0 and m.done  # as every version reads it; chunks apart (raft.proto)
        body = pb.snapshot if whole else pb.snapshot_chunk
        body.index, body.term, body.data, body.config = s.index, s.term, s.data, s.config
        if not whole:
            body.offset, body.more = m.offset, not m.done
    elif kind is SnapshotAck:
        pb.snapshot_ack.index, pb.snapshot_ack.offset = m.index, m.offset
    else:
        pb.timeout_now.SetInParent()
    return pb


def from_proto(pb: raft_pb2.RaftMessage) -> Message | None:
    """The core's message for `pb`, or None for an empty or unknown body (a newer peer)."""
    frm, to, term = pb.from_id, pb.to_id, pb.term
    body = pb.WhichOneof("body")
    if body == "append":
        a = pb.append
        entries = [Entry(e.index, e.term, e.command) for e in a.entries]
        return AppendRequest(frm, to, term, a.prev_index, a.prev_term, entries, a.commit)
    if body == "append_response":
        r = pb.append_response
        return AppendResponse(frm, to, term, r.success, r.index, r.hint_index, r.hint_term)
    if body == "heartbeat":
        return Heartbeat(frm, to, term, pb.heartbeat.commit, pb.heartbeat.ctx)
    if body == "heartbeat_response":
        return HeartbeatResponse(frm, to, term, pb.heartbeat_response.ctx)
    if body == "vote":
        v = pb.vote
        return VoteRequest(frm, to, term, v.last_index, v.last_term, v.pre_vote, v.transfer)
    if body == "vote_response":
        return VoteResponse(frm, to, term, pb.vote_response.granted, pb.vote_response.pre_vote)
    if body == "snapshot":
        s = pb.snapshot
        return SnapshotRequest(frm, to, term, Snapshot(s.index, s.term, s.data, s.config))
    if body == "snapshot_chunk":
        s = pb.snapshot_chunk
        return SnapshotRequest(frm, to, term, Snapshot(s.index, s.term, s.data, s.config), s.offset, not s.more)
    if body == "snapshot_ack":
        return SnapshotAck(frm, to, term, pb.snapshot_ack.index, pb.snapshot_ack.offset)
    if body == "timeout_now":
        return TimeoutNow(frm, to, term)
    return None


# -- server side -----------------------------------------------------------------------
class Receiver(Protocol):
    node_id: str

    def receive(self, messages: list[Message]) -> None:
        """Queue messages for the core; must not block."""

    def raft_members(self) -> Collection[str]:
        """The addresses that may speak Raft to this server now (`peer_auth`)."""


class RaftServicer:
    """The `Raft` service, registered through `register_service` like every other one.
    Each call is first checked by `PeerCheck`: a member of our configuration, as itself."""

    def __init__(self, node: Receiver, peers: PeerCheck):
        self._node = node
        self._peers = peers

    @rpc_boundary
    async def Send(  # noqa: N802 - gRPC method name
        self, request: raft_pb2.RaftBatch, context: grpc.aio.ServicerContext
    ) -> raft_pb2.RaftBatchAck:
        sender = await self._peers.caller(context, "Raft.Send")
        self._deliver(request, sender)
        return raft_pb2.RaftBatchAck()

    @rpc_boundary
    async def Stream(  # noqa: N802 - gRPC method name
        self, request_iterator, context: grpc.aio.ServicerContext
    ) -> raft_pb2.RaftBatchAck:
        sender = await self._peers.caller(context, "Raft.Stream")
        async for batch in request_iterator:
            if sender:
                self._peers.still_member(sender, "Raft.Stream")
            self._deliver(batch, sender)
        return raft_pb2.RaftBatchAck()

    @rpc_boundary
    async def Probe(  # noqa: N802 - gRPC method name
        self, request: raft_pb2.RaftProbeRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.RaftProbeResponse:
        """A leader checks a server it is asked to add runs Raft, at the address given."""
        await self._peers.caller(context, "Raft.Probe")
        me = self._node.node_id
        if request.to_id and request.to_id != me:
            raise FailedPrecondition(f"this is {me}, not {request.to_id}")
        info = getattr(self._node, "probe_info", None)
        if info is None:
            return raft_pb2.RaftProbeResponse(node_id=me)
        term, last, voter = info()  # Unavailable when not running
        return raft_pb2.RaftProbeResponse(node_id=me, term=term, last_index=last, voter=voter,
                                          members=sorted(self._node.raft_members()))

    def _deliver(self, batch: raft_pb2.RaftBatch, sender: str) -> None:
        """Raises FailedPrecondition (not for us), PermissionDenied (not from the caller)."""
        me = self._node.node_id
        msgs = []
        for pb in batch.messages:
            if pb.to_id != me:
                # A peer configured with the wrong address for us: say so, loudly.
                raise FailedPrecondition(f"this is {me}, not {pb.to_id}")
            if sender and pb.from_id != sender:
                raise self._peers.deny(f"Raft: {sender} may not send a message from {pb.from_id or 'nobody'}")
            m = from_proto(pb)
            if m is not None:
                msgs.append(m)
        self._node.receive(msgs)


def add_raft_servicer(server: grpc.aio.Server, node: Receiver, *, tls: TlsConfig | None = None,
                      peer_key: bytes | None = None) -> None:
    """Register the Raft service for `node` (a RaftConsensus) on an existing server; calls
    are checked against `node.raft_members()` with `tls` and/or `peer_key` (see
    `peer_auth`). Call before `server.start()`."""
    peers = PeerCheck(node.raft_members, tls=tls, key=peer_key, vouch=getattr(node, "vouch_for", None))
    if hasattr(node, "peer_check"):
        node.peer_check = peers  # its refusals are a metric (lepton_raft_peer_refused_total)
    register_service(server, RaftServicer(node, peers), raft_pb2.DESCRIPTOR.services_by_name["Raft"])


# -- client side -----------------------------------------------------------------------
class Transport(Protocol):
    def send(self, messages: list[Message]) -> None:
        """Queue for delivery; never blocks, may drop."""

    async def close(self) -> None: ...


class _PeerSender:
    def __init__(self, peer: str, address: str, *, max_queue: int, rpc_timeout: float,
                 max_batch_bytes: int, on_lost: Callable[[str], None] | None = None,
                 tls: TlsConfig | None = None, metadata: tuple[tuple[str, str], ...] = ()):
        self.peer = peer
        self._metadata = metadata  # who we are, for the receiver's PeerCheck
        self.address = address
        self._queue: deque[Message] = deque()
        self._max_queue = max_queue
        self._rpc_timeout = rpc_timeout
        self._max_batch_bytes = max_batch_bytes
        self._wakeup = asyncio.Event()
        self._channel = make_channel(address, tls=tls)
        self._stub = raft_pb2_grpc.RaftStub(self._channel)
        self._task = asyncio.create_task(self._run(), name=f"raft-send-{peer}")
        self._on_lost = on_lost
        self._watcher = asyncio.create_task(self._watch(), name=f"raft-watch-{peer}")
        self._failing = False
        self.dropped = 0

    def enqueue(self, m: Message) -> None:
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()  # the peer is not keeping up: the oldest is the stalest
            self.dropped += 1
        self._queue.append(m)
        self._wakeup.set()

    async def _run(self) -> None:
        call = None
        while True:
            await self._wakeup.wait()
            await asyncio.sleep(0)  # let the rest of this turn's messages join the batch
            self._wakeup.clear()
            while self._queue:
                batch = take_batch(self._queue, self._max_batch_bytes)
                try:
                    if call is None or call.done():
                        call = self._stub.Stream(metadata=self._metadata)
                    # A write completes once gRPC has taken the batch; flow control makes it
                    # wait for a slow peer while the queue (bounded) piles up behind it.
                    await call.write(batch)
                    if self._failing:
                        logger.info("raft: %s at %s is reachable again", self.peer, self.address)
                        self._failing = False
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as err:
                    code = await _ended_with(call)
                    call = None
                    if not self._failing:
                        logger.warning("raft: cannot reach %s at %s: %s", self.peer, self.address,
                                       code or type(err).__name__)
                        self._failing = True
                    # Back off a little; what queues meanwhile is sent (or dropped) next.
                    await asyncio.sleep(0.05)

    async def _watch(self) -> None:
        """Report a connection to the peer that was up and went down: when the peer is
        our leader, Raft need not wait a whole election timeout to find out it is gone."""
        ready = grpc.ChannelConnectivity.READY
        state = self._channel.get_state(try_to_connect=True)
        while True:
            await self._channel.wait_for_state_change(state)
            new = self._channel.get_state(try_to_connect=False)
            if state == ready and new != ready and self._on_lost is not None:
                self._on_lost(self.peer)
            state = new

    async def close(self) -> None:
        for task in (self._task, self._watcher):
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self._channel.close()


def take_batch(queue: deque[Message], max_bytes: int) -> raft_pb2.RaftBatch:
    """The oldest messages of `queue` (taken off it) that fit `max_bytes` together, at
    least one: a message never exceeds the limit on its own, since the core caps entries
    (validation.MAX_ENTRY_BYTES) and sends snapshots in chunks."""
    batch = raft_pb2.RaftBatch()
    size = 0
    while queue:
        pb = to_proto(queue[0])
        n = pb.ByteSize() + 5  # the field's tag and length inside the batch
        if batch.messages and size + n > max_bytes:
            break  # full: this message opens the next batch
        queue.popleft()
        size += n
        batch.messages.append(pb)
    return batch


async def _ended_with(call) -> str:
    """The status name a broken stream ended with ("" if unknown); cancels it if still open."""
    if call is None:
        return ""
    if not call.done():
        call.cancel()
        return ""
    try:
        return (await call.code()).name
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        return ""


class GrpcTransport:
    """Sends to voters by their advertised host:port. Create and use on the event loop.
    `me` (our address) and `peer_key` go with every call for the receiver's `PeerCheck`.

    A message to a peer not in `addresses` (a voter added later, a learner, a leader
    outside our configuration) gets a sender at `resolve(peer)`, when that is given.
    """

    def __init__(
        self,
        addresses: Mapping[str, str],
        *,
        rpc_timeout: float = 5.0,
        max_queue: int = 4096,
        max_batch_bytes: int = MAX_MESSAGE_BYTES // 2,
        on_peer_lost: Callable[[str], None] | None = None,
        tls: TlsConfig | None = None,
        resolve: Callable[[str], str] | None = None,
        me: str = "",
        peer_key: bytes | None = None,
    ):
        self._resolve = resolve
        self._sender_args = dict(max_queue=max_queue, rpc_timeout=rpc_timeout,
                                 max_batch_bytes=max_batch_bytes, on_lost=on_peer_lost, tls=tls,
                                 metadata=peer_metadata(me, peer_key) if me else ())
        self._senders = {peer: _PeerSender(peer, addr, **self._sender_args) for peer, addr in addresses.items()}

    def send(self, messages: list[Message]) -> None:
        for m in messages:
            sender = self._senders.get(m.to)
            if sender is None and self._resolve is not None:
                address = self._resolve(m.to)
                if address:
                    sender = self._senders[m.to] = _PeerSender(m.to, address, **self._sender_args)
            if sender is not None:
                sender.enqueue(m)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._senders.values()))
