"""Audit records: built purely from (principal, method, request, code, time), bounded, and
free of secrets."""

from __future__ import annotations

import json

import grpc
import pytest

from lepton.common.auth import AuthEvent, Principal, Role, new_token
from lepton.common.errors import InvalidArgument
from lepton.coordinator import audit
from lepton.coordinator.audit import AuditLog, AuditRecord, build_record
from lepton.v1 import coordinator_pb2, datasets_pb2, tasks_pb2

SUBMIT = "/lepton.v1.Coordinator/SubmitTask"
ALICE = Principal("alice", Role.USER, "token", "0123456789ab")


def _submit_request(token: str) -> coordinator_pb2.SubmitTaskRequest:
    return coordinator_pb2.SubmitTaskRequest(spec=tasks_pb2.TaskSpec(
        name="train", argv=["python", "train.py", "--password", "hunter2", f"--token={token}"],
        env={"AWS_SECRET_ACCESS_KEY": "AKIA-very-secret", "LEPTON_TOKEN": token, "PLAIN": "v"},
        resources=tasks_pb2.Resources(cpu=2, gpus=1), priority=5, owner="alice",
        constraints={"zone": "a", "db_password": "swordfish"},
    ))


def test_record_fields_and_purity():
    req = coordinator_pb2.CancelTaskRequest(task_id="t-1")
    a = build_record(ALICE, "/lepton.v1.Coordinator/CancelTask", req, grpc.StatusCode.OK, 1234)
    b = build_record(ALICE, "/lepton.v1.Coordinator/CancelTask", req.SerializeToString(), "OK", 1234)
    assert a == b  # message or wire bytes, same record
    assert a == AuditRecord(1234, "alice", "user", "token", "/lepton.v1.Coordinator/CancelTask",
                            "OK", '{"task_id":"t-1"}', "0123456789ab")
    assert AuditRecord.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_no_secrets_in_records():
    token, token_hash = new_token()
    rec = build_record(ALICE, SUBMIT, _submit_request(token), grpc.StatusCode.OK, 1)
    text = json.dumps(rec.to_dict())
    for secret in (token, token_hash, "hunter2", "AKIA-very-secret", "train.py", "swordfish"):
        assert secret not in text, secret
    summary = json.loads(rec.request)
    assert summary["spec"]["argv"] == {"program": "python", "args": 4}
    assert summary["spec"]["env"] == {"keys": ["AWS_SECRET_ACCESS_KEY", "LEPTON_TOKEN", "PLAIN"], "count": 3}
    assert summary["spec"]["resources"] == {"cpu": 2.0, "gpus": 1}
    assert summary["spec"]["constraints"] == {"db_password": "<redacted>", "zone": "a"}
    assert rec.token_id == "0123456789ab" and token.split("_", 2)[2] not in text  # the secret may hold "_"


def test_token_shaped_text_and_secret_named_fields_are_masked():
    token, _ = new_token()
    rec = build_record(None, "/x.Y/Z", {"name": f"job {token}", "note": "Bearer abc.def",
                                        "api_key": "k", "password": "p", "blob": b"\x00" * 99}, 0, 5)
    doc = json.loads(rec.request)
    assert doc == {"name": "job <token>", "note": "<token>", "api_key": "<redacted>",
                   "password": "<redacted>", "blob": "<99 bytes>"}
    assert rec.principal == "-" and rec.code == "OK"


def test_bytes_payloads_are_counted_not_copied():
    req = datasets_pb2.WriteShardRequest()
    for fd in req.DESCRIPTOR.fields:
        if fd.type == fd.TYPE_BYTES:
            setattr(req, fd.name, b"secret-data" * 100)
    rec = build_record(ALICE, "/lepton.v1.Shards/WriteShard", req, "OK", 0)
    assert "secret-data" not in rec.request


def test_summaries_are_bounded():
    req = coordinator_pb2.ListTasksRequest(owner="x" * 10_000, states=[1] * 1000)
    rec = build_record(ALICE, "/lepton.v1.Coordinator/ListTasks", req, "OK", 0)
    assert len(rec.request) <= audit.MAX_SUMMARY
    huge = {f"k{i}": "v" * 500 for i in range(1000)}
    assert len(build_record(ALICE, "/x/y", huge, "OK", 0).request) <= audit.MAX_SUMMARY
    assert len(build_record(Principal("p" * 5000, Role.USER), "/x/y", None, "OK", 0).principal) < 200


def test_malformed_and_unknown_requests():
    assert build_record(ALICE, SUBMIT, b"\xff\xff\xff", "OK", 0).request == '{"_malformed_bytes":3}'
    assert build_record(ALICE, "/lepton.v1.Nope/X", b"abc", "OK", 0).request == '{"_bytes":3}'
    assert build_record(ALICE, SUBMIT, None, "OK", 0).request == "{}"


@pytest.mark.parametrize("code, name", [
    (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"), (7, "PERMISSION_DENIED"),
    ("unauthenticated", "UNAUTHENTICATED"), (999, "UNKNOWN"),
])
def test_codes(code, name):
    assert build_record(ALICE, SUBMIT, None, code, 0).code == name


def test_from_auth_event():
    token, _ = new_token()
    event = AuthEvent(None, "/lepton.v1.Coordinator/DrainNode", grpc.StatusCode.UNAUTHENTICATED,
                      False, b"", f"bad token {token}", at_ms=77)
    rec = audit.record_from_event(event)
    assert (rec.principal, rec.code, rec.at_ms) == ("-", "UNAUTHENTICATED", 77)
    assert token not in json.dumps(rec.to_dict())


def test_retention_keeps_the_last_n_and_snapshots():
    log = AuditLog(keep=3)
    for i in range(5):
        log.append(build_record(ALICE, SUBMIT, None, "OK" if i % 2 else "PERMISSION_DENIED", i))
    assert [r.at_ms for r in log] == [2, 3, 4] and log.dropped == 2
    assert [r.at_ms for r in log.query(denied_only=True)] == [2, 4]
    assert [r.at_ms for r in log.query(since_ms=3, limit=1)] == [4]
    assert (log.first_seq, list(log.seqs()), log.record_at(4).at_ms, log.record_at(1)) == (2, [2, 3, 4], 4, None)
    other = AuditLog(keep=2)
    other.restore(log.snapshot())
    assert [r.at_ms for r in other] == [3, 4]
    assert other.first_seq == 3 and other.record_at(3).at_ms == 3  # sequence numbers survive
    assert audit.retain(list(log), 1) == [list(log)[-1]]
    with pytest.raises(InvalidArgument):
        AuditLog(keep=0)
    with pytest.raises(InvalidArgument):
        other.restore(b"{not json")
