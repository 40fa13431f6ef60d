"""Who may tell the leader where replicas are (issue 19), on a real agent with TLS and
--auth: ReportReplicas and WatchEndpoints are nodes' only (a user's certificate and a task's
own credential are refused), a node speaks only for itself, and a node's report of replicas
that are not its own (a made-up task, a user's plain task on it) changes no endpoint."""

from __future__ import annotations

import json
import sys

import grpc
import pytest

from lepton.client import Client
from lepton.common.channels import client_tls, make_channel
from lepton.v1 import serving_pb2, serving_pb2_grpc
from tests.integration.cluster import run_ctl, wait_until

pytestmark = pytest.mark.integration

# Runs as a task of alice's: calls ReportReplicas with the task's own credential.
PROBE = r"""
import json, os
import grpc
from lepton.common.channels import client_tls, make_channel
from lepton.v1 import serving_pb2, serving_pb2_grpc

tls = client_tls(os.environ["LEPTON_TLS_DIR"], os.environ.get("LEPTON_CERT_NAME") or None)
ch = make_channel(os.environ["LEPTON_SERVER"].split(",")[0], tls=tls, aio=False,
                  token=os.environ.get("LEPTON_TOKEN", ""))
report = serving_pb2.ReportReplicasRequest(node_id=os.environ["NODE_ID"], replicas=[serving_pb2.ReplicaReport(
    task_id=os.environ["LEPTON_TASK_ID"], deployment="web", state=serving_pb2.REPLICA_READY)])
try:
    serving_pb2_grpc.DeploymentsStub(ch).ReportReplicas(report, timeout=20)
    code = "OK"
except grpc.RpcError as err:
    code = err.code().name
print("PROBE " + json.dumps({"code": code, "token": bool(os.environ.get("LEPTON_TOKEN"))}), flush=True)
"""


def call(channel, method: str, request) -> grpc.StatusCode:
    stub = serving_pb2_grpc.DeploymentsStub(channel)
    try:
        answer = getattr(stub, method)(request, timeout=20)
        if method == "WatchEndpoints":
            next(iter(answer))
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def test_only_a_node_reports_replicas_and_only_its_own(agents, tmp_path, tasks_exec_python):
    d = str(tmp_path / "tls")
    run_ctl("certs", "init", "--dir", d, server="-", check=True)
    run_ctl("certs", "issue", "alice", "--kind", "user", "--role", "user", "--dir", d, server="-", check=True)
    run_ctl("certs", "issue", "other-node", "--kind", "node", "--dir", d, server="-", check=True)
    node = agents("solo", "--tls-dir", d, "--auth")
    alice = make_channel(node.address, tls=client_tls(d, "alice"), aio=False, token="")
    other = make_channel(node.address, tls=client_tls(d, "other-node"), aio=False, token="")
    with Client(node.address, tls_dir=d, cert_name="alice") as client:
        wait_until(lambda: any(n.state == "ready" for n in client.nodes()), timeout=60, what="node ready")
        # A user's plain task, running on the node: its credential is a user's, never a node's.
        task = client.submit([sys.executable, "-c", PROBE], env={"NODE_ID": node.node_id})
        done = client.wait(task.id, timeout=120)
    out = (node.data_dir / "tasks" / task.id / "1" / "output.log").read_text(errors="replace")
    line = next((ln for ln in out.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, (done, out[-2000:])
    probe = json.loads(line[len("PROBE "):])
    assert probe == {"code": "PERMISSION_DENIED", "token": True}, probe

    report = serving_pb2.ReportReplicasRequest(node_id=node.node_id, replicas=[serving_pb2.ReplicaReport(
        task_id=task.id, deployment="web", state=serving_pb2.REPLICA_READY)])
    watch = serving_pb2.WatchEndpointsRequest(node_id=node.node_id)
    # People may not report or watch, whatever they own.
    assert call(alice, "ReportReplicas", report) == grpc.StatusCode.PERMISSION_DENIED
    assert call(alice, "WatchEndpoints", watch) == grpc.StatusCode.PERMISSION_DENIED
    # A node speaks only for itself...
    assert call(other, "ReportReplicas", report) == grpc.StatusCode.PERMISSION_DENIED
    # ... and what it reports of others' tasks (or tasks that are no replicas) is ignored.
    own = serving_pb2.ReportReplicasRequest(node_id="other-node", replicas=[
        serving_pb2.ReplicaReport(task_id=task.id, deployment="web", state=serving_pb2.REPLICA_READY),
        serving_pb2.ReplicaReport(task_id="t-made-up", deployment="web", state=serving_pb2.REPLICA_READY)])
    assert call(other, "ReportReplicas", own) == grpc.StatusCode.OK
    endpoints = next(iter(serving_pb2_grpc.DeploymentsStub(other).WatchEndpoints(
        serving_pb2.WatchEndpointsRequest(node_id="other-node"), timeout=20)))
    assert not any(eps.endpoints for eps in endpoints.deployments.values()), endpoints
    alice.close()
    other.close()
    assert "Traceback" not in node.log_path.read_text(errors="replace")
