"""The Security gRPC API (tokens, audit log, online snapshots), served by every voter, and
the leader's soft-state helpers around it: the audit batcher and first-leadership bootstrap.

- Tokens are made on the leader (`CreateToken`); only the HMAC hash enters the log, and the
  token is returned once.
- The interceptor's `on_event` feeds `AuditBatcher`, which the leader commits as one
  `AppendAuditCmd` about every 0.5 s (not one log entry per call). Calls by nodes are
  audited only when refused (heartbeats and Raft would drown the log); calls answered
  UNAVAILABLE (a follower redirecting, no leader) did nothing and are not audited.
  A follower drops the events it sees: the call is redirected and audited at the leader.
- At first leadership the cluster gets its id (`SetClusterIdCmd`, a random hex string), the
  key task credentials are signed with (`SetTaskTokenKeyCmd`, see
  `lepton.coordinator.state.task_tokens`) and, with auth on and no token ever made, an
  initial admin token written to `<data-dir>/admin.token` (0600).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from lepton.common import validation as v
from lepton.common.auth import AuthEvent, Role, new_token, token_id
from lepton.common.durable import write_atomic
from lepton.common.errors import InvalidArgument, LeptonError
from lepton.common.grpc_util import register_service, rpc_boundary
from lepton.common.loops import run_cycles
from lepton.common.paging import MAX_PAGE_BYTES, decode_token, page_size, take_page
from lepton.coordinator.api.service import CoordinatorContext
from lepton.coordinator.audit import record_from_event
from lepton.coordinator.state import task_tokens
from lepton.coordinator.state.quotas import MAX_LISTED, check_quota_request
from lepton.coordinator.state.security_state import MAX_AUDIT_BATCH, PEOPLE_ROLES, record_to_proto
from lepton.v1 import security_pb2 as spb
from lepton.v1 import state_pb2

logger = logging.getLogger(__name__)

AUDIT_INTERVAL_S = 0.5  # records gather this long into one commit
AUDIT_IDLE_S = 60.0  # with nothing recorded the loop sleeps (a record wakes it)
MAX_PENDING_AUDIT = 20_000
DEFAULT_AUDIT_LIMIT = 1000
MAX_AUDIT_LIMIT = 10_000
ADMIN_TOKEN_FILE = "admin.token"
MAX_INTROSPECT_CHARS = 1024  # longer than any token this cluster makes

Propose = Callable[[state_pb2.Command], Awaitable[object]]


class AuditBatcher:
    """Buffers audit records on the leader and commits them in batches.

    `on_event` is the interceptor's hook (runs on the event loop, never raises);
    `run_cycle()` commits what is buffered and returns a sentence saying what it did.
    """

    def __init__(self, propose: Propose, is_leader: Callable[[], bool]):
        self._propose = propose
        self._is_leader = is_leader
        self._pending: list[spb.AuditRecord] = []
        self._recorded = asyncio.Event()  # wakes run(): no polling while nothing happens
        self.dropped = 0

    def on_event(self, event: AuthEvent) -> None:
        if event.code == grpc.StatusCode.UNAVAILABLE:
            return  # redirected or no leader: nothing happened here
        principal = event.principal
        refused = event.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        if principal is not None and principal.role == Role.NODE and not refused:
            return  # agent chatter (heartbeats, Raft, reports): audited only when refused
        if not self._is_leader():
            return
        if len(self._pending) >= MAX_PENDING_AUDIT:
            self.dropped += 1
            return
        self._pending.append(record_to_proto(record_from_event(event)))
        self._recorded.set()

    async def run_cycle(self) -> str:
        if not self._is_leader():
            lost, self._pending = len(self._pending), []
            return f"not the leader; dropped {lost} audit records" if lost else "not the leader"
        if not self._pending:
            return "nothing to write"
        batch = self._pending[:MAX_AUDIT_BATCH]
        del self._pending[:MAX_AUDIT_BATCH]
        if self._pending:
            self._recorded.set()  # the rest in the next cycle
        try:
            await self._propose(state_pb2.Command(append_audit=state_pb2.AppendAuditCmd(records=batch)))
        except LeptonError as err:
            self.dropped += len(batch)
            return f"lost {len(batch)} audit records: {err.message}"
        return f"wrote {len(batch)} audit records"

    async def run(self, interval_s: float = AUDIT_INTERVAL_S) -> None:
        def warn_of_losses(sentence: str) -> None:  # batches written are routine: no line
            if not sentence.startswith(("wrote", "nothing", "not the leader")):
                logger.warning("audit: %s", sentence)

        await run_cycles("audit", self.run_cycle, interval_s=AUDIT_IDLE_S, wakeup=self._recorded,
                         gather_s=interval_s, logger=logger, log=warn_of_losses)


class Bootstrap:
    """What a new leader makes once: the cluster id, and (auth on) the first admin token."""

    def __init__(self, ctx: CoordinatorContext, data_dir: Path, *, auth: bool):
        self._ctx = ctx
        self._data_dir = data_dir
        self._auth = auth
        self._task: asyncio.Task[None] | None = None

    def on_leadership(self, is_leader: bool, term: int) -> None:
        if is_leader and (self._task is None or self._task.done()):
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        for attempt in range(20):
            try:
                await self.run_cycle()
                return
            except LeptonError as err:
                if not self._ctx.consensus.is_leader():
                    return  # the next leader does it
                logger.info("bootstrap attempt %d: %s", attempt + 1, err.message)
                await asyncio.sleep(0.5)

    async def run_cycle(self) -> str:
        """Raises the LeptonError of a failed commit."""
        await self._ctx.read()
        security = self._ctx.state.security
        done = []
        if not security.cluster_id:
            cid = await self._ctx.commit(state_pb2.Command(
                set_cluster_id=state_pb2.SetClusterIdCmd(cluster_id=uuid.uuid4().hex)))
            done.append(f"cluster id {cid}")
        if not security.task_token_key:
            await self._ctx.commit(state_pb2.Command(set_task_token_key=state_pb2.SetTaskTokenKeyCmd(
                key=secrets.token_bytes(task_tokens.KEY_BYTES))))
            done.append("task token key")
        if self._auth and not security.tokens:
            token, _ = await create_token(self._ctx, "admin", Role.ADMIN.value)
            path = self._data_dir / ADMIN_TOKEN_FILE
            write_atomic(path, (token + "\n").encode())  # 0600
            logger.warning("auth: no tokens yet; made an admin token in %s (mode 0600). "
                           "Use it to create others, then remove the file", path)
            done.append("admin token")
        return "made " + ", ".join(done) if done else "nothing to do"


async def create_token(ctx: CoordinatorContext, name: str, role: str) -> tuple[str, spb.ApiToken]:
    """Make a token on this (leader) voter and commit its hash; returns (token, record).
    Raises InvalidArgument (role, name), NotLeader, or the commit's error."""
    if role not in PEOPLE_ROLES:
        raise InvalidArgument(f"role {role!r} is not one of admin, user, viewer")
    v.check_text(name, "name", v.MAX_NAME, required=True)
    ctx.require_leader()
    token, token_hash = new_token()
    cmd = state_pb2.Command(create_token=state_pb2.CreateTokenCmd(
        token_id=token_id(token), name=name, role=role, token_hash=token_hash,
        created_at=ctx.wall_ms(),
    ))
    record = await ctx.commit(cmd)
    record.hash = ""
    return token, record


class SecurityService:
    """Admin-only methods (see `lepton.common.auth.POLICY`).

    `term_of(index)`: the term of the log entry at `index` (for SaveSnapshot).
    """

    def __init__(self, ctx: CoordinatorContext, term_of: Callable[[int], int]):
        self._ctx = ctx
        self._term_of = term_of

    @rpc_boundary
    async def CreateToken(self, request, context):
        token, record = await create_token(self._ctx, request.name, request.role)
        logger.info("created token %s for %s (%s)", record.id, record.name, record.role)
        return spb.CreateTokenResponse(token=token, token_id=record.id, info=record)

    @rpc_boundary
    async def ListTokens(self, request, context):
        after = decode_token(request.page_token, (str, str))
        size = page_size(request.page_size)
        await self._ctx.read()
        tokens = self._ctx.state.security.list_tokens()  # by name, then id
        by_key = {(t.name, t.id): t for t in tokens}
        page, token = take_page(list(by_key), after, size=size, select=by_key.get, size_of=lambda t: t.ByteSize())
        return spb.ListTokensResponse(tokens=page, next_page_token=token)

    @rpc_boundary
    async def RevokeToken(self, request, context):
        v.require_id(request.token_id, "token_id")
        await self._ctx.read()
        cmd = state_pb2.Command(revoke_token=state_pb2.RevokeTokenCmd(token_id=request.token_id))
        record = await self._ctx.commit(cmd)
        record.hash = ""
        logger.info("revoked token %s (%s)", record.id, record.name)
        return record

    @rpc_boundary
    async def ListAudit(self, request, context):
        """Pages newest first by sequence number; an older client's `limit` (no page_size,
        no page_token) gets the newest `limit` in one answer, oldest first, as before."""
        if request.page_size or request.page_token:
            after = decode_token(request.page_token, (int,))
            size = page_size(request.page_size)
            await self._ctx.read()
            log = self._ctx.state.security.audit
            since_ms = max(request.since_ms, 0)

            def select(key: tuple[int, ...]) -> spb.AuditRecord | None:
                record = log.record_at(key[0])
                return record_to_proto(record) if record and record.at_ms >= since_ms else None

            keys = [(seq,) for seq in log.seqs()]
            records, token = take_page(keys, after, size=size, select=select,
                                       size_of=lambda r: r.ByteSize(), reverse=True)
            return spb.ListAuditResponse(records=records, next_page_token=token)
        if request.limit > MAX_AUDIT_LIMIT:
            raise InvalidArgument(f"limit is {request.limit}; at most {MAX_AUDIT_LIMIT}")
        await self._ctx.read()
        records = self._ctx.state.security.audit.query(
            since_ms=max(request.since_ms, 0), limit=request.limit or DEFAULT_AUDIT_LIMIT
        )
        protos = [record_to_proto(r) for r in records]
        start, used = len(protos), 0
        while start and used + protos[start - 1].ByteSize() <= MAX_PAGE_BYTES:  # the newest that fit
            start -= 1
            used += protos[start].ByteSize()
        return spb.ListAuditResponse(records=protos[start:])

    @rpc_boundary
    async def Introspect(self, request, context):
        """Who `request.token` stands for, as this cluster's state says now (after a read
        barrier: a revocation committed before the call is seen)."""
        if len(request.token) > MAX_INTROSPECT_CHARS:
            return spb.IntrospectResponse(valid=False)
        await self._ctx.read()
        p = self._ctx.state.security.lookup(request.token)
        if p is None:
            return spb.IntrospectResponse(valid=False)
        return spb.IntrospectResponse(valid=True, name=p.name, role=p.role.value, via=p.via, token_id=p.token_id)

    @rpc_boundary
    async def SetQuota(self, request, context):
        v.check_text(request.quota.user, "quota.user", v.MAX_NAME, required=True)
        check_quota_request(request.quota, request.unlimited)  # before anything is proposed
        cmd = state_pb2.Command(set_quota=state_pb2.SetQuotaCmd(
            quota=request.quota, unlimited=request.unlimited))
        view = await self._ctx.commit(cmd)
        logger.info("quota of %s: %s", request.quota.user, view.quota)
        return view

    @rpc_boundary
    async def ListQuotas(self, request, context):
        v.check_text(request.user, "user", v.MAX_NAME)
        after = decode_token(request.page_token, (str,))
        await self._ctx.read()
        quotas = self._ctx.state.quotas
        if request.user:
            return spb.ListQuotasResponse(quotas=[quotas.view(request.user)])
        # An older client (no page_size, no token) gets up to MAX_LISTED in one answer.
        size = page_size(request.page_size) if request.page_size or after else MAX_LISTED
        page, token = take_page([(u,) for u in sorted(quotas.quotas)], after, size=size,
                                select=lambda key: quotas.view(key[0]), size_of=lambda q: q.ByteSize())
        return spb.ListQuotasResponse(quotas=page, next_page_token=token)

    @rpc_boundary
    async def SaveSnapshot(self, request, context):
        state = self._ctx.state
        if not state.security.cluster_id:  # a cluster older than cluster ids
            await self._ctx.commit(state_pb2.Command(
                set_cluster_id=state_pb2.SetClusterIdCmd(cluster_id=uuid.uuid4().hex)))
        await self._ctx.read()
        # No await until the copy is taken: one consistent state at the applied index.
        index = state.applied_index
        data = state.snapshot()
        term, cluster_id = self._term_of(index), state.security.cluster_id
        # In chunks: the state may exceed any single message (issue 14).
        for offset in range(0, max(len(data), 1), v.STREAM_CHUNK_BYTES):
            yield spb.SaveSnapshotResponse(
                data=data[offset:offset + v.STREAM_CHUNK_BYTES], index=index, term=term,
                cluster_id=cluster_id, offset=offset, total_bytes=len(data),
            )


def add_to_server(service: SecurityService, server: grpc.aio.Server) -> str:
    desc = spb.DESCRIPTOR.services_by_name["Security"]
    register_service(server, service, desc)
    return desc.full_name
