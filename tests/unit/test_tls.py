"""The cluster CA and mTLS: a real grpc.aio server on 127.0.0.1 refuses plaintext clients and
clients of another CA, and tells handlers who the verified peer is."""

from __future__ import annotations

import logging
import socket
import ssl
import stat
import threading

import grpc
import pytest
from cryptography import x509

from lepton.common import tls
from lepton.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument

METHOD = "/test.Echo/Who"


@pytest.fixture
def ca(tmp_path):
    d = tmp_path / "tls"
    tls.init_ca(d)
    return d


def _sans(path):
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return {str(v) for v in tls._cert_sans(cert)}


def test_init_ca_is_private_and_not_overwritten(ca):
    assert stat.S_IMODE((ca / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.stat().st_mode) == 0o700
    before = (ca / "ca.key").read_bytes()
    with pytest.raises(AlreadyExists):
        tls.init_ca(ca)
    assert (ca / "ca.key").read_bytes() == before


def test_issue_node_and_user_certs(ca):
    node = tls.issue(ca, "agent-1", kind="node", hosts=["10.0.0.5", "gpu-5.example.com"])
    assert stat.S_IMODE(node.key.stat().st_mode) == 0o600
    assert _sans(node.cert) >= {"10.0.0.5", "gpu-5.example.com", "127.0.0.1", "localhost", "::1"}
    cert = x509.load_pem_x509_certificate(node.cert.read_bytes())
    assert tls.identity_from_cert(cert) == tls.PeerIdentity("agent-1", "node", "node")

    user = tls.issue(ca, "alice", kind="user", role="viewer")
    cert = x509.load_pem_x509_certificate(user.cert.read_bytes())
    assert tls.identity_from_cert(cert) == tls.PeerIdentity("alice", "user", "viewer")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]  # cannot serve
    with pytest.raises(AlreadyExists):
        tls.issue(ca, "alice", kind="user", role="admin")


@pytest.mark.parametrize("kwargs", [
    {"name": "../etc/passwd"}, {"name": "ca"}, {"name": ""}, {"name": "a" * 65},
    {"name": "x", "kind": "root"}, {"name": "x", "kind": "user", "role": "node"},
    {"name": "x", "hosts": ["bad host!"]},
])
def test_issue_rejects_bad_input(ca, kwargs):
    with pytest.raises(InvalidArgument):
        tls.issue(ca, **kwargs)


def test_issue_without_ca_fails(tmp_path):
    with pytest.raises(FailedPrecondition):
        tls.issue(tmp_path, "agent-1")


# -- a real mTLS server ---------------------------------------------------------------------
async def _who(request: bytes, context) -> bytes:
    ident = tls.peer_identity(context)
    return b"-" if ident is None else f"{ident.kind}/{ident.name}/{ident.role}".encode()


@pytest.fixture
async def mtls_server(ca):
    tls.issue(ca, "server", kind="node")
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(_who)}),))
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(ca, "server"))
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def _call(channel: grpc.aio.Channel) -> bytes:
    async with channel:
        return await channel.unary_unary(METHOD)(b"", timeout=5)


async def test_mtls_accepts_cluster_certs_and_names_the_peer(ca, mtls_server):
    tls.issue(ca, "agent-2", kind="node")
    tls.issue(ca, "bob", kind="user", role="admin")
    creds = tls.channel_credentials(ca, "agent-2")
    assert await _call(grpc.aio.secure_channel(mtls_server, creds)) == b"node/agent-2/node"
    creds = tls.channel_credentials(ca, "bob")
    assert await _call(grpc.aio.secure_channel(mtls_server, creds)) == b"user/bob/admin"


async def test_mtls_refuses_plaintext_client(mtls_server):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _call(grpc.aio.insecure_channel(mtls_server))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_client_without_certificate(ca, mtls_server):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _call(grpc.aio.secure_channel(mtls_server, tls.channel_credentials(ca)))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_client_of_another_ca(tmp_path, ca, mtls_server):
    other = tmp_path / "other"
    tls.init_ca(other)
    tls.issue(other, "mallory", kind="user", role="admin")
    # Trusts our CA (so the server is accepted) but presents a foreign client certificate.
    creds = grpc.ssl_channel_credentials(
        root_certificates=(ca / "ca.crt").read_bytes(),
        private_key=(other / "mallory.key").read_bytes(),
        certificate_chain=(other / "mallory.crt").read_bytes(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _call(grpc.aio.secure_channel(mtls_server, creds))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_refuses_server_of_another_ca(tmp_path, ca):
    other = tmp_path / "other"
    tls.init_ca(other)
    tls.issue(other, "fake", kind="node")
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(_who)}),))
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(other, "fake"))
    await server.start()
    try:
        tls.issue(ca, "agent-3", kind="node")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(grpc.aio.secure_channel(f"127.0.0.1:{port}", tls.channel_credentials(ca, "agent-3")))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


# -- the agent's path: ensure_node_cert ---------------------------------------------------
def test_ensure_node_cert_issues_once_and_logs(ca, caplog):
    caplog.set_level(logging.INFO, logger="lepton.common.tls")
    paths = tls.ensure_node_cert(ca, "agent-7", ["10.1.2.3"])
    assert "issuing a new one" in caplog.text and "agent-7" in caplog.text
    first = paths.cert.read_bytes()
    caplog.clear()
    again = tls.ensure_node_cert(ca, "agent-7", ["10.1.2.3"])
    assert again.cert.read_bytes() == first and "issuing" not in caplog.text
    # A new address the certificate does not cover: re-issued.
    tls.ensure_node_cert(ca, "agent-7", ["10.1.2.3", "10.9.9.9"])
    assert paths.cert.read_bytes() != first and "10.9.9.9" in _sans(paths.cert)


def test_ensure_node_cert_replaces_a_foreign_or_user_cert(tmp_path, ca):
    other = tmp_path / "other"
    tls.init_ca(other)
    tls.issue(other, "agent-8", kind="node")
    for suffix in (".crt", ".key"):
        (ca / f"agent-8{suffix}").write_bytes((other / f"agent-8{suffix}").read_bytes())
    tls.ensure_node_cert(ca, "agent-8", [])
    assert tls._problem(ca, "agent-8", []) == ""
    tls.issue(ca, "agent-9", kind="user", role="admin")
    tls.ensure_node_cert(ca, "agent-9", [])
    cert = x509.load_pem_x509_certificate((ca / "agent-9.crt").read_bytes())
    assert tls.identity_from_cert(cert).kind == "node"


def test_ensure_node_cert_without_ca_key(tmp_path, ca):
    worker = tmp_path / "worker"
    worker.mkdir()
    with pytest.raises(FailedPrecondition, match="ca.crt"):
        tls.ensure_node_cert(worker, "w1", [])
    (worker / "ca.crt").write_bytes((ca / "ca.crt").read_bytes())
    with pytest.raises(FailedPrecondition, match="no CA key"):
        tls.ensure_node_cert(worker, "w1", [])
    # Issued where the CA key is and copied over: accepted as is.
    tls.issue(ca, "w1", kind="node", hosts=["10.0.0.9"])
    for suffix in (".crt", ".key"):
        (worker / f"w1{suffix}").write_bytes((ca / f"w1{suffix}").read_bytes())
    assert tls.ensure_node_cert(worker, "w1", ["10.0.0.9"]).cert == worker / "w1.crt"


# -- the raw-socket side channel ----------------------------------------------------------
def _serve_once(ctx: ssl.SSLContext, listener: socket.socket, seen: list) -> None:
    conn, _ = listener.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as s:
            seen.append(tls.identity_from_ssl(s))
            s.sendall(b"ok")
    except (ssl.SSLError, OSError) as err:
        seen.append(err)


@pytest.mark.parametrize("foreign", [False, True])
def test_ssl_context_pair(tmp_path, ca, foreign):
    tls.issue(ca, "holder", kind="node")
    if foreign:
        # Trusts our CA (so the holder is accepted) but presents a certificate of another CA.
        other = tmp_path / "other"
        tls.init_ca(other)
        tls.issue(other, "puller", kind="node")
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.load_verify_locations(cafile=str(ca / "ca.crt"))
        client_ctx.load_cert_chain(other / "puller.crt", other / "puller.key")
    else:
        tls.issue(ca, "puller", kind="node")
        client_ctx = tls.client_ssl_context(ca, "puller")
    server_ctx = tls.server_ssl_context(ca, "holder")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        seen: list = []
        t = threading.Thread(target=_serve_once, args=(server_ctx, listener, seen))
        t.start()
        raw = socket.create_connection(listener.getsockname(), timeout=5)
        try:
            with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                data = s.recv(2)
        except (ssl.SSLError, OSError):
            data = b""
        t.join(5)
    if foreign:
        assert data == b"" and isinstance(seen[0], (ssl.SSLError, OSError))
    else:
        assert data == b"ok" and seen == [tls.PeerIdentity("puller", "node", "node")]
