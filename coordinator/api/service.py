"""The Coordinator gRPC API, served by every voter; writes and reads go to the leader.

A voter that does not lead answers UNAVAILABLE with the leader's address in trailing
metadata (`lepton-leader`), and clients retry there on their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import grpc

from lepton.common import validation as v
from lepton.common.errors import (
    REASON_WRONG_STATE_BACKEND,
    FailedPrecondition,
    LeptonError,
    NotLeader,
    ResourceExhausted,
)
from lepton.common.grpc_util import register_service, rpc_boundary
from lepton.common.paging import decode_token, page_size, take_page
from lepton.common.served_certs import ServedCertificates, check_caller_serves
from lepton.common.version import VERSION
from lepton.coordinator.api.admission import SubmitAdmission
from lepton.coordinator.api.task_api import TaskApi
from lepton.coordinator.api.task_hub import TaskHub
from lepton.coordinator.consensus import Consensus
from lepton.coordinator.loops.liveness import Liveness
from lepton.coordinator.state.security_state import check_node_caller
from lepton.coordinator.state.state_machine import ClusterStateMachine, NodeChange, NodeState
from lepton.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, state_pb2

logger = logging.getLogger(__name__)

# A watcher this far behind is cut off rather than let its queue grow without bound.
WATCH_QUEUE_LIMIT = 10_000


class CoordinatorContext:
    """What the API needs from the coordinator: state, consensus, liveness, clocks."""

    def __init__(
        self,
        state: ClusterStateMachine,
        consensus: Consensus,
        liveness: Liveness,
        *,
        wall_ms,
        propose_timeout_s: float = 10.0,
        max_spec_bytes: int = v.DEFAULT_MAX_SPEC_BYTES,
    ):
        self.state = state
        self.consensus = consensus
        self.liveness = liveness
        self.wall_ms = wall_ms
        self.propose_timeout_s = propose_timeout_s
        self.max_spec_bytes = max_spec_bytes
        self.hub = TaskHub()
        self.admission = SubmitAdmission()  # bounds user submissions in flight
        self.scheduling = None  # a SchedulingLoop, set by the Coordinator
        self.gc = None  # a GarbageCollector (loops/gc.py), set by the Coordinator
        self.served: ServedCertificates | None = None  # with TLS: who serves which address
        # Where the state lives ("single", "raft" or "etcd"; etcd's endpoints and prefix), for
        # cluster status and for refusing a voter of the other kind; set by the Coordinator.
        self.state_backend = "raft"
        self.etcd_endpoints: list[str] = []
        self.etcd_prefix = ""

    def require_leader(self) -> None:
        if not self.consensus.is_leader():
            _, address = self.consensus.leader()
            raise NotLeader("this voter is not the coordinator", leader=address)

    async def commit(self, cmd: state_pb2.Command) -> object:
        """Stamp, propose, wait for the commit; raise the state machine's error if any."""
        self.require_leader()
        cmd.at_ms = self.wall_ms()
        data = cmd.SerializeToString()
        v.check_entry_size(len(data))  # before anything is logged
        result = await self.consensus.propose(data, timeout=self.propose_timeout_s)
        if isinstance(result, LeptonError):
            raise result
        return result

    async def read(self) -> None:
        """Linearizable read point: only the leader answers, after a barrier."""
        self.require_leader()
        await self.consensus.read_barrier(timeout=self.propose_timeout_s)

    def with_soft_state(self, node: common_pb2.Node) -> common_pb2.Node:
        wall_ms, usage = self.liveness.last_seen(node.id)
        if usage is not None:
            node.usage.CopyFrom(usage)
            node.last_heartbeat_ms = wall_ms
        return node


class CoordinatorService(TaskApi, coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, ctx: CoordinatorContext):
        self._ctx = ctx

    @rpc_boundary
    async def RegisterNode(self, request, context):
        v.require_id(request.node_id, "node_id")
        v.check_text(request.name, "name", v.MAX_NAME)
        v.check_address(request.address, "address")
        v.check_labels(request.labels)
        v.check_capacity(request.capacity)
        v.check_text(request.version, "version", v.MAX_VERSION)
        check_node_caller(self._ctx.state, request.node_id)
        await check_caller_serves(self._ctx.served, request.address)
        self._check_voter_backend(request)
        cmd = state_pb2.Command(
            register_node=state_pb2.RegisterNodeCmd(
                node_id=request.node_id,
                name=request.name or request.node_id,
                address=request.address,
                labels=dict(request.labels),
                capacity=request.capacity,
                voter=request.voter,
                version=request.version,
            )
        )
        node = await self._ctx.commit(cmd)
        await self._ctx.liveness.heartbeat(request.node_id, common_pb2.Usage())
        logger.info("registered node %s (%s) at %s", node.name, node.id, node.address)
        # The leader's interval, stretched by the heartbeat budget in a large cluster.
        return coordinator_pb2.RegisterNodeResponse(
            node=node, heartbeat_interval_ms=self._ctx.liveness.interval_ms
        )

    def _check_voter_backend(self, request) -> None:
        """A voter started for the other state backend would keep a second history of the
        cluster (a Raft log beside etcd, or the reverse): refuse it with what to do."""
        if not request.voter or (request.state_backend == "etcd") == (self._ctx.state_backend == "etcd"):
            return
        if self._ctx.state_backend == "etcd":
            raise FailedPrecondition(
                "this cluster keeps its state in etcd: a Raft voter (--peers, --join-as-voter) cannot join it; "
                f"start {request.address} with --state etcd://{','.join(self._ctx.etcd_endpoints)} "
                "or as a worker (--join only)", reason=REASON_WRONG_STATE_BACKEND,
            )
        raise FailedPrecondition(
            "this cluster keeps its state in the built-in Raft: an etcd candidate (--state etcd) cannot join it; "
            f"start {request.address} without --state etcd (a worker with --join, or a voter with --join-as-voter)",
            reason=REASON_WRONG_STATE_BACKEND,
        )

    def _check_beat(self, request) -> None:
        v.require_id(request.node_id, "node_id")
        if len(request.usage.gpus) > v.MAX_GPUS:
            raise v.InvalidArgument(f"usage.gpus lists {len(request.usage.gpus)}; at most {v.MAX_GPUS}")

    def _beat_response(self, node) -> coordinator_pb2.HeartbeatResponse:
        return coordinator_pb2.HeartbeatResponse(
            state=node.state,
            draining=node.draining,
            heartbeat_interval_ms=self._ctx.liveness.interval_ms,
            term=self._ctx.consensus.term(),
        )

    @rpc_boundary
    async def Heartbeat(self, request, context):
        return await self.beat(request)

    async def beat(self, request: coordinator_pb2.HeartbeatRequest) -> coordinator_pb2.HeartbeatResponse:
        """One beat, checked, recorded and answered: the unary RPC's body, and how this
        voter's own agent beats in-process (its caller is the node itself, so
        check_node_caller sees no principal, as with auth off). Raises LeptonError."""
        self._check_beat(request)
        check_node_caller(self._ctx.state, request.node_id)
        self._ctx.require_leader()
        return self._beat_response(await self._ctx.liveness.heartbeat(request.node_id, request.usage))

    @rpc_boundary
    async def HeartbeatStream(self, request_iterator, context):
        # Answer every second beat, and at once when something the agent acts on changed
        # (state, drain, term, the interval the heartbeat budget hands out).
        # The answers are how an agent notices a leader that stopped (SIGSTOP, a hung
        # host): gRPC keepalive does not break a stream that is still being written to.
        # A reply per beat would cost the leader ~20% more per beat; this is the hot path
        # of a large cluster, so the id is checked once per stream and a reply is built
        # only when it is sent.
        last = None
        count = 0
        checked = ""
        liveness, consensus = self._ctx.liveness, self._ctx.consensus
        async for request in request_iterator:
            if request.node_id != checked:
                self._check_beat(request)
                check_node_caller(self._ctx.state, request.node_id)
                checked = request.node_id
            elif len(request.usage.gpus) > v.MAX_GPUS:
                self._check_beat(request)
            self._ctx.require_leader()
            node = await liveness.heartbeat(request.node_id, request.usage)
            count += 1
            key = (node.state, node.draining, consensus.term(), liveness.interval_ms)
            if key != last or count % 2 == 0:
                last = key
                yield self._beat_response(node)

    @rpc_boundary
    async def LeaveNode(self, request, context):
        v.require_id(request.node_id, "node_id")
        await self._ctx.read()
        self._ctx.state.get_node(request.node_id)  # NotFound before proposing anything
        check_node_caller(self._ctx.state, request.node_id)
        cmd = state_pb2.Command(
            set_node_state=state_pb2.SetNodeStateCmd(
                node_id=request.node_id, state=NodeState.LEFT.proto, reason="left gracefully"
            )
        )
        return await self._ctx.commit(cmd)

    @rpc_boundary
    async def DrainNode(self, request, context):
        v.require_id(request.node_id, "node_id")
        await self._ctx.read()
        self._ctx.state.get_node(request.node_id)
        cmd = state_pb2.Command(
            set_drain=state_pb2.SetDrainCmd(node_id=request.node_id, draining=request.enable)
        )
        return self._ctx.with_soft_state(await self._ctx.commit(cmd))

    @rpc_boundary
    async def GetNode(self, request, context):
        v.require_id(request.node_id, "node_id")
        await self._ctx.read()
        return self._ctx.with_soft_state(self._ctx.state.get_node(request.node_id))

    @rpc_boundary
    async def ListNodes(self, request, context):
        wanted = {NodeState.from_proto(s) for s in request.states}
        after = decode_token(request.page_token, (str, str))
        size = page_size(request.page_size)
        await self._ctx.read()
        nodes = self._ctx.state.nodes
        by_key = {(n.name, n.id): n for n in nodes.values()}

        def select(key):
            node = by_key[key]
            if wanted and NodeState.from_proto(node.state) not in wanted:
                return None
            return self._ctx.with_soft_state(self._ctx.state.get_node(node.id))

        page, token = take_page(sorted(by_key), after, size=size, select=select, size_of=lambda n: n.ByteSize())
        return coordinator_pb2.ListNodesResponse(nodes=page, next_page_token=token)

    @rpc_boundary
    async def GetClusterStatus(self, request, context):
        await self._ctx.read()
        return self._cluster_status()

    @rpc_boundary
    async def AddVoter(self, request, context):
        self._ctx.require_leader()
        await self._ctx.consensus.add_voter(request.address, timeout=_voter_change_timeout(context))
        return self._cluster_status()  # no read barrier: this leader may have just left

    @rpc_boundary
    async def RemoveVoter(self, request, context):
        self._ctx.require_leader()
        await self._ctx.consensus.remove_voter(request.address, timeout=_voter_change_timeout(context))
        return self._cluster_status()

    def _cluster_status(self) -> coordinator_pb2.ClusterStatus:
        st = self._ctx.consensus.status()
        counts = Counter(NodeState.from_proto(n.state).value for n in self._ctx.state.nodes.values())
        # Raft knows voters by address; show the node id where the node table has it.
        by_address = {n.address: n.id for n in self._ctx.state.nodes.values() if n.voter}
        return coordinator_pb2.ClusterStatus(
            leader_id=by_address.get(st.leader_address, st.leader_id),
            leader=st.leader_address,
            term=st.term,
            commit_index=st.commit_index,
            applied_index=st.applied_index,
            voters=[
                coordinator_pb2.Voter(
                    id=by_address.get(vs.address, vs.id), address=vs.address, role=vs.role,
                    match_index=vs.match_index, lag=vs.lag,
                )
                for vs in st.voters
            ],
            nodes_by_state=dict(counts),
            node_count=len(self._ctx.state.nodes),
            version=VERSION,
            state_backend=self._ctx.state_backend,
            etcd_endpoints=self._ctx.etcd_endpoints,
            etcd_prefix=self._ctx.etcd_prefix,
        )

    @rpc_boundary
    async def WatchNodes(self, request, context):
        await self._ctx.read()
        queue: asyncio.Queue[NodeChange | None] = asyncio.Queue()

        def on_change(change: NodeChange) -> None:
            if queue.qsize() >= WATCH_QUEUE_LIMIT:
                queue.put_nowait(None)  # overflow marker; the stream ends with an error
                self._ctx.state.remove_listener(on_change)
                return
            queue.put_nowait(change)

        self._ctx.state.add_listener(on_change)
        await context.send_initial_metadata(())  # the watcher knows it is subscribed from here
        try:
            while True:
                change = await queue.get()
                if change is None:
                    raise ResourceExhausted("watcher fell too far behind; watch again")
                yield coordinator_pb2.NodeEvent(
                    kind=change.kind, node=change.node, at_ms=change.at_ms, index=change.index
                )
        finally:
            self._ctx.state.remove_listener(on_change)


def _voter_change_timeout(context) -> float:
    """The caller's deadline, less a margin to answer in; 60 s without one. A new voter
    may need a whole snapshot before it counts."""
    remaining = context.time_remaining() if context is not None else None
    return 60.0 if remaining is None else max(0.5, min(remaining - 0.5, 600.0))


def add_to_server(service: CoordinatorService, server: grpc.aio.Server) -> None:
    register_service(server, service, coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"])
