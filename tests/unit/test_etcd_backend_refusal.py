"""A voter of the other state backend is refused by the leader with a structured reason
(LeptonError.reason, carried in trailing metadata), and the agent recognises the refusal
by that reason, never by the message's wording: over a real gRPC server and the agent's
real CoordinatorLink and Heartbeater."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest

from lepton.agent.heartbeat import Heartbeater
from lepton.agent.link import CoordinatorLink
from lepton.common.errors import REASON_WRONG_STATE_BACKEND, FailedPrecondition, LeptonError
from lepton.common.grpc_util import rpc_boundary
from lepton.coordinator.api.service import CoordinatorService
from lepton.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc


class Leader(coordinator_pb2_grpc.CoordinatorServicer):
    """RegisterNode runs the real service's backend check for a cluster on `backend`, or
    raises `refusal` when given."""

    def __init__(self, backend: str, refusal: LeptonError | None = None):
        self._service = SimpleNamespace(_ctx=SimpleNamespace(state_backend=backend, etcd_endpoints=["etcd-1:2379"]))
        self._refusal = refusal

    @rpc_boundary
    async def RegisterNode(self, request, context):  # noqa: N802 - gRPC method name
        if self._refusal is not None:
            raise self._refusal
        CoordinatorService._check_voter_backend(self._service, request)
        return coordinator_pb2.RegisterNodeResponse()


@pytest.fixture
async def serve():
    servers = []

    async def start(servicer) -> str:
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(0)


async def register(address: str, backend: str) -> tuple[list[LeptonError], LeptonError | None]:
    """One registration of a voter on `backend`: (the refusals handed to on_refused, the error raised)."""
    refusals: list[LeptonError] = []
    link = CoordinatorLink([address])
    beat = Heartbeater(
        link, lambda: coordinator_pb2.RegisterNodeRequest(node_id="n1", address="10.0.0.1:7070", voter=True,
                                                          state_backend=backend),
        common_pb2.Usage, interval_s=1.0, on_refused=refusals.append)
    try:
        await beat.run_cycle()
    except LeptonError as err:
        return refusals, err
    finally:
        await link.close()
    return refusals, None


@pytest.mark.parametrize(("cluster", "voter"), [("etcd", "raft"), ("raft", "etcd")])
async def test_a_voter_of_the_other_backend_is_refused_with_the_reason(serve, cluster, voter):
    address = await serve(Leader(cluster))
    refusals, err = await register(address, voter)
    assert isinstance(err, FailedPrecondition) and err.reason == REASON_WRONG_STATE_BACKEND, err
    assert refusals == [err]  # the agent exits with it


async def test_the_reason_decides_not_the_wording(serve):
    """The same words without the reason are an ordinary failed registration (retried); the
    reason with other words is the refusal."""
    worded = await serve(Leader("etcd", FailedPrecondition("this cluster keeps its state in etcd: ...")))
    refusals, err = await register(worded, "raft")
    assert isinstance(err, FailedPrecondition) and err.reason == "" and refusals == []

    reasoned = await serve(Leader("etcd", FailedPrecondition("reworded", reason=REASON_WRONG_STATE_BACKEND)))
    refusals, err = await register(reasoned, "raft")
    assert refusals == [err] and err.message == "reworded"


async def test_the_same_backend_registers(serve):
    address = await serve(Leader("etcd"))
    refusals, err = await register(address, "etcd")
    assert err is None and refusals == []
