"""One registration boundary (issue 12): services registered through `register_service` answer
malformed input with INVALID_ARGUMENT, never UNKNOWN, and log no traceback; grpc_health's
Watch (a coroutine writing with context.write) works; a method left to the generated base
class is a quiet UNIMPLEMENTED."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lepton.common.channels import make_channel
from lepton.common.errors import NotFound
from lepton.common.grpc_util import register_service

SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]


async def _server(servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    register_service(server, servicer, SERVICE)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_health_watch_list_and_garbage(caplog):
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server, address = await _server(servicer)
    channel = make_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)
    caplog.set_level(logging.DEBUG)
    try:
        watch = stub.Watch(health_pb2.HealthCheckRequest())
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        assert await _code(stub.List(health_pb2.HealthListRequest())) == grpc.StatusCode.UNIMPLEMENTED
        for method in ("Check", "Watch", "List"):
            raw = channel.unary_unary(f"/grpc.health.v1.Health/{method}") if method != "Watch" \
                else channel.unary_stream(f"/grpc.health.v1.Health/{method}")
            call = raw(b"\x0a\xff\xff\xff")
            if method == "Watch":
                code = grpc.StatusCode.OK
                try:
                    async for _ in call:
                        pass
                except grpc.aio.AioRpcError as err:
                    code = err.code()
            else:
                code = await _code(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, method
        assert not [r for r in caplog.records if r.exc_info], "a request put a traceback in the log"
    finally:
        await channel.close()
        await server.stop(0)


async def test_errors_from_a_servicer_without_its_own_boundary_keep_their_status():
    class Broken(health_pb2_grpc.HealthServicer):
        async def Check(self, request, context):  # noqa: N802 - gRPC method name
            raise NotFound(f"no service {request.service!r}")

    server, address = await _server(Broken())
    channel = make_channel(address)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        assert await _code(stub.Check(health_pb2.HealthCheckRequest(service="x"))) == grpc.StatusCode.NOT_FOUND
    finally:
        await channel.close()
        await server.stop(0)


async def test_rpc_boundary_gives_lepton_errors_their_status_and_bugs_internal(caplog):
    """rpc_boundary, unary and streaming: a LeptonError is its own status (a follower's
    leader hint in the trailers), anything else INTERNAL with one traceback logged."""
    from lepton.common.errors import LEADER_METADATA_KEY, NotLeader
    from lepton.common.grpc_util import rpc_boundary

    class Servicer(health_pb2_grpc.HealthServicer):
        @rpc_boundary
        async def Check(self, request, context):  # noqa: N802 - gRPC method name
            if request.service == "follower":
                raise NotLeader(leader="10.0.0.9:7070")
            raise RuntimeError("a bug")

        @rpc_boundary
        async def Watch(self, request, context):  # noqa: N802 - gRPC method name
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
            if request.service == "gone":
                raise NotFound("no such service")
            raise RuntimeError("a streaming bug")

    server, address = await _server(Servicer())
    channel = make_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)
    caplog.set_level(logging.ERROR)
    try:
        call = stub.Check(health_pb2.HealthCheckRequest(service="follower"))
        assert await _code(call) == grpc.StatusCode.UNAVAILABLE
        assert (LEADER_METADATA_KEY, "10.0.0.9:7070") in tuple(await call.trailing_metadata())
        assert not caplog.records
        call = stub.Check(health_pb2.HealthCheckRequest(service="x"))
        assert await _code(call) == grpc.StatusCode.INTERNAL
        assert await call.details() == "internal error in Check"
        for service, want in (("gone", grpc.StatusCode.NOT_FOUND), ("x", grpc.StatusCode.INTERNAL)):
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=service))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            try:
                await watch.read()
            except grpc.aio.AioRpcError as err:
                assert err.code() == want, service
            else:
                raise AssertionError(f"{service}: the stream did not fail")
        assert [r.getMessage() for r in caplog.records if r.exc_info] == ["Check failed", "Watch failed"]
    finally:
        await channel.close()
        await server.stop(0)
