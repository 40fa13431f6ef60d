"""Issue 12c end to end, on real agents with TLS and auth: owners of datasets, env values
redacted for others, PullShards sources only from the node table, a side channel that
idle connections cannot stop, and metrics that refuse plaintext on a non-loopback address."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest

from lepton.common.channels import TlsConfig, make_channel
from lepton.v1 import datasets_pb2 as dpb
from lepton.v1.datasets_pb2_grpc import ShardsStub
from tests.integration.cluster import free_port, run_ctl, wait_until
from tests.unit.test_side_channel_limits import idle_connections

# One cluster for the module's tests (each leaves it as it found it), on one worker.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("trust_owners")]

USERS = {"admin": "admin", "alice": "user", "bob": "user", "vic": "viewer"}


@pytest.fixture(scope="module")
def cluster(module_agents):
    """A voter and a worker with --tls-dir and --auth; certificates for USERS.
    Returns (voter, worker, ctl, tls dir); ctl(user, *args) runs lepton-ctl as that user."""
    agents, root = module_agents
    d = str(root / "tls")
    run_ctl("certs", "init", "--dir", d, server="-", check=True)
    for name, role in USERS.items():
        run_ctl("certs", "issue", name, "--kind", "user", "--role", role, "--dir", d, server="-", check=True)
    voter = agents("voter", "--tls-dir", d, "--auth")
    worker = agents("worker", "--join", voter.address, "--tls-dir", d, "--auth")

    def ctl(user: str, *args: str, check: bool = False):
        return run_ctl("--tls-dir", d, "--cert-name", user, *args, server=voter.address, check=check)

    def ready() -> bool:
        out = ctl("vic", "-o", "json", "nodes", "list")
        return out.returncode == 0 and sum(n["state"] == "ready" for n in json.loads(out.stdout)) == 2

    wait_until(ready, what="both nodes ready")
    return voter, worker, ctl, d


def test_owners_and_redacted_env(cluster, tmp_path):
    voter, worker, ctl, _ = cluster
    np.save(tmp_path / "a.npy", np.arange(400, dtype=np.float32).reshape(100, 4))
    np.save(tmp_path / "b.npy", np.zeros((10, 4), dtype=np.float32))
    # Two replicas: the worker pulls from the voter by node id (PullShards via the node table).
    put = ctl("alice", "-o", "json", "data", "put", str(tmp_path / "a.npy"), "--name", "shared",
              "--replicas", "2", check=True)
    assert json.loads(put.stdout)["owner"] == "alice"
    for args in (("data", "put", str(tmp_path / "b.npy"), "--name", "shared", "--replicas", "1"),
                 ("data", "rm", "shared")):
        refused = ctl("bob", *args)
        assert refused.returncode == 1, refused.stdout
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "belongs to alice" in lines[0], refused.stderr
    shown = json.loads(ctl("vic", "-o", "json", "data", "show", "shared", check=True).stdout)
    assert (shown["version"], shown["owner"], shown["rows"]) == (1, "alice", 100)  # untouched

    out = ctl("alice", "-o", "json", "submit", "--env", "DB_PASSWORD=hunter2", "--env", "MODE=fast",
              "--", "sleep", "600", check=True)  # running still when cancelled below, however slow the machine
    task_id = json.loads(out.stdout)["id"]

    def env_seen_by(user: str) -> dict[str, str]:
        return json.loads(ctl(user, "-o", "json", "tasks", "show", task_id, check=True).stdout)["env"]

    assert env_seen_by("alice") == {"DB_PASSWORD": "hunter2", "MODE": "fast"}
    assert env_seen_by("admin") == {"DB_PASSWORD": "hunter2", "MODE": "fast"}
    for other in ("vic", "bob"):
        assert env_seen_by(other) == {"DB_PASSWORD": "<redacted>", "MODE": "<redacted>"}
    ctl("alice", "tasks", "cancel", task_id, check=True)

    def audited() -> str:
        text = ctl("admin", "-o", "json", "audit", "--since", "10m", check=True).stdout
        return text if "SubmitTask" in text else ""

    text = wait_until(audited, what="the submission audited")
    assert "DB_PASSWORD" in text and "hunter2" not in text
    ctl("admin", "data", "rm", "shared", check=True)  # admins may remove anyone's


def test_pull_sources_come_from_the_node_table(cluster):
    voter, worker, ctl, d = cluster
    channel = make_channel(worker.address, tls=TlsConfig(d, "admin"), aio=False)
    stub = ShardsStub(channel)
    with channel, socket.create_server(("127.0.0.1", 0)) as bait:
        bait.setblocking(False)
        outside = f"127.0.0.1:{bait.getsockname()[1]}"
        for sources, code, words in (([outside], grpc.StatusCode.INVALID_ARGUMENT, "source_nodes"),
                                     (["not-a-node"], grpc.StatusCode.FAILED_PRECONDITION, "not a node")):
            request = dpb.PullShardsRequest(shards=[dpb.ShardSource(shard_id="a" * 64, size=1,
                                                                    source_nodes=sources)])
            with pytest.raises(grpc.RpcError) as err:
                stub.PullShards(request, timeout=30)
            assert err.value.code() == code and words in err.value.details(), err.value.details()
        with pytest.raises(BlockingIOError):
            bait.accept()  # the agent answered without connecting anywhere


def test_idle_side_channel_connections_do_not_stop_a_transfer(cluster, tmp_path):
    voter, worker, ctl, d = cluster
    np.save(tmp_path / "x.npy", np.arange(4000, dtype=np.float32).reshape(1000, 4))
    put = ctl("alice", "-o", "json", "data", "put", str(tmp_path / "x.npy"), "--name", "x",
              "--replicas", "2", check=True)
    shard_id = json.loads(put.stdout)["shards"][0]["id"]
    ports = []  # each agent's side channel: where its tickets point
    for agent in (voter, worker):
        with make_channel(agent.address, tls=TlsConfig(d, "admin"), aio=False) as ch:
            ticket = ShardsStub(ch).OpenTransfer(dpb.OpenTransferRequest(shard_id=shard_id), timeout=30)
        ports.append(ticket.port)
    with idle_connections(ports[0]), idle_connections(ports[1]):
        out = ctl("alice", "data", "get", "x", str(tmp_path / "y.npy"))
        assert out.returncode == 0, out.stderr
    assert np.array_equal(np.load(tmp_path / "y.npy"), np.load(tmp_path / "x.npy"))


def test_plaintext_metrics_on_a_public_address_refuse_to_start(tmp_path):
    cmd = [sys.executable, "-m", "lepton.agent.main", "--data-dir", str(tmp_path / "a"),
           "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", f"0.0.0.0:{free_port()}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "metrics" in lines[0] and "without TLS" in lines[0], out.stderr
