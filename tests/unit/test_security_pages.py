"""ListAudit and ListQuotas pages as the coordinator serves them, on a real state machine."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from lepton.common import paging
from lepton.common.errors import InvalidArgument
from lepton.coordinator.api.security_api import SecurityService
from lepton.coordinator.audit import AuditLog
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import security_pb2, state_pb2

RECORDS = 2_600  # more than two pages of the largest size, past the log's retention
KEEP = 2_400
USERS = 1_234


async def _no_barrier() -> None:
    return None


def _service() -> tuple[SecurityService, ClusterStateMachine]:
    sm = ClusterStateMachine()
    sm.security.audit = AuditLog(keep=KEEP)
    index = 0

    def apply(**op):
        nonlocal index
        index += 1
        return sm.apply(index, state_pb2.Command(at_ms=1, **op).SerializeToString())

    # at_ms ties in tens: only the position in the log tells records apart.
    recs = [security_pb2.AuditRecord(at_ms=i // 10, principal=f"p{i}", method="/m", code="OK")
            for i in range(RECORDS)]
    for lo in range(0, RECORDS, 500):
        apply(append_audit=state_pb2.AppendAuditCmd(records=recs[lo:lo + 500]))
    for u in range(USERS):
        apply(set_quota=state_pb2.SetQuotaCmd(quota=security_pb2.Quota(user=f"u{u:04d}", tokens=u)))
    ctx = SimpleNamespace(state=sm, read=_no_barrier)
    return SecurityService(ctx, term_of=lambda index: 1), sm


def _call(svc, method: str, request):
    call = getattr(SecurityService, method).__wrapped__  # past the gRPC boundary: errors raise
    return asyncio.run(call(svc, request, None))


def _walk(svc, method: str, field: str, request_type, **fields) -> tuple[list, int]:
    items, token, pages = [], "", 0
    while True:
        resp = _call(svc, method, request_type(page_token=token, **fields))
        items += list(getattr(resp, field))
        pages += 1
        token = resp.next_page_token
        if not token:
            return items, pages


def test_audit_pages_walk_every_kept_record_once_newest_first():
    svc, sm = _service()
    kept = [r.principal for r in sm.security.audit]
    assert len(kept) == KEEP and kept[0] == f"p{RECORDS - KEEP}"
    records, pages = _walk(svc, "ListAudit", "records", security_pb2.ListAuditRequest, page_size=10_000)
    assert [r.principal for r in records] == kept[::-1] and pages == 3  # cut to the maximum page
    since, _ = _walk(svc, "ListAudit", "records", security_pb2.ListAuditRequest, page_size=7, since_ms=255)
    assert [r.principal for r in since] == [f"p{i}" for i in range(RECORDS - 1, 2549, -1)]


def test_an_audit_token_holds_while_retention_drops_records_and_across_a_snapshot():
    svc, sm = _service()
    first = _call(svc, "ListAudit", security_pb2.ListAuditRequest(page_size=100))
    assert first.records[-1].principal == f"p{RECORDS - 100}"
    more = [security_pb2.AuditRecord(at_ms=999, principal=f"new{i}", code="OK") for i in range(50)]
    sm.apply(sm.applied_index + 1, state_pb2.Command(
        at_ms=1, append_audit=state_pb2.AppendAuditCmd(records=more)).SerializeToString())
    other = ClusterStateMachine()
    other.security.audit = AuditLog(keep=KEEP)
    other.restore(sm.snapshot(), sm.applied_index)
    assert other.security.audit.first_seq == sm.security.audit.first_seq == RECORDS + 50 - KEEP
    for state in (sm, other):  # the next page starts right after the first, on any replica
        nxt = _call(SecurityService(SimpleNamespace(state=state, read=_no_barrier), lambda i: 1), "ListAudit",
                    security_pb2.ListAuditRequest(page_size=2, page_token=first.next_page_token))
        assert [r.principal for r in nxt.records] == [f"p{RECORDS - 101}", f"p{RECORDS - 102}"]


def test_audit_older_clients_limit_and_bad_requests():
    svc, _ = _service()
    legacy = _call(svc, "ListAudit", security_pb2.ListAuditRequest(limit=3))  # newest three, oldest first
    assert [r.principal for r in legacy.records] == [f"p{i}" for i in range(RECORDS - 3, RECORDS)]
    assert not legacy.next_page_token
    assert len(_call(svc, "ListAudit", security_pb2.ListAuditRequest()).records) == 1000  # the old default
    foreign = paging.encode_token(("u0001",))  # a quota token is no audit token
    for bad in ("x", "!!", foreign, paging.encode_token((1, 2))):
        with pytest.raises(InvalidArgument, match="page_token"):
            _call(svc, "ListAudit", security_pb2.ListAuditRequest(page_token=bad))
    with pytest.raises(InvalidArgument, match="limit"):
        _call(svc, "ListAudit", security_pb2.ListAuditRequest(limit=10_001))


def test_quota_pages_walk_every_user_once_by_name():
    svc, _ = _service()
    expected = [f"u{u:04d}" for u in range(USERS)]  # tokens=0 (u0000) is a limit too
    views, pages = _walk(svc, "ListQuotas", "quotas", security_pb2.ListQuotasRequest, page_size=500)
    assert [v.quota.user for v in views] == expected and pages == 3
    assert [v.quota.tokens for v in views[:3]] == [0, 1, 2]
    legacy = _call(svc, "ListQuotas", security_pb2.ListQuotasRequest())  # an older client: one answer
    assert len(legacy.quotas) == 1000 and legacy.next_page_token
    one = _call(svc, "ListQuotas", security_pb2.ListQuotasRequest(user="u0042", page_size=1))
    assert [v.quota.user for v in one.quotas] == ["u0042"] and not one.next_page_token
    for bad in ("x", paging.encode_token((5,)), paging.encode_token(("a", "b"))):
        with pytest.raises(InvalidArgument, match="page_token"):
            _call(svc, "ListQuotas", security_pb2.ListQuotasRequest(page_token=bad))


class _PagesClient:
    """lepton-ctl's client, answered by a SecurityService in this process."""

    def __init__(self, svc: SecurityService):
        self.svc, self.calls = svc, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _unary(self, stub, method, request, **kwargs):
        self.calls += 1
        return _call(self.svc, method, request)


def test_the_cli_walks_every_page(monkeypatch, capsys):
    import json

    from lepton.client import cli, cli_quota, cli_security

    svc, _ = _service()
    fake = _PagesClient(svc)
    for module in (cli_security, cli_quota):
        monkeypatch.setattr(module, "_client", lambda args: fake)
    assert cli.main(["--server", "127.0.0.1:1", "-o", "json", "audit", "--limit", "1500"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["principal"] for r in records] == [f"p{i}" for i in range(RECORDS - 1500, RECORDS)]  # oldest first
    assert fake.calls == 2
    assert cli.main(["--server", "127.0.0.1:1", "-o", "json", "audit", "--limit", "0"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == KEEP
    assert cli.main(["--server", "127.0.0.1:1", "-o", "json", "quota", "show"]) == 0
    assert [q["user"] for q in json.loads(capsys.readouterr().out)] == [f"u{u:04d}" for u in range(USERS)]
    assert cli.main(["--server", "127.0.0.1:1", "audit", "--limit", "-1"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
