"""The server side of the error boundary, plus small gRPC helpers shared by all services."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from lepton.common.errors import (
    LEADER_METADATA_KEY,
    REASON_METADATA_KEY,
    RETRY_AFTER_METADATA_KEY,
    InvalidArgument,
    LeptonError,
    NotLeader,
    Overloaded,
)

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
# Every channel's options (channels.make_channel): agents, voters, lepton-ctl, the client
# library and tasks alike. No server sends more than MAX_MESSAGE_BYTES, so no client needs
# a larger receive limit.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Fail fast and reconnect quickly: leader failover should cost ~a second, not 20 (gRPC's
    # own backoff starts at 1 s and grows to 2 min, so short retries would hit a channel
    # still parked in TRANSIENT_FAILURE).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # No second layer of retries: the client and the agent's link retry themselves, knowing
    # which calls are idempotent.
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
    trailing = []
    if isinstance(err, NotLeader) and err.leader:
        trailing.append((LEADER_METADATA_KEY, err.leader))
    elif isinstance(err, Overloaded):
        trailing.append((RETRY_AFTER_METADATA_KEY, str(err.retry_after_ms)))
    if err.reason:
        trailing.append((REASON_METADATA_KEY, err.reason))
    if trailing:
        context.set_trailing_metadata(tuple(trailing))
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
            except (grpc.aio.BaseError, GeneratorExit):  # grpc's own: an abort, a call already over
                raise
            except Exception as err:  # noqa: BLE001 - the boundary: every error gets a status
                await _fail(context, err, method.__name__)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.BaseError:  # grpc's own: an abort, a call already over
            raise
        except Exception as err:  # noqa: BLE001 - the boundary: every error gets a status
            await _fail(context, err, method.__name__)

    return unary_wrapper


def register_service(server: grpc.aio.Server, servicer: Any, service: Any) -> None:
    """Register `servicer` for the proto `service` descriptor, parsing requests ourselves.

    Every service goes through here (ours, Raft, Health, reflection): grpc's own
    deserializer turns a malformed request into INTERNAL, and a generated handler turns
    any exception into UNKNOWN with a traceback in the log. Here a request that does not
    parse is INVALID_ARGUMENT naming the message, a LeptonError is its status, a method
    the servicer leaves to the generated base class is a quiet UNIMPLEMENTED, and a
    server-streaming method may be an async generator or a coroutine that writes with
    `context.write` (grpc_health's Watch).
    """
    from google.protobuf import message_factory

    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        impl = getattr(servicer, method.name)
        if _unimplemented(impl):
            impl = _answer_unimplemented(method.full_name)
        # What impl is called with: the parsed request, or an iterator of parsed requests.
        arg_of = _requests(request_cls) if method.client_streaming else functools.partial(_parse, cls=request_cls)
        answer = _answer_stream if method.server_streaming else _answer_once
        make = _HANDLER_MAKERS[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(answer(impl, arg_of), response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _parse(raw: bytes, cls: Any) -> Any:
    """Raises _Malformed for bytes that are not a `cls`."""
    from google.protobuf.message import DecodeError

    try:
        return cls.FromString(raw)
    except (DecodeError, RuntimeWarning, ValueError) as err:
        raise _Malformed(f"malformed {cls.DESCRIPTOR.name}: {err}") from None


async def _fail(context: Any, err: BaseException, name: str) -> None:
    """The status for an exception that left a handler: INVALID_ARGUMENT for a request
    that did not parse, a LeptonError's own code, else INTERNAL (a bug: logged once)."""
    if isinstance(err, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
    if isinstance(err, LeptonError):
        await _abort(context, err)
    logger.exception("%s failed", name)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}")


def _requests(cls: Any) -> Callable[[Any], AsyncIterator[Any]]:
    """A client stream's raw messages as parsed requests."""
    async def requests(raw_iter: Any) -> AsyncIterator[Any]:
        async for raw in raw_iter:
            try:
                yield _parse(raw, cls)
            except _Malformed as err:  # seen by the servicer's own boundary, if it has one
                raise InvalidArgument(str(err)) from None

    return requests


def _answer_once(impl: Callable[..., Any], arg_of: Callable[[Any], Any]) -> Callable[..., Any]:
    """One answer: `impl(arg_of(what came), context)`, a coroutine's or a plain method's."""
    async def answer(received: Any, context: Any) -> Any:
        try:
            result = impl(arg_of(received), context)
            return await result if inspect.isawaitable(result) else result
        except (grpc.aio.BaseError, asyncio.CancelledError):
            raise
        except Exception as err:  # noqa: BLE001 - the boundary: every error gets a status
            await _fail(context, err, impl.__name__)

    return answer


def _answer_stream(impl: Callable[..., Any], arg_of: Callable[[Any], Any]) -> Callable[..., Any]:
    """A stream of answers: an (async) generator's items, or a coroutine that writes them
    with context.write (grpc_health's Watch)."""
    async def stream(received: Any, context: Any) -> AsyncIterator[Any]:
        try:
            result = impl(arg_of(received), context)
            if inspect.isawaitable(result):
                await result
                return
            async for item in as_async_iter(result):
                yield item
        except (grpc.aio.BaseError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as err:  # noqa: BLE001 - the boundary: every error gets a status
            await _fail(context, err, impl.__name__)

    return stream


# (client streaming, server streaming) -> grpc's handler for that kind of method.
_HANDLER_MAKERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


async def as_async_iter(items: Any) -> AsyncIterator[Any]:
    """Async-iterate an async or a plain iterable (a sync servicer's stream)."""
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def _unimplemented(impl: Any) -> bool:
    """Whether `impl` is the generated base class's stub (raises NotImplementedError)."""
    return getattr(getattr(impl, "__func__", impl), "__module__", "").endswith("_pb2_grpc")


def _answer_unimplemented(name: str) -> Callable[..., Any]:
    async def unimplemented(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented")

    unimplemented.__name__ = name
    return unimplemented


class _Malformed(Exception):
    pass


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()
