"""Moving shards between nodes: a raw-socket side channel (the fast path) and the puller.

Control goes over gRPC; bytes over a plain TCP connection:

1. the puller asks the holder `Shards.OpenTransfer(shard, offset)` and gets a port and a
   one-time 32-byte token (random, valid `TICKET_TTL_S`, usable once);
2. it connects to that port and sends the token; anything else is dropped unanswered;
3. the holder sends frames `FRAME` = (offset u64, length u32, checkpoint digest 32 bytes)
   each followed by `length` bytes straight from the page cache (`os.sendfile`), then an
   end frame (offset `END`). Every frame but the last is `CHUNK` bytes.

The puller hashes as it receives and compares its running SHA-256 with each frame's
checkpoint (the holder's digest of the blob's prefix, made when the blob was written), so a
flipped byte is caught at the frame that holds it, at no extra hashing cost. On a bad frame,
a broken or truncated stream, it rolls back to the last verified frame and resumes there
from the next replica; the whole hash is checked at the end; nothing is stored unless it
matches. Memory: one CHUNK buffer per transfer.

`ReadShard` (gRPC streaming) carries the same frames, for peers without the side channel.

Shards encrypted at rest (`dataplane/shard_crypto.py`) travel as plaintext frames too: the
holder decrypts and authenticates each chunk before it sends it (no `sendfile` then), so a
chunk that fails authentication is never sent; the stream stops there, the holder
quarantines its copy, and the puller resumes from the next replica. The wire carries the
same checkpoints either way, and the receiver seals with its own store's key. Confidentiality
on the wire is TLS's job (`--tls-dir`). Why this design: docs/data.md.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from lepton.common.channels import TlsConfig, make_channel
from lepton.common.errors import (
    AlreadyExists,
    InvalidArgument,
    LeptonError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
)
from lepton.common.sockets import bind_tcp
from lepton.common.tls import PeerIdentity, identity_from_ssl
from lepton.common.validation import join_host_port, split_host_port
from lepton.dataplane.shards import CHUNK, ShardCorrupt, ShardStore, ShardWriter, checkpoint_offsets
from lepton.v1 import datasets_pb2 as dpb
from lepton.v1.datasets_pb2_grpc import ShardsStub

logger = logging.getLogger(__name__)

FRAME = struct.Struct("!QI32s")
END = (1 << 64) - 1
TOKEN_BYTES = 32
TICKET_TTL_S = 30.0
MAX_SERVING = 32  # concurrent side-channel streams per node
MAX_SERVING_PER_PEER = 16  # of those, held by one peer address
MAX_PENDING = 256  # connections still in the TLS handshake or before their ticket
MAX_PENDING_PER_PEER = 32
HANDSHAKE_TIMEOUT_S = 5.0  # to finish the TLS handshake and send the ticket
IO_TIMEOUT_S = 30.0
# Told (direction "in"/"out", bytes) as shard bytes move, from any thread (metrics).
ByteCounter = Callable[[str, int], None]


class SideChannel:
    """The holder's end: a TCP listener that serves shard bytes to token holders.

    A connection proves itself first (the TLS handshake with a cluster certificate, then
    its ticket) within `HANDSHAKE_TIMEOUT_S`, before it may take one of the `MAX_SERVING`
    streaming slots: idle or slow connections cost a short-lived thread, never a slot. At
    most `MAX_PENDING` connections (`MAX_PENDING_PER_PEER` per peer address) wait to prove
    themselves; past that the oldest waiting one is dropped, so a flood of idle connections
    is recycled instead of locking newcomers out. One peer holds at most
    `MAX_SERVING_PER_PEER` slots (its further streams wait for its own to end). With TLS, a
    ticket is bound to the certificate that asked for it: only that identity can redeem it.
    """

    def __init__(self, store: ShardStore, host: str = "127.0.0.1", on_bytes: ByteCounter | None = None,
                 tls: TlsConfig | None = None):
        self.store = store
        # With TLS, every connection must first prove it belongs to the cluster CA.
        self._ssl = tls.server_ssl_context() if tls is not None else None
        self.on_bytes = on_bytes
        self._tickets: dict[bytes, _Ticket] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_SERVING)
        # Waiting to prove themselves, oldest first, by accepted socket.
        self._pending: dict[socket.socket, _Pending] = {}
        self._serving: dict[str, int] = {}  # peer host -> slots held
        self._slot_freed = threading.Condition(self._lock)  # a peer gave a slot back
        self._sock = bind_tcp(host, 0)  # the host's own family: an IPv6 --listen works too
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="side-channel", daemon=True)
        self._thread.start()

    def issue(self, shard_id: str, offset: int, holder: PeerIdentity | None = None) -> dpb.TransferTicket:
        """A one-time ticket for `shard_id` from `offset`. With TLS, `holder` is the identity
        of the OpenTransfer caller's certificate (None for one that names nobody, the task
        certificate), and only a certificate with that identity redeems the ticket.
        Raises NotFound, InvalidArgument."""
        size = self.store.size(shard_id)
        if offset > size or offset % CHUNK and offset != size:
            raise InvalidArgument(f"offset {offset} is not a multiple of {CHUNK} within {size}")
        token = secrets.token_bytes(TOKEN_BYTES)
        now = time.monotonic()
        with self._lock:
            # Forget expired tickets here, so an unused one costs nothing for long.
            for key in [k for k, t in self._tickets.items() if t.expires < now]:
                del self._tickets[key]
            self._tickets[_key(token)] = _Ticket(shard_id, offset, now + TICKET_TTL_S, holder)
        return dpb.TransferTicket(port=self.port, token=token, size=size, chunk_size=CHUNK)

    def _redeem(self, token: bytes, peer: PeerIdentity | None) -> _Ticket | None:
        with self._lock:
            ticket = self._tickets.pop(_key(token), None)
        if ticket is None or ticket.expires < time.monotonic():
            return None
        if peer != ticket.holder:  # with TLS: only the certificate that asked for it
            logger.warning("side channel: refused %s redeeming a ticket issued to %s",
                           peer.name if peer else "a certificate without identity",
                           ticket.holder.name if ticket.holder else "a certificate without identity")
            return None
        return ticket

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            host = str(addr[0])
            self._admit(conn, host)
            threading.Thread(target=self._serve, args=(conn, host), daemon=True).start()

    def _admit(self, conn: socket.socket, host: str) -> None:
        """Count `conn` as waiting; drop the oldest waiting connection (of this peer first)
        when over the caps. Dropped ones are shut down, which wakes their thread."""
        with self._lock:
            self._pending[conn] = _Pending(host, conn)
            # Silent ones first (an idle flood never speaks; a puller speaks at once), then
            # the oldest: a connection that arrived late in the backlog spares the puller.
            order = sorted(self._pending, key=lambda c: self._pending[c].spoke)
            mine = [c for c in order if self._pending[c].host == host]
            victims = mine[: max(0, len(mine) - MAX_PENDING_PER_PEER)]
            over = len(self._pending) - len(victims) - MAX_PENDING
            if over > 0:
                victims += [c for c in order if c not in victims][:over]
            streams = [self._pending.pop(victim).stream for victim in victims]
        for stream in streams:
            _shutdown(stream)
        if victims:
            # Debug: a flood would otherwise write a line per connection.
            logger.debug("side channel: dropped %d idle connections (from %s)", len(victims), host)

    def _serve(self, conn: socket.socket, host: str) -> None:
        with conn:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            stream, ticket = self._prove(conn, host)
            with self._lock:
                self._pending.pop(conn, None)
            with stream:
                if ticket is None:
                    return
                if not self._take_slot(host):
                    logger.warning("side channel: no streaming slot for %s within %gs", host, IO_TIMEOUT_S)
                    return
                try:
                    stream.settimeout(IO_TIMEOUT_S)
                    self._send(stream, ticket.shard_id, ticket.offset)
                except (OSError, LeptonError) as err:
                    logger.info("side channel: transfer ended early: %s", err)
                finally:
                    self._give_slot(host)

    def _prove(self, conn: socket.socket, host: str) -> tuple[socket.socket, _Ticket | None]:
        """The TLS handshake (a client certificate of the cluster CA required) and the
        ticket, under the handshake timeout. Returns the stream to serve on (to close) and
        the ticket, or None: refused, timed out, or dropped as idle."""
        stream, peer = conn, None
        try:
            if not _readable(conn, HANDSHAKE_TIMEOUT_S):
                raise TimeoutError("nothing sent")
            with self._lock:
                if conn in self._pending:
                    self._pending[conn].spoke = True
            if self._ssl is not None:
                stream = self._ssl.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                with self._lock:  # `conn` is detached now: dropping it must shut `stream`
                    if conn in self._pending:
                        self._pending[conn].stream = stream
                try:
                    stream.do_handshake()
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    raise ConnectionError("closed during the TLS handshake") from None  # or dropped as idle
                except ssl.SSLError as err:  # no certificate, another CA, plaintext
                    logger.warning("side channel: refused a peer in the TLS handshake: %s", err.reason or err)
                    return stream, None
                # None for the task certificate (it names nobody): its tickets were asked for
                # with it, under the submitter's token, and only it can redeem them.
                peer = identity_from_ssl(stream)
            ticket = self._redeem(_recv_exact(stream, TOKEN_BYTES), peer)
        except OSError as err:  # timed out, dropped as idle, or gone
            logger.debug("side channel: a connection from %s ended before its ticket: %s", host, err)
            return stream, None
        if ticket is None:
            logger.warning("side channel: refused a connection with a bad, used or someone else's token")
        return stream, ticket

    def _take_slot(self, host: str) -> bool:
        """Wait (at most IO_TIMEOUT_S) until `host` holds fewer than its share of slots and
        one is free; False when none came."""
        deadline = time.monotonic() + IO_TIMEOUT_S
        with self._slot_freed:
            while self._serving.get(host, 0) >= MAX_SERVING_PER_PEER:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._slot_freed.wait(left)
            self._serving[host] = self._serving.get(host, 0) + 1
        if self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return True
        self._give_slot(host, release=False)
        return False

    def _give_slot(self, host: str, release: bool = True) -> None:
        with self._slot_freed:
            left = self._serving.get(host, 0) - 1
            if left > 0:
                self._serving[host] = left
            else:
                self._serving.pop(host, None)
            self._slot_freed.notify_all()
        if release:
            self._slots.release()

    def _send(self, conn: socket.socket, shard_id: str, offset: int) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.store.encrypted(shard_id):
            self._send_sealed(conn, shard_id, offset)
            return
        size = self.store.size(shard_id)
        digests = self.store.checkpoints(shard_id)
        ends = checkpoint_offsets(size)
        with open(self.store.path(shard_id), "rb") as f:
            for i, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
                if start < offset:
                    continue
                conn.sendall(FRAME.pack(start, end - start, digests[i]))
                # socket.sendfile: os.sendfile (no copy through Python) that honours the
                # socket's timeout; it raises if the file is shorter than asked.
                if end > start and conn.sendfile(f, start, end - start) != end - start:
                    raise OSError("the blob is shorter than its size")
                if self.on_bytes is not None:
                    self.on_bytes("out", end - start)
        conn.sendall(FRAME.pack(END, 0, bytes(32)))

    def _send_sealed(self, conn: socket.socket, shard_id: str, offset: int) -> None:
        """Each chunk decrypted and authenticated before it is sent. A chunk that fails
        raises ShardCorrupt (the store has quarantined the blob) and ends the stream early."""
        for start, data, digest in self.store.read_chunks(shard_id, offset, reuse=True):
            conn.sendall(FRAME.pack(start, len(data), digest))
            conn.sendall(data)
            if self.on_bytes is not None:
                self.on_bytes("out", len(data))
        conn.sendall(FRAME.pack(END, 0, bytes(32)))

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


@dataclass(frozen=True, slots=True)
class _Ticket:
    shard_id: str
    offset: int
    expires: float  # time.monotonic()
    holder: PeerIdentity | None  # with TLS: the only certificate that may redeem it


@dataclass(slots=True)
class _Pending:
    host: str
    stream: socket.socket  # what to shut down to drop it: the TLS socket once wrapped
    spoke: bool = False  # sent its first bytes (the TLS hello or the ticket)


def _readable(sock: socket.socket, timeout_s: float) -> bool:
    poller = select.poll()  # not select(): an agent's descriptors may pass 1024
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _key(token: bytes) -> bytes:
    # Look tickets up by a keyed hash, not the token itself: no timing signal about tokens.
    return hmac.new(b"lepton-side-channel", token, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def _recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"stream ended after {got} of {len(view)} bytes")
        got += n


# -- the puller ------------------------------------------------------------------------


@dataclass
class PullResult:
    pulled: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    bytes: int = 0


class Puller:
    """Fetches shards into a store from peers that hold them. Thread-safe.

    `transport`: "auto" (side channel, else gRPC streaming), "socket" or "grpc".
    `on_corrupt(address, shard_id)` is told which peer served a bad copy.
    `token`: the bearer token its gRPC calls (OpenTransfer, ReadShard) send; None: the
    process default (an agent's node token), as `make_channel`.
    """

    def __init__(
        self,
        store: ShardStore,
        *,
        transport: str = "auto",
        on_corrupt: Callable[[str, str], None] | None = None,
        on_bytes: ByteCounter | None = None,
        tls: TlsConfig | None = None,
        token: str | None = None,
    ):
        if transport not in ("auto", "socket", "grpc"):
            raise InvalidArgument(f"unknown transport {transport!r}")
        self.store = store
        self.transport = transport
        self.on_corrupt = on_corrupt or functools.partial(_ask_to_verify, tls=tls)
        self._tls = tls
        self._token = token
        self._ssl = tls.client_ssl_context() if tls is not None else None
        self.on_bytes = on_bytes
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            ch.close()

    def _stub(self, address: str) -> ShardsStub:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                ch = self._channels[address] = make_channel(address, tls=self._tls, aio=False, token=self._token)
        return ShardsStub(ch)

    def pull_many(
        self,
        shards: Sequence[tuple[str, int, Sequence[str]]],
        *,
        parallel: int = 4,
        progress: Callable[[int], None] | None = None,
    ) -> PullResult:
        """Fetch each (shard id, size, sources); `parallel` at a time. Never raises for
        one shard: failures are listed in the result."""
        result = PullResult()
        lock = threading.Lock()

        def one(item: tuple[str, int, Sequence[str]]) -> None:
            shard_id, size, sources = item
            try:
                n = self.pull(shard_id, size, sources, progress=progress)
            except LeptonError as err:
                with lock:
                    result.failed[shard_id] = err.message
                return
            with lock:
                result.pulled.append(shard_id)
                result.bytes += n

        with ThreadPoolExecutor(max(1, parallel), thread_name_prefix="pull") as pool:
            list(pool.map(one, shards))
        return result

    def pull(
        self,
        shard_id: str,
        size: int,
        sources: Sequence[str],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Fetch one shard, trying `sources` in turn (twice round), resuming at the last
        verified frame. Returns bytes received (0 when already stored).

        Raises ResourceExhausted (quota), InvalidArgument, Unavailable (every source failed;
        nothing stored)."""
        if not sources:
            raise Unavailable(f"shard {shard_id[:12]}: no node holds it")
        try:
            writer: ShardWriter | None = self.store.writer(shard_id, size)
        except AlreadyExists:
            # A copy the table may not list (a node back after DOWN): the leader lists it
            # once this returns, so re-hash it first; a corrupt one is removed: fetch it.
            if self.store.verify(shard_id):
                return 0
            writer = None
        errors: list[str] = []
        received = 0
        try:
            for attempt in range(2 * len(sources)):
                source = sources[attempt % len(sources)]
                if writer is None:
                    try:
                        writer = self.store.writer(shard_id, size)
                    except AlreadyExists:  # stored meanwhile by another pull
                        return received
                before = writer.offset
                try:
                    self._fetch(source, writer, progress)
                    received += writer.offset - before
                    writer.commit()
                    return received
                except ShardCorrupt as err:
                    errors.append(f"{source}: {err.message}")
                    logger.warning("shard %s from %s is corrupt: %s", shard_id[:12], source, err.message)
                    self.on_corrupt(source, shard_id)
                except (OSError, LeptonError, grpc.RpcError) as err:
                    if isinstance(err, ResourceExhausted):
                        raise
                    msg = err.message if isinstance(err, LeptonError) else str(err) or type(err).__name__
                    errors.append(f"{source}: {msg}")
                    logger.info("shard %s from %s failed: %s", shard_id[:12], source, msg)
                if writer._done:  # commit found the whole hash wrong: start over
                    writer = None
                else:
                    received += writer.offset - before
                    writer.rollback()
            raise Unavailable(f"shard {shard_id[:12]}: every copy failed: {'; '.join(errors[-4:])}")
        finally:
            if writer is not None:
                writer.abort()

    def _fetch(self, source: str, writer: ShardWriter, progress) -> None:
        if self.transport != "grpc":
            try:
                ticket = self._stub(source).OpenTransfer(
                    dpb.OpenTransferRequest(shard_id=writer.shard_id, offset=writer.offset),
                    timeout=IO_TIMEOUT_S,
                )
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNIMPLEMENTED or self.transport == "socket":
                    raise from_rpc_error(err) from None
            else:
                return self._fetch_socket(source, ticket, writer, progress)
        return self._fetch_grpc(source, writer, progress)

    def _fetch_socket(self, source: str, ticket, writer: ShardWriter, progress) -> None:
        if ticket.size != writer.size:
            raise ShardCorrupt(f"{source} has {ticket.size} bytes, not {writer.size}")
        host = split_host_port(source, "source")[0]
        buf = bytearray(CHUNK)
        with self._connect(host, ticket.port) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.sendall(ticket.token)
            while True:
                offset, length, digest = FRAME.unpack(_recv_exact(sock, FRAME.size))
                if offset == END:
                    break
                if offset != writer.offset or length > CHUNK:
                    raise ConnectionError(f"protocol error: frame at {offset}+{length}")
                view = memoryview(buf)[:length]
                _recv_into_exact(sock, view)
                self._accept(writer, view, digest, source, progress)

    def _connect(self, host: str, port: int) -> socket.socket:
        """The side-channel connection; with TLS, to a node certificate of the cluster CA
        that covers `host`. Raises OSError (ssl.SSLError included)."""
        sock = socket.create_connection((host, port), timeout=IO_TIMEOUT_S)
        if self._ssl is None:
            return sock
        try:
            tls_sock = self._ssl.wrap_socket(sock, server_hostname=host)
        except OSError:
            sock.close()
            raise
        peer = identity_from_ssl(tls_sock)
        if peer is None or peer.kind != "node":
            tls_sock.close()
            raise ConnectionError(f"side channel at {join_host_port(host, port)} is not a cluster node")
        return tls_sock

    def _fetch_grpc(self, source: str, writer: ShardWriter, progress) -> None:
        call = self._stub(source).ReadShard(
            dpb.ReadShardRequest(shard_id=writer.shard_id, offset=writer.offset), timeout=3600
        )
        try:
            for chunk in call:
                if chunk.offset != writer.offset:
                    raise ConnectionError(f"protocol error: chunk at {chunk.offset}")
                self._accept(writer, chunk.data, chunk.digest, source, progress)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    def _accept(self, writer: ShardWriter, data, digest: bytes, source: str, progress) -> None:
        start = writer.offset
        writer.write(data)
        if self.on_bytes is not None:  # received, verified or not: it crossed the network
            self.on_bytes("in", len(data))
        if writer.digest() != digest:
            raise ShardCorrupt(f"chunk at byte {start} from {source} fails its checksum")
        writer.mark_verified()
        if progress is not None:
            progress(len(data))


def _ask_to_verify(address: str, shard_id: str, tls: TlsConfig | None = None) -> None:
    """Tell the peer its copy looks bad: it re-hashes it and drops it if so (and reports
    the lost replica to the coordinator). Best effort."""
    try:
        with make_channel(address, tls=tls, aio=False) as ch:
            ShardsStub(ch).StatShards(dpb.StatShardsRequest(shard_ids=[shard_id], verify=True), timeout=60)
    except grpc.RpcError as err:
        logger.info("could not ask %s to verify shard %s: %s", address, shard_id[:12], err.code())


__all__ = ["END", "FRAME", "ByteCounter", "NotFound", "PullResult", "Puller", "SideChannel"]
