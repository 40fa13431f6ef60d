"""mTLS wiring (issue 7): channels, client identity choice, the shard side channel and Raft
sends over TLS, and the refusal to listen exposed in plaintext."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import threading

import grpc
import pytest

from lepton.common import tls
from lepton.common.channels import TlsConfig, client_tls, make_channel
from lepton.common.config import AgentConfig, load_config
from lepton.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from lepton.coordinator.raft.messages import VoteRequest
from lepton.coordinator.raft.transport import GrpcTransport, add_raft_servicer
from lepton.dataplane.shard_crypto import ShardCipher
from lepton.dataplane.shard_hash import content_id
from lepton.dataplane.shard_service import ShardService, add_to_server
from lepton.dataplane.shards import CHUNK, ShardStore
from lepton.dataplane.transfer import TOKEN_BYTES, Puller, SideChannel


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    tls.init_ca(d)
    for name in ("n1", "n2"):
        tls.issue(d, name, kind="node")
    tls.issue(d, "bob", kind="user", role="viewer")
    return d


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    d = tmp_path_factory.mktemp("other")
    tls.init_ca(d)
    tls.issue(d, "n1", kind="node")
    return d


def test_make_channel_plain_and_tls(ca):
    plain = make_channel("127.0.0.1:1", aio=False)
    secure = make_channel("127.0.0.1:1", aio=False, tls=TlsConfig(str(ca), "n1"))
    assert isinstance(plain, grpc.Channel) and isinstance(secure, grpc.Channel)
    plain.close()
    secure.close()
    with pytest.raises(FailedPrecondition, match="missing"):
        make_channel("127.0.0.1:1", aio=False, tls=TlsConfig(str(ca), "nobody"))


def test_client_identity_choice(ca, tmp_path):
    assert client_tls(ca).name == "bob"  # the only user certificate
    assert client_tls(ca, "n1").name == "n1"  # named: any certificate
    tls.issue(ca, "admin", kind="user", role="admin")
    try:
        assert client_tls(ca).name == "admin"  # admin wins when present
    finally:
        (ca / "admin.crt").unlink()
        (ca / "admin.key").unlink()
    with pytest.raises(FailedPrecondition, match="no certificate carol"):
        client_tls(ca, "carol")
    with pytest.raises(FailedPrecondition, match="does not exist"):
        client_tls(tmp_path / "nope")
    d = tmp_path / "two"
    tls.init_ca(d)
    with pytest.raises(FailedPrecondition, match="no user certificate"):
        client_tls(d)
    tls.issue(d, "u1", kind="user")
    tls.issue(d, "u2", kind="user")
    with pytest.raises(FailedPrecondition, match="several user certificates .*--cert-name"):
        client_tls(d)


def test_exposed_plaintext_listen_is_refused():
    with pytest.raises(InvalidArgument, match="without TLS.*--insecure"):
        AgentConfig(listen="0.0.0.0:7070")
    AgentConfig(listen="0.0.0.0:7070", insecure=True)
    AgentConfig(listen="0.0.0.0:7070", tls_dir="/etc/lepton/tls")
    AgentConfig(listen="[::1]:7070")
    assert load_config({}, env={"LEPTON_LISTEN": "10.0.0.1:1", "LEPTON_INSECURE": "true"}).insecure
    with pytest.raises(InvalidArgument, match="insecure"):
        load_config({}, env={"LEPTON_INSECURE": "maybe"})


class _Holder:
    """A Shards server with a TLS side channel, on its own loop thread."""

    def __init__(self, store: ShardStore, cfg: TlsConfig):
        self.side = SideChannel(store, tls=cfg)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server, port = asyncio.run_coroutine_threadsafe(self._start(store, cfg), self.loop).result(30)
        self.address = f"127.0.0.1:{port}"

    async def _start(self, store, cfg):
        server = grpc.aio.server()
        port = server.add_secure_port("127.0.0.1:0", cfg.server_credentials())
        add_to_server(ShardService(store, self.side, Puller(store, tls=cfg)), server)
        await server.start()
        return server, port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.side.close()
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_side_channel_over_mtls(ca, other_ca, tmp_path):
    src = ShardStore(tmp_path / "src")
    data = bytes(range(256)) * (CHUNK // 128 + 3)
    sid = hashlib.sha256(data).hexdigest()
    with src.writer(sid, len(data)) as w:
        w.write(data)
        w.commit()
    holder = _Holder(src, TlsConfig(str(ca), "n1"))
    try:
        # A user certificate may pull (lepton-ctl data get), over the socket path.
        dst = ShardStore(tmp_path / "dst")
        assert Puller(dst, transport="socket", tls=TlsConfig(str(ca), "bob")).pull(
            sid, len(data), [holder.address]) == len(data)
        assert dst.path(sid).read_bytes() == data
        # Plaintext with a valid token gets nothing: the handshake comes first.
        ticket = holder.side.issue(sid, 0)
        with socket.create_connection(("127.0.0.1", ticket.port), timeout=5) as s:
            s.sendall(ticket.token)
            try:
                assert s.recv(TOKEN_BYTES) == b""
            except ConnectionResetError:
                pass  # refused either way: no shard bytes
        # A certificate of another CA is refused by the holder (the client trusts the holder).
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(ca / "ca.crt"))
        ctx.load_cert_chain(other_ca / "n1.crt", other_ca / "n1.key")
        with socket.create_connection(("127.0.0.1", ticket.port), timeout=5) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(ticket.token)
                    assert s.recv(1) == b""
                    raise ConnectionError("closed")
        # And a plaintext puller cannot reach the TLS gRPC server at all.
        with pytest.raises(Unavailable):
            Puller(ShardStore(tmp_path / "plain"), transport="grpc").pull(sid, len(data), [holder.address])
    finally:
        holder.stop()


def test_sealed_copies_and_downloads_over_mtls(ca, tmp_path):
    """Encrypted at rest, over TLS: a node with the same key gets the sealed chunks (kept
    byte for byte); a user's download gets verified plaintext."""
    key = ShardCipher(bytes(range(32)))
    src = ShardStore(tmp_path / "src", cipher=key)
    data = bytes(range(256)) * (CHUNK // 128 + 3)
    sid = content_id(data)
    with src.writer(sid, len(data)) as w:
        w.write(data)
        w.commit()
    holder = _Holder(src, TlsConfig(str(ca), "n1"))
    try:
        node = ShardStore(tmp_path / "node", cipher=key)
        assert Puller(node, transport="socket", tls=TlsConfig(str(ca), "n2")).pull(
            sid, len(data), [holder.address]) == len(data)
        assert node.path(sid).read_bytes() == src.path(sid).read_bytes() and node.verify(sid)
        user = ShardStore(tmp_path / "user")
        assert Puller(user, transport="socket", tls=TlsConfig(str(ca), "bob")).pull(
            sid, len(data), [holder.address]) == len(data)
        assert user.path(sid).read_bytes() == data
    finally:
        holder.stop()


async def test_raft_transport_over_mtls(ca):
    received: list = []

    class Node:
        node_id = "127.0.0.1:0"

        def receive(self, messages):
            received.extend(messages)

        def raft_members(self):
            return {"me"}  # no PeerCheck here (tls not given): tests/unit/test_raft_peer_auth.py

    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", TlsConfig(str(ca), "n2").server_credentials())
    node = Node()
    node.node_id = f"127.0.0.1:{port}"
    add_raft_servicer(server, node)
    await server.start()
    transport = GrpcTransport({node.node_id: node.node_id}, tls=TlsConfig(str(ca), "n1"))
    try:
        transport.send([VoteRequest("me", node.node_id, 3, 0, 0)])
        for _ in range(200):
            if received:
                break
            await asyncio.sleep(0.02)
        assert [type(m).__name__ for m in received] == ["VoteRequest"]
    finally:
        await transport.close()
        await server.stop(0)


def test_every_channel_the_clients_too_dials_with_the_one_set_of_options(monkeypatch) -> None:
    """One home for channel options (grpc_util.CHANNEL_OPTIONS): agents' aio channels and
    the client library's sync ones get the same limits, backoff and keepalive."""
    from lepton.client.client import Client
    from lepton.common.grpc_util import CHANNEL_OPTIONS

    seen: list[list] = []
    real_sync, real_aio = grpc.insecure_channel, grpc.aio.insecure_channel

    def spy(real):
        def channel(address, options=None, **kw):
            seen.append(list(options))
            return real(address, options=options, **kw)
        return channel

    monkeypatch.setattr(grpc, "insecure_channel", spy(real_sync))
    monkeypatch.setattr(grpc.aio, "insecure_channel", spy(real_aio))
    async def aio_channel() -> None:
        await make_channel("127.0.0.1:1").close()

    make_channel("127.0.0.1:1", aio=False).close()
    asyncio.run(aio_channel())
    client = Client("127.0.0.1:1", tls_dir="", token="")
    try:
        client._conn("127.0.0.1:1")
    finally:
        client.close()
    assert seen == [list(CHANNEL_OPTIONS)] * 3
    assert ("grpc.keepalive_time_ms", 10_000) in CHANNEL_OPTIONS
