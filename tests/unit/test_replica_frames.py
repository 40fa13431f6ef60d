"""The agent-to-local-replica frames socket (common/frames.py): the replica's FrameServer
around a fake service, the agent's FramesDialer, and the Predict router using them."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from lepton.agent.predict_router import PredictRouter
from lepton.agent.replica_frames import FramesAbsent, FramesConnection, FramesDialer
from lepton.common.errors import DeadlineExceeded, InvalidArgument, PermissionDenied, Unavailable
from lepton.common.frames import HEADER, MAX_FRAME_BYTES
from lepton.v1 import serving_pb2
from lepton.workloads.serving.frame_server import FrameServer
from lepton.workloads.serving.tensors import from_tensor, to_tensor


class FakeService:
    """Doubles float32 rows; rows of all -1 fail INVALID_ARGUMENT; `hold` keeps answers back."""

    def __init__(self, name: str = "r1"):
        self.name = name
        self.calls = 0
        self.hold: list[tuple[asyncio.Future, np.ndarray]] | None = None
        self.unavailable = False

    def start_predict(self, request: serving_pb2.PredictRequest) -> asyncio.Future:
        self.calls += 1
        if self.unavailable:
            raise Unavailable(f"{self.name} is stopping")
        x = from_tensor(request.inputs)
        if (x == -1).all():
            raise InvalidArgument("rows of -1 are refused")
        future = asyncio.get_running_loop().create_future()
        if self.hold is not None:
            self.hold.append((future, x))
        else:
            future.set_result((x * 2, len(x)))
        return future

    def answer(self, future: asyncio.Future) -> serving_pb2.PredictResponse:
        y, rows = future.result()
        return serving_pb2.PredictResponse(outputs=to_tensor(y), batch_rows=rows, replica=self.name)

    def release(self) -> None:
        held, self.hold = self.hold or [], None
        for future, x in held:
            future.set_result((x * 2, len(x)))


def request(x: np.ndarray) -> bytes:
    return serving_pb2.PredictRequest(deployment="d", inputs=to_tensor(x.astype("<f4"))).SerializeToString()


@pytest.fixture
async def served(tmp_path):
    """{name: (FakeService, FrameServer, FramesDialer)} for two replicas."""
    made = {}
    for name in ("t1", "t2"):
        service = FakeService(name)
        server = FrameServer(service)
        await server.start(tmp_path / f"{name}.sock.frames")
        made[name] = (service, server, FramesDialer(tmp_path / f"{name}.sock.frames"))
    yield made
    for _, server, dialer in made.values():
        dialer.close()
        await server.close()


async def test_concurrent_calls_share_one_connection_and_get_their_own_answers(served):
    _, _, dialer = served["t1"]
    rows = [np.full((i + 1, 3), float(i)) for i in range(20)]
    conns = await asyncio.gather(*(dialer.connect() for _ in range(5)))
    assert all(c is conns[0] for c in conns)  # one connection however many asked at once
    answers = await asyncio.gather(*(conns[0].call(request(x), 5.0) for x in rows))
    for x, raw in zip(rows, answers, strict=True):
        got = from_tensor(serving_pb2.PredictResponse.FromString(raw).outputs)
        np.testing.assert_array_equal(got, x * 2)


async def test_errors_come_back_with_their_code_and_the_connection_keeps_serving(served):
    service, _, dialer = served["t1"]
    conn = await dialer.connect()
    with pytest.raises(InvalidArgument, match="rows of -1 are refused"):
        await conn.call(request(-np.ones((1, 3))), 5.0)
    with pytest.raises(InvalidArgument, match="not a serialized PredictRequest"):
        await conn.call(b"\xff\xff\xff", 5.0)
    raw = await conn.call(request(np.ones((1, 3))), 5.0)
    assert serving_pb2.PredictResponse.FromString(raw).replica == "t1"
    assert service.calls == 2  # the garbage never reached the service


async def test_a_late_answer_is_a_deadline_and_is_dropped(served):
    service, _, dialer = served["t1"]
    service.hold = []
    conn = await dialer.connect()
    with pytest.raises(DeadlineExceeded):
        await conn.call(request(np.ones((1, 3))), 0.05)
    service.release()  # answered after the caller left: dropped, nothing breaks
    assert serving_pb2.PredictResponse.FromString(await conn.call(request(np.ones((1, 3))), 5.0)).batch_rows == 1


async def test_a_lost_connection_fails_its_calls_unavailable_and_the_next_one_reconnects(served):
    service, server, dialer = served["t1"]
    service.hold = []
    conn = await dialer.connect()
    pending = asyncio.ensure_future(conn.call(request(np.ones((1, 3))), 5.0))
    while not service.hold:
        await asyncio.sleep(0.01)
    for c in list(server.connections):
        c.close()
    with pytest.raises(Unavailable, match="closed its connection"):
        await pending
    service.release()
    again = await dialer.connect()
    assert again is not conn
    assert serving_pb2.PredictResponse.FromString(await again.call(request(np.ones((2, 3))), 5.0)).batch_rows == 2


async def test_an_oversized_frame_closes_the_connection(served):
    _, _, dialer = served["t1"]
    conn = await dialer.connect()
    conn.transport.write(HEADER.pack(MAX_FRAME_BYTES + 1, 1, 0))
    for _ in range(1000):  # the replica closes it
        if conn.lost:
            break
        await asyncio.sleep(0.01)
    assert conn.lost
    with pytest.raises(Unavailable):
        await conn.call(request(np.ones((1, 3))), 5.0)


async def test_draining_refuses_new_requests_but_answers_those_it_holds(served):
    service, server, dialer = served["t1"]
    service.hold = []
    conn = await dialer.connect()
    held = asyncio.ensure_future(conn.call(request(np.ones((1, 3))), 5.0))
    while not service.hold:
        await asyncio.sleep(0.01)
    server.drain()
    with pytest.raises(Unavailable, match="shutting down"):
        await conn.call(request(np.ones((1, 3))), 5.0)
    service.release()
    assert serving_pb2.PredictResponse.FromString(await held).batch_rows == 1


async def test_nobody_listening_is_unavailable(tmp_path):
    import socket

    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.frames"))  # there, but not listening: refused
    try:
        with pytest.raises(Unavailable, match="cannot reach the replica"):
            await FramesDialer(tmp_path / "dead.frames").connect()
    finally:
        dead.close()
    missing = FramesDialer(tmp_path / "none.frames")
    with pytest.raises(FramesAbsent, match="no frames socket"):
        await missing.connect()
    assert missing.absent
    with pytest.raises(Unavailable, match="not there"):
        await FramesDialer(tmp_path / "no-folder" / ("x" * 120) / "r.frames").connect()


def frames_router(served, *task_ids: str) -> PredictRouter:
    router = PredictRouter("nodeA", local_frames=lambda t: served[t][2] if t in served else None)
    es = serving_pb2.EndpointSet(version=1)
    es.deployments["digits"].endpoints.extend(
        serving_pb2.Endpoint(task_id=t, node_id="nodeA", node_address="a:1", generation=1) for t in task_ids)
    router.set_endpoints(es)
    return router


async def test_the_router_calls_local_replicas_through_frames_and_retries_an_unavailable_one(served):
    router = frames_router(served, "t1", "t2")
    served["t1"][0].unavailable = True

    async def answered_by_t2() -> None:
        response = await router.predict("digits", to_tensor(np.ones((2, 3), dtype="<f4")))
        assert response.replica == "t2"
        np.testing.assert_array_equal(from_tensor(response.outputs), np.full((2, 3), 2.0))

    calls = 0
    while not served["t1"][0].calls:  # ties between idle replicas are broken at random
        assert calls < 64, "t1 never tried"
        await answered_by_t2()
        calls += 1
    for _ in range(4):
        await answered_by_t2()
    assert served["t1"][0].calls == 1  # marked bad after one failure
    with pytest.raises(InvalidArgument, match="rows of -1"):  # the caller's error: as it came
        await router.predict("digits", to_tensor(-np.ones((1, 3), dtype="<f4")))
    assert (router.outstanding("t1"), router.outstanding("t2")) == (0, 0)
    [stats] = router.stats()
    assert (stats.requests, stats.errors) == (calls + 4 + 1, 1)


async def test_a_deployment_made_a_moment_ago_is_waited_for_not_refused(served):
    router = frames_router(served, "t1")
    call = asyncio.ensure_future(router.predict("fresh", to_tensor(np.ones((1, 3), dtype="<f4"))))
    await asyncio.sleep(0.1)
    assert not call.done()  # not NOT_FOUND at once: this agent's set may lag the leader's
    es = serving_pb2.EndpointSet(version=2)
    for name in ("digits", "fresh"):
        es.deployments[name].endpoints.add(task_id="t1", node_id="nodeA", node_address="a:1", generation=1)
    router.set_endpoints(es)
    assert (await call).replica == "t1"


async def test_an_unknown_deployment_within_a_short_deadline_is_unavailable(served):
    router = frames_router(served, "t1")
    with pytest.raises(Unavailable, match="not heard of the deployment"):
        await router.predict("fresh", to_tensor(np.ones((1, 3), dtype="<f4")), timeout_s=0.2)


def test_a_frames_connection_that_was_lost_refuses_at_once():
    conn = FramesConnection()
    conn.connection_lost(None)
    with pytest.raises(Unavailable):
        asyncio.run(conn.call(b"", 1.0))


async def test_a_replica_that_checks_keys_serves_only_the_key_it_takes(tmp_path):
    server = FrameServer(FakeService(), key_ok=lambda key: key == "s3cret")
    await server.start(tmp_path / "k.frames")
    right = FramesDialer(tmp_path / "k.frames", key="s3cret")
    wrong = FramesDialer(tmp_path / "k.frames", key="guess")
    keyless = FramesDialer(tmp_path / "k.frames")
    try:
        ok = await (await right.connect()).call(request(np.ones((1, 3))), 5.0)
        assert serving_pb2.PredictResponse.FromString(ok).batch_rows == 1
        with pytest.raises(Unavailable, match="refused this agent's connection: only this replica's agent"):
            await (await wrong.connect()).call(request(np.ones((1, 3))), 5.0)
        with pytest.raises(PermissionDenied, match="only this replica's agent"):
            await (await keyless.connect()).call(request(np.ones((1, 3))), 5.0)
        assert server.service.calls == 1
    finally:
        for dialer in (right, wrong, keyless):
            dialer.close()
        await server.close()


async def test_a_replica_without_a_frames_socket_is_called_over_grpc(tmp_path):
    """A replica an older Lepton started (re-adopted after an agent upgrade) has only its
    gRPC socket: the router uses it, and stops looking for the frames one."""
    from tests.unit.test_predict_router import FakeReplica, serve

    server, _ = await serve(FakeReplica("old"), f"unix:{tmp_path / 'old.sock'}")
    channel = grpc.aio.insecure_channel(f"unix:{tmp_path / 'old.sock'}")
    dialer = FramesDialer(tmp_path / "old.sock.frames")
    router = PredictRouter("nodeA", local_frames=lambda t: dialer, local_channel=lambda t: channel)
    es = serving_pb2.EndpointSet(version=1)
    es.deployments["digits"].endpoints.add(task_id="old", node_id="nodeA", node_address="a:1", generation=1)
    router.set_endpoints(es)
    try:
        for _ in range(2):
            response = await router.predict("digits", to_tensor(np.ones((1, 3), dtype="<f4")))
            assert response.replica == "old"
        assert dialer.absent
        [stats] = router.stats()
        assert stats.errors == 0
    finally:
        await channel.close()
        await server.stop(None)
