"""The stable endpoint: every agent answers `Inference.Predict` for every deployment.

The router keeps the leader's endpoint set (`Deployments.WatchEndpoints`, through the agent's
one CoordinatorLink: it follows the leader and reconnects with backoff; a broken stream keeps
the last set, so routing goes on through a leader failover) and, per replica, how many of its
requests are in flight here. A request goes to the READY replica with the fewest in flight
(this node's on a tie): to a replica on this node over its private unix socket
(`local_channel(task_id)`, agent/serving.py), else to the hosting agent's `Inference.Predict`
with `replica` set, over the agent-to-agent channel with this node's identity (the link's
channel per address: node certificate, or the node token without TLS).

Failures that say "this replica, not this request" (UNAVAILABLE, CANCELLED by the server, a
replica gone from its node) mark the replica bad here for BAD_FOR_S and the request goes to
another one, within the caller's deadline (DEFAULT_DEADLINE_S when it set none). Anything
else, INVALID_ARGUMENT first of all, is the caller's answer as it came.

A forwarded request (`replica` set) is served only for a node identity and only by that
local replica: it is never routed further (one hop at most).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from lepton.agent.replica_frames import FramesAbsent, FramesDialer
from lepton.common import validation as v
from lepton.common.auth import Role, current_principal
from lepton.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    LeptonError,
    NotFound,
    PermissionDenied,
    Unavailable,
    from_rpc_error,
)
from lepton.common.failover import MAX_BACKOFF_S, MIN_BACKOFF_S
from lepton.common.grpc_util import MAX_MESSAGE_BYTES, register_service, rpc_boundary
from lepton.v1 import serving_pb2, serving_pb2_grpc

logger = logging.getLogger(__name__)

# A caller without a deadline gets this one: retries need an end.
DEFAULT_DEADLINE_S = 10.0
# How long a replica that failed a call here is skipped (while others are left).
BAD_FOR_S = 3.0
# Input bytes per request: a replica's own cap (workloads/serving/tensors.MAX_INPUT_BYTES),
# under the gRPC message limit (MAX_MESSAGE_BYTES, 16 MiB, which gRPC enforces with
# RESOURCE_EXHAUSTED and its own message). Between the two, the router refuses with
# INVALID_ARGUMENT and a message before forwarding anything.
MAX_PREDICT_BYTES = MAX_MESSAGE_BYTES * 3 // 4
# Latency histogram bounds (ms) of RouterStats and /metrics; the last is +Inf.
LATENCY_BUCKETS_MS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500,
                      750, 1000, 2000, 5000, 10000, float("inf"))
# Rows of the batch a request ran in (PredictResponse.batch_rows), for /metrics.
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, float("inf"))
# Server-side codes after which another replica may answer. CANCELLED here is the server's
# (a replica or agent stopping mid-call); our own caller going away is CancelledError.
_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# A deployment this agent has not heard of gets this long for the leader's next endpoint set
# before NOT_FOUND (made a moment ago: `serve up --no-wait` then predict).
UNKNOWN_GRACE_S = 1.0
# Too little time left to start another try.
_MIN_TRY_S = 0.005
# Waits between passes when no replica is usable (grows to MAX_BACKOFF_S / 2).
_FIRST_WAIT_S = 0.02

LocalChannel = Callable[[str], "grpc.aio.Channel | None"]
LocalFrames = Callable[[str], "FramesDialer | None"]
RemoteStub = Callable[[str], Any]


@dataclass
class DeploymentCounters:
    """One deployment's counters on this router, cumulative since the agent started."""

    requests: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    # Per bucket (not cumulative over bounds); LATENCY_BUCKETS_MS[i] is bucket i's bound.
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_MS))
    latency_sum_ms: float = 0.0
    batch_rows: int = 0
    batches: int = 0
    batch_buckets: list[int] = field(default_factory=lambda: [0] * len(BATCH_ROWS_BUCKETS))

    @property
    def errors(self) -> int:
        return sum(self.errors_by_code.values())

    def answered(self, latency_ms: float, batch_rows: int) -> None:
        self.requests += 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1
        self.latency_sum_ms += latency_ms
        if batch_rows:
            self.batch_rows += batch_rows
            self.batches += 1
            self.batch_buckets[bisect.bisect_left(BATCH_ROWS_BUCKETS, batch_rows)] += 1

    def failed(self, code: grpc.StatusCode) -> None:
        self.requests += 1
        self.errors_by_code[code.name] = self.errors_by_code.get(code.name, 0) + 1

    def cumulative_buckets(self) -> list[int]:
        """Counts of answers at or under each latency bound (Prometheus `le` style)."""
        return _running_sum(self.buckets)

    def cumulative_batch_buckets(self) -> list[int]:
        return _running_sum(self.batch_buckets)


def _running_sum(counts: list[int]) -> list[int]:
    out, total = [], 0
    for n in counts:
        total += n
        out.append(total)
    return out


class PredictRouter:
    """The agent's `Inference` servicer, and its endpoint-set watcher (`watch()`)."""

    def __init__(self, node_id: str, *, link: Any = None, local_channel: LocalChannel | None = None,
                 local_frames: LocalFrames | None = None, remote_stub: RemoteStub | None = None,
                 clock: Callable[[], float] | None = None):
        self.node_id = node_id
        self._link = link
        self._local_channel = local_channel or (lambda _task_id: None)
        self._local_frames = local_frames or (lambda _task_id: None)
        self._remote_stub = remote_stub or (lambda address: link.stub(serving_pb2_grpc.InferenceStub, address))
        self._clock = clock
        self._endpoints: dict[str, list[serving_pb2.Endpoint]] = {}
        self._version = -1  # of the set in use; -1: none received yet
        self._changed = asyncio.Event()
        self._outstanding: dict[str, int] = {}
        self._bad_until: dict[str, float] = {}
        self._local_stubs: dict[int, tuple[Any, Any]] = {}  # id(channel) -> (channel, stub)
        self.counters: dict[str, DeploymentCounters] = {}
        self._call: Any = None  # the WatchEndpoints stream in use
        self._dropped = False
        self.started = False

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # -- the endpoint set ----------------------------------------------------------------
    def set_endpoints(self, endpoint_set: serving_pb2.EndpointSet) -> None:
        """Replace the whole set (each WatchEndpoints message is whole)."""
        self._endpoints = {name: list(eps.endpoints) for name, eps in endpoint_set.deployments.items()}
        self._version = endpoint_set.version
        live = {ep.task_id for eps in self._endpoints.values() for ep in eps}
        for task_id in [t for t in self._bad_until if t not in live]:
            del self._bad_until[task_id]
        for name in [n for n in self.counters if n not in self._endpoints]:
            del self.counters[name]  # a removed deployment's counters go with it
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def endpoints(self, deployment: str) -> list[serving_pb2.Endpoint]:
        return list(self._endpoints.get(deployment, ()))

    def outstanding(self, task_id: str) -> int:
        """Requests this router has in flight on `task_id` now."""
        return self._outstanding.get(task_id, 0)

    async def watch(self) -> None:
        """Follow the leader's endpoint set for as long as the agent runs."""
        from lepton.agent.link import ServiceLink

        deployments = ServiceLink(self._link, serving_pb2_grpc.DeploymentsStub)
        remove = self._link.on_leader_change(self._leader_moved)
        backoff, last_note = MIN_BACKOFF_S, ""
        try:
            while True:
                self._dropped = False
                address = self._link.address
                try:
                    call, address = deployments.open_stream(
                        "WatchEndpoints", serving_pb2.WatchEndpointsRequest(node_id=self.node_id))
                    self._call = call
                    async for endpoint_set in call:
                        self._link.answered()
                        backoff, last_note = MIN_BACKOFF_S, ""
                        self.set_endpoints(endpoint_set)
                    raise Unavailable("the endpoint stream ended")
                except grpc.aio.AioRpcError as rpc_err:
                    self._call = None
                    note = self._link.failed(rpc_err, address).message
                except LeptonError as err:
                    note = err.message
                except asyncio.CancelledError:
                    if not self._dropped:
                        raise
                    continue  # the leader moved: look again at once
                if note != last_note:  # once per kind of failure, not once a second
                    logger.info("endpoint stream: %s; retrying (routing with the last set)", note)
                    last_note = note
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(MAX_BACKOFF_S, backoff * 2)
        finally:
            remove()

    def _leader_moved(self, _old: str, _new: str) -> None:
        call, self._call = self._call, None
        if call is not None:
            self._dropped = True
            call.cancel()

    # -- routing -------------------------------------------------------------------------
    def _pick(self, deployment: str, tried: set[str], allow_bad: bool) -> serving_pb2.Endpoint | None:
        """The usable replica with the fewest requests in flight here (local on a tie)."""
        now = self._now()
        best, best_key = None, None
        for ep in self._endpoints.get(deployment, ()):
            bad = self._bad_until.get(ep.task_id, 0.0) > now
            # Each replica once per pass, bad ones too: one that fails without a pause (its
            # socket refused at once) would otherwise be retried in a loop that never yields.
            if ep.task_id in tried or bad and not allow_bad:
                continue
            key = (bad, self._outstanding.get(ep.task_id, 0),
                   ep.node_id != self.node_id, random.random())
            if best_key is None or key < best_key:
                best, best_key = ep, key
        return best

    def mark_bad(self, task_id: str) -> None:
        self._bad_until[task_id] = self._now() + BAD_FOR_S

    async def predict(self, deployment: str, inputs: serving_pb2.Tensor,
                      timeout_s: float | None = None) -> serving_pb2.PredictResponse:
        """Route one request; raises LeptonError (the replica's own, or NotFound / Unavailable /
        InvalidArgument from here). Counted in this deployment's counters when it exists."""
        return await self.predict_request(serving_pb2.PredictRequest(deployment=deployment, inputs=inputs),
                                          timeout_s)

    async def predict_request(self, request: serving_pb2.PredictRequest,
                              timeout_s: float | None = None) -> serving_pb2.PredictResponse:
        """`predict` of a PredictRequest as it came (`replica` unset): forwarded as it is."""
        deployment = request.deployment
        v.check_deployment_name(deployment)
        check_inputs_size(request.inputs)
        start = self._now()
        deadline = start + (timeout_s if timeout_s is not None and timeout_s > 0 else DEFAULT_DEADLINE_S)
        try:
            response = await self._route(request, deadline)
        except LeptonError as err:
            if deployment in self._endpoints:
                self.counters.setdefault(deployment, DeploymentCounters()).failed(err.code)
            raise
        except asyncio.CancelledError:
            # The caller gave up (its deadline, or it hung up) before an answer: a failed
            # request for `serve show`, which otherwise undercounted timed-out requests.
            if deployment in self._endpoints:
                self.counters.setdefault(deployment, DeploymentCounters()).failed(grpc.StatusCode.CANCELLED)
            raise
        self.counters.setdefault(deployment, DeploymentCounters()).answered(
            (self._now() - start) * 1000, response.batch_rows)
        return response

    async def _route(self, request: serving_pb2.PredictRequest, deadline: float) -> serving_pb2.PredictResponse:
        deployment = request.deployment
        tried: set[str] = set()
        last: LeptonError | None = None
        wait_s = _FIRST_WAIT_S
        allow_bad = False
        while True:
            if self._version >= 0 and deployment not in self._endpoints:
                await self._wait_unknown(deployment, deadline)
            ep = self._pick(deployment, tried, allow_bad)
            remaining = deadline - self._now()
            if ep is None or remaining <= _MIN_TRY_S:
                if remaining <= _MIN_TRY_S:
                    raise Unavailable(_none_ready(deployment, self._version, last))
                # Nothing usable now: wait for a new set or a moment, then try again,
                # this time also replicas that failed (they may be back).
                changed = self._changed
                try:
                    await asyncio.wait_for(changed.wait(), min(wait_s, remaining))
                except asyncio.TimeoutError:
                    pass
                wait_s = min(wait_s * 2, MAX_BACKOFF_S / 2)
                tried.clear()
                allow_bad = True
                continue
            tried.add(ep.task_id)
            try:
                return await self._forward(ep, request, remaining)
            except DeadlineExceeded:
                if last is None:
                    raise  # the one replica tried was slow: the caller's deadline, as is
                raise Unavailable(_none_ready(deployment, self._version, last)) from None
            except _ReplicaFailed as failed:
                self.mark_bad(ep.task_id)
                last = failed.error
                logger.debug("predict %s: replica %s on %s failed (%s); trying another",
                             deployment, ep.task_id, ep.node_id, failed.error.message)

    async def _wait_unknown(self, deployment: str, deadline: float) -> None:
        """A deployment not in this agent's set may be one made a moment ago (`serve up
        --no-wait`) that the leader's next set names: wait for sets for up to UNKNOWN_GRACE_S
        (within the deadline), then NOT_FOUND. Past the deadline: UNAVAILABLE, as for a
        deployment whose replicas are not ready yet."""
        grace_end = min(deadline, self._now() + UNKNOWN_GRACE_S)
        while deployment not in self._endpoints:
            remaining = grace_end - self._now()
            if remaining <= 0:
                if grace_end < deadline:
                    raise NotFound(f"no deployment {deployment!r} (lepton-ctl serve ls)")
                raise Unavailable(f"no replica of {deployment} ready yet: this agent has not heard of "
                                  "the deployment within the deadline (made a moment ago?)")
            changed = self._changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def _forward(self, ep: serving_pb2.Endpoint, request: serving_pb2.PredictRequest,
                       timeout_s: float) -> serving_pb2.PredictResponse:
        """One try on `ep`. Raises _ReplicaFailed (try another) or the caller's LeptonError."""
        local = ep.node_id == self.node_id
        frames = self._local_frames(ep.task_id) if local else None
        if frames is not None and not frames.absent:
            with contextlib.suppress(FramesAbsent):  # an older replica: its gRPC socket below
                return await self._call_frames(ep.task_id, frames, request, timeout_s)
        if local:
            stub = self._local_stub(ep.task_id)
            if stub is None:
                raise _ReplicaFailed(Unavailable(f"replica {ep.task_id} is not running on this node"))
        else:
            stub = self._remote_stub(ep.node_address)
            request = serving_pb2.PredictRequest(deployment=request.deployment, inputs=request.inputs,
                                                 replica=ep.task_id)
        self._outstanding[ep.task_id] = self._outstanding.get(ep.task_id, 0) + 1
        try:
            return await stub.Predict(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as rpc_err:
            err = from_rpc_error(rpc_err)
            if rpc_err.code() in _RETRY_CODES:
                raise _ReplicaFailed(err) from None
            raise err from None
        finally:
            left = self._outstanding.get(ep.task_id, 1) - 1
            if left > 0:
                self._outstanding[ep.task_id] = left
            else:
                self._outstanding.pop(ep.task_id, None)

    async def _call_frames(self, task_id: str, frames: FramesDialer, request: serving_pb2.PredictRequest,
                           timeout_s: float) -> serving_pb2.PredictResponse:
        """One try on a local replica through its frames socket (common/frames.py)."""
        self._outstanding[task_id] = self._outstanding.get(task_id, 0) + 1
        try:
            conn = frames.ready() or await frames.connect()
            answer = await conn.call(request.SerializeToString(), timeout_s)
        except FramesAbsent:
            raise
        except LeptonError as err:
            if err.code in _RETRY_CODES:
                raise _ReplicaFailed(err) from None
            raise
        finally:
            left = self._outstanding.get(task_id, 1) - 1
            if left > 0:
                self._outstanding[task_id] = left
            else:
                self._outstanding.pop(task_id, None)
        return serving_pb2.PredictResponse.FromString(answer)

    def _local_stub(self, task_id: str) -> Any:
        channel = self._local_channel(task_id)
        if channel is None:
            return None
        cached = self._local_stubs.get(id(channel))
        if cached is None or cached[0] is not channel:
            if len(self._local_stubs) > 4 * max(16, len(self._outstanding)):
                self._local_stubs.clear()  # channels of replicas long gone
            cached = self._local_stubs[id(channel)] = (channel, serving_pb2_grpc.InferenceStub(channel))
        return cached[1]

    # -- the gRPC service ----------------------------------------------------------------
    @rpc_boundary
    async def Predict(self, request: serving_pb2.PredictRequest, context: Any) -> serving_pb2.PredictResponse:
        remaining = context.time_remaining()
        if request.replica:
            return await self._serve_forwarded(request, remaining)
        return await self.predict_request(request, timeout_s=remaining)

    async def _serve_forwarded(self, request: serving_pb2.PredictRequest,
                               timeout_s: float | None) -> serving_pb2.PredictResponse:
        """Another agent picked `request.replica`, one of ours: hand it over, nothing more.
        Its failures are UNAVAILABLE, so the sending agent tries another replica."""
        principal = current_principal()
        if principal is not None and principal.role != Role.NODE:
            raise PermissionDenied(f"{principal.name} may not name a replica: only agents forwarding a "
                                   "request set PredictRequest.replica")
        v.require_id(request.replica, "replica")
        check_inputs_size(request.inputs)
        timeout_s = timeout_s or DEFAULT_DEADLINE_S
        replica = request.replica
        request = serving_pb2.PredictRequest(deployment=request.deployment, inputs=request.inputs)
        frames = self._local_frames(replica)
        if frames is not None and not frames.absent:
            with contextlib.suppress(FramesAbsent):  # an older replica: its gRPC socket below
                conn = frames.ready() or await frames.connect()
                return serving_pb2.PredictResponse.FromString(await conn.call(request.SerializeToString(), timeout_s))
        stub = self._local_stub(replica)
        if stub is None:
            raise Unavailable(f"replica {replica} is not running on node {self.node_id}")
        try:
            return await stub.Predict(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as rpc_err:
            raise from_rpc_error(rpc_err) from None

    # -- statistics ----------------------------------------------------------------------
    def stats(self) -> list[serving_pb2.RouterStats]:
        """This router's counters per deployment, for the agent's ReplicaReports."""
        bounds = list(LATENCY_BUCKETS_MS)
        return [
            serving_pb2.RouterStats(deployment=name, requests=c.requests, errors=c.errors,
                                    bucket_le_ms=bounds, bucket_counts=c.cumulative_buckets(),
                                    batch_rows=c.batch_rows, batches=c.batches)
            for name, c in sorted(self.counters.items())
        ]


class _ReplicaFailed(Exception):
    def __init__(self, error: LeptonError):
        super().__init__(error.message)
        self.error = error


def _none_ready(deployment: str, version: int, last: LeptonError | None) -> str:
    if version < 0:
        return f"no ready replica of {deployment}: this agent has no endpoint list from the leader yet"
    why = f" (last failure: {last.message})" if last is not None else ""
    return f"no ready replica of {deployment} within the deadline{why}"


def check_inputs_size(inputs: serving_pb2.Tensor) -> None:
    """The router's own cap; dtype and shape are the replica's to check (it knows the model)."""
    if len(inputs.data) > MAX_PREDICT_BYTES:
        raise InvalidArgument(f"inputs are {len(inputs.data)} bytes; one Predict takes at most "
                              f"{MAX_PREDICT_BYTES} bytes: split the rows into several requests")


def add_to_server(router: PredictRouter, server: grpc.aio.Server) -> str:
    """Register `router` as this agent's Inference service; returns the service's full name."""
    service = serving_pb2.DESCRIPTOR.services_by_name["Inference"]
    register_service(server, router, service)
    return service.full_name
