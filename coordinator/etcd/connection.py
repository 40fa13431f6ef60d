"""One gRPC channel to an etcd cluster, failing over between its endpoints.

The etcd client is aetcd's generated v3 stubs (`aetcd.rpc`) on a channel we open ourselves:
aetcd's own `Client` speaks to one plaintext endpoint, and we need TLS, several endpoints,
compares on create_revision, watches from a revision and compaction. etcd's errors become
Lepton's (`etcd_error`): unreachable is Unavailable naming the endpoints, never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import grpc
from aetcd import rpc

from lepton.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    LeptonError,
    ResourceExhausted,
    Unavailable,
)
from lepton.coordinator.etcd.tls import EtcdTls

logger = logging.getLogger(__name__)

# Snapshots are read back in pages; a page of log batches can reach a few request limits.
_MAX_RECEIVE = 64 << 20
# An unanswered channel is noticed within seconds even without calls in flight. etcd's
# --grpc-keepalive-min-time (5 s by default) refuses pings more frequent than that.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_RECEIVE),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# Codes after which another endpoint may serve better than this one.
_UNREACHABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


class Compacted(Unavailable):
    """The revision asked for (a watch's start, a pinned read) was compacted away: reload."""


class LeaseGone(Unavailable):
    """etcd no longer knows our lease (expired or revoked): a new one must be granted."""


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range cover every key starting with `prefix`."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdConnection:
    """Stubs over one channel to `endpoints[i]`; `failover(generation)` moves to the next
    endpoint (once per generation, however many callers saw the failure). Streams opened
    on the old channel end with an error when it closes, so their owners reopen them."""

    def __init__(self, endpoints: Sequence[str], tls: EtcdTls | None):
        if not endpoints:
            raise InvalidArgument("no etcd endpoints given")
        self.endpoints = list(endpoints)
        self._tls = tls
        self.credentials = _credentials(tls) if tls is not None else None
        self._index = 0
        self.generation = 0
        self._channel: grpc.aio.Channel | None = None
        self._closing: set[asyncio.Task] = set()
        self._open()

    @property
    def described(self) -> str:
        return ",".join(self.endpoints)

    @property
    def current(self) -> str:
        return self.endpoints[self._index]

    def _open(self) -> None:
        target = self.current
        if self.credentials is not None:
            self._channel = grpc.aio.secure_channel(target, self.credentials, CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target, CHANNEL_OPTIONS)
        self.kv = rpc.KVStub(self._channel)
        self.lease = rpc.LeaseStub(self._channel)
        self.watch = rpc.WatchStub(self._channel)
        self.cluster = rpc.ClusterStub(self._channel)
        self.maintenance = rpc.MaintenanceStub(self._channel)

    def failover(self, generation: int) -> None:
        """Move to the next endpoint unless someone already did since `generation`."""
        if generation != self.generation:
            return
        old = self._channel
        self._index = (self._index + 1) % len(self.endpoints)
        self.generation += 1
        self._open()
        if len(self.endpoints) > 1:
            logger.info("etcd: switching to endpoint %s", self.current)
        if old is not None:
            task = asyncio.ensure_future(old.close(grace=None))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def call(self, method, request, *, timeout: float):
        """`await method(request)` on the current channel. Raises the Lepton error for an
        etcd failure (see `etcd_error`); unreachable fails over to the next endpoint."""
        generation = self.generation
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise self.error(err, generation) from None
        except asyncio.CancelledError:
            if self.superseded(generation):
                raise Unavailable(f"etcd at {self.described}: the call was cut off by a switch of "
                                  f"endpoint; outcome unknown") from None
            raise

    def superseded(self, generation: int) -> bool:
        """Was a CancelledError just raised by closing the channel of `generation` (a
        failover) rather than by cancelling the task? grpc.aio cancels the calls of a
        channel it closes."""
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # Python 3.11+
        if cancelling is not None and cancelling():
            return False
        return generation != self.generation

    def error(self, err: grpc.aio.AioRpcError, generation: int) -> LeptonError:
        """Map etcd's status to a Lepton error; fail over when the endpoint seems down."""
        code, details = err.code(), err.details() or ""
        if code in _UNREACHABLE:
            self.failover(generation)
            return Unavailable(f"etcd at {self.described} is unreachable ({code.name}: {details})")
        return etcd_error(code, details, self.described)


def etcd_error(code: grpc.StatusCode, details: str, endpoints: str) -> LeptonError:
    if code is grpc.StatusCode.OUT_OF_RANGE or "compacted" in details:
        return Compacted(f"etcd at {endpoints}: {details}")
    if code is grpc.StatusCode.NOT_FOUND and "lease" in details:
        return LeaseGone(f"etcd at {endpoints}: {details}")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"etcd at {endpoints} refused the request: {details}")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "space" in details:  # the NOSPACE alarm (--quota-backend-bytes): defragment, disarm
            return ResourceExhausted(f"etcd at {endpoints} is out of space: {details}")
        return ResourceExhausted(f"etcd at {endpoints} is overloaded: {details}")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return FailedPrecondition(f"etcd at {endpoints} refused our credentials: {details}")
    return Unavailable(f"etcd at {endpoints} failed ({code.name}: {details})")


def _credentials(tls: EtcdTls) -> grpc.ChannelCredentials:
    if (tls.cert is None) != (tls.key is None):
        raise InvalidArgument("an etcd client certificate needs both --etcd-cert and --etcd-key")
    try:
        ca = Path(tls.ca).read_bytes()
        cert = Path(tls.cert).read_bytes() if tls.cert else None
        key = Path(tls.key).read_bytes() if tls.key else None
    except OSError as err:
        raise FailedPrecondition(f"cannot read the etcd TLS files: {err}") from None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
