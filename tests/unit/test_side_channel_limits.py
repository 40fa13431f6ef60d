"""Side-channel hardening (issue 12c): idle or slow connections never take a streaming slot
(200 of them do not stop a transfer, plain or TLS), and with TLS a ticket is redeemed only
by the certificate that asked for it."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest

from lepton.common import tls
from lepton.common.channels import TlsConfig
from lepton.common.tls import PeerIdentity
from lepton.dataplane.shards import CHUNK, ShardStore
from lepton.dataplane.side_channel import MAX_SERVING, TOKEN_BYTES
from lepton.dataplane.transfer import Puller
from tests.unit.test_channels import _Holder
from tests.unit.test_shards_transfer import nodes, put  # noqa: F401 - fixture

IDLE = 200


@pytest.fixture
def ca(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    tls.init_ca(d)
    tls.issue(d, "n1", kind="node")
    for name in ("alice", "bob"):
        tls.issue(d, name, kind="user", role="user")
    tls.issue(d, "task", kind="task")  # names nobody: what tasks connect with
    return d


@contextlib.contextmanager
def idle_connections(port: int, count: int = IDLE):
    """`count` TCP connections that never say anything."""
    with contextlib.ExitStack() as stack:
        for _ in range(count):
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        yield


def test_idle_connections_do_not_stop_a_transfer(nodes, tmp_path):  # noqa: F811
    src = nodes("src")
    sid, data = put(src.store, 3 * CHUNK + 5)
    assert IDLE > MAX_SERVING  # more than every slot: the old side channel hung here
    with idle_connections(src.side.port):
        dst = ShardStore(tmp_path / "dst")
        assert Puller(dst, transport="socket").pull(sid, len(data), [src.address]) == len(data)
    assert dst.path(sid).read_bytes() == data


def test_idle_connections_do_not_stop_a_tls_transfer(ca, tmp_path):
    src = ShardStore(tmp_path / "src")
    sid, data = put(src, 2 * CHUNK + 7)
    holder = _Holder(src, TlsConfig(str(ca), "n1"))
    try:
        with idle_connections(holder.side.port):
            dst = ShardStore(tmp_path / "dst")
            puller = Puller(dst, transport="socket", tls=TlsConfig(str(ca), "bob"))
            assert puller.pull(sid, len(data), [holder.address]) == len(data)
        assert dst.path(sid).read_bytes() == data
    finally:
        holder.stop()


def _redeem_as(ca, name: str, port: int, token: bytes) -> bytes:
    ctx = tls.client_ssl_context(ca, name)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(token)
            try:
                return s.recv(TOKEN_BYTES)
            except ConnectionResetError:
                return b""


def test_a_ticket_is_redeemed_only_by_its_holder(ca, tmp_path):
    src = ShardStore(tmp_path / "src")
    sid, _ = put(src, CHUNK + 1)
    holder = _Holder(src, TlsConfig(str(ca), "n1"))
    try:
        alice = PeerIdentity("alice", "user", "user")
        stolen = holder.side.issue(sid, 0, holder=alice)
        assert _redeem_as(ca, "bob", stolen.port, stolen.token) == b""  # bob's cert: nothing
        assert _redeem_as(ca, "alice", stolen.port, stolen.token) == b""  # one try only: spent
        ticket = holder.side.issue(sid, 0, holder=alice)
        assert len(_redeem_as(ca, "alice", ticket.port, ticket.token)) > 0  # frames flow
        # A ticket asked for with the task certificate: a named certificate cannot use it,
        # the task certificate can.
        anonymous = holder.side.issue(sid, 0, holder=None)
        assert _redeem_as(ca, "bob", anonymous.port, anonymous.token) == b""
        anonymous = holder.side.issue(sid, 0, holder=None)
        assert len(_redeem_as(ca, "task", anonymous.port, anonymous.token)) > 0
        # End to end: a task pulls over the side channel with its certificate.
        dst = ShardStore(tmp_path / "dst")
        assert Puller(dst, transport="socket", tls=TlsConfig(str(ca), "task")).pull(
            sid, CHUNK + 1, [holder.address]) == CHUNK + 1
    finally:
        holder.stop()


def test_a_peer_over_its_share_of_slots_waits_for_its_own(nodes, tmp_path, monkeypatch):  # noqa: F811
    from lepton.dataplane import side_channel

    monkeypatch.setattr(side_channel, "MAX_SERVING_PER_PEER", 1)
    src = nodes("src")
    shards = [put(src.store, 2 * CHUNK + i, seed=i) for i in range(4)]
    dst = ShardStore(tmp_path / "dst")
    result = Puller(dst, transport="socket").pull_many(
        [(sid, len(data), [src.address]) for sid, data in shards], parallel=4)
    assert (sorted(result.pulled), result.failed) == (sorted(sid for sid, _ in shards), {})


def test_a_flood_arriving_during_a_transfer_does_not_stop_it(nodes, tmp_path):  # noqa: F811
    src = nodes("src")
    shards = [put(src.store, CHUNK + i, seed=i) for i in range(8)]
    opened: list[socket.socket] = []

    def flood() -> None:
        for _ in range(IDLE):
            opened.append(socket.create_connection(("127.0.0.1", src.side.port), timeout=10))

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        result = Puller(ShardStore(tmp_path / "dst"), transport="socket").pull_many(
            [(sid, len(data), [src.address]) for sid, data in shards], parallel=4)
    finally:
        flooder.join()
        for s in opened:
            s.close()
    assert (len(result.pulled), result.failed) == (len(shards), {})
