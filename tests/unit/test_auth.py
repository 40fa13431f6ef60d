"""Tokens, the method table and AuthInterceptor, against real grpc.aio servers on 127.0.0.1
with a tiny test-only servicer registered under the real method names."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from lepton.common import auth, tls
from lepton.common.auth import AuthInterceptor, Role
from lepton.common.errors import InvalidArgument, PermissionDenied
from lepton.common.grpc_util import register_service
from lepton.v1 import agent_pb2
from lepton.v1.agent_pb2_grpc import AgentStub

from .token_fakes import TokenTable

OK = grpc.StatusCode.OK
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


# -- tokens and the table -----------------------------------------------------------------
def test_new_token_shape_and_hash():
    token, token_hash = auth.new_token()
    assert token.startswith("lep_") and len(token) == 4 + 12 + 1 + 43
    assert token not in token_hash and token_hash.startswith("sha256:")
    assert auth.hash_token(token) == token_hash
    assert auth.hash_token(token, b"pepper") != token_hash  # keyed
    assert auth.new_token()[0] != token
    with pytest.raises(InvalidArgument):
        auth.token_id("Bearer nonsense")


def test_match_token_proves_the_secret_and_refuses_revoked_and_malformed():
    table = TokenTable()
    token, record = table.create("alice", "user", now_ms=1000, ttl_s=10)
    assert table.lookup(token, now_ms=2000) == auth.Principal("alice", Role.USER, "token", record.id)
    assert table.lookup(token, now_ms=11_000) is None  # expired
    assert table.lookup(token[:-1] + ("A" if token[-1] != "A" else "B"), now_ms=2000) is None
    assert table.lookup("lep_000000000000_" + "A" * 43) is None
    assert table.lookup("x" * 10_000) is None
    table.revoke(record.id)
    assert table.lookup(token, now_ms=2000) is None


# -- the method table ---------------------------------------------------------------------
def test_every_lepton_method_has_an_explicit_rule():
    methods = auth.service_methods()
    assert "/lepton.v1.Coordinator/SubmitTask" in methods and "/lepton.v1.Raft/Send" in methods
    missing = [m for m in methods if m not in auth.POLICY]
    assert not missing, f"add these to auth.POLICY: {missing}"


def test_policy_invariants():
    for method, rule in auth.POLICY.items():
        if rule.min_role == Role.VIEWER or rule.public:
            assert rule.read, f"{method}: viewers only read"
    assert auth.rule_for("/lepton.v1.Future/Anything") == auth.ADMIN
    assert not auth.rule_for("/lepton.v1.Raft/Send").allows(Role.ADMIN)  # no person speaks Raft
    assert not auth.rule_for("/lepton.v1.Coordinator/ListNodes").allows(Role.NODE)


# -- a real server --------------------------------------------------------------------------
TASK_OWNER = "alice"


def _who() -> bytes:
    p = auth.current_principal()
    return b"anonymous" if p is None else f"{p.name}/{p.role.value}/{p.via}".encode()


async def _echo(request: bytes, context) -> bytes:
    await asyncio.sleep(0.01)  # interleave concurrent calls: the principal must not leak
    return _who()


async def _submit(request: bytes, context) -> bytes:
    try:
        return auth.effective_owner(request.decode()).encode()
    except PermissionDenied as err:
        await context.abort(err.code, err.message)


async def _cancel(request: bytes, context) -> bytes:
    try:
        auth.require_owner(TASK_OWNER, "task t1")
    except PermissionDenied as err:
        await context.abort(err.code, err.message)
    return b"cancelled"


async def _watch(request: bytes, context):
    for _ in range(2):
        yield _who()


async def _bidi(requests, context):
    async for _ in requests:
        yield _who()


def _handlers() -> list[grpc.GenericRpcHandler]:
    u = grpc.unary_unary_rpc_method_handler
    return [
        grpc.method_handlers_generic_handler("lepton.v1.Coordinator", {
            "ListNodes": u(_echo), "DrainNode": u(_echo), "RegisterNode": u(_echo),
            "SubmitTask": u(_submit), "CancelTask": u(_cancel), "NotInTable": u(_echo),
            "WatchNodes": grpc.unary_stream_rpc_method_handler(_watch),
            "HeartbeatStream": grpc.stream_stream_rpc_method_handler(_bidi),
        }),
        grpc.method_handlers_generic_handler("lepton.v1.Datasets", {"FutureMethod": u(_echo)}),
    ]


class Harness:
    def __init__(self) -> None:
        self.table = TokenTable()
        self.tokens = {
            "admin": self.table.create("root", "admin")[0],
            "alice": self.table.create("alice", "user")[0],
            "bob": self.table.create("bob", "user")[0],
            "viewer": self.table.create("vic", "viewer")[0],
            "node": self.table.create("agent-1", "node")[0],
        }
        revoked, rec = self.table.create("old", "admin")
        self.table.revoke(rec.id)
        self.tokens["revoked"] = revoked
        self.tokens["expired"] = self.table.create("temp", "admin", now_ms=0, ttl_s=1)[0]
        self.events: list[auth.AuthEvent] = []
        self.address = ""

    def interceptor(self) -> AuthInterceptor:
        return AuthInterceptor(self.table.lookup, on_event=self.events.append)

    async def start(self, server: grpc.aio.Server, port: int) -> None:
        server.add_generic_rpc_handlers(_handlers())
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        await hs.set("", health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self.address = f"127.0.0.1:{port}"


@pytest.fixture
async def plain():
    h = Harness()
    server = grpc.aio.server(interceptors=[h.interceptor()])
    await h.start(server, server.add_insecure_port("127.0.0.1:0"))
    h.channel = grpc.aio.insecure_channel(h.address)
    yield h
    await h.channel.close()
    await server.stop(None)


async def call(channel, method: str, who: str | None, tokens: dict, body: bytes = b"", *,
               metadata=None) -> tuple[grpc.StatusCode, str]:
    md = metadata if metadata is not None else (
        () if who is None else (("authorization", f"Bearer {tokens[who]}"),))
    try:
        out = await channel.unary_unary(method)(body, metadata=md, timeout=5)
        return OK, out.decode()
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()


MATRIX = [
    # method, {caller: expected code}
    ("/lepton.v1.Coordinator/ListNodes",
     {"admin": OK, "alice": OK, "viewer": OK, "node": UNAUTH, None: UNAUTH, "revoked": UNAUTH, "expired": UNAUTH}),
    ("/lepton.v1.Coordinator/DrainNode", {"admin": OK, "alice": DENIED, "viewer": DENIED, None: UNAUTH}),
    ("/lepton.v1.Coordinator/SubmitTask", {"admin": OK, "alice": OK, "viewer": DENIED, None: UNAUTH}),
    ("/lepton.v1.Coordinator/RegisterNode", {"admin": DENIED, "alice": DENIED, "viewer": DENIED}),
    ("/lepton.v1.Coordinator/NotInTable", {"admin": OK, "alice": DENIED, "viewer": DENIED}),
    ("/lepton.v1.Datasets/FutureMethod", {"admin": OK, "alice": DENIED, "viewer": DENIED, None: UNAUTH}),
]


@pytest.mark.parametrize("method, expected", MATRIX, ids=[m.rsplit("/", 1)[1] for m, _ in MATRIX])
async def test_role_matrix(plain, method, expected):
    for who, code in expected.items():
        got, details = await call(plain.channel, method, who, plain.tokens)
        assert got == code, f"{who} calling {method}: {got} {details}"
        if code == DENIED:
            assert method in details and "needs role" in details
        if code == UNAUTH:
            assert method in details
        for secret in plain.tokens.values():
            assert secret not in details


async def test_refusals_say_what_is_needed(plain):
    code, details = await call(plain.channel, "/lepton.v1.Coordinator/DrainNode", "viewer", plain.tokens)
    assert details == "/lepton.v1.Coordinator/DrainNode needs role admin; vic has role viewer"
    code, details = await call(plain.channel, "/lepton.v1.Coordinator/RegisterNode", "alice", plain.tokens)
    assert "needs role node" in details
    code, details = await call(plain.channel, "/lepton.v1.Coordinator/ListNodes", None, plain.tokens)
    assert "needs credentials (role viewer)" in details and "Bearer" in details


@pytest.mark.parametrize("metadata", [
    (("authorization", "Basic YWxpY2U6cHc="),),
    (("authorization", "Bearer"),),
    (("authorization", "Bearer " + "lep_" + "0" * 12 + "_" + "A" * 43),),
    (("authorization", "Bearer " + "x" * 4000),),
])
async def test_malformed_or_forged_credentials(plain, metadata):
    code, details = await call(plain.channel, "/lepton.v1.Coordinator/ListNodes", None, {}, metadata=metadata)
    assert code == UNAUTH, details


async def test_two_authorization_headers_are_refused(plain):
    md = (("authorization", f"Bearer {plain.tokens['viewer']}"), ("authorization", f"Bearer {plain.tokens['admin']}"))
    code, details = await call(plain.channel, "/lepton.v1.Coordinator/DrainNode", None, {}, metadata=md)
    assert code == UNAUTH and "one authorization header" in details


async def test_health_is_public(plain):
    stub = health_pb2_grpc.HealthStub(plain.channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_ownership_through_current_principal(plain):
    submit, cancel = "/lepton.v1.Coordinator/SubmitTask", "/lepton.v1.Coordinator/CancelTask"
    assert await call(plain.channel, submit, "alice", plain.tokens, b"") == (OK, "alice")
    assert (await call(plain.channel, submit, "alice", plain.tokens, b"bob"))[0] == DENIED
    assert await call(plain.channel, submit, "admin", plain.tokens, b"bob") == (OK, "bob")
    assert (await call(plain.channel, cancel, "alice", plain.tokens))[0] == OK
    code, details = await call(plain.channel, cancel, "bob", plain.tokens)
    assert code == DENIED and "belongs to alice" in details
    assert (await call(plain.channel, cancel, "admin", plain.tokens))[0] == OK


async def test_principal_does_not_leak_between_concurrent_calls(plain):
    who = ["admin", "alice", "viewer", "bob"] * 10
    results = await asyncio.gather(*(
        call(plain.channel, "/lepton.v1.Coordinator/ListNodes", w, plain.tokens) for w in who))
    names = {"admin": "root", "alice": "alice", "viewer": "vic", "bob": "bob"}
    assert [r[1].split("/")[0] for r in results] == [names[w] for w in who]


async def test_streams_are_checked_before_the_first_message(plain):
    watch = plain.channel.unary_stream("/lepton.v1.Coordinator/WatchNodes")
    md = (("authorization", f"Bearer {plain.tokens['viewer']}"),)
    got = [m async for m in watch(b"", metadata=md, timeout=5)]
    assert got == [b"vic/viewer/token"] * 2
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [m async for m in watch(b"", timeout=5)]
    assert info.value.code() == UNAUTH
    bidi = plain.channel.stream_stream("/lepton.v1.Coordinator/HeartbeatStream")
    md = (("authorization", f"Bearer {plain.tokens['admin']}"),)
    # No message at all: the refusal cannot depend on one. (Sending one races the refusal:
    # grpc's client then reports its own failed write, "Internal error from Core".)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [m async for m in bidi(iter([]), metadata=md, timeout=5)]
    assert info.value.code() == DENIED


async def test_audit_events_for_writes_and_refusals_only(plain):
    plain.events.clear()
    await call(plain.channel, "/lepton.v1.Coordinator/ListNodes", "viewer", plain.tokens)  # a read
    await call(plain.channel, "/lepton.v1.Coordinator/DrainNode", "admin", plain.tokens, b"n1")
    await call(plain.channel, "/lepton.v1.Coordinator/DrainNode", "viewer", plain.tokens, b"n1")
    await call(plain.channel, "/lepton.v1.Coordinator/SubmitTask", "alice", plain.tokens, b"bob")
    await asyncio.sleep(0.05)
    got = [(e.principal.name if e.principal else None, e.method.rsplit("/", 1)[1], e.code) for e in plain.events]
    assert got == [("root", "DrainNode", OK), ("vic", "DrainNode", DENIED), ("alice", "SubmitTask", DENIED)]
    for secret in plain.tokens.values():
        assert secret not in repr(plain.events)


async def test_node_tokens_only_when_allowed():
    h = Harness()
    server = grpc.aio.server(interceptors=[AuthInterceptor(h.table.lookup, allow_node_tokens=True)])
    await h.start(server, server.add_insecure_port("127.0.0.1:0"))
    try:
        async with grpc.aio.insecure_channel(h.address) as ch:
            assert await call(ch, "/lepton.v1.Coordinator/RegisterNode", "node", h.tokens) == (OK, "agent-1/node/token")
            assert (await call(ch, "/lepton.v1.Coordinator/ListNodes", "node", h.tokens))[0] == DENIED
    finally:
        await server.stop(None)


# -- certificates as credentials -------------------------------------------------------------
async def test_certificate_principals(tmp_path):
    d = tmp_path / "tls"
    tls.init_ca(d)
    for name, kind, role in [("server", "node", ""), ("agent-2", "node", ""), ("carol", "user", "viewer")]:
        tls.issue(d, name, kind=kind, role=role or "user")
    h = Harness()
    server = grpc.aio.server(interceptors=[h.interceptor()])
    await h.start(server, server.add_secure_port("127.0.0.1:0", tls.server_credentials(d, "server")))
    try:
        async with grpc.aio.secure_channel(h.address, tls.channel_credentials(d, "agent-2")) as ch:
            assert await call(ch, "/lepton.v1.Coordinator/RegisterNode", None, {}) == (OK, "agent-2/node/certificate")
            bidi = ch.stream_stream("/lepton.v1.Coordinator/HeartbeatStream")
            assert [m async for m in bidi(iter([b"a", b"b"]), timeout=5)] == [b"agent-2/node/certificate"] * 2
            assert (await call(ch, "/lepton.v1.Coordinator/ListNodes", None, {}))[0] == DENIED
            assert (await call(ch, "/lepton.v1.Coordinator/DrainNode", None, {}))[0] == DENIED
        async with grpc.aio.secure_channel(h.address, tls.channel_credentials(d, "carol")) as ch:
            assert await call(ch, "/lepton.v1.Coordinator/ListNodes", None, {}) == (OK, "carol/viewer/certificate")
            assert (await call(ch, "/lepton.v1.Coordinator/SubmitTask", None, {}))[0] == DENIED
            # A token on top of the certificate wins; a bad one is refused, not ignored.
            assert await call(ch, "/lepton.v1.Coordinator/DrainNode", "admin", h.tokens) == (OK, "root/admin/token")
            assert (await call(ch, "/lepton.v1.Coordinator/ListNodes", "revoked", h.tokens))[0] == UNAUTH
    finally:
        await server.stop(None)



# -- with the project's own handler registration --------------------------------------------
class _FakeAgent:
    """Test-only: the real Agent service descriptor, a fake body."""

    async def StreamLogs(self, request, context):
        p = auth.current_principal()
        yield agent_pb2.LogChunk(data=f"{p.name}:{request.task_id}".encode())


async def test_works_with_register_service_and_reflection():
    table = TokenTable()
    viewer = table.create("vic", "viewer")[0]
    server = grpc.aio.server(interceptors=[AuthInterceptor(table.lookup)])
    register_service(server, _FakeAgent(), agent_pb2.DESCRIPTOR.services_by_name["Agent"])
    reflection.enable_server_reflection(["lepton.v1.Agent", reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    md = (("authorization", f"Bearer {viewer}"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            logs = AgentStub(ch).StreamLogs
            got = [c.data async for c in logs(agent_pb2.StreamLogsRequest(task_id="t1"), metadata=md)]
            assert got == [b"vic:t1"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [c async for c in logs(agent_pb2.StreamLogsRequest(task_id="t1"))]
            assert info.value.code() == UNAUTH
            with pytest.raises(grpc.aio.AioRpcError) as info:  # still parsed by our handler
                [c async for c in ch.unary_stream("/lepton.v1.Agent/StreamLogs")(b"\xff\xff", metadata=md)]
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            out = [r async for r in stub.ServerReflectionInfo(iter([req]), metadata=md)]
            assert "lepton.v1.Agent" in [s.name for s in out[0].list_services_response.service]
    finally:
        await server.stop(None)
