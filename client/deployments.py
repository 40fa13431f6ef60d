"""Deployments: a model served by replicas behind every agent (docs/serving.md).

`Client.create_deployment`, `scale_deployment`, `update_deployment`, `delete_deployment`,
`get_deployment`, `list_deployments` and `wait_deployment` (until every replica of the
current generation is ready, or the deployment is gone after an rm).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from lepton.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from lepton.common.validation import (
    check_dataset_name,
    check_deployment_name,
    check_deployment_spec,
    check_replica_count,
)
from lepton.v1 import serving_pb2
from lepton.v1.serving_pb2_grpc import DeploymentsStub

__all__ = ["DeploymentInfo", "DeploymentMethods", "ReplicaInfo", "StatsInfo"]

_STATE_NAMES = {v: serving_pb2.ReplicaState.Name(v).removeprefix("REPLICA_").lower()
                for v in serving_pb2.ReplicaState.values()}


@dataclass(frozen=True)
class ReplicaInfo:
    task_id: str
    node_id: str
    generation: int
    model: str
    state: str  # pending | ready | unhealthy | draining


@dataclass(frozen=True)
class StatsInfo:
    requests: int = 0
    errors: int = 0
    requests_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_batch_rows: float = 0.0


@dataclass(frozen=True)
class DeploymentInfo:
    name: str
    model: str
    replicas: int  # wanted
    generation: int
    owner: str
    state: str  # starting | failing | ready | degraded | rolling | scaling | stopping
    message: str
    max_batch: int
    max_wait_ms: int
    priority: int
    pack: bool
    cpu: float
    memory_bytes: int
    gpus: int
    created_at_ms: int
    updated_at_ms: int
    replica_list: tuple[ReplicaInfo, ...]
    stats: StatsInfo

    @property
    def ready(self) -> int:
        """Ready replicas of the current generation."""
        return sum(1 for r in self.replica_list if r.state == "ready" and r.generation == self.generation)

    @property
    def rolled(self) -> bool:
        """Every wanted replica of the current generation is ready, nothing else is left, and
        the serving loop says so too (its state lags the replicas' live readiness by up to a
        cycle: a wait that ended on the counts alone could still print "degraded")."""
        return self.ready == self.replicas == len(self.replica_list) and self.state == "ready"

    @classmethod
    def from_proto(cls, d: serving_pb2.Deployment) -> DeploymentInfo:
        s, r = d.spec, d.spec.resources
        st = d.stats
        return cls(
            name=s.name, model=s.model, replicas=s.replicas, generation=d.generation, owner=d.owner,
            state=d.state, message=d.message, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms,
            priority=s.priority, pack=s.pack, cpu=r.cpu, memory_bytes=r.memory_bytes, gpus=r.gpus,
            created_at_ms=d.created_at_ms, updated_at_ms=d.updated_at_ms,
            replica_list=tuple(ReplicaInfo(x.task_id, x.node_id, x.generation, x.model,
                                           _STATE_NAMES.get(x.state, "unknown")) for x in d.replicas),
            stats=StatsInfo(st.requests, st.errors, st.requests_per_s, st.p50_ms, st.p99_ms, st.mean_batch_rows),
        )


class DeploymentMethods:
    """Deployment calls of `Client` (needs `_unary`)."""

    _unary: Callable[..., object]

    def create_deployment(self, name: str, model: str, *, replicas: int = 1, cpu: float = 0.0,
                          memory_bytes: int = 0, gpus: int = 0, max_batch: int = 1, max_wait_ms: int = 0,
                          priority: int = 0, pack: bool = False, timeout: float | None = None) -> DeploymentInfo:
        """Serve `model` (a stored model: `models list`) as `name` with `replicas` replicas.
        Returns at once; `wait_deployment` waits until they are ready."""
        check_deployment_name(name)
        check_dataset_name(model, "model name")
        check_replica_count(replicas)
        spec = serving_pb2.DeploymentSpec(name=name, model=model, pack=pack)
        for holder, field, value in ((spec, "replicas", replicas), (spec, "max_batch", max_batch),
                                     (spec, "max_wait_ms", max_wait_ms), (spec, "priority", priority),
                                     (spec.resources, "cpu", cpu), (spec.resources, "memory_bytes", memory_bytes),
                                     (spec.resources, "gpus", gpus)):
            try:  # a number past its field's range is a ValueError here: name the field
                setattr(holder, field, value)
            except (ValueError, TypeError) as err:
                raise InvalidArgument(f"{field}: {err}") from None
        check_deployment_spec(spec)
        # A request id makes the create safe to retry through a failover.
        req = serving_pb2.CreateDeploymentRequest(spec=spec, request_id="d-" + uuid.uuid4().hex)
        return DeploymentInfo.from_proto(
            self._unary(DeploymentsStub, "CreateDeployment", req, idempotent=True, timeout=timeout))

    def scale_deployment(self, name: str, replicas: int, *, timeout: float | None = None) -> DeploymentInfo:
        check_deployment_name(name)
        check_replica_count(replicas)
        req = serving_pb2.ScaleDeploymentRequest(name=name, replicas=replicas)
        return DeploymentInfo.from_proto(
            self._unary(DeploymentsStub, "ScaleDeployment", req, idempotent=True, timeout=timeout))

    def update_deployment(self, name: str, model: str, *, timeout: float | None = None) -> DeploymentInfo:
        """Roll `name` over to `model`: a new replica is ready before an old one stops."""
        check_deployment_name(name)
        check_dataset_name(model, "model name")
        req = serving_pb2.UpdateDeploymentRequest(name=name, model=model)
        # Not idempotent: each update is a new generation.
        return DeploymentInfo.from_proto(
            self._unary(DeploymentsStub, "UpdateDeployment", req, idempotent=False, timeout=timeout))

    def delete_deployment(self, name: str, *, timeout: float | None = None) -> DeploymentInfo:
        """Drain every replica, then remove the deployment."""
        check_deployment_name(name)
        req = serving_pb2.DeleteDeploymentRequest(name=name)
        return DeploymentInfo.from_proto(
            self._unary(DeploymentsStub, "DeleteDeployment", req, idempotent=True, timeout=timeout))

    def get_deployment(self, name: str, *, timeout: float | None = None) -> DeploymentInfo:
        check_deployment_name(name)
        req = serving_pb2.GetDeploymentRequest(name=name)
        return DeploymentInfo.from_proto(
            self._unary(DeploymentsStub, "GetDeployment", req, idempotent=True, timeout=timeout))

    def list_deployments(self, *, timeout: float | None = None) -> list[DeploymentInfo]:
        resp = self._unary(DeploymentsStub, "ListDeployments", serving_pb2.ListDeploymentsRequest(),
                           idempotent=True, timeout=timeout)
        return [DeploymentInfo.from_proto(d) for d in resp.deployments]

    def wait_deployment(self, name: str, *, timeout: float = 300.0, gone: bool = False, poll_s: float = 0.5,
                        on_change: Callable[[DeploymentInfo], None] | None = None) -> DeploymentInfo | None:
        """Until every replica of the current generation is ready and no other is left
        (`gone`: until the deployment is removed; returns None). `on_change` sees each
        new state. Raises DeadlineExceeded naming what it waited for, FailedPrecondition
        once the deployment is "failing" (replicas failed again and again, none ready)."""
        if timeout <= 0:
            raise InvalidArgument("timeout must be positive")
        deadline = time.monotonic() + timeout
        last: DeploymentInfo | None = None
        while True:
            try:
                info = self.get_deployment(name)
            except NotFound:
                if gone:
                    return None
                raise
            if on_change is not None and (last is None or (info.state, info.message) != (last.state, last.message)):
                on_change(info)
            last = info
            if not gone and info.rolled:
                return info
            if not gone and info.state == "failing":  # its replicas fail to start, again and again
                raise FailedPrecondition(f'deployment "{name}" is failing: {info.message}; it keeps trying '
                                         f"(lepton-ctl serve show {name}; serve update or serve rm changes that)")
            if time.monotonic() >= deadline:
                what = "removed" if gone else f"{info.replicas} replica(s) of generation {info.generation} ready"
                raise DeadlineExceeded(f'deployment "{name}" not {what} after {timeout:g}s: {info.message}')
            time.sleep(poll_s)

