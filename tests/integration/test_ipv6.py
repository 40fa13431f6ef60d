"""A cluster on the IPv6 loopback: agents listen on [::1]:PORT (the side channel and the
free port they report in the host's own family), advertise and join by that address, and
a gang's rank-0 address reaches its members as the bare host torch wants (MASTER_ADDR)."""

from __future__ import annotations

import socket

import pytest

from lepton.client import Client
from lepton.common.channels import make_channel
from lepton.v1 import common_pb2
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1.coordinator_pb2_grpc import CoordinatorStub
from tests.integration.cluster import free_port, wait_until


def _free_ipv6_port() -> int:
    """A port free on ::1 now; 0 where this machine has no IPv6 loopback."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
            return s.getsockname()[1]
    except OSError:
        return 0


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not _free_ipv6_port(), reason="no IPv6 loopback on this machine"),
]


def test_a_cluster_on_the_ipv6_loopback_places_a_gang(agents):
    voter_addr, worker_addr = (f"[::1]:{free_port('::1')}" for _ in range(2))
    agents("voter", "--listen", voter_addr)
    agents("worker", "--listen", worker_addr, "--join", voter_addr)
    channel = make_channel(voter_addr, aio=False)
    stub = CoordinatorStub(channel)

    def nodes_with_free_ports():
        nodes = {n.name: n for n in stub.ListNodes(cpb.ListNodesRequest(), timeout=10).nodes}
        ready = [n for n in nodes.values() if n.state == common_pb2.NODE_STATE_READY and n.usage.free_port > 0]
        return nodes if len(ready) == 2 else None

    try:
        nodes = wait_until(nodes_with_free_ports, timeout=90, what="both nodes ready, reporting a free port")
        assert {n.name: n.address for n in nodes.values()} == {"voter": voter_addr, "worker": worker_addr}
        with Client(voter_addr) as client:
            job = client.submit_job(["sleep", "60"], nodes=2, cpu=0.1)

            def placed():
                tasks = [stub.GetTask(cpb.GetTaskRequest(task_id=t.id), timeout=10) for t in client.job(job.id).tasks]
                return tasks if all(t.node_id for t in tasks) else None

            tasks = wait_until(placed, timeout=90, what="both gang members placed")
            by_id = {n.id: n for n in nodes.values()}
            rank0 = next(t for t in tasks if t.spec.gang_rank == 0)
            assert {(t.master_addr, t.master_port) for t in tasks} == {("::1", rank0.master_port)}
            assert rank0.master_port > 0 and by_id[rank0.node_id].address.startswith("[::1]:")
            client.cancel(rank0.id)
    finally:
        channel.close()
