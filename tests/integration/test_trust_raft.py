"""Issue 12, as an attacker would try it on a 3-voter cluster with --tls-dir and --auth:
a worker's certificate and a user's certificate cannot speak Raft to any voter (forged
AppendEntries carrying a CreateToken, RequestVote, Probe), and a node certificate cannot act
for another node (heartbeat, task events, replicas, registration, leaving) nor order another
agent to delete or pull shards."""

from __future__ import annotations

import json

import grpc
import pytest

from lepton.common import cluster_secret
from lepton.common.channels import TlsConfig, make_channel
from lepton.coordinator.raft.messages import AppendRequest, VoteRequest
from lepton.coordinator.raft.peer_auth import FROM_HEADER, peer_key, peer_metadata
from lepton.coordinator.raft.transport import to_proto
from lepton.coordinator.storage.log_store import Entry
from lepton.v1 import common_pb2, coordinator_pb2, datasets_pb2, raft_pb2, state_pb2
from lepton.v1.coordinator_pb2_grpc import CoordinatorStub
from lepton.v1.datasets_pb2_grpc import DatasetsStub, ShardsStub
from lepton.v1.raft_pb2_grpc import RaftStub
from tests.integration.cluster import (
    RAFT_FAST,
    AgentProcess,
    free_port,
    run_ctl,
    servers,
    start_voters,
    wait_until,
)

pytestmark = pytest.mark.integration
DENIED = grpc.StatusCode.PERMISSION_DENIED
FORGED_TERM_JUMP = 1000


@pytest.fixture
def cluster(agents, tmp_path):
    """Three voters and a worker sharing a TLS folder (each agent issues its own node
    certificate from the CA there), an admin and a plain user certificate."""
    d = str(tmp_path / "tls")
    run_ctl("certs", "init", "--dir", d, server="-", check=True)
    for name, role in (("admin", "admin"), ("alice", "user")):
        run_ctl("certs", "issue", name, "--kind", "user", "--role", role, "--dir", d, server="-", check=True)
    voters = start_voters(agents, 3, "--tls-dir", d, "--auth")
    worker = agents("worker", "--join", servers(voters), "--tls-dir", d, "--auth")
    srv = servers(voters)

    def ready() -> bool:
        out = run_ctl("--tls-dir", d, "-o", "json", "nodes", "list", server=srv)
        return out.returncode == 0 and sum(n["state"] == "ready" for n in json.loads(out.stdout)) == 4

    wait_until(ready, timeout=90, what="4 ready nodes")
    return voters, worker, d


def _status(d: str, srv: str) -> dict:
    return json.loads(run_ctl("--tls-dir", d, "-o", "json", "cluster", "status", server=srv, check=True).stdout)


def _tokens(d: str, srv: str) -> list:
    return json.loads(run_ctl("--tls-dir", d, "-o", "json", "tokens", "ls", server=srv, check=True).stdout)


def _code(fn, *args, **kw) -> grpc.StatusCode:
    try:
        result = fn(*args, **kw)
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            for _ in result:  # a server stream: its first answer or its status
                result.cancel()
                break
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _forged_token_entry(index: int, term: int) -> Entry:
    cmd = state_pb2.Command(create_token=state_pb2.CreateTokenCmd(
        token_id="0123456789ab", name="mallory", role="admin", token_hash="sha256:" + "0" * 64))
    return Entry(index, term, cmd.SerializeToString())


def test_only_voters_speak_raft(cluster):
    voters, worker, d = cluster
    srv = servers(voters)
    status = _status(d, srv)
    leader, term = status["leader"], int(status["term"])
    last = int(status["commit_index"])
    tokens_before = sorted(t["id"] for t in _tokens(d, srv))
    forged = term + FORGED_TERM_JUMP

    for cert in (worker.node_id, "alice"):
        for v in voters:
            channel = make_channel(v.address, tls=TlsConfig(d, cert), aio=False)
            raft = RaftStub(channel)
            other = next(x.address for x in voters if x.address not in (v.address, leader))
            append = to_proto(AppendRequest(leader, v.address, forged, last, term,
                                            [_forged_token_entry(last + 1, forged)], last + 1))
            vote = to_proto(VoteRequest(other, v.address, forged, last + 10, forged))
            own = to_proto(VoteRequest(worker.address, v.address, forged, last + 10, forged))
            send, claim_leader = raft.Send, ((FROM_HEADER, leader),)
            codes = {
                "AppendEntries as the leader": _code(send, raft_pb2.RaftBatch(messages=[append]),
                                                     metadata=claim_leader, timeout=10),
                "RequestVote as a voter": _code(send, raft_pb2.RaftBatch(messages=[vote]),
                                                metadata=((FROM_HEADER, other),), timeout=10),
                "RequestVote as itself": _code(send, raft_pb2.RaftBatch(messages=[own]),
                                               metadata=((FROM_HEADER, worker.address),), timeout=10),
                "AppendEntries naming no sender": _code(send, raft_pb2.RaftBatch(messages=[append]), timeout=10),
                "AppendEntries on a stream": _code(raft.Stream, iter([raft_pb2.RaftBatch(messages=[append])]),
                                                   metadata=claim_leader, timeout=10),
                "Probe as the leader": _code(raft.Probe, raft_pb2.RaftProbeRequest(to_id=v.address),
                                             metadata=claim_leader, timeout=10),
            }
            channel.close()
            assert all(c == DENIED for c in codes.values()), f"{cert} -> {v.name}: {codes}"
    # Nothing moved: every voter's term is below the forged one, no token appeared, the
    # cluster still commits, and the leader audited the refusals.
    for v in voters:
        assert int(_status(d, v.address)["term"]) < forged
    run_ctl("--tls-dir", d, "submit", "--name", "after", "--label", "zone=none", "--", "true",
            server=srv, check=True)
    assert sorted(t["id"] for t in _tokens(d, srv)) == tokens_before

    def refusals() -> set:
        out = run_ctl("--tls-dir", d, "-o", "json", "audit", "--since", "10m", server=srv, check=True)
        return {(r["principal"], r["method"]) for r in json.loads(out.stdout)
                if r["code"] == "PERMISSION_DENIED" and "/lepton.v1.Raft/" in r["method"]}

    want = {(who, f"/lepton.v1.Raft/{m}") for who in (worker.node_id, "alice") for m in ("Send", "Probe")}
    wait_until(lambda: want <= refusals(), timeout=30, what="the leader's audit of the refused Raft calls")


def test_a_node_acts_only_for_itself(cluster):
    voters, worker, d = cluster
    srv = servers(voters)
    leader = next(v for v in voters if v.address == _status(d, srv)["leader"])
    victim = next(v for v in voters if v is not leader)
    as_worker = make_channel(leader.address, tls=TlsConfig(d, worker.node_id), aio=False)
    coordinator, datasets = CoordinatorStub(as_worker), DatasetsStub(as_worker)
    other = victim.node_id
    try:
        attempts = {
            "Heartbeat": lambda: coordinator.Heartbeat(
                coordinator_pb2.HeartbeatRequest(node_id=other), timeout=10),
            "HeartbeatStream": lambda: coordinator.HeartbeatStream(
                iter([coordinator_pb2.HeartbeatRequest(node_id=other)]), timeout=10),
            "RegisterNode": lambda: coordinator.RegisterNode(coordinator_pb2.RegisterNodeRequest(
                node_id=other, name="evil", address=worker.address,
                capacity=common_pb2.Capacity(cpu_logical=1, memory_bytes=1 << 30)), timeout=10),
            "RegisterNode at another's address": lambda: coordinator.RegisterNode(
                coordinator_pb2.RegisterNodeRequest(node_id=worker.node_id, name="worker", address=victim.address,
                                                    capacity=common_pb2.Capacity(cpu_logical=1, memory_bytes=1 << 30)),
                timeout=10),
            "LeaveNode": lambda: coordinator.LeaveNode(coordinator_pb2.LeaveNodeRequest(node_id=other), timeout=10),
            "WatchAssignments": lambda: coordinator.WatchAssignments(
                coordinator_pb2.WatchAssignmentsRequest(node_id=other), timeout=10),
            "ReportTaskEvents": lambda: coordinator.ReportTaskEvents(
                coordinator_pb2.ReportTaskEventsRequest(node_id=other), timeout=10),
            "DropReplica": lambda: datasets.DropReplica(datasets_pb2.DropReplicaRequest(
                shard_id="0" * 64, node_id=other, reason="forged"), timeout=10),
            "ReportInventory": lambda: datasets.ReportInventory(
                datasets_pb2.ReportInventoryRequest(node_id=other), timeout=10),
        }
        for what, attempt in attempts.items():
            assert _code(attempt) == DENIED, what
        # Its own heartbeat passes: the refusals above are about whom it acts for.
        assert _code(coordinator.Heartbeat, coordinator_pb2.HeartbeatRequest(node_id=worker.node_id),
                     timeout=10) == grpc.StatusCode.OK
    finally:
        as_worker.close()

    # Shards on an agent: only a coordinator (a voter's certificate) orders deletes and pulls.
    for caller, expected in ((worker.node_id, DENIED), (leader.node_id, grpc.StatusCode.OK)):
        channel = make_channel(victim.address, tls=TlsConfig(d, caller), aio=False)
        try:
            shards = ShardsStub(channel)
            assert _code(shards.DeleteShards, datasets_pb2.DeleteShardsRequest(shard_ids=["0" * 64]),
                         timeout=10) == expected, caller
            if expected == DENIED:  # nor write anything there
                blank = "0" * 64
                assert _code(shards.PullShards, datasets_pb2.PullShardsRequest(), timeout=10) == DENIED
                assert _code(shards.WriteShard, iter([datasets_pb2.WriteShardRequest(shard_id=blank, size=1)]),
                             timeout=10) == DENIED
                assert _code(shards.TransformShard, datasets_pb2.TransformShardRequest(shard_id=blank),
                             timeout=10) == DENIED
                assert _code(shards.ShardStats, datasets_pb2.ShardStatsRequest(shard_id=blank), timeout=10) == DENIED
        finally:
            channel.close()
    nodes = json.loads(run_ctl("--tls-dir", d, "-o", "json", "nodes", "list", server=srv, check=True).stdout)
    assert {n["id"]: n["state"] for n in nodes}[other] == "ready"


def test_without_tls_the_peer_secret_keeps_node_token_holders_off_raft(agents, tmp_path):
    """No TLS: every agent holds the node token, only voters the peer secret. A worker (the
    node token, even the shard secret) cannot speak Raft; a voter without the peer secret
    refuses to start."""
    token_file, peer_secret, shard_secret = (str(tmp_path / n) for n in ("node.token", "peer.key", "shard.key"))
    run_ctl("tokens", "node-token", token_file, server="-", check=True)
    for path in (peer_secret, shard_secret):
        run_ctl("secret", "init", "--out", path, server="-", check=True)
    for name in ("voter-1", "voter-2", "voter-3", "worker", "no-secret"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "node.token").write_text(open(token_file).read())
        (tmp_path / name / "node.token").chmod(0o600)

    port = free_port()
    refused = AgentProcess(tmp_path, "no-secret", ["--peers", f"127.0.0.1:{port},127.0.0.1:1,127.0.0.1:2",
                                                   "--auth"], port=port)
    with pytest.raises(AssertionError, match="--peer-secret-file"):
        refused.start()

    voters = start_voters(agents, 3, "--auth", "--peer-secret-file", peer_secret)
    srv = servers(voters)
    agents("worker", "--join", srv, "--auth", "--shard-key-file", shard_secret)
    admin = wait_until(lambda: [p for v in voters if (p := v.data_dir / "admin.token").exists()],
                       timeout=60, what="the bootstrap admin token")[0]
    admin_token = admin.read_text().strip()

    def status() -> dict:
        out = run_ctl("--token", admin_token, "-o", "json", "cluster", "status", server=srv, check=True)
        return json.loads(out.stdout)

    leader, term = status()["leader"], int(status()["term"])
    node_token = open(token_file).read().strip()
    shard_key = peer_key(cluster_secret.read(shard_secret))
    for v in voters:
        channel = make_channel(v.address, aio=False, token=node_token)
        try:
            send = RaftStub(channel).Send
            batch = raft_pb2.RaftBatch(messages=[to_proto(AppendRequest(
                leader, v.address, term + FORGED_TERM_JUMP, 0, 0, [], 0))])
            for metadata in (((FROM_HEADER, leader),), peer_metadata(leader, shard_key)):
                assert _code(send, batch, metadata=metadata, timeout=10) == DENIED, (v.name, metadata)
        finally:
            channel.close()
    assert int(status()["term"]) < term + FORGED_TERM_JUMP
    run_ctl("--token", admin_token, "submit", "--name", "after", "--label", "zone=none", "--", "true",
            server=srv, check=True)  # the voters still replicate, with the peer secret


def test_a_voter_joins_and_takes_over_with_tls_and_auth(agents, tmp_path):
    """The peer check lets a real change through: a server waiting to join trusts its --join
    addresses, answers the leader's probe, catches up and votes; with the old leader dead
    every commit needs it."""
    d = str(tmp_path / "tls")
    run_ctl("certs", "init", "--dir", d, server="-", check=True)
    run_ctl("certs", "issue", "admin", "--kind", "user", "--role", "admin", "--dir", d, server="-", check=True)
    voters = start_voters(agents, 3, "--tls-dir", d, "--auth")
    extra = agents("extra", "--join", servers(voters), "--join-as-voter", "--tls-dir", d, "--auth", *RAFT_FAST)
    srv = servers(voters)
    wait_until(lambda: run_ctl("--tls-dir", d, "cluster", "status", server=srv).returncode == 0,
               timeout=60, what="a leader")
    out = run_ctl("--tls-dir", d, "-o", "json", "cluster", "peers", "add", extra.address, server=srv, check=True)
    assert extra.address in {v["address"] for v in json.loads(out.stdout)["voters"]}
    old = next(v for v in voters if v.address == _status(d, srv)["leader"])
    old.kill9()
    everyone = servers([v for v in voters if v is not old] + [extra])

    def submitted() -> bool:
        return run_ctl("--tls-dir", d, "submit", "--name", "after", "--label", "zone=none", "--", "true",
                       server=everyone).returncode == 0

    wait_until(submitted, timeout=90, what="a commit with the new voter's help")
