"""An attacker holding a task's environment (its credential, LEPTON_TOKEN) on a real agent
with --auth: every RPC the trust table keeps from its submitter (a plain user) or for nodes
is refused with PERMISSION_DENIED and a message (never UNKNOWN), nothing changes, the
agent logs no traceback, and the credential dies with its attempt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc
import pytest

from lepton.client import Client, LeptonError
from lepton.common.channels import make_channel
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cgrpc
from lepton.v1 import datasets_pb2 as dpb
from lepton.v1 import datasets_pb2_grpc as dgrpc
from lepton.v1 import security_pb2 as spb
from lepton.v1 import security_pb2_grpc as sgrpc
from lepton.v1 import serving_pb2 as vpb
from lepton.v1 import serving_pb2_grpc as vgrpc
from lepton.workloads.recipes.cluster import put_file
from tests.integration.cluster import run_ctl, wait_until

pytestmark = pytest.mark.integration

LEAK = "import os, sys, time; print('TOKEN=' + os.environ.get('LEPTON_TOKEN', ''), flush=True); time.sleep(600)"


def token_for(admin: str, server: str, role: str, name: str) -> str:
    out = run_ctl("--token", admin, "tokens", "create", "--role", role, "--name", name, server=server, check=True)
    return out.stdout.strip()


def token_names(admin: str, server: str) -> list[str]:
    out = run_ctl("--token", admin, "-o", "json", "tokens", "ls", server=server, check=True)
    return sorted(t["name"] for t in json.loads(out.stdout))


def probes(node_id: str, victim_task: str) -> list[tuple[type, str, object]]:
    """(stub, method, request) of calls a plain user's task may not make (common/auth.POLICY)."""
    return [
        # Admins only.
        (sgrpc.SecurityStub, "CreateToken", spb.CreateTokenRequest(name="evil", role="admin")),
        (sgrpc.SecurityStub, "ListTokens", spb.ListTokensRequest()),
        (sgrpc.SecurityStub, "RevokeToken", spb.RevokeTokenRequest(token_id="t-0")),
        (sgrpc.SecurityStub, "ListAudit", spb.ListAuditRequest()),
        (sgrpc.SecurityStub, "SaveSnapshot", spb.SaveSnapshotRequest()),
        (sgrpc.SecurityStub, "SetQuota", spb.SetQuotaRequest()),
        (cgrpc.CoordinatorStub, "AddVoter", cpb.AddVoterRequest(address="127.0.0.1:9")),
        (cgrpc.CoordinatorStub, "RemoveVoter", cpb.RemoveVoterRequest(address="127.0.0.1:9")),
        (cgrpc.CoordinatorStub, "DrainNode", cpb.DrainNodeRequest(node_id=node_id, enable=True)),
        (cgrpc.CoordinatorStub, "CollectGarbage", cpb.CollectGarbageRequest()),
        # Nodes only: a task never speaks for its node (Raft: test_trust_raft).
        (cgrpc.CoordinatorStub, "RegisterNode", cpb.RegisterNodeRequest(node_id=node_id)),
        (cgrpc.CoordinatorStub, "Heartbeat", cpb.HeartbeatRequest(node_id=node_id)),
        (cgrpc.CoordinatorStub, "ReportTaskEvents", cpb.ReportTaskEventsRequest(node_id=node_id)),
        (cgrpc.CoordinatorStub, "WatchAssignments", cpb.WatchAssignmentsRequest(node_id=node_id)),
        (vgrpc.DeploymentsStub, "ReportReplicas", vpb.ReportReplicasRequest(node_id=node_id)),
        (vgrpc.DeploymentsStub, "WatchEndpoints", vpb.WatchEndpointsRequest(node_id=node_id)),
        (dgrpc.DatasetsStub, "ReportInventory", dpb.ReportInventoryRequest(node_id=node_id)),
        (dgrpc.DatasetsStub, "DropReplica", dpb.DropReplicaRequest(shard_id="b3-" + "0" * 64, node_id=node_id)),
        # Another user's things.
        (cgrpc.CoordinatorStub, "CancelTask", cpb.CancelTaskRequest(task_id=victim_task)),
        (vgrpc.DeploymentsStub, "ScaleDeployment", vpb.ScaleDeploymentRequest(name="alices", replicas=3)),
        (vgrpc.DeploymentsStub, "UpdateDeployment", vpb.UpdateDeploymentRequest(name="alices", model="m")),
        (vgrpc.DeploymentsStub, "DeleteDeployment", vpb.DeleteDeploymentRequest(name="alices")),
        (dgrpc.DatasetsStub, "DeleteDataset", dpb.DeleteDatasetRequest(name="m")),
    ]


def call(channel, stub_cls, method: str, request) -> tuple[grpc.StatusCode, str]:
    try:
        answer = getattr(stub_cls(channel), method)(request, timeout=20)
        if not hasattr(answer, "ListFields"):  # a server stream: its first message tells
            next(iter(answer))
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""


def test_a_stolen_task_credential_gets_no_more_than_its_submitter(agents, tmp_path):
    node = agents("solo", "--auth", "--cpus", "4")
    srv = node.address
    wait_until(lambda: (node.data_dir / "admin.token").exists(), timeout=60, what="the admin token")
    admin = (node.data_dir / "admin.token").read_text().strip()
    alice, bob = token_for(admin, srv, "user", "alice"), token_for(admin, srv, "user", "bob")
    (tmp_path / "m.bin").write_bytes(b"not really a model")
    with Client(srv, token=alice) as a, Client(srv, token=bob) as b, Client(srv, token=admin) as ad:
        wait_until(lambda: any(n.state == "ready" for n in ad.nodes()), timeout=60, what="the node")
        put_file(a, "m", tmp_path / "m.bin", replicas=1, kind="model")
        # Never placed: its replica needs the whole node, which a task of 3.5 cores holds.
        # (One bigger than any node is refused at once: test_edges_serving.py.)
        filler = a.submit(["sleep", "600"], cpu=3.5)
        wait_until(lambda: a.get(filler.id).state == "running", timeout=60, what="the node filled")
        a.create_deployment("alices", "m", cpu=4)
        victim = a.submit(["sleep", "600"], cpu=0.1)
        leaker = b.submit([sys.executable, "-c", LEAK], cpu=0.1)
        lines: list[str] = []

        def leaked() -> bool:
            try:
                text = b"".join(b.logs(leaker.id)).decode(errors="replace")
            except LeptonError:  # not started yet
                return False
            lines[:] = [line for line in text.splitlines() if line.startswith("TOKEN=")]
            return bool(lines)

        wait_until(leaked, timeout=120, interval=0.5, what="the task to print its credential")
        stolen = lines[0].removeprefix("TOKEN=")
        assert stolen and stolen not in (alice, bob, admin)
        tokens_before = token_names(admin, srv)
        wait_until(lambda: a.get(victim.id).state == "running", timeout=60, what="the victim task to run")

        channel = make_channel(srv, tls=None, aio=False, token=stolen)
        try:
            answers = {method: call(channel, stub, method, req)
                       for stub, method, req in probes(node.node_id, victim.id)}
            whoami = call(channel, cgrpc.CoordinatorStub, "ListNodes", cpb.ListNodesRequest())
        finally:
            channel.close()
        assert whoami[0] == grpc.StatusCode.OK  # the credential works: as bob, a user
        wrong = {m: a for m, a in answers.items() if a[0] != grpc.StatusCode.PERMISSION_DENIED or not a[1]}
        assert not wrong, wrong

        # Nothing changed.
        assert token_names(admin, srv) == tokens_before
        assert a.get(victim.id).state == "running"
        dep = a.get_deployment("alices")
        assert (dep.replicas, dep.owner) == (1, "alice")
        assert a.dataset("m").name == "m"
        assert all(not n.draining for n in ad.nodes())

        # The credential ends with its attempt.
        b.cancel(leaker.id)
        b.wait(leaker.id, timeout=60)

        def refused() -> bool:
            with Client(srv, token=stolen, timeout=5) as thief:
                try:
                    thief.nodes()
                except Exception as err:  # noqa: BLE001 - which error is checked below
                    return type(err).__name__ == "Unauthenticated"
            return False

        wait_until(refused, timeout=60, interval=0.5, what="the dead attempt's credential to be refused")
        a.cancel(victim.id)
        a.delete_deployment("alices")
    log = Path(node.log_path).read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
