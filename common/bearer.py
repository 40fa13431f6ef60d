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

    def _intercept(self, continuation, client_call_details, request_or_iterator):
        metadata = _with_token(client_call_details.metadata, self._token)
        return continuation(_SyncDetails(client_call_details, metadata), request_or_iterator)

    intercept_unary_unary = intercept_unary_stream = _intercept
    intercept_stream_unary = intercept_stream_stream = _intercept


class _AioBearer:
    """The token on a grpc.aio call, whatever its shape."""

    def __init__(self, token: str):
        self._token = token

    async def _intercept(self, continuation, client_call_details, request_or_iterator):
        d = client_call_details
        details = grpc.aio.ClientCallDetails(
            d.method, d.timeout, _with_token(d.metadata, self._token), d.credentials, d.wait_for_ready
        )
        return await continuation(details, request_or_iterator)

    intercept_unary_unary = intercept_unary_stream = _intercept
    intercept_stream_unary = intercept_stream_stream = _intercept


# grpc.aio files an interceptor under the first of the four interfaces it implements (an
# if/elif chain), so one class cannot serve them all: one subclass per interface.
_AIO_BEARERS = [
    type(f"_AioBearer{base.__name__}", (_AioBearer, base), {})
    for base in (grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor,
                 grpc.aio.StreamUnaryClientInterceptor, grpc.aio.StreamStreamClientInterceptor)
]


def aio_interceptors(token: str | None = None) -> list[Any]:
    """Interceptors for `grpc.aio.*_channel(interceptors=...)`; [] without a token.
    `token=None`: the process default."""
    token = _DEFAULT if token is None else token.strip()
    if not token:
        return []
    return [cls(token) for cls in _AIO_BEARERS]


def wrap_sync(channel: grpc.Channel, token: str | None = None) -> grpc.Channel:
    """A sync channel that sends the token (`None`: the process default); unchanged without one."""
    token = _DEFAULT if token is None else token.strip()
    return grpc.intercept_channel(channel, _SyncBearer(token)) if token else channel
