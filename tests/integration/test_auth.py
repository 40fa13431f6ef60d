"""Issue 7 end to end: agents with --auth, roles, tokens, the audit log, backup and restore,
driven by the real lepton-ctl (and the client where many calls are needed)."""

from __future__ import annotations

import json
import shutil

import pytest

from lepton.client import Client
from lepton.common.errors import PermissionDenied, Unauthenticated
from tests.integration.cluster import run_ctl, wait_until

pytestmark = pytest.mark.integration


def admin_token(agent) -> str:
    path = agent.data_dir / "admin.token"
    wait_until(path.exists, what="the bootstrap admin token")
    assert path.stat().st_mode & 0o777 == 0o600
    return path.read_text().strip()


def ctl(server: str, token: str | None, *args: str, check: bool = False):
    extra = ["--token", token] if token is not None else []
    return run_ctl(*extra, *args, server=server, check=check)


def new_token(server: str, admin: str, role: str, name: str) -> str:
    out = ctl(server, admin, "tokens", "create", "--role", role, "--name", name, check=True)
    token = out.stdout.strip()
    assert token.startswith("lep_") and "\n" not in token  # alone on stdout
    return token


def test_roles_tokens_and_audit(agents):
    voter = agents("voter", "--auth")
    srv = voter.address
    admin = admin_token(voter)
    # A worker authenticates with the cluster node token copied into its data dir.
    (agents_dir := voter.data_dir.parent / "worker").mkdir()
    shutil.copy(voter.data_dir / "node.token", agents_dir / "node.token")
    agents("worker", "--auth", "--join", srv)

    denied = ctl(srv, None, "nodes", "list")
    assert denied.returncode == 1 and "needs credentials" in denied.stderr
    bogus = ctl(srv, "lep_000000000000_" + "A" * 43, "nodes", "list")
    assert bogus.returncode == 1 and "unknown, expired or revoked" in bogus.stderr

    viewer = new_token(srv, admin, "viewer", "vic")
    alice = new_token(srv, admin, "user", "alice")
    bob = new_token(srv, admin, "user", "bob")

    listed = json.loads(ctl(srv, viewer, "-o", "json", "nodes", "list", check=True).stdout)
    wait_until(lambda: len(Client(srv, token=viewer).nodes()) == 2, what="the worker registered")
    assert listed
    with Client(srv, token=viewer) as c, pytest.raises(PermissionDenied, match="needs role user"):
        c.submit(["sleep", "30"], cpu=0.1)

    with Client(srv, token=alice) as a, Client(srv, token=bob) as b, Client(srv, token=admin) as ad:
        t1 = a.submit(["sleep", "30"], cpu=0.1)
        assert t1.owner == "alice"  # the caller, not what the client sent
        with pytest.raises(PermissionDenied, match="belongs to alice"):
            b.cancel(t1.id)
        with pytest.raises(PermissionDenied, match="on behalf of"):
            b.submit(["true"], cpu=0.1, owner="alice")
        assert a.cancel(t1.id).state == "cancelled"
        t2 = b.submit(["sleep", "30"], cpu=0.1)
        assert ad.cancel(t2.id).state == "cancelled"  # admins act on anyone's
        with pytest.raises(PermissionDenied, match="needs role admin"):
            a.drain(ad.nodes()[0].id)

    refused = ctl(srv, alice, "tokens", "ls")
    assert refused.returncode == 1 and "needs role admin" in refused.stderr
    tokens = json.loads(ctl(srv, admin, "-o", "json", "tokens", "ls", check=True).stdout)
    assert {t["name"] for t in tokens} == {"admin", "vic", "alice", "bob"}
    assert all("hash" not in t and "token" not in t for t in tokens)
    vic_id = next(t["id"] for t in tokens if t["name"] == "vic")
    ctl(srv, admin, "tokens", "revoke", vic_id, check=True)
    with Client(srv, token=viewer) as c, pytest.raises(Unauthenticated):
        c.nodes()

    def audit():
        out = ctl(srv, admin, "-o", "json", "audit", "--since", "10m", check=True)
        return json.loads(out.stdout)

    def seen(records, who, method, code):
        return any(r["principal"] == who and r["method"].endswith(method) and r["code"] == code
                   for r in records)

    expected = [("alice", "SubmitTask", "OK"), ("bob", "CancelTask", "PERMISSION_DENIED"),
                ("alice", "CancelTask", "OK"), ("admin", "CancelTask", "OK"),
                ("vic", "SubmitTask", "PERMISSION_DENIED"), ("admin", "RevokeToken", "OK"),
                ("-", "ListNodes", "UNAUTHENTICATED"), ("admin", "CreateToken", "OK")]
    records = wait_until(lambda: (r := audit()) and all(seen(r, *e) for e in expected) and r,
                         what="the audit records")
    assert not any(r["role"] == "node" and r["code"] == "OK" for r in records)  # no chatter
    text = json.dumps(records)
    for secret in (admin, alice, bob, viewer):
        assert secret not in text
    table = ctl(srv, admin, "audit", "--since", "2024-01-01T00:00", check=True).stdout
    assert "SubmitTask" in table and "PERMISSION_DENIED" in table


def test_snapshot_save_wipe_restore(agents, tmp_path):
    voter = agents("voter", "--auth")
    srv = voter.address
    admin = admin_token(voter)
    user = new_token(srv, admin, "user", "ursula")
    with Client(srv, token=user) as c:
        task = c.submit(["sleep", "30"], cpu=0.1)
        c.cancel(task.id)

    def state():
        with Client(srv, token=admin) as c:
            return {
                "nodes": sorted(n.id for n in c.nodes()),
                "tasks": sorted((t.id, t.state) for t in c.tasks()),
                "datasets": sorted(d.name for d in c.datasets()),
                "tokens": json.loads(ctl(srv, admin, "-o", "json", "tokens", "ls", check=True).stdout),
            }

    before = state()
    backup = tmp_path / "cluster.lbk"
    saved = json.loads(ctl(srv, admin, "-o", "json", "snapshot", "save", str(backup), check=True).stdout)
    assert saved["cluster_id"] and saved["index"] > 0 and backup.stat().st_mode & 0o777 == 0o600

    running = ctl(srv, None, "snapshot", "restore", str(backup), "--data-dir", str(voter.data_dir))
    assert running.returncode == 1 and "stop it first" in running.stderr

    assert voter.terminate() == 0
    node_id = (voter.data_dir / "node_id").read_text()
    voter.wait_fence_gone()
    shutil.rmtree(voter.data_dir)
    voter.data_dir.mkdir()
    (voter.data_dir / "node_id").write_text(node_id)  # the same machine, the same identity

    corrupt = tmp_path / "corrupt.lbk"
    raw = bytearray(backup.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(raw))
    refused = ctl(srv, None, "snapshot", "restore", str(corrupt), "--data-dir", str(voter.data_dir))
    assert refused.returncode == 1 and "corrupt" in refused.stderr

    out = ctl(srv, None, "snapshot", "restore", str(backup), "--data-dir", str(voter.data_dir), check=True)
    assert saved["cluster_id"] in out.stdout
    voter.start()
    assert not (voter.data_dir / "admin.token").exists()  # tokens came back: no new bootstrap
    after = state()
    assert after == before
