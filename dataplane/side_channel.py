"""The holder's end of a shard transfer: a raw-socket side channel (the fast path).

Control goes over gRPC; bytes over a plain TCP connection:

1. the puller asks the holder `Shards.OpenTransfer(shard, offset)` and gets a port and a
   one-time 32-byte token (random, valid `TICKET_TTL_S`, usable once);
2. it connects to that port and sends the token; anything else is dropped unanswered;
3. the holder sends frames `FRAME` = (offset u64, length u32, checkpoint digest 32 bytes)
   each followed by `length` bytes straight from the page cache (`os.sendfile`), then an
   end frame (offset `END`). Every frame but the last is `CHUNK` bytes of plaintext.

A blob encrypted at rest goes one of two ways. To a puller whose store has the same shard
key (it names its key id in OpenTransfer), its sealed chunks go as they lie on disk, with
`sendfile` too: the ticket carries the blob's header and each frame is a chunk's
ciphertext + tag, which the puller authenticates, decrypts to hash, and keeps as is. To
any other puller (a client's download, a node without the key or with another one), the
holder decrypts and authenticates each chunk first and sends plaintext frames, so a chunk
that fails authentication is never sent. Frames carry the plaintext checkpoints either way.
The puller's side and the why: `dataplane/transfer.py`, docs/data.md.

Sockets run blocking, with the kernel's send and receive timeouts instead of Python's:
then a whole frame is one `sendfile` or one `recv_into(MSG_WAITALL)` system call with the
GIL released, not dozens of non-blocking calls each taking the GIL back.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lepton.common.channels import TlsConfig
from lepton.common.errors import InvalidArgument, LeptonError
from lepton.common.sockets import bind_tcp
from lepton.common.tls import PeerIdentity, identity_from_ssl
from lepton.dataplane import shard_crypto as sc
from lepton.dataplane.shards import CHUNK, ShardStore, checkpoint_offsets
from lepton.v1 import datasets_pb2 as dpb

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

    def issue(self, shard_id: str, offset: int, holder: PeerIdentity | None = None,
              sealed_key_id: str = "") -> dpb.TransferTicket:
        """A one-time ticket for `shard_id` from `offset`. With TLS, `holder` is the identity
        of the OpenTransfer caller's certificate (None for one that names nobody, the task
        certificate), and only a certificate with that identity redeems the ticket.
        `sealed_key_id`: the puller's shard key id; when the blob is sealed with the same
        key the stream carries its sealed chunks (the ticket names the header).
        Raises NotFound, InvalidArgument."""
        size = self.store.size(shard_id)
        if offset > size or offset % CHUNK and offset != size:
            raise InvalidArgument(f"offset {offset} is not a multiple of {CHUNK} within {size}")
        header = None
        if sealed_key_id and self.store.cipher is not None and sealed_key_id == self.store.cipher.key_id:
            header = self.store.sealed_header(shard_id)
        token = secrets.token_bytes(TOKEN_BYTES)
        now = time.monotonic()
        with self._lock:
            # Forget expired tickets here, so an unused one costs nothing for long.
            for key in [k for k, t in self._tickets.items() if t.expires < now]:
                del self._tickets[key]
            self._tickets[_key(token)] = _Ticket(shard_id, offset, now + TICKET_TTL_S, holder, header is not None)
        return dpb.TransferTicket(port=self.port, token=token, size=size, chunk_size=CHUNK,
                                  sealed_header=header or b"")

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
                    tune(stream)
                    self._send(stream, ticket)
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
            ticket = self._redeem(recv_exact(stream, TOKEN_BYTES), peer)
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

    def _send(self, conn: socket.socket, ticket: _Ticket) -> None:
        shard_id, offset = ticket.shard_id, ticket.offset
        if ticket.sealed:
            self._send_file(conn, shard_id, offset, sealed=True)
        elif self.store.encrypted(shard_id):
            self._send_decrypted(conn, shard_id, offset)
        else:
            self._send_file(conn, shard_id, offset, sealed=False)

    def _send_file(self, conn: socket.socket, shard_id: str, offset: int, *, sealed: bool) -> None:
        """Frames straight from the page cache: the plaintext blob, or a sealed blob's
        chunks (ciphertext + tag, laid out after the header) for a puller with its key.
        The holder checks neither: the puller does, and reports a bad copy."""
        size = self.store.size(shard_id)
        digests = self.store.checkpoints(shard_id)
        ends = checkpoint_offsets(size)
        with open(self.store.path(shard_id), "rb") as f:
            for i, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
                if start < offset:
                    continue
                at, length = (sc.HEADER.size + i * (CHUNK + sc.TAG), end - start + sc.TAG) if sealed else \
                    (start, end - start)
                send_frame(conn, FRAME.pack(start, length, digests[i]))
                send_file(conn, f, at, length)
                if self.on_bytes is not None:
                    self.on_bytes("out", end - start)
        conn.sendall(FRAME.pack(END, 0, bytes(32)))

    def _send_decrypted(self, conn: socket.socket, shard_id: str, offset: int) -> None:
        """Each chunk decrypted and authenticated before it is sent. A chunk that fails
        raises ShardCorrupt (the store has quarantined the blob) and ends the stream early."""
        for start, data, digest in self.store.read_chunks(shard_id, offset, reuse=True):
            send_frame(conn, FRAME.pack(start, len(data), digest))
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
    sealed: bool = False  # send the sealed chunks as they lie (the puller has the key)


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


def tune(sock: socket.socket) -> None:
    """Prepare a connected stream for shard frames: no Nagle delay, and for plain TCP
    blocking mode under the kernel's SO_SNDTIMEO/SO_RCVTIMEO (see the module docstring).
    A TLS socket keeps Python's timeout: it cannot take MSG_WAITALL or sendfile anyway.
    Buffer sizes stay the kernel's to tune (setting them turns its autotuning off)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(IO_TIMEOUT_S)
        return
    sock.settimeout(None)
    timeval = struct.pack("ll", int(IO_TIMEOUT_S), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def send_frame(sock: socket.socket, header: bytes) -> None:
    """A frame header, held back (MSG_MORE) to leave with the bytes that follow it."""
    if isinstance(sock, ssl.SSLSocket):
        sock.sendall(header)
    else:
        _io(sock.sendall, header, socket.MSG_MORE)


def send_file(sock: socket.socket, f, offset: int, count: int) -> None:
    """`count` bytes of file `f` from `offset`: os.sendfile on plain TCP (no copy through
    Python, one call per frame while the socket keeps up). Raises OSError when the file
    is shorter or the peer stops reading for IO_TIMEOUT_S."""
    if isinstance(sock, ssl.SSLSocket):
        if count and sock.sendfile(f, offset, count) != count:
            raise OSError("the blob is shorter than its size")
        return
    out, fd = sock.fileno(), f.fileno()
    while count:
        sent = _io(os.sendfile, out, fd, offset, count)
        if sent == 0:
            raise OSError("the blob is shorter than its size")
        offset += sent
        count -= sent


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view`: on plain TCP one recv_into(MSG_WAITALL) system call for the lot.
    Raises ConnectionError (the stream ended) and TimeoutError."""
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
    got = 0
    while got < len(view):
        n = _io(sock.recv_into, view[got:], len(view) - got, flags)
        if n == 0:
            raise ConnectionError(f"stream ended after {got} of {len(view)} bytes")
        got += n


def _io(call, *args):
    try:
        return call(*args)
    except BlockingIOError:  # SO_RCVTIMEO / SO_SNDTIMEO ran out
        raise TimeoutError(f"no progress for {IO_TIMEOUT_S:g}s") from None
