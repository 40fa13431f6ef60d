"""Voter-only Raft (issue 12): only a member of the receiver's configuration may call Raft, as
itself. With TLS the caller's certificate must be the one served at the address it claims;
without TLS the call must carry the peer-secret MAC of that address."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from lepton.common import tls
from lepton.common.channels import TlsConfig, make_channel
from lepton.coordinator.raft.messages import VoteRequest
from lepton.coordinator.raft.peer_auth import peer_key, peer_metadata
from lepton.coordinator.raft.transport import GrpcTransport, add_raft_servicer, to_proto
from lepton.v1 import raft_pb2, raft_pb2_grpc


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    tls.init_ca(d)
    for name in ("v1", "v2", "worker"):
        tls.issue(d, name, kind="node")
    tls.issue(d, "alice", kind="user", role="admin")
    return d


class Node:
    """The receiver's side of RaftConsensus: what the servicer needs."""

    def __init__(self, node_id: str, members: set[str]):
        self.node_id = node_id
        self.members = members
        self.received: list = []
        self.peer_check = None  # set by add_raft_servicer, as on RaftConsensus

    def receive(self, messages):
        self.received.extend(messages)

    def raft_members(self):
        return self.members

    def probe_info(self):
        return 7, 42, True


async def _serve(cert: TlsConfig | None, node: Node | None = None, **check) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    if cert is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", cert.server_credentials())
    address = f"127.0.0.1:{port}"
    if node is not None:
        node.node_id = address
        add_raft_servicer(server, node, **check)
    await server.start()
    return server, address


def _batch(frm: str, to: str, term: int = 9) -> raft_pb2.RaftBatch:
    return raft_pb2.RaftBatch(messages=[to_proto(VoteRequest(frm, to, term, 0, 0))])


async def _write_all(call, *batches) -> None:
    """Write and half-close; the server may answer (and end the call) before we finish."""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        for batch in batches:
            await call.write(batch)
        await call.done_writing()


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def _delivered(transport: GrpcTransport, message: VoteRequest, node: Node, timeout: float = 60.0) -> None:
    """Send until it arrives, as Raft does (a send that fails is lost, and a busy machine
    may time out the receiver's first look at the sender's certificate)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not node.received:
        assert loop.time() < deadline, "the member's message never arrived"
        transport.send([message])
        await asyncio.sleep(0.5)


async def test_tls_only_the_member_serving_an_address_speaks_for_it(ca):
    v1, v2 = TlsConfig(str(ca), "v1"), TlsConfig(str(ca), "v2")
    member_server, member = await _serve(v1)  # voter v1 listens here: its Raft address
    node = Node("", set())
    server, address = await _serve(v2, node, tls=v2)
    node.members = {member, address}
    transport = GrpcTransport({address: address}, tls=v1, me=member)
    channels = []

    def stub(cert: str) -> raft_pb2_grpc.RaftStub:
        channels.append(make_channel(address, tls=TlsConfig(str(ca), cert)))
        return raft_pb2_grpc.RaftStub(channels[-1])

    try:
        await _delivered(transport, VoteRequest(member, address, 3, 0, 0), node)
        await asyncio.sleep(0.5)  # a resend in flight lands before we count
        assert {m.frm for m in node.received} == {member}
        before = len(node.received)

        # A worker's certificate and an admin's, each claiming to be the member.
        as_member = peer_metadata(member, None)
        for cert in ("worker", "alice"):
            assert await _code(stub(cert).Send(_batch(member, address), metadata=as_member)) \
                == grpc.StatusCode.PERMISSION_DENIED
            assert await _code(stub(cert).Probe(raft_pb2.RaftProbeRequest(), metadata=as_member)) \
                == grpc.StatusCode.PERMISSION_DENIED
            refused_before = node.peer_check.refused
            call = stub(cert).Stream(metadata=as_member)
            await _write_all(call, _batch(member, address))
            code, details = await call.code(), await call.details()
            if (code, details) == (grpc.StatusCode.INTERNAL, "Internal error from Core"):
                # grpc.aio's client bug (grpc/grpc#36066): a write that fails because the server
                # already ended the call overwrites the server's status. The server's own count
                # says whether it refused the stream (and `received` is checked below).
                assert node.peer_check.refused > refused_before
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, details
        # The member itself: not as someone else, not without naming itself, and no
        # address outside the configuration.
        legit = stub("v1")
        assert await _code(legit.Send(_batch("127.0.0.1:1", address), metadata=as_member)) \
            == grpc.StatusCode.PERMISSION_DENIED
        assert await _code(legit.Send(_batch(member, address))) == grpc.StatusCode.PERMISSION_DENIED
        outsider = peer_metadata("127.0.0.1:1", None)
        assert await _code(legit.Send(_batch("127.0.0.1:1", address), metadata=outsider)) \
            == grpc.StatusCode.PERMISSION_DENIED
        assert len(node.received) == before
        probe = await legit.Probe(raft_pb2.RaftProbeRequest(to_id=address), metadata=as_member)
        assert (probe.term, probe.last_index) == (7, 42)

        # Removed from the configuration: refused from then on.
        node.members = {address}
        assert await _code(legit.Send(_batch(member, address), metadata=as_member)) \
            == grpc.StatusCode.PERMISSION_DENIED
        assert node.peer_check.refused >= 10  # every refusal above is counted (a metric)
    finally:
        await transport.close()
        for ch in channels:
            await ch.close()
        await server.stop(0)
        await member_server.stop(0)


async def test_without_tls_the_peer_secret_proves_the_sender():
    key, wrong = peer_key(b"k" * 32), peer_key(b"w" * 32)
    member = "127.0.0.1:7101"
    node = Node("", {member})
    server, address = await _serve(None, node, peer_key=key)
    node.members.add(address)
    transport = GrpcTransport({address: address}, me=member, peer_key=key)
    channel = make_channel(address)
    stub = raft_pb2_grpc.RaftStub(channel)
    try:
        await _delivered(transport, VoteRequest(member, address, 3, 0, 0), node)
        await asyncio.sleep(0.5)
        before = len(node.received)
        for metadata in (peer_metadata(member, wrong), peer_metadata(member, None), ()):
            assert await _code(stub.Send(_batch(member, address), metadata=metadata)) \
                == grpc.StatusCode.PERMISSION_DENIED
        assert len(node.received) == before

        # A long-lived stream stops counting once its sender leaves the configuration.
        stream = stub.Stream(metadata=peer_metadata(member, key))
        await stream.write(_batch(member, address))
        await _until(lambda: len(node.received) == before + 1)
        node.members.discard(member)
        await _write_all(stream, _batch(member, address))
        assert await stream.code() == grpc.StatusCode.PERMISSION_DENIED
        assert len(node.received) == before + 1
    finally:
        await transport.close()
        await channel.close()
        await server.stop(0)


async def _until(predicate, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_malformed_raft_requests_are_invalid_argument():
    node = Node("", set())
    server, address = await _serve(None, node)  # no check: parsing comes first anyway
    channel = make_channel(address)
    try:
        for method in ("Send", "Probe"):
            call = channel.unary_unary(f"/lepton.v1.Raft/{method}")
            assert await _code(call(b"\xff\xff\xff")) == grpc.StatusCode.INVALID_ARGUMENT
        stream = channel.stream_unary("/lepton.v1.Raft/Stream")(iter([b"\x0a\x05\xff"]))
        assert await _code(stream) == grpc.StatusCode.INVALID_ARGUMENT
        assert node.received == []
    finally:
        await channel.close()
        await server.stop(0)


def test_refusals_are_exported_as_a_metric():
    from types import SimpleNamespace

    from lepton.agent.metrics import ClusterCollector

    consensus = SimpleNamespace(
        status=lambda: SimpleNamespace(term=1, commit_index=2, applied_index=2, voters=[]),
        is_leader=lambda: False,
        peer_check=SimpleNamespace(refused=3),
    )
    metrics = {m.name: m for m in ClusterCollector(consensus=consensus)._sample_raft()}
    assert [s.value for s in metrics["lepton_raft_peer_refused"].samples if s.name.endswith("_total")] == [3]


async def test_a_sender_we_do_not_know_counts_when_our_members_vouch_for_it():
    """A member that missed a configuration change asks the members it knows, but only about
    a sender that proved itself, and not again for every call."""
    key = peer_key(b"k" * 32)
    known, newcomer, stranger = "127.0.0.1:7201", "127.0.0.1:7202", "127.0.0.1:7203"
    asked: list[str] = []

    class Behind(Node):
        async def vouch_for(self, address):
            asked.append(address)
            return address == newcomer

    node = Behind("", {known})
    server, address = await _serve(None, node, peer_key=key)
    node.members.add(address)
    channel = make_channel(address)
    stub = raft_pb2_grpc.RaftStub(channel)
    try:
        assert await _code(stub.Send(_batch(newcomer, address), metadata=peer_metadata(newcomer, key))) \
            == grpc.StatusCode.OK
        assert await _code(stub.Send(_batch(newcomer, address), metadata=peer_metadata(newcomer, key))) \
            == grpc.StatusCode.OK
        assert asked == [newcomer]  # the answer is kept
        wrong = peer_key(b"w" * 32)
        assert await _code(stub.Send(_batch(stranger, address), metadata=peer_metadata(stranger, wrong))) \
            == grpc.StatusCode.PERMISSION_DENIED
        assert asked == [newcomer]  # an unproven sender makes us ask nobody
        for _ in range(3):
            assert await _code(stub.Send(_batch(stranger, address), metadata=peer_metadata(stranger, key))) \
                == grpc.StatusCode.PERMISSION_DENIED
        assert asked == [newcomer, stranger]  # a "no" is not asked again at once
        assert [m.frm for m in node.received] == [newcomer, newcomer]
        probe = await stub.Probe(raft_pb2.RaftProbeRequest(to_id=address), metadata=peer_metadata(known, key))
        assert set(probe.members) == {known, address}  # what a member behind would ask
    finally:
        await channel.close()
        await server.stop(0)
