"""lepton-ctl's security commands: `tokens create|ls|revoke|node-token`, `audit`,
`snapshot save|restore`. Hooked into lepton-ctl with `register(top, common)`.

Every online command is admin-only on a cluster with `--auth` (`lepton.common.auth.POLICY`).
`tokens create` prints the token alone on stdout (it is shown once: the cluster keeps only
its hash). `snapshot restore` is offline: it writes into a stopped agent's data dir.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from lepton.common.errors import Internal, InvalidArgument, error_for_code
from lepton.common.paging import MAX_PAGE, walk_pages
from lepton.v1 import security_pb2 as spb
from lepton.v1.security_pb2_grpc import SecurityStub

from ._cli_common import UsageError, _client, command, command_group, print_result
from .render import when
from .tables import FitTable

__all__ = ["parse_since", "register"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now_ms: int | None = None) -> int:
    """`10m`, `2h`, `1d` (that long ago) or an ISO time (`2024-05-01T12:00`, UTC unless it
    names a zone) → ms since the epoch. Raises UsageError."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    m = _DURATION.match(text.strip())
    if m:
        return max(0, now_ms - int(float(m.group(1)) * _UNIT_S[m.group(2)] * 1000))
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text!r} is neither a duration (10m, 2h, 1d) nor an ISO time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1000)


def _token_dict(t: spb.ApiToken) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "role": t.role, "created_at_ms": t.created_at_ms,
            "revoked": t.revoked, "revoked_at_ms": t.revoked_at_ms}


def _audit_dict(r: spb.AuditRecord) -> dict[str, Any]:
    return {"at_ms": r.at_ms, "principal": r.principal, "role": r.role, "via": r.via,
            "method": r.method, "code": r.code, "request": r.request, "token_id": r.token_id}


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _call(args: argparse.Namespace, method: str, request: Any, *, idempotent: bool = True) -> Any:
    with _client(args) as c:
        return c._unary(SecurityStub, method, request, idempotent=idempotent)


def join_snapshot_chunks(chunks: list[spb.SaveSnapshotResponse]) -> spb.SaveSnapshotResponse:
    """SaveSnapshot's stream as one response; Internal unless the chunks are one whole
    snapshot, in order (never a partial backup)."""
    if not chunks:
        raise Internal("SaveSnapshot sent nothing")
    head = chunks[0]
    data = bytearray()
    for c in chunks:
        if (c.index, c.term, c.cluster_id, c.total_bytes) != (head.index, head.term, head.cluster_id, head.total_bytes) \
                or c.offset != len(data):
            raise Internal(f"SaveSnapshot sent a chunk at offset {c.offset} of index {c.index}; expected "
                           f"offset {len(data)} of index {head.index}")
        data += c.data
    if len(data) != head.total_bytes:
        raise Internal(f"SaveSnapshot sent {len(data)} of {head.total_bytes} bytes")
    return spb.SaveSnapshotResponse(data=bytes(data), index=head.index, term=head.term,
                                    cluster_id=head.cluster_id, total_bytes=head.total_bytes)


# -- commands -------------------------------------------------------------------------
def cmd_tokens_create(args: argparse.Namespace) -> int:
    resp = _call(args, "CreateToken", spb.CreateTokenRequest(name=args.name, role=args.role), idempotent=False)
    def human() -> None:
        sys.stdout.write(resp.token + "\n")
        sys.stderr.write(f"created token {resp.token_id} for {args.name} ({args.role}); "
                         "it is shown only this once\n")

    return print_result(args, {"token": resp.token, **_token_dict(resp.info)}, human)


def cmd_tokens_ls(args: argparse.Namespace) -> int:
    def page(token: str) -> tuple[Any, str]:
        resp = _call(args, "ListTokens", spb.ListTokensRequest(page_token=token))
        return resp.tokens, resp.next_page_token

    tokens = list(walk_pages(page))

    def table() -> FitTable:
        out = FitTable(("ID", "NAME", "ROLE", "CREATED", "STATE"))  # ids never cut
        for t in tokens:
            out.add_row(t.id, t.name, t.role, when(t.created_at_ms), "revoked" if t.revoked else "active")
        return out

    return print_result(args, [_token_dict(t) for t in tokens], table, empty="no tokens")


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    t = _call(args, "RevokeToken", spb.RevokeTokenRequest(token_id=args.id))
    return print_result(args, _token_dict(t), f"revoked token {t.id} ({t.name}, {t.role})\n")


def cmd_tokens_node_token(args: argparse.Namespace) -> int:
    """Offline: a fresh cluster node token for agents without TLS (lepton.agent.auth_setup)."""
    from lepton.common.auth import new_token
    from lepton.common.durable import write_atomic

    path = Path(args.file)
    if path.exists():
        raise UsageError(f"{path} already exists")
    token, _ = new_token()
    try:
        write_atomic(path, (token + "\n").encode(), exclusive=True)  # 0600, fsync'd
    except FileExistsError:  # made since the check above
        raise UsageError(f"{path} already exists") from None
    sys.stderr.write(f"wrote a node token to {path} (0600); copy it to <data-dir>/node.token on every agent\n")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise UsageError(f"--limit {args.limit}: give 0 (all) or more")
    since = parse_since(args.since) if args.since else 0
    records: list[spb.AuditRecord] = []
    with _client(args) as c:
        def page(token: str) -> tuple[Any, str]:  # newest first
            size = min(args.limit - len(records), MAX_PAGE) if args.limit else MAX_PAGE
            req = spb.ListAuditRequest(since_ms=since, page_size=size, page_token=token)
            resp = c._unary(SecurityStub, "ListAudit", req)
            return resp.records, resp.next_page_token

        for record in walk_pages(page):
            records.append(record)
            if len(records) == args.limit:
                break
    records.reverse()  # shown oldest first, the newest at the bottom

    def table() -> Table:
        out = Table(box=None, pad_edge=False)
        for col in ("TIME", "WHO", "ROLE", "METHOD", "RESULT", "REQUEST"):
            out.add_column(col, overflow="fold" if col == "REQUEST" else "ellipsis")
        for r in records:
            out.add_row(_iso(r.at_ms), r.principal, r.role or "-", r.method.rpartition(".")[2],
                        r.code, r.request if len(r.request) <= 120 else r.request[:117] + "...")
        return out

    return print_result(args, [_audit_dict(r) for r in records], table, empty="no audit records")


def cmd_snapshot_save(args: argparse.Namespace) -> int:
    from lepton.common import backup

    def fetch(conn: Any, attempt_timeout: float) -> list[spb.SaveSnapshotResponse]:
        return list(conn.stub(SecurityStub).SaveSnapshot(spb.SaveSnapshotRequest(), timeout=attempt_timeout))

    with _client(args) as c:  # a broken stream starts over, on the leader
        resp = join_snapshot_chunks(c._call(fetch, what="SaveSnapshot", idempotent=True, timeout=None))
    path = backup.save(resp.data, resp.index, resp.term, resp.cluster_id, args.file, overwrite=args.overwrite)
    doc = {"file": str(path), "index": resp.index, "term": resp.term, "cluster_id": resp.cluster_id,
           "bytes": path.stat().st_size}
    return print_result(args, doc, f"saved cluster {resp.cluster_id} at index {resp.index} "
                                   f"(term {resp.term}) to {path}, {doc['bytes']} bytes\n")


def cmd_snapshot_restore(args: argparse.Namespace) -> int:
    # The restore rewrites a stopped voter's Raft folder with the coordinator's storage code;
    # it runs as its own process so the client never imports the coordinator (the layers).
    import json
    import subprocess

    if bool(args.etcd) == bool(args.data_dir):
        raise InvalidArgument("give --data-dir D (a stopped voter) or --etcd etcd://HOST:PORT,... (stopped candidates)")
    where = [args.data_dir] if args.data_dir else ["--etcd", args.etcd, "--cluster-name", args.cluster_name] + [
        f"--{flag.replace('_', '-')}={getattr(args, flag)}"
        for flag in ("etcd_prefix", "etcd_ca", "etcd_cert", "etcd_key") if getattr(args, flag)]
    proc = subprocess.run(
        [sys.executable, "-m", "lepton.coordinator.restore", args.file, *where],
        capture_output=True, text=True, check=False,
    )
    try:
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise Internal(f"snapshot restore failed: {(proc.stderr or proc.stdout).strip()[-500:]}") from None
    if proc.returncode != 0:
        raise error_for_code(doc.get("code", ""), doc.get("message", "snapshot restore failed"))
    def human() -> str:
        moved = f"the previous raft folder is kept as {doc['moved_aside']}\n" if doc["moved_aside"] else ""
        then = ("start the candidates as before" if args.etcd else
                "start the agent as before; see docs/operations.md for clusters of several voters")
        return (f"restored cluster {doc['cluster_id']} at index {doc['index']} into {doc['data_dir']}\n"
                f"{moved}{then}\n")

    return print_result(args, doc, human)


def register(top: Any, common: argparse.ArgumentParser) -> None:
    """Add `tokens`, `audit` and `snapshot` to lepton-ctl's subcommands `top`."""

    def cmd(sub: Any, name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        return command(sub, name, func, help, [common])

    tokens = command_group(top, "tokens", "API tokens: create, list, revoke (admin)")
    p = cmd(tokens, "create", cmd_tokens_create, "make a token; prints it once, alone on stdout")
    p.add_argument("--role", required=True, choices=("admin", "user", "viewer"))
    p.add_argument("--name", required=True, help="who the token is for (the owner of what it submits)")
    cmd(tokens, "ls", cmd_tokens_ls, "list tokens (never the tokens themselves)")
    p = cmd(tokens, "revoke", cmd_tokens_revoke, "revoke a token by its id")
    p.add_argument("id", metavar="ID")
    p = cmd(tokens, "node-token", cmd_tokens_node_token,
            "write a fresh cluster node token to FILE (offline; for agents without TLS)")
    p.add_argument("file", metavar="FILE")

    p = cmd(top, "audit", cmd_audit, "who changed what, when, with what result (admin)")
    p.add_argument("--since", metavar="T", help="a duration (10m, 2h, 1d) or an ISO time")
    p.add_argument("--limit", type=int, default=1000, help="the newest N records (default 1000; 0: all)")

    snap = command_group(top, "snapshot", "online backup and offline restore of the cluster state")
    p = cmd(snap, "save", cmd_snapshot_save, "save a consistent copy of the cluster state to FILE (admin)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p = cmd(snap, "restore", cmd_snapshot_restore,
            "offline: install FILE as the state of a stopped agent's data dir")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--data-dir", metavar="D", help="the stopped voter's data dir")
    p.add_argument("--etcd", metavar="etcd://HOST:PORT,...",
                   help="instead: the etcd of a cluster run with --state etcd (every candidate stopped)")
    p.add_argument("--etcd-prefix", metavar="P", help="with --etcd: the cluster's prefix (default /lepton/<cluster-name>)")
    p.add_argument("--cluster-name", default="default", help="with --etcd: names the default prefix")
    p.add_argument("--etcd-ca", metavar="F", help="with --etcd: the CA of etcd's certificates")
    p.add_argument("--etcd-cert", metavar="F", help="with --etcd: a client certificate etcd accepts")
    p.add_argument("--etcd-key", metavar="F", help="with --etcd: its key")
