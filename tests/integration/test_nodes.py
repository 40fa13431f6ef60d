"""Issue 2 end to end: real agents on loopback, driven by the real client and lepton-ctl."""

from __future__ import annotations

import json

import grpc
import psutil
import pytest

from lepton.client import Client
from lepton.common.errors import InvalidArgument, NotFound
from lepton.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.integration.cluster import run_ctl, wait_until

pytestmark = pytest.mark.integration


def by_name(client: Client, name: str):
    return next(n for n in client.nodes() if n.name == name)


def test_nodes_appear_with_real_cpu_and_memory(agents):
    voter = agents("voter")
    agents("worker", "--join", voter.address, "--labels", "zone=a")
    with Client(voter.address) as c:
        wait_until(lambda: len(c.nodes()) == 2, what="two nodes")
        worker = by_name(c, "worker")
        assert worker.state == "ready"
        assert worker.capacity.cpu_logical == psutil.cpu_count(logical=True)
        assert worker.capacity.memory_bytes == psutil.virtual_memory().total
        assert worker.labels == {"zone": "a"}
        assert not worker.voter and by_name(c, "voter").voter
        wait_until(lambda: by_name(c, "worker").usage is not None, what="a heartbeat's usage")

    out = run_ctl("-o", "json", "nodes", "list", server=voter.address, check=True)
    listed = {n["name"]: n for n in json.loads(out.stdout)}
    assert listed["worker"]["capacity"]["memory_bytes"] == psutil.virtual_memory().total
    table = run_ctl("nodes", "list", server=voter.address, check=True).stdout
    assert "worker" in table and "ready" in table


def test_kill_9_marks_the_node_down_and_it_comes_back(agents):
    voter = agents("voter")
    worker = agents("worker", "--join", voter.address)
    with Client(voter.address) as c:
        wait_until(lambda: by_name(c, "worker").state == "ready", what="worker ready")
        worker.kill9()
        down = wait_until(lambda: (n := by_name(c, "worker")).state == "down" and n, what="worker down")
        assert "no heartbeat" in down.state_reason
        worker.start()
        wait_until(lambda: by_name(c, "worker").state == "ready", what="worker back")


def test_sigterm_leaves_instead_of_going_down(agents):
    voter = agents("voter")
    worker = agents("worker", "--join", voter.address)
    with Client(voter.address) as c:
        wait_until(lambda: by_name(c, "worker").state == "ready", what="worker ready")
        assert worker.terminate() == 0
        assert by_name(c, "worker").state == "left"


def test_coordinator_restart_keeps_the_node_table(agents):
    voter = agents("voter")
    agents("worker", "--join", voter.address)
    with Client(voter.address) as c:
        wait_until(lambda: len(c.nodes()) == 2, what="two nodes")
        c.drain(by_name(c, "worker").id)
        before = {n.id: (n.name, n.address, n.draining, n.registered_at) for n in c.nodes()}
        term = c.cluster_status().term
    voter.kill9()
    voter.start()
    with Client(voter.address) as c:
        after = wait_until(lambda: {n.id: (n.name, n.address, n.draining, n.registered_at)
                                    for n in c.nodes()}, what="node table after restart")
        assert after == before
        assert c.cluster_status().term > term
        wait_until(lambda: by_name(c, "worker").state == "ready", what="worker heartbeating again")


def test_bad_input_is_refused_and_changes_nothing(agents):
    voter = agents("voter")
    with Client(voter.address) as c:
        wait_until(lambda: len(c.nodes()) == 1, what="voter registered")
        before = c.cluster_status()
        with pytest.raises(NotFound, match="not found"):
            c.node("no-such-node")
        with pytest.raises(NotFound):
            c.drain("no-such-node")

        channel = grpc.insecure_channel(voter.address)
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        cases = [
            (stub.GetNode, coordinator_pb2.GetNodeRequest(node_id=""), "must not be empty"),
            (stub.GetNode, coordinator_pb2.GetNodeRequest(node_id="x" * 5000), "at most"),
            (stub.DrainNode, coordinator_pb2.DrainNodeRequest(node_id="../etc"), "letters"),
            (stub.RegisterNode, coordinator_pb2.RegisterNodeRequest(node_id="n-1", address="nowhere"), "HOST:PORT"),
            (stub.RegisterNode, coordinator_pb2.RegisterNodeRequest(
                node_id="n-1", address="127.0.0.1:1", labels={"k": "v" * 10_000}), "at most"),
            (stub.ListNodes, coordinator_pb2.ListNodesRequest(states=[99]), "unknown node state"),
        ]
        for method, request, fragment in cases:
            with pytest.raises(grpc.RpcError) as info:
                method(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert fragment in info.value.details()
        raw = channel.unary_unary("/lepton.v1.Coordinator/RegisterNode")
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\x00garbage", timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed RegisterNodeRequest" in info.value.details()
        channel.close()

        with pytest.raises(InvalidArgument):
            c.node("")
        after = c.cluster_status()
        assert (after.commit_index, after.node_count) == (before.commit_index, before.node_count)

    out = run_ctl("nodes", "show", "no-such-node", server=voter.address)
    assert out.returncode == 1
    assert out.stderr.startswith("lepton-ctl: ") and len(out.stderr.strip().splitlines()) == 1


def test_cli_reports_an_unreachable_server_in_one_line():
    out = run_ctl("--timeout", "1", "nodes", "list", server="127.0.0.1:1")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "cannot reach 127.0.0.1:1" in out.stderr


def test_cluster_status_names_the_leader(agents):
    voter = agents("voter")
    out = run_ctl("-o", "json", "cluster", "status", server=voter.address, check=True)
    doc = json.loads(out.stdout)
    assert doc["leader"] == voter.address
    assert doc["term"] >= 1


def test_watch_streams_node_events(agents):
    voter = agents("voter")
    with Client(voter.address) as c:
        wait_until(lambda: len(c.nodes()) == 1, what="voter registered")
        with c.watch_nodes() as watch:
            agents("worker", "--join", voter.address)
            event = next(watch)
            assert event.node.name == "worker"
