"""The bearer token reaches the server on every call shape, from grpc.aio and sync channels
alike, and replaces any `authorization` the caller set itself."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from lepton.common import bearer

SHAPES = ("UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream")


def _seen(context) -> bytes:
    values = [v for k, v in context.invocation_metadata() if k == "authorization"]
    return ",".join(values).encode()


class _Echo(grpc.GenericRpcHandler):
    """Answers every shape with the `authorization` values it was sent (raw bytes)."""

    def service(self, details):
        shape = details.method.rsplit("/", 1)[-1]

        async def unary_unary(request, context):
            return _seen(context)

        async def unary_stream(request, context):
            yield _seen(context)

        async def stream_unary(requests, context):
            async for _ in requests:
                pass
            return _seen(context)

        async def stream_stream(requests, context):
            async for _ in requests:
                pass
            yield _seen(context)

        return {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
            "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
        }.get(shape)


@pytest.fixture
async def address():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_Echo(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


CALLER_METADATA = (("authorization", "Bearer forged"), ("x-other", "kept"))


async def _aio_calls(address: str, interceptors: list) -> dict[str, bytes]:
    async with grpc.aio.insecure_channel(address, interceptors=interceptors) as ch:
        md = CALLER_METADATA
        got = {"UnaryUnary": await ch.unary_unary("/t.Echo/UnaryUnary")(b"x", metadata=md)}
        got["UnaryStream"] = b"".join([r async for r in ch.unary_stream("/t.Echo/UnaryStream")(b"x", metadata=md)])
        got["StreamUnary"] = await ch.stream_unary("/t.Echo/StreamUnary")(iter([b"x"]), metadata=md)
        got["StreamStream"] = b"".join(
            [r async for r in ch.stream_stream("/t.Echo/StreamStream")(iter([b"x"]), metadata=md)]
        )
        return got


def _sync_calls(address: str, token: str | None) -> dict[str, bytes]:
    with grpc.insecure_channel(address) as raw:
        ch = bearer.wrap_sync(raw, token)
        md = CALLER_METADATA
        return {
            "UnaryUnary": ch.unary_unary("/t.Echo/UnaryUnary")(b"x", metadata=md),
            "UnaryStream": b"".join(ch.unary_stream("/t.Echo/UnaryStream")(b"x", metadata=md)),
            "StreamUnary": ch.stream_unary("/t.Echo/StreamUnary")(iter([b"x"]), metadata=md),
            "StreamStream": b"".join(ch.stream_stream("/t.Echo/StreamStream")(iter([b"x"]), metadata=md)),
        }


async def test_aio_channel_sends_the_token_on_every_shape(address: str) -> None:
    got = await _aio_calls(address, bearer.aio_interceptors("lep_tok"))
    assert got == {shape: b"Bearer lep_tok" for shape in SHAPES}


async def test_sync_channel_sends_the_token_on_every_shape(address: str) -> None:
    got = await asyncio.to_thread(_sync_calls, address, " lep_tok ")
    assert got == {shape: b"Bearer lep_tok" for shape in SHAPES}


async def test_process_default_and_no_token(address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bearer, "_DEFAULT", "")
    assert bearer.aio_interceptors() == []
    got = await asyncio.to_thread(_sync_calls, address, None)
    assert got == {shape: b"Bearer forged" for shape in SHAPES}  # untouched without a token
    bearer.set_default_token("lep_default\n")
    got = await _aio_calls(address, bearer.aio_interceptors())
    assert got == {shape: b"Bearer lep_default" for shape in SHAPES}
