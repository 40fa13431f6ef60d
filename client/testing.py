"""A small in-memory Coordinator for tests of the client, the CLI and tools built on them.

    fake = FakeCoordinator()
    fake.add_node(make_node("n1", "agent-1"))
    with serve(fake) as address:
        assert Client(address).nodes()[0].name == "agent-1"

It answers from a dict of nodes, records every call, and can be told to act as a follower
(`leader_hint`), to fail the next calls with UNAVAILABLE, or to answer slowly. Not a model of
the real coordinator's semantics beyond what a client can observe.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from lepton.common.errors import LEADER_METADATA_KEY
from lepton.v1 import common_pb2 as pb
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cgrpc

__all__ = ["FakeCoordinator", "make_node", "serve"]


def make_node(
    node_id: str,
    name: str = "",
    *,
    address: str = "127.0.0.1:7070",
    state: int = pb.NODE_STATE_READY,
    draining: bool = False,
    voter: bool = False,
    labels: dict[str, str] | None = None,
    cpus: int = 8,
    memory_bytes: int = 16 * 1024**3,
    gpus: int = 0,
    usage: pb.Usage | None = None,
    last_heartbeat_ms: int = 0,
) -> pb.Node:
    """A Node message with plausible defaults."""
    capacity = pb.Capacity(
        cpu_logical=cpus,
        cpu_physical=max(1, cpus // 2),
        cpu_model="Fake CPU",
        memory_bytes=memory_bytes,
        disk_bytes=100 * 1024**3,
        gpus=[
            pb.Gpu(index=i, uuid=f"GPU-{i}", name="Fake GPU", memory_total_bytes=80 * 1024**3)
            for i in range(gpus)
        ],
    )
    node = pb.Node(
        id=node_id,
        name=name or node_id,
        address=address,
        labels=labels or {},
        capacity=capacity,
        state=state,
        draining=draining,
        voter=voter,
        registered_at_ms=1_700_000_000_000,
        state_changed_at_ms=1_700_000_000_000,
        version="0.1.0",
        last_heartbeat_ms=last_heartbeat_ms,
    )
    if usage is not None:
        node.usage.CopyFrom(usage)
    return node


class FakeCoordinator(cgrpc.CoordinatorServicer):
    """The Coordinator service over a dict of nodes. Attributes may be changed mid-test."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.nodes: dict[str, pb.Node] = {}
        self.calls: list[tuple[str, Any]] = []
        # Act as a follower: refuse every call with UNAVAILABLE and this leader address.
        self.leader_hint: str = ""
        # Fail this many next calls with a server-side UNAVAILABLE (e.g. no leader yet).
        self.fail_unavailable: int = 0
        # Sleep this long before answering.
        self.delay_s: float = 0.0
        self.status = cpb.ClusterStatus(
            leader_id="n1", leader="127.0.0.1:7070", term=1, version="0.1.0"
        )
        self.events: queue.Queue[cpb.NodeEvent | None] = queue.Queue()
        self.watchers = 0

    def add_node(self, node: pb.Node) -> None:
        with self.lock:
            self.nodes[node.id] = node

    def push_event(self, event: cpb.NodeEvent | None) -> None:
        """Send `event` to the (one) open watch; None ends the stream."""
        self.events.put(event)

    def _enter(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls.append((method, request))
            fail = self.fail_unavailable > 0
            if fail:
                self.fail_unavailable -= 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.leader_hint:
            context.set_trailing_metadata(((LEADER_METADATA_KEY, self.leader_hint),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "not the leader")
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no leader elected yet")

    def _get(self, node_id: str, context: grpc.ServicerContext) -> pb.Node:
        with self.lock:
            node = self.nodes.get(node_id)
        if node is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f'node "{node_id}" not found')
        return node

    def RegisterNode(self, request: cpb.RegisterNodeRequest, context: grpc.ServicerContext) -> Any:
        self._enter("RegisterNode", request, context)
        node = pb.Node(
            id=request.node_id,
            name=request.name,
            address=request.address,
            labels=request.labels,
            capacity=request.capacity,
            voter=request.voter,
            version=request.version,
            state=pb.NODE_STATE_READY,
            registered_at_ms=int(time.time() * 1000),
            last_heartbeat_ms=int(time.time() * 1000),
        )
        self.add_node(node)
        return cpb.RegisterNodeResponse(node=node, heartbeat_interval_ms=1000)

    def GetNode(self, request: cpb.GetNodeRequest, context: grpc.ServicerContext) -> Any:
        self._enter("GetNode", request, context)
        return self._get(request.node_id, context)

    def ListNodes(self, request: cpb.ListNodesRequest, context: grpc.ServicerContext) -> Any:
        self._enter("ListNodes", request, context)
        with self.lock:
            nodes = [
                n for n in self.nodes.values() if not request.states or n.state in request.states
            ]
        return cpb.ListNodesResponse(nodes=nodes)

    def DrainNode(self, request: cpb.DrainNodeRequest, context: grpc.ServicerContext) -> Any:
        self._enter("DrainNode", request, context)
        node = self._get(request.node_id, context)
        with self.lock:
            node.draining = request.enable
        return node

    def GetClusterStatus(
        self, request: cpb.GetClusterStatusRequest, context: grpc.ServicerContext
    ) -> Any:
        self._enter("GetClusterStatus", request, context)
        return self.status

    def WatchNodes(
        self, request: cpb.WatchNodesRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        self._enter("WatchNodes", request, context)
        with self.lock:
            self.watchers += 1
        try:
            while context.is_active():
                try:
                    event = self.events.get(timeout=0.05)
                except queue.Empty:
                    continue
                if event is None:
                    return
                yield event
        finally:
            with self.lock:
                self.watchers -= 1


@contextlib.contextmanager
def serve(servicer: cgrpc.CoordinatorServicer, address: str = "127.0.0.1:0") -> Iterator[str]:
    """Serve `servicer` on `address` (port 0: a free one); yields the `host:port` it got."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    cgrpc.add_CoordinatorServicer_to_server(servicer, server)
    host = address.rpartition(":")[0]
    port = server.add_insecure_port(address)
    server.start()
    try:
        yield f"{host}:{port}"
    finally:
        server.stop(grace=None)
