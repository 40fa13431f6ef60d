"""The server side of the error boundary, plus small gRPC helpers shared by all services."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from lepton.common.errors import LEADER_METADATA_KEY, InvalidArgument, LeptonError, NotLeader

logger = logging.getLogger(__name__)

# Bounds every message; a peer cannot make us buffer more than this per call.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # Agents ping every second on long-lived streams; allow it rather than GOAWAY them.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
    # Calls the server has not yet taken off its queue: past 1,000 (waiting 30 s) or 3,000,
    # gRPC refuses new ones. Thousands of agents open their streams at once after a failover
    # (benchmarks/heartbeats.py: ~1 in 5 of 5,000 refused): let them queue instead.
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 50_000),
]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Fail fast and reconnect quickly: leader failover should cost ~a second, not 20.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
    # Keepalive finds dead connections that nothing writes to. Gentle on purpose: a busy
    # leader that cannot answer a ping within a second would otherwise see thousands of
    # agent connections torn down at once. Hung leaders are found by the heartbeat answers.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


async def _abort(context: grpc.aio.ServicerContext, err: LeptonError) -> None:
    if isinstance(err, NotLeader) and err.leader:
        context.set_trailing_metadata(((LEADER_METADATA_KEY, err.leader),))
    await context.abort(err.code, err.message)


def rpc_boundary(method: Callable[..., Any]) -> Callable[..., Any]:
    """Map LeptonError to its status code; anything else is INTERNAL and logged once.

    Works for unary methods and for server-streaming async generators.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except LeptonError as err:
                await _abort(context, err)
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception:
                logger.exception("%s failed", method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}")

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except LeptonError as err:
            await _abort(context, err)
        except grpc.aio.AbortError:
            raise
        except Exception:
            logger.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}")

    return unary_wrapper


def register_service(server: grpc.aio.Server, servicer: Any, service: Any) -> None:
    """Register `servicer` for the proto `service` descriptor, parsing requests ourselves.

    grpc's own deserializer turns a malformed request into INTERNAL; parsing inside the
    handler lets us answer INVALID_ARGUMENT and say which message did not parse.
    """
    from google.protobuf import message_factory
    from google.protobuf.message import DecodeError

    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        impl = getattr(servicer, method.name)

        def parse(raw: bytes, cls: Any = request_cls) -> Any:
            try:
                return cls.FromString(raw)
            except (DecodeError, RuntimeWarning, ValueError) as err:
                raise _Malformed(f"malformed {cls.DESCRIPTOR.name}: {err}") from None

        if method.client_streaming and method.server_streaming:

            async def bidi(raw_iter: Any, context: Any, impl: Any = impl, parse: Any = parse) -> Any:
                async def requests() -> AsyncIterator[Any]:
                    async for raw in raw_iter:
                        try:
                            yield parse(raw)
                        except _Malformed as err:  # seen by the servicer's own boundary
                            raise InvalidArgument(str(err)) from None

                try:
                    async for item in impl(requests(), context):
                        yield item
                except LeptonError as err:  # servicers without their own boundary
                    await _abort(context, err)

            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                bidi, response_serializer=_serialize
            )
        elif method.client_streaming:
            raise NotImplementedError(f"client-streaming {method.full_name} is not supported")
        elif method.server_streaming:

            async def stream(raw: bytes, context: Any, impl: Any = impl, parse: Any = parse) -> Any:
                try:
                    request = parse(raw)
                except _Malformed as err:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
                async for item in impl(request, context):
                    yield item

            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                stream, response_serializer=_serialize
            )
        else:

            async def unary(raw: bytes, context: Any, impl: Any = impl, parse: Any = parse) -> Any:
                try:
                    request = parse(raw)
                except _Malformed as err:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
                return await impl(request, context)

            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                unary, response_serializer=_serialize
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


class _Malformed(Exception):
    pass


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()
