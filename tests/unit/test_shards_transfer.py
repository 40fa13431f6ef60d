"""Shard transfers between two stores over the real Shards service (in-process servers):
side channel and gRPC paths, corruption caught per chunk, failover, resume, tokens."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading

import grpc
import numpy as np
import pytest

from lepton.common.errors import InvalidArgument, Unavailable
from lepton.common.validation import join_host_port
from lepton.dataplane import shard_crypto as sc
from lepton.dataplane import side_channel, transfer
from lepton.dataplane.shard_crypto import ShardCipher
from lepton.dataplane.shard_hash import content_id
from lepton.dataplane.shard_service import ShardService, add_to_server
from lepton.dataplane.shards import CHUNK, ShardStore
from lepton.dataplane.transfer import TOKEN_BYTES, Puller, SideChannel
from lepton.v1 import datasets_pb2 as dpb
from lepton.v1.datasets_pb2_grpc import ShardsStub

KEY = ShardCipher(bytes(range(32)))  # shard keys: two nodes with KEY share a cluster secret
OTHER = ShardCipher(bytes(range(1, 33)))


class Node:
    """A Shards server on its own event loop thread."""

    def __init__(self, store: ShardStore, host: str = "127.0.0.1"):
        self.store = store
        self.sent: list[int] = []  # shard bytes that left this node (side channel or gRPC)
        self.side = SideChannel(store, host, on_bytes=self._count)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server, port = self._run(self._start(host))
        self.address = join_host_port(host, port)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self, host: str):
        server = grpc.aio.server()
        port = server.add_insecure_port(join_host_port(host, 0))
        add_to_server(ShardService(self.store, self.side, Puller(self.store), "n", on_bytes=self._count), server)
        await server.start()
        return server, port

    def _count(self, direction: str, n: int) -> None:
        if direction == "out":
            self.sent.append(n)

    def stop(self) -> None:
        self._run(self.server.stop(0))
        self.side.close()
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def nodes(tmp_path):
    made: list[Node] = []

    def make(name: str, cipher=None, host: str = "127.0.0.1") -> Node:
        made.append(Node(ShardStore(tmp_path / name, cipher=cipher), host))
        return made[-1]

    yield make
    for n in made:
        n.stop()


def put(store: ShardStore, n: int, seed: int = 0, algo: str = "b3") -> tuple[str, bytes]:
    """A shard of `n` random bytes, named by BLAKE3 (new shards) or SHA-256 (older ones)."""
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    sid = content_id(data) if algo == "b3" else hashlib.sha256(data).hexdigest()
    with store.writer(sid, n) as w:
        w.write(data)
        w.commit()
    return sid, data


def flip(store: ShardStore, sid: str, at: int) -> None:
    with open(store.path(sid), "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("algo", ["b3", "sha256"])
@pytest.mark.parametrize("transport", ["socket", "grpc"])
def test_pull_verifies_and_stores(nodes, tmp_path, transport, algo):
    src = nodes("src")
    sid, data = put(src.store, 2 * CHUNK + 7, algo=algo)
    dst = ShardStore(tmp_path / "dst")
    seen = []
    with_puller = Puller(dst, transport=transport)
    assert with_puller.pull(sid, len(data), [src.address], progress=seen.append) == len(data)
    assert dst.path(sid).read_bytes() == data and sum(seen) == len(data)
    assert with_puller.pull(sid, len(data), [src.address]) == 0  # already there


@pytest.mark.parametrize("cipher", [None, KEY], ids=["plain", "sealed"])
def test_pull_many_fetches_each_shard_once_per_call(nodes, tmp_path, cipher):
    src = nodes("src", cipher=cipher)
    shards = [put(src.store, CHUNK * k + 11 * k, seed=k, algo=algo) for k, algo in
              enumerate(["b3", "sha256", "b3", "b3", "sha256"])]
    dst = ShardStore(tmp_path / "dst", cipher=cipher)
    seen: list[int] = []
    items = [(sid, len(data), [src.address]) for sid, data in shards]
    result = Puller(dst).pull_many(items, progress=seen.append)
    total = sum(len(data) for _, data in shards)
    assert sorted(result.pulled) == sorted(sid for sid, _ in shards) and not result.failed
    assert result.bytes == total and sum(seen) == total
    for sid, data in shards:
        assert b"".join(bytes(f[1]) for f in dst.read_chunks(sid)) == data
    again = Puller(dst).pull_many(items)
    assert again.bytes == 0 and len(again.pulled) == len(shards)


@pytest.mark.parametrize("cipher", [None, KEY], ids=["plain", "sealed"])
def test_one_thread_per_pull_keeps_its_buffers_and_still_catches_a_bad_chunk(nodes, tmp_path, cipher,
                                                                           monkeypatch):
    """Pulls that fill the cores (here one on a one-core node): each receives, checks and
    writes in its one thread (no helper), with its frame buffers kept from shard to shard.
    Every shard lands exactly (nothing of the one before), and a bad chunk in a later
    shard is still caught."""
    bad, good = nodes("bad", cipher=cipher), nodes("good", cipher=cipher)
    shards = [put(bad.store, 2 * CHUNK + 5 * k, seed=k) for k in range(4)]
    for sid, data in shards:
        copy_of(bad, good, sid, len(data))
    last = shards[-1][0]
    if cipher is None:
        flip(bad.store, last, CHUNK + 100)
    else:
        tamper(bad.store, last, 1)
    pools, handed = [], []
    real_pool, real_buffers = transfer.ThreadPoolExecutor, Puller._buffers
    monkeypatch.setattr(transfer, "ThreadPoolExecutor",
                        lambda n, thread_name_prefix: pools.append(thread_name_prefix) or real_pool(n, thread_name_prefix))
    monkeypatch.setattr(transfer.os, "cpu_count", lambda: 1)
    monkeypatch.setattr(Puller, "_buffers", lambda self, n: handed.append(real_buffers(self, n)) or handed[-1])
    dst = ShardStore(tmp_path / "dst", cipher=cipher)
    items = [(sid, len(data), [bad.address, good.address]) for sid, data in shards]
    result = Puller(dst, transport="socket").pull_many(items)
    assert sorted(result.pulled) == sorted(sid for sid, _ in shards) and not result.failed
    for sid, data in shards:
        assert b"".join(bytes(f[1]) for f in dst.read_chunks(sid)) == data and dst.verify(sid)
    assert not bad.store.has(last) and good.store.has(last)  # told, re-hashed, dropped
    assert pools == ["pull"]  # no pull-check helper
    assert len(handed) == len(shards) + 1  # the bad copy, then the good one resumed
    assert all(all(a is b for a, b in zip(bufs, handed[0], strict=True)) for bufs in handed)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("transport", ["socket", "grpc"])
def test_a_node_listening_on_ipv6_serves_its_shards(nodes, tmp_path, transport):
    """--listen [::1]:PORT: the side channel binds in the host's family (a plain socket is
    IPv4 only), and the puller dials "[::1]:PORT" and the side channel's bare ::1."""
    src = nodes("src", host="::1")
    assert src.address.startswith("[::1]:") and src.side._sock.family == socket.AF_INET6
    sid, data = put(src.store, CHUNK + 3)
    dst = ShardStore(tmp_path / "dst")
    assert Puller(dst, transport=transport).pull(sid, len(data), [src.address]) == len(data)
    assert dst.path(sid).read_bytes() == data
    if transport == "socket":
        assert sum(src.sent) == len(data)


@pytest.mark.parametrize("algo", ["b3", "sha256"])
@pytest.mark.parametrize("transport", ["socket", "grpc"])
def test_a_flipped_byte_is_caught_and_fetched_from_the_other_replica(nodes, tmp_path, transport, algo):
    bad, good = nodes("bad"), nodes("good")
    sid, data = put(bad.store, 3 * CHUNK, algo=algo)
    put(good.store, 3 * CHUNK, algo=algo)
    flip(bad.store, sid, CHUNK + 100)  # the second chunk
    dst = ShardStore(tmp_path / "dst")
    received = Puller(dst, transport=transport).pull(sid, len(data), [bad.address, good.address])
    assert dst.path(sid).read_bytes() == data
    assert received < 2 * len(data)  # resumed at the last good chunk, not from scratch
    # The bad holder re-hashed its copy when told, and dropped it.
    assert not bad.store.has(sid) and good.store.has(sid)


def test_a_stream_cut_mid_frame_resumes_on_the_other_replica(nodes, tmp_path, monkeypatch):
    first, second = nodes("first"), nodes("second")
    sid, data = put(first.store, 3 * CHUNK)
    put(second.store, 3 * CHUNK)
    real, calls = side_channel.send_file, []

    def cut_second_frame(sock, f, offset, count):
        calls.append(offset)
        if len(calls) == 2:  # half of the second frame, then the holder dies
            real(sock, f, offset, count // 2)
            raise OSError("holder went away")
        real(sock, f, offset, count)

    monkeypatch.setattr(side_channel, "send_file", cut_second_frame)
    dst = ShardStore(tmp_path / "dst")
    received = Puller(dst, transport="socket").pull(sid, len(data), [first.address, second.address])
    assert dst.path(sid).read_bytes() == data and dst.verify(sid)
    # The verified first frame was kept; the second replica resumed at the cut frame (the
    # half frame never reached the file).
    assert calls == [0, CHUNK, CHUNK, 2 * CHUNK] and received == len(data)
    assert first.store.has(sid)  # a broken stream is not a corrupt copy


def test_frames_past_the_end_are_a_protocol_error(nodes, tmp_path, monkeypatch):
    """A holder that keeps sending empty frames at the end (with the right digest) is
    refused, not followed forever."""
    src = nodes("src")
    sid, data = put(src.store, CHUNK + 3)
    final = src.store.checkpoints(sid)[-1]

    class Padding:
        def __init__(self, conn):
            self._conn = conn

        def fileno(self):
            return self._conn.fileno()

        def sendall(self, frame, flags=0):
            if side_channel.FRAME.unpack(frame[: side_channel.FRAME.size])[0] == side_channel.END:
                for _ in range(3):
                    self._conn.sendall(side_channel.FRAME.pack(len(data), 0, final))
            self._conn.sendall(frame, flags)

    real = side_channel.SideChannel._send
    monkeypatch.setattr(side_channel.SideChannel, "_send", lambda self, conn, t: real(self, Padding(conn), t))
    dst = ShardStore(tmp_path / "dst")
    with pytest.raises(Unavailable, match="protocol error"):
        Puller(dst, transport="socket").pull(sid, len(data), [src.address])
    assert not dst.has(sid)


def test_every_copy_bad_stores_nothing(nodes, tmp_path):
    a = nodes("a")
    sid, data = put(a.store, CHUNK + 10)
    flip(a.store, sid, 5)
    dst = ShardStore(tmp_path / "dst")
    with pytest.raises(Unavailable, match="every copy failed"):
        Puller(dst).pull(sid, len(data), [a.address])
    assert not dst.has(sid) and not list(dst.tmp.iterdir()) and dst.used_bytes == 0


def test_a_truncated_upload_stores_nothing(nodes):
    a = nodes("a")
    data = b"y" * 5000
    sid = hashlib.sha256(data).hexdigest()
    with grpc.insecure_channel(a.address) as ch:
        stub = ShardsStub(ch)
        reqs = [dpb.WriteShardRequest(shard_id=sid, size=len(data), data=data[:3000])]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.WriteShard(iter(reqs)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in err.value.details()
        assert not a.store.has(sid) and not list(a.store.tmp.iterdir())
        reqs = [dpb.WriteShardRequest(shard_id=sid, size=len(data), data=data)]
        assert list(stub.WriteShard(iter(reqs)))[0].size == len(data)
        assert a.store.has(sid)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.WriteShard(iter([dpb.WriteShardRequest(shard_id="../x", size=1)])))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_tokens_are_one_time(nodes):
    a = nodes("a")
    sid, _ = put(a.store, 100)
    ticket = a.side.issue(sid, 0)
    for expect_data in (True, False):
        with socket.create_connection(("127.0.0.1", ticket.port), timeout=5) as s:
            s.sendall(ticket.token)
            got = s.recv(64)
            assert bool(got) is expect_data
    with socket.create_connection(("127.0.0.1", ticket.port), timeout=5) as s:
        s.sendall(b"\0" * TOKEN_BYTES)
        assert s.recv(64) == b""
    with pytest.raises(InvalidArgument):
        a.side.issue(sid, 3)


# -- shards encrypted at rest ------------------------------------------------------------



@pytest.mark.parametrize("transport", ["socket", "grpc"])
@pytest.mark.parametrize("dst_key", [None, KEY, OTHER], ids=["keyless", "same-key", "other-key"])
def test_sealed_shards_travel_as_verified_plaintext(nodes, tmp_path, transport, dst_key):
    src = nodes("src", cipher=KEY)
    sid, data = put(src.store, 2 * CHUNK + 7)
    dst = ShardStore(tmp_path / "dst", cipher=dst_key)
    assert Puller(dst, transport=transport).pull(sid, len(data), [src.address]) == len(data)
    # The receiver seals with its own key (or stores plaintext: a client's download).
    assert dst.encrypted(sid) == (dst_key is not None)
    assert b"".join(f[1] for f in dst.read_chunks(sid)) == data and dst.verify(sid)


def tamper(store: ShardStore, sid: str, chunk: int) -> None:
    """Flip a ciphertext byte of sealed chunk `chunk`."""
    with open(store.path(sid), "r+b") as f:
        f.seek(sc.HEADER.size + chunk * (CHUNK + sc.TAG) + 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))


def copy_of(src: Node, dst: Node, sid: str, size: int) -> None:
    """`dst` gets `src`'s copy the way replication makes it (the same seal)."""
    Puller(dst.store, transport="socket").pull(sid, size, [src.address])
    assert dst.store.path(sid).read_bytes() == src.store.path(sid).read_bytes()


@pytest.mark.parametrize("algo", ["b3", "sha256"])
def test_with_the_same_key_sealed_chunks_travel_as_they_lie(nodes, tmp_path, algo):
    src = nodes("src", cipher=KEY)
    sid, data = put(src.store, 2 * CHUNK + 7, algo=algo)
    dst = ShardStore(tmp_path / "dst", cipher=KEY)
    seen: list[int] = []
    assert Puller(dst, transport="socket").pull(sid, len(data), [src.address], progress=seen.append) == len(data)
    # Kept byte for byte (header, salt, ciphertext), and it opens and verifies here.
    assert dst.path(sid).read_bytes() == src.store.path(sid).read_bytes() and sum(seen) == len(data)
    assert b"".join(bytes(f[1]) for f in dst.read_chunks(sid)) == data and dst.verify(sid)
    # An empty shard: one sealed empty chunk.
    empty = content_id(b"") if algo == "b3" else hashlib.sha256(b"").hexdigest()
    with src.store.writer(empty, 0) as w:
        w.commit()
    assert Puller(dst, transport="socket").pull(empty, 0, [src.address]) == 0 and dst.verify(empty)
    assert dst.path(empty).read_bytes() == src.store.path(empty).read_bytes()


def test_a_tampered_sealed_chunk_sent_to_a_keyholder_is_refused_there(nodes, tmp_path):
    bad, good = nodes("bad", cipher=KEY), nodes("good", cipher=KEY)
    sid, data = put(bad.store, 3 * CHUNK)
    copy_of(bad, good, sid, len(data))  # one seal, two replicas
    tamper(bad.store, sid, 1)
    dst = ShardStore(tmp_path / "dst", cipher=KEY)
    received = Puller(dst, transport="socket").pull(sid, len(data), [bad.address, good.address])
    assert b"".join(bytes(f[1]) for f in dst.read_chunks(sid)) == data
    assert dst.path(sid).read_bytes() == good.store.path(sid).read_bytes()
    assert received == len(data)  # the same seal: resumed at the tampered chunk
    # The puller refused it (authentication) and told the holder, which dropped its copy.
    assert not bad.store.has(sid) and good.store.has(sid)


def test_resuming_on_a_replica_with_another_seal_starts_over(nodes, tmp_path):
    bad, good = nodes("bad", cipher=KEY), nodes("good", cipher=KEY)
    sid, data = put(bad.store, 3 * CHUNK)
    put(good.store, 3 * CHUNK)  # sealed on its own: another salt, other ciphertext
    tamper(bad.store, sid, 1)
    dst = ShardStore(tmp_path / "dst", cipher=KEY)
    received = Puller(dst, transport="socket").pull(sid, len(data), [bad.address, good.address])
    assert dst.path(sid).read_bytes() == good.store.path(sid).read_bytes() and dst.verify(sid)
    assert received == len(data) + CHUNK  # chunk 0 from bad, then all of good's seal


def test_a_forged_sealed_header_is_a_corrupt_copy(nodes, tmp_path):
    bad, good = nodes("bad", cipher=KEY), nodes("good", cipher=KEY)
    sid, data = put(bad.store, CHUNK + 5)
    copy_of(bad, good, sid, len(data))
    with open(bad.store.path(sid), "r+b") as f:  # a salt byte: the header still parses
        f.seek(24)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    dst = ShardStore(tmp_path / "dst", cipher=KEY)
    Puller(dst, transport="socket").pull(sid, len(data), [bad.address, good.address])
    assert dst.path(sid).read_bytes() == good.store.path(sid).read_bytes()
    assert not bad.store.has(sid)


@pytest.mark.parametrize("transport", ["socket", "grpc"])
def test_a_tampered_sealed_chunk_is_never_served_in_plaintext(nodes, tmp_path, transport):
    """To a puller without the key (a client's download, another key) or over gRPC, the
    holder decrypts: a chunk that fails authentication never leaves it."""
    bad, good = nodes("bad", cipher=KEY), nodes("good", cipher=KEY)
    sid, data = put(bad.store, 3 * CHUNK)
    put(good.store, 3 * CHUNK)
    tamper(bad.store, sid, 1)
    dst = ShardStore(tmp_path / "dst", cipher=OTHER if transport == "socket" else KEY)
    received = Puller(dst, transport=transport).pull(sid, len(data), [bad.address, good.address])
    assert b"".join(bytes(f[1]) for f in dst.read_chunks(sid)) == data
    assert received == len(data)  # resumed at the tampered chunk: nothing fetched twice
    # Only the authenticated first chunk left the bad node; it dropped its copy.
    assert sum(bad.sent) == CHUNK and not bad.store.has(sid) and good.store.has(sid)
