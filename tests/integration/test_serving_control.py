"""Deployments on real agents (issue 19): `serve up` places its replicas on distinct nodes and
waits until they are ready, `serve scale` adds and drains replicas, `serve rm` frees the
resources, and bad names or models get one-line refusals. Predictions and load are
test_serving.py's; a replica's own behaviour test_serving_replica.py's.

The model is stored as its training job stores it (`recipes.cluster.put_file`, kind model),
without running a job (as test_models.py does)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest

from lepton.client import Client
from lepton.common.errors import FailedPrecondition, InvalidArgument, NotFound
from lepton.v1 import coordinator_pb2, serving_pb2, tasks_pb2
from lepton.v1.coordinator_pb2_grpc import CoordinatorStub
from lepton.v1.serving_pb2_grpc import DeploymentsStub
from tests.integration.cluster import run_ctl, wait_until

torch = pytest.importorskip("torch")

from lepton.workloads.recipes.cluster import model_labels, put_file  # noqa: E402
from lepton.workloads.recipes.models import build_model, read_config, save_model  # noqa: E402

pytestmark = pytest.mark.integration

CPUS = 2  # per agent; each replica asks for one
READY_S = 240  # a replica imports torch and loads the model: slow on a loaded machine


@pytest.fixture
def cluster(agents, tmp_path, tasks_exec_python):
    """A voter and a worker with CPUS cores each, and a small model stored as "mlp"."""
    voter = agents("voter", "--cpus", str(CPUS))
    worker = agents("worker", "--join", voter.address, "--cpus", str(CPUS))
    client = Client(voter.address)
    wait_until(lambda: sum(n.state == "ready" for n in client.nodes()) == 2, timeout=60, what="two ready nodes")
    meta = {"algorithm": "mlp", "task": "classification", "input_shape": [4], "output_dim": 2,
            "num_classes": 2, "target_shape": [], "hidden": 8, "recipe": "lepton.workloads.recipes.train"}
    save_model(tmp_path / "model.safetensors", build_model("mlp", [4], 2, hidden=8), meta)
    for name in ("mlp", "mlp2"):
        put_file(client, name, tmp_path / "model.safetensors", replicas=1, kind="model",
                 labels=model_labels(read_config(tmp_path / "model.safetensors"), "j-1"))
    np.savez(tmp_path / "d.npz", x=np.ones((8, 4), dtype=np.float32), y=np.zeros(8, dtype=np.int64))
    run_ctl("data", "put", str(tmp_path / "d.npz"), "--name", "rows", "--replicas", "1", server=voter.address,
            check=True)

    def ctl(*args: str, check: bool = False, timeout: float = 60):
        return run_ctl(*args, server=voter.address, check=check, timeout=timeout)

    yield ctl, client, (voter, worker)
    client.close()


def show(ctl, name: str) -> dict:
    out = ctl("-o", "json", "serve", "show", name, check=True)
    return json.loads(out.stdout)


def live_replicas(doc: dict) -> list[dict]:
    return [r for r in doc["replica_list"] if r["state"] != "draining"]


def one_line_refusal(out, says: str) -> None:
    assert out.returncode != 0, (out.stdout, out.stderr)
    assert len(out.stderr.splitlines()) == 1 and says in out.stderr and "Traceback" not in out.stderr, out.stderr


def refusals(ctl, client) -> None:
    """Bad names and models: one line each, nothing created."""
    one_line_refusal(ctl("serve", "up", "mlp", "--name", "Bad_Name", "--no-wait"), "deployment name 'Bad_Name'")
    one_line_refusal(ctl("serve", "up", "nope", "--name", "web", "--no-wait"), 'model "nope" not found')
    one_line_refusal(ctl("serve", "up", "rows", "--name", "web", "--no-wait"), '"rows" is not a model')
    # The rest through the client (each lepton-ctl start costs seconds on a loaded machine).
    with pytest.raises(NotFound, match='deployment "nope" not found'):
        client.scale_deployment("nope", 2)
    with pytest.raises(NotFound, match='deployment "nope" not found'):
        client.update_deployment("nope", "mlp")
    spec = serving_pb2.DeploymentSpec(name="web", model="mlp", replicas=0)
    with pytest.raises(InvalidArgument, match="replicas must be 1-64"):  # the server checks too
        client._unary(DeploymentsStub, "CreateDeployment", serving_pb2.CreateDeploymentRequest(spec=spec))
    assert client.list_deployments() == []
    # Replica specs are the serving loop's alone.
    spec = tasks_pb2.TaskSpec(argv=["true"], replica=tasks_pb2.ReplicaSpec(deployment="web", generation=1))
    with pytest.raises(InvalidArgument, match="only by the serving loop"):
        client._unary(CoordinatorStub, "SubmitTask", coordinator_pb2.SubmitTaskRequest(spec=spec), idempotent=False)


@pytest.mark.timeout(900)  # five replica starts (each imports torch) on a loaded machine
def test_up_scale_and_rm(cluster):
    ctl, client, (voter, worker) = cluster
    refusals(ctl, client)
    up = ctl("-o", "json", "serve", "up", "mlp", "--name", "web", "--replicas", "2", "--cpu", "1",
             "--wait-timeout", str(READY_S), timeout=READY_S + 30)
    assert up.returncode == 0, up.stderr
    doc = json.loads(up.stdout)
    assert (doc["ready"], doc["replicas"], doc["generation"], doc["state"]) == (2, 2, 1, "ready")
    nodes = sorted(r["node_id"] for r in doc["replica_list"])
    assert nodes == sorted([voter.node_id, worker.node_id])  # spread: one per node
    assert all(r["model"] == "mlp" and r["state"] == "ready" for r in doc["replica_list"])
    listed = json.loads(ctl("-o", "json", "serve", "ls", check=True).stdout)
    assert [(d["name"], d["ready"]) for d in listed] == [("web", 2)]
    first = {r["task_id"] for r in doc["replica_list"]}

    # A rolling update: every replica is replaced by one of generation 2 serving mlp2.
    out = ctl("-o", "json", "serve", "update", "web", "mlp2", "--wait-timeout", str(READY_S), timeout=READY_S + 30)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert (doc["generation"], doc["model"], doc["ready"]) == (2, "mlp2", 2)
    assert all((r["generation"], r["model"]) == (2, "mlp2") for r in doc["replica_list"])
    assert not first & {r["task_id"] for r in doc["replica_list"]}
    assert all(client.get(t).state == "cancelled" for t in first)
    assert "rolling to generation 2" in out.stderr  # the wait said what it waited for

    # Up to 3: more replicas than nodes share one rather than wait.
    out = ctl("-o", "json", "serve", "scale", "web", "3", "--wait-timeout", str(READY_S), timeout=READY_S + 30)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["ready"] == 3 and len(doc["replica_list"]) == 3
    # Down to 1: the surplus drains and its tasks end.
    out = ctl("-o", "json", "serve", "scale", "web", "1", "--wait-timeout", str(READY_S), timeout=READY_S + 30)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["ready"] == 1 and len(doc["replica_list"]) == 1
    kept = doc["replica_list"][0]["task_id"]
    replica_tasks = [t for t in client.tasks() if t.name.startswith("serve-web-g2")]
    assert len(replica_tasks) == 3
    assert {t.id for t in replica_tasks if t.state == "running"} == {kept}

    out = ctl("serve", "rm", "web", "--wait-timeout", "120", timeout=150)
    assert out.returncode == 0 and "web: removed" in out.stdout, out.stderr
    assert all(client.get(t.id).state == "cancelled" for t in replica_tasks)
    assert client.list_deployments() == []
    with pytest.raises(NotFound, match='deployment "web" not found'):
        client.get_deployment("web")
    # The capacity is back: a task asking for a whole node runs on each node.
    whole = [client.submit(["true"], cpu=CPUS) for _ in range(2)]
    for task in whole:
        assert client.wait(task.id, timeout=120).state == "succeeded"


USERS = {"alice": "user", "bob": "user", "vic": "viewer"}


@pytest.mark.timeout(600)  # a replica imports torch: tens of seconds on a loaded machine
def test_owners_with_auth_and_tls(agents, tmp_path, tasks_exec_python):
    """Under --auth: a user's replicas fetch the model with its credential and become ready;
    another user may read but not change or remove the deployment, a viewer not create one."""
    d = str(tmp_path / "tls")
    run_ctl("certs", "init", "--dir", d, server="-", check=True)
    for name, role in USERS.items():
        run_ctl("certs", "issue", name, "--kind", "user", "--role", role, "--dir", d, server="-", check=True)
    node = agents("solo", "--tls-dir", d, "--auth", "--cpus", str(CPUS))

    def ctl(user: str, *args: str, timeout: float = 60):
        return run_ctl("--tls-dir", d, "--cert-name", user, *args, server=node.address, timeout=timeout)

    with Client(node.address, tls_dir=d, cert_name="alice") as alice:
        wait_until(lambda: any(n.state == "ready" for n in alice.nodes()), timeout=60, what="node ready")
        save_model(tmp_path / "model.safetensors", build_model("mlp", [4], 2, hidden=8),
                   {"algorithm": "mlp", "task": "classification", "input_shape": [4], "output_dim": 2,
                    "num_classes": 2, "target_shape": [], "hidden": 8})
        put_file(alice, "mlp", tmp_path / "model.safetensors", replicas=1, kind="model",
                 labels=model_labels(read_config(tmp_path / "model.safetensors"), "j-1"))
    one_line_refusal(ctl("vic", "serve", "up", "mlp", "--name", "web", "--no-wait"),
                     "CreateDeployment needs role user; vic has role viewer")
    up = ctl("alice", "-o", "json", "serve", "up", "mlp", "--name", "web", "--cpu", "1",
             "--wait-timeout", str(READY_S), timeout=READY_S + 30)
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["owner"] == "alice"
    listed = json.loads(ctl("vic", "-o", "json", "serve", "ls").stdout)
    assert [(x["name"], x["ready"]) for x in listed] == [("web", 1)]
    for args in (("scale", "web", "2"), ("update", "web", "mlp"), ("rm", "web")):
        one_line_refusal(ctl("bob", "serve", *args, "--no-wait"), "belongs to alice")
    out = ctl("alice", "serve", "rm", "web", "--wait-timeout", "120", timeout=150)
    assert out.returncode == 0 and "web: removed" in out.stdout, out.stderr


@pytest.mark.timeout(300)
def test_a_careless_user_changes_nothing(cluster):
    """Numbers past any range, the same model again, rm twice, Ctrl-C while `serve up` waits:
    one line on stderr, a non-zero exit, the deployment as it was. Its replica asks for a whole
    node and both are busy, so it stays pending: no replica process is started. (One asking
    for more than any node has is refused at once: test_edges_serving.py.)"""
    ctl, client, _ = cluster
    busy = [client.submit(["sleep", "600"], cpu=CPUS) for _ in range(2)]
    wait_until(lambda: all(client.get(t.id).state == "running" for t in busy), timeout=60, what="both nodes busy")
    one_line_refusal(ctl("serve", "up", "mlp", "--name", "web", "--no-wait", "--max-wait-ms", "99999999999"),
                     "max_wait_ms")
    one_line_refusal(ctl("serve", "up", "mlp", "--name", "web", "--no-wait", "--max-batch", "100000"),
                     "max_batch is 100000; at most 4096")
    assert client.list_deployments() == []

    # Ctrl-C while `serve up` waits: the deployment carries on, and the command says so.
    up = subprocess.Popen([sys.executable, "-m", "lepton.client.cli", "--server", client.addresses[0],
                           "serve", "up", "mlp", "--name", "web", "--cpu", str(CPUS)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: [d.name for d in client.list_deployments()] == ["web"], timeout=60,
                   what="the deployment made")
        up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=60)
    finally:
        up.kill()
    assert up.returncode == 130, err
    assert "stopped waiting; deployment web carries on" in err.splitlines()[-1] and "Traceback" not in err, err
    before = client.get_deployment("web")

    one_line_refusal(ctl("serve", "scale", "web", "100000"), "replicas must be 1-64, got 100000")
    one_line_refusal(ctl("serve", "scale", "web", "99999999999999999999999"), "replicas must be 1-64")
    one_line_refusal(ctl("serve", "scale", "web", "0"), "must be at least 1")
    one_line_refusal(ctl("serve", "update", "web", "mlp"), 'deployment "web" already serves mlp (version 1)')
    one_line_refusal(ctl("serve", "update", "web", "rows"), '"rows" is not a model')
    after = client.get_deployment("web")
    assert (after.generation, after.replicas, after.model) == (before.generation, before.replicas, "mlp")

    # rm twice: the second while the first still drains, or once it is gone.
    client.delete_deployment("web")
    with pytest.raises((FailedPrecondition, NotFound)) as second:
        client.delete_deployment("web")
    assert "being removed already" in second.value.message or "not found" in second.value.message
    wait_until(lambda: client.list_deployments() == [], timeout=60, what="the deployment removed")
    one_line_refusal(ctl("serve", "rm", "web"), 'deployment "web" not found')
    for t in busy:
        client.cancel(t.id)


@pytest.mark.timeout(600)  # three replica starts (each imports torch) on a loaded machine
def test_serve_up_of_a_model_that_cannot_load_stops_waiting_and_says_where_to_look(cluster, tmp_path):
    """A stored "model" whose bytes are no model: every replica fails to load it. `serve up`
    does not wait out its timeout: once replicas failed again and again with none ready the
    deployment is "failing" and the command says so in one line naming a task's logs."""
    ctl, client, _ = cluster
    (tmp_path / "junk.safetensors").write_bytes(b"\0not a model\0" * 64)
    put_file(client, "junk", tmp_path / "junk.safetensors", replicas=1, kind="model", labels={})
    out = ctl("serve", "up", "junk", "--name", "bad", "--wait-timeout", str(READY_S), timeout=READY_S + 30)
    assert out.returncode == 1, out.stderr
    last = out.stderr.splitlines()[-1]
    assert 'deployment "bad" is failing' in last and "replica(s) failed" in last, out.stderr
    failed = last.split("lepton-ctl logs ")[1].split(")")[0]
    assert client.get(failed).state == "failed"
    assert client.get_deployment("bad").state in ("failing", "starting")  # it keeps trying
    client.delete_deployment("bad")
    wait_until(lambda: client.list_deployments() == [], timeout=60, what="the deployment removed")


@pytest.mark.timeout(300)
def test_a_deployment_made_again_under_a_removed_ones_name_starts_with_no_figures(cluster):
    """serve show's figures are the leader's merge of routers' counters (ReportReplicas): a
    removed deployment's go with it, and a router that missed the removal and counts on from
    the old counters is counted from where they stood. The router here is a node's report
    sent by the test (auth is off), so its counts are exact; the deployment's replica asks
    for a whole node and both are busy: no replica process is needed."""
    _, client, (voter, _) = cluster
    busy = [client.submit(["sleep", "600"], cpu=CPUS) for _ in range(2)]
    wait_until(lambda: all(client.get(t.id).state == "running" for t in busy), timeout=60, what="both nodes busy")
    channel = grpc.insecure_channel(voter.address)
    stub = DeploymentsStub(channel)

    def router_says(requests: int) -> None:
        stats = serving_pb2.RouterStats(deployment="web", requests=requests, errors=1, bucket_le_ms=[5.0, 1e9],
                                        bucket_counts=[requests, requests])
        stub.ReportReplicas(serving_pb2.ReportReplicasRequest(node_id="router-1", started_at_ms=1, stats=[stats]),
                            timeout=30)

    client.create_deployment("web", "mlp", cpu=CPUS)
    router_says(7)
    assert client.get_deployment("web").stats.requests == 7
    client.delete_deployment("web")
    wait_until(lambda: client.list_deployments() == [], timeout=60, what="the deployment removed")
    router_says(8)  # a late report under the removed name: not kept
    client.create_deployment("web", "mlp", cpu=CPUS)
    fresh = client.get_deployment("web").stats
    assert (fresh.requests, fresh.errors, fresh.p99_ms) == (0, 0, 0), fresh  # nothing of the removed one's
    router_says(10)  # this router never heard of the removal: its counters ran on from 7
    assert client.get_deployment("web").stats.requests == 3
    channel.close()
    client.delete_deployment("web")
    wait_until(lambda: client.list_deployments() == [], timeout=60, what="the deployment removed")
    for t in busy:
        client.cancel(t.id)
