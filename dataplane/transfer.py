"""Moving shards between nodes: the puller. The holder's end and the wire protocol are in
`dataplane/side_channel.py` (re-exported here); gRPC `ReadShard` carries the same frames,
for peers without the side channel.

The puller hashes as it receives and compares its running hash (the shard id's algorithm:
BLAKE3 for new ids, SHA-256 for older ones) with each frame's checkpoint (the holder's
digest of the blob's prefix, made when the blob was written), so a flipped byte is caught
at the frame that holds it, at no extra hashing cost. On a bad frame, a broken or truncated
stream, it rolls back to the last verified frame and resumes there from the next replica;
the whole hash is checked at the end; nothing is stored unless it matches.

Each frame is one `recv_into` system call into a reused buffer, then hashed and written
with `os.write` (BLAKE3, AES-GCM and `os.write` release the GIL). `pull_many` runs one pull
per core; when those fill the cores, each pull does all three in its one thread, keeping
its buffers from shard to shard. A pull with a core to spare overlaps: one thread receives
frame k+1 while a helper hashes and writes frame k. Memory: one frame buffer per pull (two
when overlapping), one more for a sealed copy's plaintext.

Sealed copies: when this store encrypts at rest, the puller names its key id and a holder
with the same key sends its sealed chunks; each is authenticated and decrypted here (to
hash the plaintext against the checkpoint) and kept as it came, the holder's header
included: no re-encryption, and the holder serves with `sendfile`. A chunk that fails
authentication is a corrupt copy like any other. Resuming on another replica keeps the
chunks already copied only if that replica has the same header (copies of one seal do);
otherwise the blob starts over from there. Why this design: docs/data.md.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
from lepton.common.tls import identity_from_ssl
from lepton.common.validation import join_host_port, split_host_port
from lepton.dataplane import shard_crypto as sc
from lepton.dataplane.shards import CHUNK, ShardCorrupt, ShardStore, ShardWriter
from lepton.dataplane.side_channel import (
    END,
    FRAME,
    IO_TIMEOUT_S,
    TOKEN_BYTES,
    ByteCounter,
    SideChannel,
    recv_exact,
    recv_into_exact,
    tune,
)
from lepton.v1 import datasets_pb2 as dpb
from lepton.v1.datasets_pb2_grpc import ShardsStub

logger = logging.getLogger(__name__)


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
        # A pull_many worker's frame buffers, kept across its shards (gone with the thread).
        self._kept = threading.local()

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
        parallel: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> PullResult:
        """Fetch each (shard id, size, sources); `parallel` at a time (default: one per
        core). Never raises for one shard: failures are listed in the result.

        When the pulls at once leave no core free for a helper each, every pull receives,
        checks and writes in its one thread (the other pulls keep the other cores busy; a
        helper would only add hand-offs and move each frame between cores' caches); else
        each pull overlaps its receiving and checking on two threads (`pull`)."""
        result = PullResult()
        lock = threading.Lock()
        workers = max(1, parallel or os.cpu_count() or 1)
        overlap = 2 * min(workers, len(shards)) <= (os.cpu_count() or 1)

        def one(item: tuple[str, int, Sequence[str]]) -> None:
            shard_id, size, sources = item
            if not hasattr(self._kept, "buffers"):
                self._kept.buffers = []
            try:
                n = self.pull(shard_id, size, sources, progress=progress, overlap=overlap)
            except LeptonError as err:
                with lock:
                    result.failed[shard_id] = err.message
                return
            with lock:
                result.pulled.append(shard_id)
                result.bytes += n

        with ThreadPoolExecutor(workers, thread_name_prefix="pull") as pool:
            list(pool.map(one, shards))
        return result

    def pull(
        self,
        shard_id: str,
        size: int,
        sources: Sequence[str],
        *,
        progress: Callable[[int], None] | None = None,
        overlap: bool = True,
    ) -> int:
        """Fetch one shard, trying `sources` in turn (twice round), resuming at the last
        verified frame. Returns bytes received (0 when already stored). `overlap`: check
        and write each frame on a helper thread while the next one arrives (two cores).

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
                before = writer.received
                try:
                    self._fetch(source, writer, progress, overlap)
                    writer.commit()
                    return received + writer.received - before
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
                received += writer.received - before
                if writer.done:  # commit found the whole hash wrong: start over
                    writer = None
                else:
                    writer.rollback()
            raise Unavailable(f"shard {shard_id[:12]}: every copy failed: {'; '.join(errors[-4:])}")
        finally:
            if writer is not None:
                writer.abort()

    def _fetch(self, source: str, writer: ShardWriter, progress, overlap: bool) -> None:
        if self.transport != "grpc":
            try:
                ticket = self._open(source, writer)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNIMPLEMENTED or self.transport == "socket":
                    raise from_rpc_error(err) from None
            else:
                header = ticket.sealed_header or None
                if header != writer.copied_header:
                    # Another seal than the chunks copied so far (or none): they cannot
                    # be mixed, so the blob starts over, from this source.
                    resumed = writer.offset
                    writer.start_over(header)
                    if resumed:
                        return self._fetch(source, writer, progress, overlap)
                return self._fetch_socket(source, ticket, writer, progress, overlap)
        if writer.copied_header is not None:  # ReadShard carries plaintext: seal it here
            writer.start_over(None)
        return self._fetch_grpc(source, writer, progress)

    def _open(self, source: str, writer: ShardWriter) -> dpb.TransferTicket:
        """OpenTransfer at the writer's offset. With a shard key, ask for sealed chunks
        unless the blob is already being sealed here (its own seal cannot take them)."""
        cipher = self.store.cipher
        sealable = cipher is not None and (writer.offset == 0 or writer.copied_header is not None)
        return self._stub(source).OpenTransfer(
            dpb.OpenTransferRequest(shard_id=writer.shard_id, offset=writer.offset,
                                    sealed_key_id=cipher.key_id if sealable else ""),
            timeout=IO_TIMEOUT_S,
        )

    def _fetch_socket(self, source: str, ticket, writer: ShardWriter, progress, overlap: bool) -> None:
        """Receive frames into a reused buffer and check and write each; with `overlap`,
        into two alternating buffers while a helper thread checks and writes the previous
        one (a failed check raises from the helper here)."""
        if ticket.size != writer.size:
            raise ShardCorrupt(f"{source} has {ticket.size} bytes, not {writer.size}")
        sealed = writer.copied_header is not None
        extra = sc.TAG if sealed else 0
        frames = 2 if overlap else 1
        buffers = self._buffers(frames + sealed)  # and one for a sealed chunk's plaintext
        bufs, plain = buffers[:frames], (buffers[frames] if sealed else None)
        host = split_host_port(source, "source")[0]
        expect = writer.offset
        checking: Future | None = None
        with (ThreadPoolExecutor(1, thread_name_prefix="pull-check") if overlap else _Inline()) as checker, \
                self._connect(host, ticket.port) as sock:
            try:
                tune(sock)
                sock.sendall(ticket.token)
                for k in itertools.count():
                    offset, length, digest = FRAME.unpack(recv_exact(sock, FRAME.size))
                    if offset == END:
                        break
                    want = min(CHUNK, writer.size - expect) + extra
                    # Past the end only END may come (an empty blob has one empty frame):
                    # a holder cannot keep a puller busy with frames that add nothing.
                    over = expect == writer.size and (k > 0 or writer.size > 0)
                    if offset != expect or length != want or over:
                        raise ConnectionError(f"protocol error: frame at {offset}+{length}, not {expect}+{want}")
                    view = memoryview(bufs[k % len(bufs)])[:length]
                    recv_into_exact(sock, view)
                    if checking is not None:
                        checking.result()  # frees the other buffer; raises its check's error
                    checking = checker.submit(self._accept, writer, view, digest, source, progress, plain)
                    expect += length - extra
                if checking is not None:
                    checking.result()
            except BaseException:
                # The helper's verdict (a corrupt copy) says more than the broken stream.
                if checking is not None and checking.exception() is not None:
                    raise checking.exception() from None
                raise

    def _buffers(self, count: int) -> list[bytearray]:
        """`count` frame buffers (CHUNK + TAG bytes): a pull_many worker's kept ones, else
        new. Each new one is 4 MiB to zero and fault in (8-12 MiB per 64 MiB shard when
        made per shard)."""
        kept = getattr(self._kept, "buffers", None)
        if kept is None:
            return [bytearray(CHUNK + sc.TAG) for _ in range(count)]
        kept.extend(bytearray(CHUNK + sc.TAG) for _ in range(count - len(kept)))
        return kept[:count]

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

    def _accept(self, writer: ShardWriter, data, digest: bytes, source: str, progress,
                plain: bytearray | None = None) -> None:
        """Append one frame (a sealed chunk when `plain` is given: decrypted into it) and
        check the running hash against its checkpoint. Raises ShardCorrupt."""
        start = writer.offset
        if self.on_bytes is not None:  # received, verified or not: it crossed the network
            self.on_bytes("in", len(data))
        if plain is None:
            writer.write(data)
            n = len(data)
        else:
            n = len(writer.write_sealed(data, plain))
        if writer.digest() != digest:
            raise ShardCorrupt(f"chunk at byte {start} from {source} fails its checksum")
        writer.mark_verified()
        if progress is not None:
            progress(n)


class _Inline:
    """The helper thread's executor interface, running each call at once in the caller
    (whose error then raises straight from `submit`)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def submit(self, fn, *args) -> Future:
        done: Future = Future()
        done.set_result(fn(*args))
        return done


def _ask_to_verify(address: str, shard_id: str, tls: TlsConfig | None = None) -> None:
    """Tell the peer its copy looks bad: it re-hashes it and drops it if so (and reports
    the lost replica to the coordinator). Best effort."""
    try:
        with make_channel(address, tls=tls, aio=False) as ch:
            ShardsStub(ch).StatShards(dpb.StatShardsRequest(shard_ids=[shard_id], verify=True), timeout=60)
    except grpc.RpcError as err:
        logger.info("could not ask %s to verify shard %s: %s", address, shard_id[:12], err.code())


__all__ = ["END", "FRAME", "TOKEN_BYTES", "ByteCounter", "NotFound", "PullResult", "Puller", "SideChannel"]
