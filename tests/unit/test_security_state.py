"""Tokens, audit records and the cluster id in the replicated state; offline restore."""

from __future__ import annotations

import pytest

from lepton.common import backup
from lepton.common.auth import Role, hash_token, new_token, token_id
from lepton.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from lepton.coordinator.restore import restore
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.coordinator.storage.log_store import FileLogStore
from lepton.v1 import security_pb2, state_pb2


def cmd(at_ms: int = 1000, **kw) -> bytes:
    return state_pb2.Command(at_ms=at_ms, **kw).SerializeToString()


def create(sm: ClusterStateMachine, index: int, name: str, role: str) -> str:
    token, h = new_token()
    out = sm.apply(index, cmd(create_token=state_pb2.CreateTokenCmd(
        token_id=token_id(token), name=name, role=role, token_hash=h, created_at=5)))
    assert isinstance(out, security_pb2.ApiToken), out
    return token


def test_tokens_lookup_revoke_and_only_hashes_stored():
    sm = ClusterStateMachine()
    tok = create(sm, 1, "alice", "user")
    p = sm.security.lookup(tok)
    assert p is not None and p.name == "alice" and p.role == Role.USER and p.token_id == token_id(tok)
    assert tok not in sm.snapshot().decode("latin-1")  # only the hash
    assert hash_token(tok) == sm.security.tokens[token_id(tok)].hash
    assert sm.security.lookup(tok[:-1] + ("A" if tok[-1] != "A" else "B")) is None
    assert sm.security.lookup("garbage") is None
    assert all(t.hash == "" for t in sm.security.list_tokens())
    out = sm.apply(2, cmd(at_ms=77, revoke_token=state_pb2.RevokeTokenCmd(token_id=token_id(tok))))
    assert out.revoked and out.revoked_at_ms == 77
    assert sm.security.lookup(tok) is None
    assert isinstance(sm.apply(3, cmd(revoke_token=state_pb2.RevokeTokenCmd(token_id="nope"))), NotFound)


def test_bad_commands_are_refused_the_same_everywhere():
    sm = ClusterStateMachine()
    bad_role = sm.apply(1, cmd(create_token=state_pb2.CreateTokenCmd(
        token_id="abc", name="n", role="node", token_hash="sha256:x")))
    assert isinstance(bad_role, InvalidArgument)
    tok = create(sm, 2, "a", "admin")
    dup = sm.apply(3, cmd(create_token=state_pb2.CreateTokenCmd(
        token_id=token_id(tok), name="b", role="viewer", token_hash="sha256:y")))
    assert isinstance(dup, AlreadyExists)


def test_audit_retention_cluster_id_and_snapshot_round_trip():
    sm = ClusterStateMachine()
    sm.security.audit = type(sm.security.audit)(keep=3)
    recs = [security_pb2.AuditRecord(at_ms=i, principal="p", method="/m", code="OK") for i in range(5)]
    assert sm.apply(1, cmd(append_audit=state_pb2.AppendAuditCmd(records=recs))) == 5
    assert [r.at_ms for r in sm.security.audit] == [2, 3, 4]
    assert sm.apply(2, cmd(set_cluster_id=state_pb2.SetClusterIdCmd(cluster_id="c1"))) == "c1"
    assert sm.apply(3, cmd(set_cluster_id=state_pb2.SetClusterIdCmd(cluster_id="c2"))) == "c1"
    create(sm, 4, "v", "viewer")
    data = sm.snapshot()
    other = ClusterStateMachine()
    other.restore(data, sm.applied_index)
    assert other.snapshot() == data
    assert other.security.cluster_id == "c1" and len(other.security.tokens) == 1
    assert [r.at_ms for r in other.security.audit.query(since_ms=3)] == [3, 4]


def _state(cluster_id: str) -> ClusterStateMachine:
    sm = ClusterStateMachine()
    sm.apply(1, cmd(set_cluster_id=state_pb2.SetClusterIdCmd(cluster_id=cluster_id)))
    create(sm, 2, "alice", "admin")
    return sm


def test_offline_restore_installs_the_snapshot_and_refuses_bad_files(tmp_path):
    sm = _state("cid-1")
    f = backup.save(sm.snapshot(), sm.applied_index, 3, "cid-1", tmp_path / "b.lbk")
    d = tmp_path / "data"
    d.mkdir()
    result = restore(f, d)
    assert (result.index, result.term, result.cluster_id) == (2, 3, "cid-1")
    store = FileLogStore(d / "raft")
    assert store.snapshot().data == sm.snapshot() and store.hard_state()[0] == 3
    assert store.last_index() == 2  # an empty log after the snapshot
    store.close()
    # Again over the restored state (same cluster): fine, the old folder kept aside.
    assert restore(f, d).moved_aside
    # Corrupt: refused, nothing touched.
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad = tmp_path / "bad.lbk"
    bad.write_bytes(bytes(raw))
    with pytest.raises(InvalidArgument, match="corrupt"):
        restore(bad, d)
    # Another cluster's backup over this cluster's data: refused.
    other = _state("cid-2")
    g = backup.save(other.snapshot(), 2, 1, "cid-2", tmp_path / "o.lbk")
    with pytest.raises(FailedPrecondition, match="cid-1"):
        restore(g, d)
    with pytest.raises(NotFound):
        restore(f, tmp_path / "missing")
