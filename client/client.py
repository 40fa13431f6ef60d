"""The Lepton client: a synchronous, leader-finding wrapper around the coordinator's gRPC API.

    with Client("10.0.0.1:7070,10.0.0.2:7070,10.0.0.3:7070") as c:
        for node in c.nodes(states=["ready"]):
            print(node.name, node.capacity.memory_bytes)

Every call goes to the leader. The client starts with the address that answered last, follows
a follower's `lepton-leader` hint straight to the leader, moves on to the next address when
one cannot be reached, and backs off (50 ms doubling to 1 s) until the call's time budget is
spent. A call the leader sheds (RESOURCE_EXHAUSTED with `retry-after-ms`, nothing done) is
sent again after that hint, within the budget. Failures surface only as
`lepton.common.errors.LeptonError` subclasses.

New RPCs slot in as one method each: build the request, call `self._unary(Stub, "Method",
req, idempotent=...)` (or `self._stream(...)` for a server stream such as following task
logs), and convert the reply with a `types.*.from_proto`. Only a call that is safe to repeat
may be `idempotent`; a submit is not, unless it carries a client-chosen request id.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from lepton.common.channels import TlsConfig, client_tls, make_channel
from lepton.common.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    LeptonError,
    NotFound,
    NotLeader,
    Overloaded,
    Unavailable,
    from_rpc_error,
)
from lepton.common.paging import walk_pages
from lepton.common.validation import MAX_NAME, check_address, check_text, require_id
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1.coordinator_pb2_grpc import CoordinatorStub

from ._transport import retryable, transport_failure, unreachable_error
from .code import CodeMethods
from .contexts import DEFAULT_SERVER, resolve_connection
from .data import DataMethods
from .deployments import DeploymentMethods
from .jobs import JobMethods
from .predict import PredictMethods
from .tasks import TaskMethods
from .types import ClusterStatusInfo, NodeEvent, NodeInfo, state_to_proto

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_SERVER",
    "DEFAULT_TIMEOUT",
    "Client",
    "NodeWatch",
    "Stream",
    "parse_servers",
]

log = logging.getLogger(__name__)

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


def parse_servers(servers: str | Sequence[str]) -> list[str]:
    """`"a:1,b:2"` or `["a:1", "b:2"]` → `["a:1", "b:2"]`, checked and de-duplicated."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    out: list[str] = []
    for raw in items:
        addr = raw.strip()
        if not addr:
            continue
        check_address(addr, "server address")
        if addr not in out:
            out.append(addr)
    if not out:
        raise InvalidArgument("no server address given")
    return out


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


class Client(TaskMethods, JobMethods, DataMethods, CodeMethods, PredictMethods, DeploymentMethods):
    """A connection to a Lepton cluster; every call is sent to its current leader.

    `servers`: `"host:port"`, `"a:1,b:2,c:3"` or a list of addresses (any voters; the leader
    is found). Left out, as lepton-ctl does (`lepton.client.contexts.resolve_connection`):
    the context named by `context`, else `$LEPTON_SERVER`, else the current context of the
    client config file (`lepton-ctl config`), else 127.0.0.1:7070.
    `timeout`: the total time budget of one call, retries included.
    `connect_timeout`: give up when no server at all can be reached for this long (default
    2 s, CONNECT_TIMEOUT_S): "cannot reach" at once, not a long retry. A program that must
    ride out a whole-cluster restart passes more.
    `tls_dir`: a TLS folder (`lepton-ctl certs init`); every connection then uses mutual TLS
    with the certificate `cert_name` from it (default: `$LEPTON_CERT_NAME`, else `admin` if
    there is one, else the only user certificate there). Raises FailedPrecondition when
    there is none to use. Default `$LEPTON_TLS_DIR`, else the context's, "" for plaintext.
    `token`: an API token (`lepton-ctl tokens create`) sent on every call; default
    `$LEPTON_TOKEN`, else the context's, "" for none. A context's TLS folder and token are
    used only with its own servers. Inside a task, the agent sets all three: the task's own
    credential (its submitter's rights) and a TLS folder without any node identity.

    Nodes and the cluster are below; tasks (`submit`, `get`, `tasks`/`list`, `find_task`,
    `cancel`, `wait`, `logs`) come from `lepton.client.tasks.TaskMethods`; `predict` (any
    agent answers it) from `lepton.client.predict.PredictMethods`; deployments
    (`create_deployment`, `scale_deployment`, ...) from `lepton.client.deployments`.

    Thread-safe; use as a context manager or call `close()`.
    """

    def __init__(
        self,
        servers: str | Sequence[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float | None = None,
        tls_dir: str | None = None,
        cert_name: str | None = None,
        token: str | None = None,
        context: str | None = None,
    ):
        given = servers if isinstance(servers, str) or servers is None else ",".join(servers)
        conn = resolve_connection(
            given, tls_dir=tls_dir, cert_name=cert_name, token=token, context=context
        )
        self._addresses = parse_servers(conn.servers)
        self.servers_source = conn.source  # "--server", "$LEPTON_SERVER", "context 'x'", ...
        self._tls: TlsConfig | None = (
            client_tls(conn.tls_dir, conn.cert_name) if conn.tls_dir else None
        )
        # Sent as `authorization: Bearer <token>` on every call.
        self._token = conn.token
        if timeout <= 0:
            raise InvalidArgument(f"timeout must be positive, got {timeout}")
        self._timeout = float(timeout)
        self._connect_timeout = min(
            self._timeout, CONNECT_TIMEOUT_S if connect_timeout is None else float(connect_timeout)
        )
        self._current = self._addresses[0]
        self._conns: dict[str, _Conn] = {}
        self._lock = threading.Lock()
        self._coalescer = None  # TaskMethods.submit's (client/_coalesce.py), made on first use
        # Open streams (and agent log calls), cancelled by close().
        self._streams: weakref.WeakSet[Any] = weakref.WeakSet()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"Client({','.join(self.addresses)!r}, current={self.current_address!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel open streams and close every channel. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams, conns = list(self._streams), list(self._conns.values())
            self._conns.clear()
        for st in streams:
            st.cancel()
        for conn in conns:
            conn.channel.close()

    @property
    def addresses(self) -> list[str]:
        """Every server address known so far: the given ones, then leader hints learned."""
        with self._lock:
            return list(self._addresses)

    @property
    def current_address(self) -> str:
        """The address that answered last (the leader, as far as the client knows)."""
        with self._lock:
            return self._current

    @property
    def timeout(self) -> float:
        return self._timeout

    # -- nodes -------------------------------------------------------------------------

    def nodes(
        self, states: Sequence[str] | None = None, *, timeout: float | None = None
    ) -> list[NodeInfo]:
        """Every node, or those in one of `states` (`ready`, `suspect`, `down`, `left`)."""
        wanted = [state_to_proto(s) for s in states or ()]

        def fetch(token: str) -> tuple[Sequence[Any], str]:
            req = cpb.ListNodesRequest(states=wanted, page_token=token)
            resp = self._unary(CoordinatorStub, "ListNodes", req, timeout=timeout)
            return resp.nodes, resp.next_page_token

        return [NodeInfo.from_proto(n) for n in walk_pages(fetch)]

    def node(self, node_id: str, *, timeout: float | None = None) -> NodeInfo:
        """One node by its exact id; NotFound when there is none."""
        req = cpb.GetNodeRequest(node_id=require_id(node_id, "node id"))
        return NodeInfo.from_proto(self._unary(CoordinatorStub, "GetNode", req, timeout=timeout))

    def find_node(self, ref: str, *, timeout: float | None = None) -> NodeInfo:
        """The node `ref` names: an exact id, else an exact name, else a unique id prefix.

        Raises NotFound when nothing matches and InvalidArgument when `ref` is ambiguous.
        """
        check_text(ref, "node id or name", MAX_NAME, required=True)
        nodes = self.nodes(timeout=timeout)
        for n in nodes:
            if n.id == ref:
                return n
        named = [n for n in nodes if n.name == ref]
        if len(named) > 1:
            # A re-created host keeps its name under a new id; the one not gone is meant.
            named = [n for n in named if n.state != "left"] or named
        if len(named) == 1:
            return named[0]
        matches = named or [n for n in nodes if n.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFound(f'node "{ref}" not found')
        listed = ", ".join(sorted(n.id[:12] for n in matches)[:5])
        more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
        raise InvalidArgument(f'node "{ref}" is ambiguous: matches {listed}{more}')

    def drain(self, node_id: str, enable: bool = True, *, timeout: float | None = None) -> NodeInfo:
        """Stop (`enable=True`) or resume (`False`) placing new work on a node; returns it."""
        req = cpb.DrainNodeRequest(node_id=require_id(node_id, "node id"), enable=enable)
        # Setting a flag to a given value is idempotent: a retry after a lost reply is safe.
        return NodeInfo.from_proto(self._unary(CoordinatorStub, "DrainNode", req, timeout=timeout))

    def cluster_status(self, *, timeout: float | None = None) -> ClusterStatusInfo:
        """The leader, the Raft voters and their log progress, and node counts by state."""
        resp = self._unary(
            CoordinatorStub, "GetClusterStatus", cpb.GetClusterStatusRequest(), timeout=timeout
        )
        return ClusterStatusInfo.from_proto(resp)

    def add_voter(self, address: str, *, timeout: float | None = None) -> ClusterStatusInfo:
        """Admin: make the agent advertising `address` (started with --join-as-voter) a
        Raft voter. It catches up first; returns the status once the change is committed.
        Not retried on its own: on Unavailable / DeadlineExceeded look at `cluster_status`."""
        req = cpb.AddVoterRequest(address=address)
        resp = self._unary(CoordinatorStub, "AddVoter", req, idempotent=False, timeout=timeout)
        return ClusterStatusInfo.from_proto(resp)

    def collect_garbage(
        self, keep_finished: int | None = None, max_age_s: float | None = None, *, timeout: float | None = None
    ) -> dict[str, int]:
        """Admin: garbage-collect finished tasks and jobs now, by the cluster's retention,
        narrowed by `keep_finished` (the newest N kept) and `max_age_s` when given. Returns
        counts: tasks_collected, jobs_collected, finished_kept, history_size."""
        req = cpb.CollectGarbageRequest()
        if keep_finished is not None:
            req.keep_finished = keep_finished
        if max_age_s is not None:
            req.max_age_s = max_age_s
        # A repeat after a lost reply collects nothing more (the same retention, later).
        resp = self._unary(CoordinatorStub, "CollectGarbage", req, idempotent=True, timeout=timeout)
        return {f.name: getattr(resp, f.name) for f in resp.DESCRIPTOR.fields}

    def remove_voter(self, address: str, *, timeout: float | None = None) -> ClusterStatusInfo:
        """Admin: remove voter `address` (the leader included); returns the status once
        the change is committed."""
        req = cpb.RemoveVoterRequest(address=address)
        resp = self._unary(CoordinatorStub, "RemoveVoter", req, idempotent=False, timeout=timeout)
        return ClusterStatusInfo.from_proto(resp)

    def watch_nodes(self, *, timeout: float | None = None) -> NodeWatch:
        """Every node change from now on, as an iterator of `NodeEvent`, until cancelled.

        `timeout` bounds only finding the leader and opening the stream. If the stream
        breaks once open, iteration raises: re-list and watch again. `cancel()`, leaving a
        `with` block, or the client's `close()` end it quietly.
        """
        return self._stream(
            CoordinatorStub, "WatchNodes", cpb.WatchNodesRequest(), NodeEvent.from_proto, timeout
        )

    # -- the call machinery ------------------------------------------------------------

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

    def _stream(
        self,
        stub_cls: type,
        method: str,
        request: Any,
        convert: Callable[[Any], T],
        timeout: float | None = None,
    ) -> Stream[T]:
        """A server stream on the leader; `close()` cancels it with the client."""
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
        redirects = 0
        last: LeptonError | None = None

        def backoff() -> None:
            nonlocal delay
            pause = min(delay * random.uniform(0.5, 1.0), max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            delay = min(delay * 2, _BACKOFF_MAX_S)

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
                if exc.leader == addr or redirects >= len(self._addresses):
                    backoff()  # stale hints bouncing between servers mid-election
                    redirects = 0
                else:
                    redirects += 1
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
        client: Client,
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


# What `Client.watch_nodes()` returns.
NodeWatch = Stream[NodeEvent]
