"""Bearer tokens on outgoing calls: `authorization: Bearer <token>` metadata on every RPC.

`lepton.common.channels.make_channel` adds it to the channels it makes: the token given to
it, else the process default set with `set_default_token` (an agent without TLS sets its
cluster node token there, so heartbeats, Raft and shard moves authenticate as a node).
A client process (lepton-ctl) never sets a default; `Client(token=...)` passes its own.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

logger = logging.getLogger(__name__)

_DEFAULT: str = ""


def set_default_token(token: str) -> None:
    """The token every channel made from now on sends when none is given ("" = none)."""
    global _DEFAULT
    _DEFAULT = token.strip()


def default_token() -> str:
    return _DEFAULT


def _with_token(metadata: Any, token: str) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in (metadata or ()) if k != "authorization"]
    out.append(("authorization", f"Bearer {token}"))
    return out


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list[tuple[str, str]]):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _SyncBearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _SyncDetails(d, _with_token(d.metadata, self._token))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def _aio_details(d: Any, token: str) -> Any:
    return grpc.aio.ClientCallDetails(
        d.method, d.timeout, _with_token(d.metadata, token), d.credentials, d.wait_for_ready
    )


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_aio_details(client_call_details, self._token), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_aio_details(client_call_details, self._token), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_aio_details(client_call_details, self._token), request_iterator)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_aio_details(client_call_details, self._token), request_iterator)


def aio_interceptors(token: str | None = None) -> list[Any]:
    """Interceptors for `grpc.aio.*_channel(interceptors=...)`; [] without a token.
    `token=None`: the process default."""
    token = _DEFAULT if token is None else token.strip()
    if not token:
        return []
    return [_AioUnaryUnary(token), _AioUnaryStream(token), _AioStreamUnary(token), _AioStreamStream(token)]


def wrap_sync(channel: grpc.Channel, token: str | None = None) -> grpc.Channel:
    """A sync channel that sends the token (`None`: the process default); unchanged without one."""
    token = _DEFAULT if token is None else token.strip()
    return grpc.intercept_channel(channel, _SyncBearer(token)) if token else channel
