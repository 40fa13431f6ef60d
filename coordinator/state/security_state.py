"""Security in the replicated state: API tokens (hashes only), the audit log, the cluster id,
and the key task credentials are signed with (`task_tokens`).

Called from `ClusterStateMachine.apply` and therefore deterministic: times come from the
commands, never from a clock, and nothing here makes a token (the leader does, and only
its HMAC hash enters the log). `lookup` is the `AuthInterceptor`'s token lookup on a voter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from lepton.common.auth import (
    Principal,
    Role,
    current_principal,
    effective_owner,
    match_token,
)
from lepton.common.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from lepton.coordinator.audit import DEFAULT_KEEP, AuditLog, AuditRecord
from lepton.coordinator.state import task_tokens
from lepton.v1 import security_pb2, state_pb2, tasks_pb2

logger = logging.getLogger(__name__)

PEOPLE_ROLES = (Role.ADMIN.value, Role.USER.value, Role.VIEWER.value)
MAX_AUDIT_BATCH = 5_000


def record_to_proto(r: AuditRecord) -> security_pb2.AuditRecord:
    return security_pb2.AuditRecord(
        at_ms=r.at_ms, principal=r.principal, role=r.role, via=r.via, method=r.method,
        code=r.code, request=r.request, token_id=r.token_id,
    )


def record_from_proto(p: security_pb2.AuditRecord) -> AuditRecord:
    return AuditRecord(p.at_ms, p.principal, p.role, p.via, p.method, p.code, p.request, p.token_id)


def _copy(token: security_pb2.ApiToken) -> security_pb2.ApiToken:
    out = security_pb2.ApiToken()
    out.CopyFrom(token)
    return out


class SecurityTable:
    """Tokens by id, the audit log (`keep` newest records), the cluster id and the task token
    key. `find_task(id)`: the state's task (None when unknown), and `holding(task)`: whether
    its current attempt holds its node; task credentials are checked against them."""

    def __init__(self, keep: int = DEFAULT_KEEP, *,
                 find_task: Callable[[str], tasks_pb2.Task | None] = lambda task_id: None,
                 holding: Callable[[tasks_pb2.Task], bool] = lambda task: False):
        self.tokens: dict[str, security_pb2.ApiToken] = {}
        self.audit = AuditLog(keep)
        self.cluster_id = ""
        self.task_token_key = b""
        self._find_task = find_task
        self._holding = holding

    # -- commands (deterministic) ------------------------------------------------------
    def create_token(self, c: state_pb2.CreateTokenCmd, at_ms: int) -> security_pb2.ApiToken:
        """Raises InvalidArgument (bad role, name or hash), AlreadyExists (id taken)."""
        if c.role not in PEOPLE_ROLES:
            raise InvalidArgument(f"role {c.role!r} is not one of admin, user, viewer")
        if not c.name or len(c.name) > 128:
            raise InvalidArgument("token name must be 1-128 characters")
        if not c.token_id or not c.token_hash.startswith("sha256:"):
            raise InvalidArgument("a token needs an id and a sha256 hash")
        if c.token_id in self.tokens:
            raise AlreadyExists(f'token id "{c.token_id}" is taken')
        token = security_pb2.ApiToken(
            id=c.token_id, name=c.name, role=c.role, hash=c.token_hash,
            created_at_ms=c.created_at or at_ms,
        )
        self.tokens[token.id] = token
        return _copy(token)

    def revoke_token(self, c: state_pb2.RevokeTokenCmd, at_ms: int) -> security_pb2.ApiToken:
        """Idempotent: revoking a revoked token changes nothing. Raises NotFound."""
        token = self.tokens.get(c.token_id)
        if token is None:
            raise NotFound(f'token "{c.token_id}" not found')
        if not token.revoked:
            token.revoked = True
            token.revoked_at_ms = at_ms
        return _copy(token)

    def append_audit(self, c: state_pb2.AppendAuditCmd, at_ms: int) -> int:
        for rec in c.records:
            self.audit.append(record_from_proto(rec))
        return len(c.records)

    def set_cluster_id(self, c: state_pb2.SetClusterIdCmd, at_ms: int) -> str:
        """The first id wins; later ones (a second leader racing) are ignored."""
        if not self.cluster_id and c.cluster_id:
            self.cluster_id = c.cluster_id
        return self.cluster_id

    def set_task_token_key(self, c: state_pb2.SetTaskTokenKeyCmd, at_ms: int) -> int:
        """The first key wins (a second leader racing is ignored); returns its length.
        Raises InvalidArgument for a key of the wrong size."""
        if len(c.key) != task_tokens.KEY_BYTES:
            raise InvalidArgument(f"a task token key is {task_tokens.KEY_BYTES} bytes, not {len(c.key)}")
        if not self.task_token_key:
            self.task_token_key = bytes(c.key)
        return len(self.task_token_key)

    # -- reads -------------------------------------------------------------------------
    def task_token(self, task: tasks_pb2.Task) -> str:
        """The credential for `task`'s current attempt ("" before the key exists)."""
        return task_tokens.mint(self.task_token_key, task)

    def list_tokens(self) -> list[security_pb2.ApiToken]:
        """Copies without their hashes, by name then id."""
        out = []
        for t in sorted(self.tokens.values(), key=lambda t: (t.name, t.id)):
            c = _copy(t)
            c.hash = ""
            out.append(c)
        return out

    def lookup(self, token: str, now_ms: int | None = None) -> Principal | None:
        """The principal a bearer token stands for, or None (malformed, unknown, revoked).
        Compares in constant time even for unknown ids. Task credentials: `task_tokens`."""
        if task_tokens.is_task_token(token):
            now_ms = int(time.time() * 1000) if now_ms is None else now_ms
            return task_tokens.lookup(self.task_token_key, token, self._find_task, self.tokens,
                                      self._holding, now_ms)
        record = match_token(token, self.tokens)
        if record is None:
            return None
        return Principal(record.name, Role(record.role), via="token", token_id=record.id)

    # -- snapshots ---------------------------------------------------------------------
    def fill(self, snap: state_pb2.StateSnapshot) -> None:
        for tid in sorted(self.tokens):
            snap.tokens.append(self.tokens[tid])
        snap.audit.extend(record_to_proto(r) for r in self.audit)
        snap.audit_first_seq = self.audit.first_seq
        snap.cluster_id = self.cluster_id
        snap.task_token_key = self.task_token_key

    def rebuild(self, snap: state_pb2.StateSnapshot) -> None:
        self.tokens = {t.id: _copy(t) for t in snap.tokens}
        self.audit = AuditLog(self.audit.keep, first_seq=snap.audit_first_seq)
        for rec in snap.audit:  # a smaller keep here drops the oldest, counting them
            self.audit.append(record_from_proto(rec))
        self.audit.dropped = 0
        self.cluster_id = snap.cluster_id
        self.task_token_key = snap.task_token_key


def check_node_caller(state: object, node_id: str) -> None:
    """When a node certificate is the caller, the node it acts for must be itself: its
    certificate name is the node id (`lepton.common.channels.node_tls`) or the name the
    node registered with. Skipped with auth off, for people (admins may act for any node)
    and for the shared node token (it names no node). Raises PermissionDenied."""
    p = current_principal()
    if p is None or p.role != Role.NODE or p.via != "certificate":
        return
    node = getattr(state, "nodes", {}).get(node_id)
    if p.name == node_id or (node is not None and node.name and p.name == node.name):
        return
    raise PermissionDenied(f"node {p.name} may not act for node {node_id}")


def stamp_owner(spec: tasks_pb2.TaskSpec, state) -> None:
    """Record the submitter on a new task's spec, whatever the client sent: the owner (the
    caller; an admin may name anyone), the caller's role and the token it used (a task's
    credential passes on its own submitter's). Its attempts' credentials act with that role
    and stop working when that token is revoked. Raises PermissionDenied when a non-admin
    names another owner."""
    spec.owner = effective_owner(spec.owner)
    p = current_principal()
    role = p.role.value if p is not None and p.role.value in PEOPLE_ROLES else ""
    spec.owner_role = role
    spec.owner_token_id = ""
    if p is not None and role and p.via == "token":
        spec.owner_token_id = p.token_id
    elif p is not None and role and p.via == "task":
        parent = state.tasks.tasks.get(task_tokens.task_of(p.token_id))
        spec.owner_token_id = parent.spec.owner_token_id if parent is not None else ""
