"""Who may call what: bearer tokens, roles, the method table and the gRPC interceptor.

Principals authenticate in one of two ways:

- a bearer token, `authorization: Bearer lep_<id>_<secret>` metadata. Only a keyed SHA-256
  of the token is stored (`new_token`); the token is shown once. The id is public and
  names the token for listing and revocation; the 256-bit secret is what proves possession.
- an mTLS client certificate from the cluster CA (`lepton.common.tls`): agents are nodes
  (`OU=node`), people and tools may also carry a role (`OU=user:<role>`).

A bearer token, when sent, wins over the connection's certificate, and an invalid one is
refused outright (never silently ignored in favour of the certificate).

Roles: `viewer` < `user` < `admin` read/write the API; `node` is separate, for what agents
do (register, heartbeat, assignments, Raft, shard moves) and nothing else. `POLICY` maps
every RPC to the roles it admits; a method missing from it needs `admin` (deny by default).
Handlers see the caller through `current_principal()`, to enforce ownership ("users manage
their own tasks and datasets") with `require_owner` / `effective_owner`.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import inspect
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import grpc

from lepton.common.errors import InvalidArgument, PermissionDenied
from lepton.common.grpc_util import as_async_iter

logger = logging.getLogger(__name__)


class Role(str, Enum):
    VIEWER = "viewer"
    USER = "user"
    ADMIN = "admin"
    NODE = "node"

    @classmethod
    def parse(cls, value: str) -> Role:
        """Raises InvalidArgument for anything but admin|user|viewer|node."""
        try:
            return cls(value)
        except ValueError:
            raise InvalidArgument(f"role {value!r} is not one of admin, user, viewer, node") from None


_RANK = {Role.VIEWER: 1, Role.USER: 2, Role.ADMIN: 3}


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `via` is "token" or "certificate"."""

    name: str
    role: Role
    via: str = "token"
    token_id: str = ""

    def __str__(self) -> str:
        return f"{self.name} ({self.role.value})"


@dataclass(frozen=True, slots=True)
class Rule:
    """Who may call one method.

    `min_role`: the lowest of viewer/user/admin admitted (admin and above pass); None when
    no person may call it. `nodes`: agents may call it. `read`: changes nothing. `public`:
    no credentials needed at all (health checks, so probes and load balancers work).
    """

    min_role: Role | None
    nodes: bool = False
    read: bool = False
    public: bool = False

    def allows(self, role: Role) -> bool:
        if self.public:
            return True
        if role == Role.NODE:
            return self.nodes
        return self.min_role is not None and _RANK[role] >= _RANK[self.min_role]

    def needed(self) -> str:
        parts = [self.min_role.value] if self.min_role is not None else []
        if self.nodes:
            parts.append("node")
        return " or ".join(parts) or "nobody"


VIEW = Rule(Role.VIEWER, read=True)
VIEW_OR_NODE = Rule(Role.VIEWER, nodes=True, read=True)
USER = Rule(Role.USER)
USER_OR_NODE = Rule(Role.USER, nodes=True)
ADMIN = Rule(Role.ADMIN)
ADMIN_OR_NODE = Rule(Role.ADMIN, nodes=True)
NODE_ONLY = Rule(None, nodes=True)
NODE_READ = Rule(None, nodes=True, read=True)
PUBLIC = Rule(None, read=True, public=True)
# Anything not listed: only admins, and it counts as a write (audited).
DEFAULT_RULE = ADMIN


def _svc(service: str, rules: dict[str, Rule]) -> dict[str, Rule]:
    return {f"/{service}/{name}": rule for name, rule in rules.items()}


POLICY: dict[str, Rule] = {
    **_svc("lepton.v1.Coordinator", {
        "RegisterNode": NODE_ONLY,
        "Heartbeat": NODE_ONLY,
        "HeartbeatStream": NODE_ONLY,
        # The agent leaves on SIGTERM; an admin may retire a dead node's entry.
        "LeaveNode": ADMIN_OR_NODE,
        "DrainNode": ADMIN,
        "GetNode": VIEW_OR_NODE,  # agents resolve PullShards source node ids to addresses
        "ListNodes": VIEW,
        "GetClusterStatus": VIEW,
        "AddVoter": ADMIN,  # change the voter set: admins only, audited
        "RemoveVoter": ADMIN,
        "WatchNodes": VIEW,
        # Users submit as themselves and cancel their own (the handler checks the owner).
        "SubmitTask": USER,
        "SubmitTasks": USER,  # a batch of SubmitTask, same owner rule
        "GetTask": VIEW,
        "ListTasks": VIEW,
        "CancelTask": USER,
        "WaitTask": VIEW,
        "SubmitJob": USER,  # a gang of tasks; owner checked like SubmitTask
        "GetJob": VIEW,
        "CollectGarbage": ADMIN,  # `lepton-ctl cluster gc`
        "WatchAssignments": NODE_READ,
        "ReportTaskEvents": NODE_ONLY,
    }),
    **_svc("lepton.v1.Agent", {"StreamLogs": VIEW}),
    # Any agent answers for any deployment: users call it, agents forward to each other (only
    # a node may name the replica: agent/predict_router.py). A read: it changes no state, and
    # auditing each prediction would make the audit log the endpoint's bottleneck.
    **_svc("lepton.v1.Inference", {"Predict": Rule(Role.USER, nodes=True, read=True)}),
    # Nodes, and of them only members of the receiver's Raft configuration speaking as
    # themselves (lepton.coordinator.raft.peer_auth). Probe is not a read here so that its
    # refusals, too, are counted and audited.
    **_svc("lepton.v1.Raft", {"Send": NODE_ONLY, "Stream": NODE_ONLY, "Probe": NODE_ONLY}),
    **_svc("lepton.v1.Datasets", {
        "PlanPut": USER,
        "CommitDataset": USER,
        "GetDataset": VIEW_OR_NODE,  # agents look up the holders of shipped code (--working-dir)
        "ListDatasets": VIEW,
        "DeleteDataset": USER,  # own datasets; the handler checks the owner
        "ReleaseShards": USER,  # a failed put cleans up after itself
        "DropReplica": NODE_ONLY,
        "ReportInventory": NODE_ONLY,  # an agent's blobs; the answer drives its orphan sweep
    }),
    # Nodes read each other's shards; of writes, a node certificate may only be ordered by a
    # coordinator to pull or delete (the handler checks it is one: node restriction).
    **_svc("lepton.v1.Shards", {
        "WriteShard": USER,
        "ReadShard": VIEW_OR_NODE,
        "OpenTransfer": VIEW_OR_NODE,
        "PullShards": USER_OR_NODE,
        "StatShards": VIEW_OR_NODE,
        "DeleteShards": ADMIN_OR_NODE,
        "ShardStats": USER,  # reads, but costs CPU on the node
        "TransformShard": USER,
    }),
    # Serving (docs/serving.md): users change their own deployments (the handler checks the
    # owner); agents report their replicas (only for themselves) and watch the endpoints.
    **_svc("lepton.v1.Deployments", {
        "CreateDeployment": USER,
        "ScaleDeployment": USER,
        "UpdateDeployment": USER,
        "DeleteDeployment": USER,
        "GetDeployment": VIEW,
        "ListDeployments": VIEW,
        "ReportReplicas": NODE_ONLY,
        "WatchEndpoints": NODE_READ,
    }),
    # Tokens, the audit log and backups: admins only (the state holds only token hashes).
    **_svc("lepton.v1.Security", {
        "CreateToken": ADMIN,
        "ListTokens": Rule(Role.ADMIN, read=True),
        "RevokeToken": ADMIN,
        "ListAudit": Rule(Role.ADMIN, read=True),
        "SaveSnapshot": ADMIN,  # changes nothing, but a copy of everything: audited
        "Introspect": NODE_READ,  # a worker asking who a caller's token stands for
        "SetQuota": ADMIN,  # `lepton-ctl quota set`
        "ListQuotas": Rule(Role.ADMIN, read=True),
    }),
    **_svc("grpc.health.v1.Health", {"Check": PUBLIC, "Watch": PUBLIC, "List": PUBLIC}),
    **_svc("grpc.reflection.v1alpha.ServerReflection", {"ServerReflectionInfo": VIEW_OR_NODE}),
    **_svc("grpc.reflection.v1.ServerReflection", {"ServerReflectionInfo": VIEW_OR_NODE}),
}


def rule_for(method: str, policy: dict[str, Rule] | None = None) -> Rule:
    """The rule for a full method name (`/pkg.Service/Method`); unknown: DEFAULT_RULE."""
    return (POLICY if policy is None else policy).get(method, DEFAULT_RULE)


def service_methods() -> list[str]:
    """Every `/lepton.v1.<Service>/<Method>` the protos in `lepton.v1` define."""
    from lepton.v1 import (
        agent_pb2,
        coordinator_pb2,
        datasets_pb2,
        raft_pb2,
        security_pb2,
        serving_pb2,
    )

    out = []
    for module in (coordinator_pb2, agent_pb2, raft_pb2, datasets_pb2, security_pb2, serving_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            out += [f"/{service.full_name}/{m.name}" for m in service.methods]
    return out


# -- tokens ------------------------------------------------------------------------------------
TOKEN_PREFIX = "lep_"
_TOKEN_RE = re.compile(r"^lep_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_MAX_TOKEN_CHARS = 128  # longer is refused before any hashing
_DEFAULT_PEPPER = b"lepton-token-v1"


def hash_token(token: str, pepper: bytes = b"") -> str:
    """The stored form of a token: HMAC-SHA256 keyed with the pepper. A 256-bit random
    secret needs no slow hash; the pepper (kept out of the replicated state, when set) makes
    a leaked table useless for offline checks."""
    digest = hmac.new(pepper or _DEFAULT_PEPPER, token.encode(), hashlib.sha256).hexdigest()
    return f"sha256:{digest}"


def new_token(pepper: bytes = b"") -> tuple[str, str]:
    """A fresh token and its hash: `(token, token_hash)`. Show the token once, store the hash."""
    token_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    token = f"{TOKEN_PREFIX}{token_id}_{secret}"
    return token, hash_token(token, pepper)


def token_id(token: str) -> str:
    """The public id inside a token. Raises InvalidArgument if it is not a Lepton token."""
    m = _TOKEN_RE.match(token) if len(token) <= _MAX_TOKEN_CHARS else None
    if m is None:
        raise InvalidArgument("not a Lepton token (lep_<id>_<secret>)")
    return m.group(1)


_NO_HASH = "sha256:" + "0" * 64  # what an unknown id's token is compared against


def match_token(token: str, records: Mapping[str, Any], pepper: bytes = b"") -> Any | None:
    """The record in `records` (by token id; anything with `hash` and `revoked`) that `token`
    proves, or None: malformed, unknown, a wrong secret or revoked. The hash is compared even
    for unknown ids, so timing tells nothing about which ids exist."""
    try:
        tid = token_id(token)
    except InvalidArgument:
        return None
    record = records.get(tid)
    ok = hmac.compare_digest(hash_token(token, pepper), record.hash if record is not None else _NO_HASH)
    return record if record is not None and ok and not record.revoked else None


# -- the caller, for handlers ------------------------------------------------------------------
_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "lepton_principal", default=None
)


def current_principal() -> Principal | None:
    """The caller of the RPC being handled; None when auth is off (or a public method)."""
    return _CURRENT.get()


def require_owner(owner: str, what: str) -> None:
    """Raise PermissionDenied unless the caller is an admin or `owner`. With auth off
    (no principal) everything is allowed. `what` names the object, e.g. 'task 7f3a'."""
    p = current_principal()
    if p is None or p.role == Role.ADMIN or (p.role != Role.NODE and p.name == owner):
        return
    raise PermissionDenied(f"{what} belongs to {owner or 'nobody'}; {p.name} may not change it")


def effective_owner(requested: str) -> str:
    """The owner to record on a new task/dataset: the caller's own name; an admin may name
    anyone. Raises PermissionDenied when a non-admin names someone else."""
    p = current_principal()
    if p is None or p.role == Role.ADMIN:
        return requested or (p.name if p else "")
    if requested and requested != p.name:
        raise PermissionDenied(f"{p.name} may not act on behalf of {requested}")
    return p.name


# -- the interceptor ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AuthEvent:
    """One decision or outcome, for the audit log. `request` is the raw request (bytes or
    a message) for unary-request methods, None for client streams."""

    principal: Principal | None
    method: str
    code: grpc.StatusCode
    read: bool
    request: Any = None
    message: str = ""
    at_ms: int = field(default_factory=lambda: int(time.time() * 1000))


TokenLookup = Callable[[str], "Principal | None"]


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, principal: Principal | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.principal = principal


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call and checks it against `policy` before the handler runs.

    `token_lookup(token) -> Principal | None` (the replicated security state's lookup). Certificates are
    honoured when the server uses mTLS (`use_certificates`). `allow_node_tokens`: accept a
    token whose role is node (for clusters without TLS); off by default, since a node
    token is a bearer secret while a node certificate is bound to a key. `on_event` is
    called for every refusal and, after it finished, for every non-read call (audit).
    `resolve_token(token)`: awaited before `token_lookup` is asked, so a lookup that must
    call out (a worker asking a voter) can fill the cache `token_lookup` reads.
    Refusals: UNAUTHENTICATED (no, malformed or unknown credentials), PERMISSION_DENIED
    (role too low), each naming the method and the role needed.
    """

    def __init__(
        self,
        token_lookup: TokenLookup,
        *,
        policy: dict[str, Rule] | None = None,
        use_certificates: bool = True,
        allow_node_tokens: bool = False,
        on_event: Callable[[AuthEvent], None] | None = None,
        resolve_token: Callable[[str], Awaitable[None]] | None = None,
    ):
        self._lookup = token_lookup
        self._resolve = resolve_token
        self._policy = POLICY if policy is None else policy
        self._use_certs = use_certificates
        self._allow_node_tokens = allow_node_tokens
        self._on_event = on_event

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED, as without the interceptor
        method = handler_call_details.method
        return _wrap(handler, method, rule_for(method, self._policy), self)

    # -- deciding ---------------------------------------------------------------------
    async def resolve(self, metadata: Iterable[tuple[str, Any]]) -> None:
        """Let `resolve_token` prepare the lookup of the bearer token sent, if any."""
        if self._resolve is None:
            return
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if len(values) == 1 and isinstance(values[0], str):
            scheme, _, token = values[0].strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                await self._resolve(token.strip())

    def authenticate(self, method: str, metadata: Iterable[tuple[str, Any]], context: Any) -> Principal | None:
        """The caller, or None (no credentials). Raises _Denied for bad credentials."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if len(values) > 1:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED, f"{method}: send one authorization header, not {len(values)}")
        if values:
            value = values[0] if isinstance(values[0], str) else ""
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _Denied(grpc.StatusCode.UNAUTHENTICATED,
                              f"{method}: authorization metadata must be 'Bearer <token>'")
            principal = self._lookup(token.strip())
            if principal is None:
                raise _Denied(grpc.StatusCode.UNAUTHENTICATED,
                              f"{method}: the bearer token is unknown, expired or revoked")
            if principal.role == Role.NODE and not self._allow_node_tokens:
                raise _Denied(grpc.StatusCode.UNAUTHENTICATED,
                              f"{method}: node tokens are not accepted; nodes authenticate with certificates")
            return principal
        if self._use_certs:
            from lepton.common.tls import peer_identity  # cryptography only when TLS is used

            ident = peer_identity(context)
            if ident is not None:
                return Principal(ident.name, Role(ident.role), via="certificate")
        return None

    def authorize(self, method: str, rule: Rule, context: Any) -> Principal | None:
        """Raises _Denied when the caller may not call `method`."""
        principal = self.authenticate(method, context.invocation_metadata(), context)
        if rule.public:
            return principal
        if principal is None:
            raise _Denied(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs credentials (role {rule.needed()}): send 'authorization: "
                "Bearer <token>' metadata or a client certificate from the cluster CA",
            )
        if not rule.allows(principal.role):
            raise _Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs role {rule.needed()}; {principal.name} has role {principal.role.value}",
                principal,
            )
        return principal

    def emit(self, event: AuthEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:  # noqa: BLE001 - auditing must never break the call
            logger.exception("auth event hook failed")


def _status_of(context: Any, err: BaseException | None) -> grpc.StatusCode:
    if err is None:
        code = context.code() if hasattr(context, "code") else None
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code
    if isinstance(err, (GeneratorExit,)) or type(err).__name__ == "CancelledError":
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _is_generator(fn: Callable[..., Any]) -> bool:
    return inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn)


def _wrap(handler: grpc.RpcMethodHandler, method: str, rule: Rule, icpt: AuthInterceptor) -> grpc.RpcMethodHandler:
    """The same handler, with the check (and the principal set) in front of its behaviour."""

    async def check(context: Any, request: Any) -> Principal | None:
        await icpt.resolve(context.invocation_metadata())
        try:
            principal = icpt.authorize(method, rule, context)
        except _Denied as denied:
            logger.info("refused %s: %s", method, denied.message)
            icpt.emit(AuthEvent(denied.principal, method, denied.code, rule.read, request, denied.message))
            await context.abort(denied.code, denied.message)
        _CURRENT.set(principal)
        return principal

    def done(principal: Principal | None, context: Any, request: Any, err: BaseException | None) -> None:
        if not rule.read:
            icpt.emit(AuthEvent(principal, method, _status_of(context, err), False, request))

    def guard(behavior: Callable[..., Any], unary_request: bool, streaming_response: bool) -> Callable[..., Any]:
        """`behavior` behind the check; `arg` is the request, or the requests' iterator of a
        client stream (audited as no request)."""
        if streaming_response and _is_generator(behavior):

            async def agen(arg: Any, context: Any) -> Any:
                request = arg if unary_request else None
                principal = await check(context, request)
                err: BaseException | None = None
                try:
                    async for item in as_async_iter(behavior(arg, context)):
                        yield item
                except BaseException as e:
                    err = e
                    raise
                finally:
                    done(principal, context, request, err)

            return agen

        async def coro(arg: Any, context: Any) -> Any:
            request = arg if unary_request else None
            principal = await check(context, request)
            err: BaseException | None = None
            try:
                result = behavior(arg, context)
                return await result if inspect.isawaitable(result) else result
            except BaseException as e:
                err = e
                raise
            finally:
                done(principal, context, request, err)

        return coro

    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary, True, False), **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream, True, True), **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary, False, False), **kw)
    return grpc.stream_stream_rpc_method_handler(guard(handler.stream_stream, False, True), **kw)
