"""How a `Client` reaches the leader: one channel per server, leader finding and retries.

Every call goes to the leader. The client starts with the address that answered last, follows
a follower's `lepton-leader` hint straight to the leader (each address at most once a round:
a stale hint naming an address already asked or found unreachable this round sends the call to
one not yet asked, and a round where every address refused or was unreachable ends in a
backoff), moves on to the next address when
one cannot be reached, and backs off (50 ms doubling to 1 s) until the call's time budget is
spent. A call the leader sheds (RESOURCE_EXHAUSTED with `retry-after-ms`, nothing done) is
sent again after that hint, within the budget. Failures surface only as
`lepton.common.errors.LeptonError` subclasses.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from lepton.common.channels import make_channel
from lepton.common.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    LeptonError,
    NotLeader,
    Overloaded,
    Unavailable,
    from_rpc_error,
)

from ._transport import transport_failure, unreachable_error

if TYPE_CHECKING:
    from .stream import Stream

# The client's logger since before this split: tests and benchmarks count "shed by" lines on it.
log = logging.getLogger("lepton.client.client")

DEFAULT_TIMEOUT = 10.0
# No server reachable at all for this long: say "cannot reach" rather than wait out the
# whole budget (a leader election is not this: the voters still answer).
CONNECT_TIMEOUT_S = 2.0

_BACKOFF_INITIAL_S = 0.05
_BACKOFF_MAX_S = 1.0
# With several servers known, one silent server (host down, packets dropped) must not eat
# the whole budget of an idempotent call: cap each attempt so the others get their turn.
_ATTEMPT_FRACTION = 1 / 3
_ATTEMPT_MIN_S = 1.0

T = TypeVar("T")


@dataclass
class _Conn:
    """One channel to one server, with its stubs made on first use."""

    address: str
    channel: grpc.Channel
    stubs: dict[type, Any] = field(default_factory=dict)

    def stub(self, cls: type[T]) -> T:
        stub = self.stubs.get(cls)
        if stub is None:
            stub = self.stubs[cls] = cls(self.channel)
        return stub


class LeaderCalls:
    """The call machinery of `Client` (a mixin: the client holds the state it uses)."""

    def _check_open(self) -> None:
        if self._closed:
            raise Cancelled("client is closed")

    def _conn(self, address: str) -> _Conn:
        with self._lock:
            self._check_open()
            conn = self._conns.get(address)
            if conn is None:
                conn = _Conn(address, make_channel(address, tls=self._tls, aio=False, token=self._token))
                self._conns[address] = conn
            return conn

    def _learn(self, address: str) -> None:
        with self._lock:
            if address not in self._addresses:
                self._addresses.append(address)

    def _set_current(self, address: str) -> None:
        with self._lock:
            self._current = address

    def _after(self, address: str) -> str:
        with self._lock:
            addrs = self._addresses
            i = addrs.index(address) if address in addrs else -1
            return addrs[(i + 1) % len(addrs)]

    def _not_in(self, asked: set[str]) -> str | None:
        """The first known address not in `asked`, or None."""
        with self._lock:
            return next((a for a in self._addresses if a not in asked), None)

    def _stream(
        self,
        stub_cls: type,
        method: str,
        request: Any,
        convert: Callable[[Any], T],
        timeout: float | None = None,
    ) -> Stream[T]:
        """A server stream on the leader; `close()` cancels it with the client."""
        from .stream import Stream

        self._check_open()
        stream = Stream(self, stub_cls, method, request, convert, timeout)
        with self._lock:
            self._streams.add(stream)
        stream._start()
        return stream

    def _unary(
        self,
        stub_cls: type,
        method: str,
        request: Any,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Any:
        """One unary RPC on the leader, with leader finding and retries."""

        def attempt(conn: _Conn, attempt_timeout: float) -> Any:
            return getattr(conn.stub(stub_cls), method)(request, timeout=attempt_timeout)

        return self._call(attempt, what=method, idempotent=idempotent, timeout=timeout)

    def _call(
        self,
        attempt: Callable[[_Conn, float], T],
        *,
        what: str,
        idempotent: bool,
        timeout: float | None,
        start: str | None = None,
    ) -> T:
        """Run `attempt` against servers until one, the leader, answers, or time runs out.

        Retries a follower's redirect and an unreachable server always (nothing was done);
        a server's own UNAVAILABLE, a dropped connection or a capped attempt's deadline only
        when `idempotent`, since the call may have taken effect.
        """
        budget = self._timeout if timeout is None else float(timeout)
        if budget <= 0:
            raise InvalidArgument(f"timeout must be positive, got {budget}")
        deadline = time.monotonic() + budget
        addr = start or self.current_address
        delay = _BACKOFF_INITIAL_S
        unreachable: dict[str, str] = {}  # this round's transport failures, for the message
        unreachable_since: float | None = None
        asked: set[str] = set()  # this round's addresses that refused or could not be reached
        last: LeptonError | None = None

        def backoff() -> None:
            nonlocal delay
            pause = min(delay * random.uniform(0.5, 1.0), max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            delay = min(delay * 2, _BACKOFF_MAX_S)
            asked.clear()  # a new round

        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                raise last or DeadlineExceeded(f"{what}: no answer within {budget:g}s")
            attempt_timeout = remaining
            if idempotent and len(self._addresses) > 1:
                attempt_timeout = min(remaining, max(_ATTEMPT_MIN_S, budget * _ATTEMPT_FRACTION))
            capped = attempt_timeout < remaining
            try:
                result = attempt(self._conn(addr), attempt_timeout)
            except grpc.RpcError as e:
                err = e  # `e` is unbound after the except block
                failure = transport_failure(err)
                code = err.code() if hasattr(err, "code") else None
            else:
                self._set_current(addr)
                return result

            if failure is not None:
                log.debug("%s: %s unreachable (%s)", what, addr, failure.reason)
                if failure.maybe_sent and not idempotent:
                    raise Unavailable(
                        f"lost connection to {addr} during {what}; its outcome is unknown"
                    )
                unreachable[addr] = failure.reason
                asked.add(addr)
                last = unreachable_error(unreachable)
                if unreachable_since is None:
                    unreachable_since = now
                if all(a in unreachable for a in self.addresses):
                    if time.monotonic() - unreachable_since >= self._connect_timeout:
                        raise last
                    backoff()
                    unreachable.clear()
                addr = self._after(addr)
                continue

            exc = from_rpc_error(err)
            unreachable.clear()
            unreachable_since = None
            if isinstance(exc, NotLeader) and exc.leader:
                # A follower refused the call before doing anything: always safe to redirect.
                log.debug("%s: %s is not the leader, trying %s", what, addr, exc.leader)
                last = exc
                self._learn(exc.leader)
                asked.add(addr)
                # A hint naming an address asked this round (itself, a circle of stale hints
                # mid-election, or the dead leader the followers still name): ask one not asked
                # yet; once every one refused or was unreachable, back off. (Following the dead
                # leader's hint again and again spun the client between it and one follower.)
                addr = exc.leader if exc.leader not in asked else self._not_in(asked)
                if addr is None:
                    backoff()
                    addr = exc.leader
                continue
            if code == grpc.StatusCode.UNIMPLEMENTED:
                # A wrong port (another service) or a server older than this client.
                exc = LeptonError(f"{addr} does not serve {what} ({exc.message})")
                exc.code = grpc.StatusCode.UNIMPLEMENTED
                raise exc
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                if capped and time.monotonic() < deadline:
                    log.debug("%s: %s did not answer in %.1fs", what, addr, attempt_timeout)
                    last = DeadlineExceeded(f"{addr} did not answer within {attempt_timeout:.1f}s")
                    addr = self._after(addr)
                    continue
                suffix = "" if idempotent else "; its outcome is unknown"
                raise DeadlineExceeded(f"{what}: no answer from {addr} within {budget:g}s{suffix}")
            if isinstance(exc, Overloaded):
                # Shed by the leader's admission before anything was done: always safe to
                # send again, after its hint (jittered, so shed clients do not return at once).
                pause = exc.retry_after_ms / 1000 * random.uniform(1.0, 1.5)
                if time.monotonic() + pause >= deadline:
                    raise exc
                log.debug("%s: shed by %s; retrying in %.2fs", what, addr, pause)
                last = exc
                time.sleep(pause)
                continue
            if isinstance(exc, Unavailable) and idempotent:
                # No leader yet (election), or this server is stopping: wait, try the next.
                log.debug("%s: %s unavailable: %s", what, addr, exc.message)
                last = exc
                backoff()
                addr = self._after(addr)
                continue
            raise exc
