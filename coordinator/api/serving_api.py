"""The Deployments gRPC API, served by every voter; the leader answers (docs/serving.md).

Create/Scale/Update/Delete commit deployment commands (coordinator/state/deployments.py);
the serving loop (coordinator/loops/serving.py) then starts, rolls and drains the replica
tasks. Only the owner or an admin changes a deployment (checked here for a clear answer,
and again when the command applies). ReportReplicas and WatchEndpoints, which agents call,
go to the leader's endpoint table (coordinator/api/endpoints.py): `report(node_id, request,
caller)`, `watch(request, context)` (an async iterator of EndpointSet), `replicas(name)`
(each with .task_id and .state) and, for Get/List, `stats(name)` (a DeploymentStats).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import replace
from typing import Any

import grpc

from lepton.common import validation as v
from lepton.common.auth import current_principal
from lepton.common.errors import FailedPrecondition, Unavailable
from lepton.common.grpc_util import register_service, rpc_boundary
from lepton.coordinator.api.dataset_api import only_owner
from lepton.coordinator.api.service import CoordinatorContext
from lepton.coordinator.loops.scheduling import node_views, task_request
from lepton.coordinator.loops.serving import ServingLoop, replica_views
from lepton.coordinator.state.deployments import (
    check_deployment_owner,
    check_model,
    check_new_model,
)
from lepton.coordinator.state.security_state import check_node_caller, stamp_owner
from lepton.v1 import common_pb2, serving_pb2, serving_pb2_grpc, state_pb2, tasks_pb2

logger = logging.getLogger(__name__)


def check_replicas_fit(sm, spec: serving_pb2.DeploymentSpec, replicas: int) -> None:
    """Refuse, before anything is logged, `replicas` replicas that the cluster could not
    hold even with every node empty and back in service: one that fits no node, or more
    than all nodes together hold. They would only wait out `serve up --wait-timeout`.
    Draining, suspect and down nodes count (they may come back); nodes that left do not.
    The scheduler's own test and words (`unschedulable: needs 1000000m cpu, largest node
    has 4000m`) judge one replica. Nodes only, empty: no task is read, and the scheduling
    loop's kept snapshot is neither rebuilt nor dropped (a serve up costs O(nodes))."""
    from lepton.coordinator.scheduler import UNSCHEDULABLE, ClusterSnapshot, schedule

    gone = common_pb2.NODE_STATE_LEFT
    nodes = [replace(n, schedulable=sm.nodes[n.node_id].state != gone) for n in node_views(sm)]
    snapshot = ClusterSnapshot.from_tables(nodes)
    one = task_request(tasks_pb2.Task(id="t-fit-check", spec=tasks_pb2.TaskSpec(resources=spec.resources)))
    why = schedule(snapshot, [one], now_ms=0).unschedulable.get(one.task_id, "")
    if why.startswith(UNSCHEDULABLE):
        raise FailedPrecondition(f"no node can ever run a replica of {spec.name!r}: "
                                 f"{why.removeprefix(UNSCHEDULABLE).strip()}")
    most = _most_replicas(nodes, one)
    if most is not None and replicas > most:
        raise FailedPrecondition(
            f"{replicas} replicas of {spec.name!r} do not fit: all nodes together, empty, hold "
            f"at most {most}; add nodes or ask for fewer")


def _most_replicas(nodes, one) -> int | None:
    """How many replicas like `one` the nodes hold when empty (None: no limit, a replica
    that asks for nothing)."""
    total = 0
    for n in nodes:
        if not n.schedulable:
            continue
        gpus = sum(1 for memory in n.gpus.values() if memory >= one.gpu_memory_bytes)
        asks = ((n.cpu_millis, one.cpu_millis), (n.memory_bytes, one.memory_bytes), (gpus, one.gpus))
        counts = [have // need for have, need in asks if need]
        if not counts:
            return None
        total += min(counts)
    return total


class DeploymentService(serving_pb2_grpc.DeploymentsServicer):
    def __init__(self, ctx: CoordinatorContext, loop: ServingLoop, endpoints: Any = None):
        self._ctx = ctx
        self._loop = loop
        self._endpoints = endpoints  # H5's EndpointTable; None until it is wired

    @property
    def _sm(self):
        return self._ctx.state

    def _view(self, name: str) -> serving_pb2.Deployment:
        """The deployment with its replicas, the loop's state and sentence, and stats."""
        rec = self._sm.deployments.get(name)
        out = serving_pb2.Deployment()
        out.CopyFrom(rec.deployment)
        out.replicas.extend(replica_views(self._sm, self._endpoints, name))
        state, message = self._loop.status(name)
        if state and not rec.deleting:
            out.state = state
        out.message = message
        stats = getattr(self._endpoints, "stats", None)
        if stats is not None:
            out.stats.CopyFrom(stats(name))
        return out

    async def _commit_view(self, cmd: state_pb2.Command, name: str) -> serving_pb2.Deployment:
        await self._ctx.commit(cmd)
        self._loop.wake()
        return self._view(name)

    def _check_owner(self, name: str) -> None:
        """A clear answer before anything is logged; applying checks again."""
        check_deployment_owner(self._sm.deployments.get(name), only_owner())

    @rpc_boundary
    async def CreateDeployment(self, request, context):
        spec = request.spec
        v.check_deployment_spec(spec)
        if request.request_id:
            v.require_id(request.request_id, "request_id")
        await self._ctx.read()
        check_model(self._sm, spec.model)
        check_replicas_fit(self._sm, spec, spec.replicas)
        # The owner, role and token its replica tasks act with: stamped as a task's are.
        stamp = tasks_pb2.TaskSpec()
        stamp_owner(stamp, self._sm)
        cmd = state_pb2.CreateDeploymentCmd(
            spec=spec, owner=stamp.owner, request_id=request.request_id, owner_role=stamp.owner_role,
            owner_token_id=stamp.owner_token_id)
        return await self._commit_view(state_pb2.Command(create_deployment=cmd), spec.name)

    @rpc_boundary
    async def ScaleDeployment(self, request, context):
        v.check_deployment_name(request.name)
        v.check_replica_count(request.replicas)  # before anything is logged
        await self._ctx.read()
        self._check_owner(request.name)
        spec = self._sm.deployments.get(request.name).deployment.spec
        if request.replicas > spec.replicas:  # fewer always fit: a scale down is never refused
            check_replicas_fit(self._sm, spec, request.replicas)
        cmd = state_pb2.ScaleDeploymentCmd(name=request.name, replicas=request.replicas, only_owner=only_owner())
        return await self._commit_view(state_pb2.Command(scale_deployment=cmd), request.name)

    @rpc_boundary
    async def UpdateDeployment(self, request, context):
        v.check_deployment_name(request.name)
        v.check_dataset_name(request.model, "model name")
        await self._ctx.read()
        self._check_owner(request.name)
        check_new_model(self._sm, self._sm.deployments.get(request.name), request.model)
        cmd = state_pb2.UpdateDeploymentCmd(name=request.name, model=request.model, only_owner=only_owner())
        return await self._commit_view(state_pb2.Command(update_deployment=cmd), request.name)

    @rpc_boundary
    async def DeleteDeployment(self, request, context):
        v.check_deployment_name(request.name)
        await self._ctx.read()
        self._check_owner(request.name)
        if self._sm.deployments.get(request.name).deleting:
            raise FailedPrecondition(f'deployment "{request.name}" is being removed already '
                                     f"(lepton-ctl serve show {request.name})")
        cmd = state_pb2.DeleteDeploymentCmd(name=request.name, only_owner=only_owner())
        return await self._commit_view(state_pb2.Command(delete_deployment=cmd), request.name)

    @rpc_boundary
    async def GetDeployment(self, request, context):
        v.check_deployment_name(request.name)
        await self._ctx.read()
        return self._view(request.name)

    @rpc_boundary
    async def ListDeployments(self, request, context):
        await self._ctx.read()
        return serving_pb2.ListDeploymentsResponse(
            deployments=[self._view(name) for name in sorted(self._sm.deployments.records)])

    # -- agents: delegated to the endpoint table ----------------------------------------
    def _table(self) -> Any:
        if self._endpoints is None:
            raise Unavailable("this coordinator keeps no endpoint table yet")
        return self._endpoints

    @rpc_boundary
    async def ReportReplicas(self, request, context):
        v.require_id(request.node_id, "node_id")
        check_node_caller(self._sm, request.node_id)  # a node reports only for itself
        self._ctx.require_leader()
        done = self._table().report(request.node_id, request, current_principal())
        if inspect.isawaitable(done):
            await done
        self._loop.wake()
        return serving_pb2.ReportReplicasResponse()

    @rpc_boundary
    async def WatchEndpoints(self, request, context):
        v.require_id(request.node_id, "node_id")
        check_node_caller(self._sm, request.node_id)
        await self._ctx.read()
        async for endpoint_set in self._table().watch(request, context):
            yield endpoint_set


def add_to_server(service: DeploymentService, server: grpc.aio.Server) -> str:
    desc = serving_pb2.DESCRIPTOR.services_by_name["Deployments"]
    register_service(server, service, desc)
    return desc.full_name
