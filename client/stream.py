"""`Client`'s server streams (a watch, following logs) as iterators of typed items."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from lepton.common.errors import Cancelled, NotLeader, Unavailable, from_rpc_error

from ._transport import retryable, transport_failure

if TYPE_CHECKING:
    from ._calls import LeaderCalls, _Conn

T = TypeVar("T")


class Stream(Iterator[T]):
    """A server stream as an iterator of typed items; also a context manager.

    The call is sent to the current address when the stream is made, so that a watch sees
    changes from (about) that moment, not from the first `next()`. The first `next()`
    reveals whether that server serves it; if not (a follower, unreachable), the leader is
    found as for a unary call, within `timeout`, and the stream reopened there.
    `cancel()` may be called from any thread; a cancelled stream just stops iterating. A
    stream that breaks after it opened raises: there is no resume point, so the caller
    re-reads what it needs and opens a new one.
    """

    def __init__(
        self,
        client: LeaderCalls,
        stub_cls: type,
        method: str,
        request: Any,
        convert: Callable[[Any], T],
        timeout: float | None,
    ):
        self._client = client
        self._stub_cls = stub_cls
        self._method = method
        self._request = request
        self._convert = convert
        self._timeout = timeout
        self._lock = threading.Lock()
        self._call: Any = None
        self._open_call: Any = None
        self._cancelled = False
        self._eager: tuple[Any, str] | None = None

    def _start(self) -> None:
        """Send the call now, to the address the client would try first."""
        addr = self._client.current_address
        call = getattr(self._client._conn(addr).stub(self._stub_cls), self._method)(self._request)
        with self._lock:
            self._call = call
        self._eager = (call, addr)

    def __iter__(self) -> Stream[T]:
        return self

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def close(self) -> None:
        self.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """End the stream; a `next()` blocked in another thread then raises StopIteration."""
        with self._lock:
            self._cancelled = True
            call = self._call
        if call is not None:
            call.cancel()

    def _attempt(self, conn: _Conn, _attempt_timeout: float) -> Any:
        # No deadline: a stream lives until cancelled. Its errors (a follower's redirect, an
        # unreachable server) only show on the first read, so that read is the attempt.
        call = getattr(conn.stub(self._stub_cls), self._method)(self._request)
        with self._lock:
            self._call = call
            cancelled = self._cancelled
        if cancelled:
            call.cancel()
        return next(call)

    def __next__(self) -> T:
        if self._cancelled:
            raise StopIteration
        try:
            if self._open_call is None:
                return self._convert(self._first())
            return self._convert(next(self._open_call))
        except grpc.RpcError as err:
            if self._cancelled:
                raise StopIteration from None
            failure = transport_failure(err)
            if failure is not None:
                addr = self._client.current_address
                raise Unavailable(
                    f"{self._method} stream from {addr} ended: {failure.reason}"
                ) from None
            raise from_rpc_error(err) from None
        except Cancelled:
            if self._cancelled:
                raise StopIteration from None
            raise

    def _first(self) -> Any:
        start: str | None = None
        if self._eager is not None:
            (call, addr), self._eager = self._eager, None
            try:
                first = next(call)
            except grpc.RpcError as err:
                if self._cancelled or not retryable(err):
                    raise
                exc = from_rpc_error(err)
                if isinstance(exc, NotLeader) and exc.leader:
                    self._client._learn(exc.leader)
                    start = exc.leader
                elif transport_failure(err) is not None:
                    start = self._client._after(addr)
            else:
                self._client._set_current(addr)
                self._open_call = call
                return first
        first = self._client._call(
            self._attempt, what=self._method, idempotent=True, timeout=self._timeout, start=start
        )
        self._open_call = self._call
        return first

