"""The Lepton client: a synchronous, leader-finding wrapper around the coordinator's gRPC API.

    with Client("10.0.0.1:7070,10.0.0.2:7070,10.0.0.3:7070") as c:
        for node in c.nodes(states=["ready"]):
            print(node.name, node.capacity.memory_bytes)

Every call goes to the leader, found and retried as `lepton.client._calls` says; server
streams are `lepton.client.stream.Stream`s. Failures surface only as
`lepton.common.errors.LeptonError` subclasses.

New RPCs slot in as one method each: build the request, call `self._unary(Stub, "Method",
req, idempotent=...)` (or `self._stream(...)` for a server stream such as following task
logs), and convert the reply with a `types.*.from_proto`. Only a call that is safe to repeat
may be `idempotent`; a submit is not, unless it carries a client-chosen request id.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

from lepton.common.channels import TlsConfig, client_tls
from lepton.common.errors import InvalidArgument, NotFound
from lepton.common.paging import walk_pages
from lepton.common.validation import MAX_NAME, check_address, check_text, require_id
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1.coordinator_pb2_grpc import CoordinatorStub

from ._calls import CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT, LeaderCalls, _Conn
from .code import CodeMethods
from .contexts import DEFAULT_SERVER, resolve_connection
from .data import DataMethods
from .deployments import DeploymentMethods
from .jobs import JobMethods
from .predict import PredictMethods
from .stream import Stream
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


class Client(LeaderCalls, TaskMethods, JobMethods, DataMethods, CodeMethods, PredictMethods, DeploymentMethods):
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


# What `Client.watch_nodes()` returns.
NodeWatch = Stream[NodeEvent]
