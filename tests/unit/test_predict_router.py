"""PredictRouter against fake replicas: real grpc.aio servers on unix sockets (and one agent's
server on loopback TCP for forwarding), no cluster."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from lepton.agent import predict_router as pr
from lepton.agent.predict_router import PredictRouter
from lepton.common import auth
from lepton.common.auth import Principal, Role
from lepton.common.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from lepton.common.grpc_util import register_service
from lepton.v1 import serving_pb2, serving_pb2_grpc


def tensor(rows: np.ndarray) -> serving_pb2.Tensor:
    rows = np.ascontiguousarray(rows, dtype="<f4")
    return serving_pb2.Tensor(dtype=rows.dtype.str, shape=list(rows.shape), data=rows.tobytes())


class FakeReplica:
    """Doubles its inputs; `gate` (when set) holds every call until released; `fail` makes
    each call end with that status."""

    def __init__(self, task_id: str):
        self.task_id = task_id
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.fail: grpc.StatusCode | None = None

    @pr.rpc_boundary
    async def Predict(self, request, context):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            await context.abort(self.fail, f"{self.task_id} says {self.fail.name}")
        x = np.frombuffer(request.inputs.data, dtype="<f4")
        out = tensor((x * 2).reshape(list(request.inputs.shape)))
        return serving_pb2.PredictResponse(outputs=out, replica=self.task_id, model="m", generation=1,
                                           batch_rows=request.inputs.shape[0])


async def serve(servicer, address: str) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    register_service(server, servicer, serving_pb2.DESCRIPTOR.services_by_name["Inference"])
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


@pytest.fixture
async def replicas(tmp_path):
    """Two fake replicas on unix sockets: {task_id: (FakeReplica, channel)}."""
    made, servers = {}, []
    for task_id in ("t1", "t2"):
        fake = FakeReplica(task_id)
        server, _ = await serve(fake, f"unix:{tmp_path / task_id}.sock")
        servers.append(server)
        made[task_id] = (fake, grpc.aio.insecure_channel(f"unix:{tmp_path / task_id}.sock"))
    yield made
    for _, channel in made.values():
        await channel.close()
    for server in servers:
        await server.stop(None)


def endpoint_set(version: int = 1, **deployments: list[tuple[str, str, str]]) -> serving_pb2.EndpointSet:
    es = serving_pb2.EndpointSet(version=version)
    for name, eps in deployments.items():
        es.deployments[name].endpoints.extend(
            serving_pb2.Endpoint(task_id=t, node_id=n, node_address=a, generation=1) for t, n, a in eps)
    return es


def local_router(replicas, *task_ids: str) -> PredictRouter:
    router = PredictRouter("nodeA", local_channel=lambda t: replicas[t][1] if t in replicas else None)
    router.set_endpoints(endpoint_set(digits=[(t, "nodeA", "a:1") for t in task_ids]))
    return router


async def test_answers_from_a_local_replica_and_counts(replicas):
    router = local_router(replicas, "t1")
    response = await router.predict("digits", tensor(np.ones((3, 4))))
    got = np.frombuffer(response.outputs.data, dtype="<f4").reshape(3, 4)
    assert np.array_equal(got, np.full((3, 4), 2.0)) and response.replica == "t1"
    [stats] = router.stats()
    assert (stats.deployment, stats.requests, stats.errors) == ("digits", 1, 0)
    assert stats.batch_rows == 3 and stats.batches == 1
    assert stats.bucket_counts[-1] == 1 and list(stats.bucket_counts) == sorted(stats.bucket_counts)
    assert stats.bucket_le_ms[-1] == float("inf")


async def test_least_outstanding_spreads_concurrent_requests(replicas):
    router = local_router(replicas, "t1", "t2")
    gate = asyncio.Event()
    for fake, _ in replicas.values():
        fake.gate = gate
    calls = [asyncio.create_task(router.predict("digits", tensor(np.ones((1, 4))))) for _ in range(6)]
    for _ in range(200):
        if replicas["t1"][0].calls + replicas["t2"][0].calls == 6:
            break
        await asyncio.sleep(0.01)
    assert (router.outstanding("t1"), router.outstanding("t2")) == (3, 3)
    gate.set()
    await asyncio.gather(*calls)
    assert (router.outstanding("t1"), router.outstanding("t2")) == (0, 0)


async def test_a_failing_replica_is_skipped_and_the_request_answered(replicas, monkeypatch):
    monkeypatch.setattr(pr.random, "random", lambda: 0.0)  # ties go to the first listed: t1
    router = local_router(replicas, "t1", "t2")
    replicas["t1"][0].fail = grpc.StatusCode.UNAVAILABLE
    for _ in range(6):
        response = await router.predict("digits", tensor(np.ones((1, 4))))
        assert response.replica == "t2"
    assert replicas["t1"][0].calls == 1  # marked bad after its one failure, not tried again


async def test_a_replica_gone_from_this_node_is_retried_elsewhere(replicas):
    router = local_router(replicas, "t1", "t2")
    router.set_endpoints(endpoint_set(digits=[("t9", "nodeA", "a:1"), ("t2", "nodeA", "a:1")]))
    for _ in range(3):
        assert (await router.predict("digits", tensor(np.ones((1, 4))))).replica == "t2"


async def test_invalid_argument_is_returned_as_is_and_not_retried(replicas):
    router = local_router(replicas, "t1", "t2")
    for fake, _ in replicas.values():
        fake.fail = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument, match="says INVALID_ARGUMENT"):
        await router.predict("digits", tensor(np.ones((1, 4))))
    assert replicas["t1"][0].calls + replicas["t2"][0].calls == 1
    assert router.stats()[0].errors == 1


async def test_unknown_deployment_is_not_found(replicas):
    router = local_router(replicas, "t1")
    with pytest.raises(NotFound, match="no deployment 'other'"):
        await router.predict("other", tensor(np.ones((1, 4))))
    assert [s.deployment for s in router.stats()] == []  # no counters for names that do not exist


async def test_no_ready_replica_is_unavailable_at_the_deadline(replicas):
    router = local_router(replicas)
    with pytest.raises(Unavailable, match="no ready replica of digits"):
        await router.predict("digits", tensor(np.ones((1, 4))), timeout_s=0.2)
    assert router.stats()[0].errors == 1


async def test_every_replica_failing_ends_unavailable_naming_the_last_failure(replicas):
    router = local_router(replicas, "t1", "t2")
    for fake, _ in replicas.values():
        fake.fail = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(Unavailable, match="last failure: t. says UNAVAILABLE"):
        await router.predict("digits", tensor(np.ones((1, 4))), timeout_s=0.3)


async def test_a_replica_that_becomes_ready_while_waiting_answers(replicas):
    router = local_router(replicas)
    call = asyncio.create_task(router.predict("digits", tensor(np.ones((1, 4))), timeout_s=30))
    await asyncio.sleep(0.05)
    router.set_endpoints(endpoint_set(version=2, digits=[("t1", "nodeA", "a:1")]))
    assert (await call).replica == "t1"


async def test_a_caller_that_gives_up_is_counted_as_a_failed_request(replicas):
    router = local_router(replicas, "t1")
    replicas["t1"][0].gate = asyncio.Event()  # the replica holds the call
    call = asyncio.create_task(router.predict("digits", tensor(np.ones((1, 4))), timeout_s=30))
    while replicas["t1"][0].calls == 0:
        await asyncio.sleep(0.01)
    call.cancel()  # what grpc.aio does to the handler when its caller's deadline passes
    with pytest.raises(asyncio.CancelledError):
        await call
    stats = router.stats()[0]
    assert (stats.requests, stats.errors) == (1, 1)
    replicas["t1"][0].gate.set()


async def test_before_any_endpoint_set_it_waits_then_says_so():
    router = PredictRouter("nodeA")
    with pytest.raises(Unavailable, match="no endpoint list from the leader yet"):
        await router.predict("digits", tensor(np.ones((1, 4))), timeout_s=0.1)


async def test_oversized_and_malformed_requests_are_refused_before_routing(replicas):
    router = local_router(replicas, "t1")
    big = serving_pb2.Tensor(dtype="<f4", shape=[1], data=b"\0" * (pr.MAX_PREDICT_BYTES + 1))
    with pytest.raises(InvalidArgument, match="split the rows"):
        await router.predict("digits", big)
    with pytest.raises(InvalidArgument, match="deployment name is required"):
        await router.predict("", tensor(np.ones((1, 4))))
    assert replicas["t1"][0].calls == 0


async def test_removed_deployments_lose_their_counters(replicas):
    router = local_router(replicas, "t1")
    await router.predict("digits", tensor(np.ones((1, 4))))
    router.set_endpoints(endpoint_set(version=2))
    assert router.stats() == []


async def test_forwarding_to_another_agent_sets_replica_and_it_answers_once(replicas):
    """A routes to B's replica over B's Inference service; B serves only that replica."""
    router_b = PredictRouter("nodeB", local_channel=lambda t: replicas[t][1] if t == "t2" else None)
    server_b, port = await serve(router_b, "127.0.0.1:0")
    address_b = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address_b)
    try:
        router_a = PredictRouter("nodeA", local_channel=lambda t: None,
                                 remote_stub=lambda a: serving_pb2_grpc.InferenceStub(channel))
        router_a.set_endpoints(endpoint_set(digits=[("t2", "nodeB", address_b)]))
        response = await router_a.predict("digits", tensor(np.ones((2, 4))))
        assert response.replica == "t2" and replicas["t2"][0].calls == 1
        assert router_b.stats() == []  # counted once, by the router the client called
        # B refuses to pass a request on to a replica it does not hold: A would try another.
        stub = serving_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(serving_pb2.PredictRequest(deployment="digits", inputs=tensor(np.ones((1, 4))),
                                                          replica="t1"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "not running on node nodeB" in err.value.details()
    finally:
        await channel.close()
        await server_b.stop(None)


async def test_only_a_node_may_name_a_replica(replicas):
    router = PredictRouter("nodeB", local_channel=lambda t: replicas[t][1])
    request = serving_pb2.PredictRequest(deployment="digits", inputs=tensor(np.ones((1, 4))), replica="t1")
    token = auth._CURRENT.set(Principal("alice", Role.USER))
    try:
        with pytest.raises(PermissionDenied, match="only agents forwarding"):
            await router._serve_forwarded(request, 5.0)
    finally:
        auth._CURRENT.reset(token)
    token = auth._CURRENT.set(Principal("nodeA", Role.NODE, via="certificate"))
    try:
        assert (await router._serve_forwarded(request, 5.0)).replica == "t1"
    finally:
        auth._CURRENT.reset(token)
    assert replicas["t1"][0].calls == 1


def test_counters_bucket_latencies_at_their_bounds():
    c = pr.DeploymentCounters()
    for ms in (0.1, 1.0, 1.5, 99.0, 20_000.0):
        c.answered(ms, 0)
    c.failed(grpc.StatusCode.UNAVAILABLE)
    cumulative = dict(zip(pr.LATENCY_BUCKETS_MS, c.cumulative_buckets(), strict=True))
    assert (cumulative[0.5], cumulative[1], cumulative[2], cumulative[100], cumulative[10000]) == (1, 2, 3, 4, 4)
    assert cumulative[float("inf")] == 5 and c.requests == 6 and c.errors_by_code == {"UNAVAILABLE": 1}
    assert c.batches == 0


async def test_metrics_export_the_router_counters(replicas):
    from prometheus_client import CollectorRegistry, generate_latest

    from lepton.agent.metrics import ServingCollector

    router = local_router(replicas, "t1")
    registry = CollectorRegistry()
    registry.register(ServingCollector(router))
    await router.predict("digits", tensor(np.ones((3, 4))))
    replicas["t1"][0].fail = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument):
        await router.predict("digits", tensor(np.ones((1, 4))))
    text = generate_latest(registry).decode()
    assert 'lepton_serving_requests_total{deployment="digits"} 2.0' in text
    assert 'lepton_serving_errors_total{code="INVALID_ARGUMENT",deployment="digits"} 1.0' in text
    assert 'lepton_serving_latency_seconds_count{deployment="digits"} 1.0' in text
    assert 'lepton_serving_batch_rows_bucket{deployment="digits",le="2.0"} 0.0' in text
    assert 'lepton_serving_batch_rows_bucket{deployment="digits",le="4.0"} 1.0' in text
