"""`--auth` on an agent: the server interceptor, and how agents authenticate to each other.

- People, tools and tasks: bearer tokens, checked by **voters** against the replicated
  state (`SecurityTable.lookup`), or a user certificate with TLS on. Workers hold no state:
  they ask a voter about a token and keep the answer a few seconds (`token_cache`).
- Agents: their node certificate with `--tls-dir`. Without TLS, a cluster **node token**
  shared by every agent: `<data-dir>/node.token` (or `LEPTON_NODE_TOKEN`). A one-voter
  cluster makes it at first start; copy it to every other agent's data dir (0600) before
  starting them. It is a bearer secret that names no node: prefer TLS for anything shared.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lepton.agent.token_cache import TokenCache
from lepton.common import bearer
from lepton.common.auth import (
    AuthEvent,
    AuthInterceptor,
    Principal,
    Role,
    hash_token,
    new_token,
    token_id,
)
from lepton.common.durable import write_atomic
from lepton.common.errors import FailedPrecondition, InvalidArgument, LeptonError

if TYPE_CHECKING:
    from lepton.agent.daemon import Agent

logger = logging.getLogger(__name__)

NODE_TOKEN_FILE = "node.token"
NODE_TOKEN_ENV = "LEPTON_NODE_TOKEN"
INTROSPECT_TIMEOUT_S = 3.0
PEOPLE_ROLES = (Role.ADMIN.value, Role.USER.value, Role.VIEWER.value)


def load_node_token(data_dir: Path, *, tls_on: bool, may_create: bool, env=os.environ) -> str:
    """The cluster node token ("" when TLS identifies nodes and there is none).

    `may_create`: this is the only voter of a one-voter cluster, which makes the token
    when there is none. Raises FailedPrecondition (none, and TLS off) or InvalidArgument
    (not a Lepton token).
    """
    path = data_dir / NODE_TOKEN_FILE
    token = env.get(NODE_TOKEN_ENV, "").strip()
    if not token and path.exists():
        token = path.read_text().strip()
    if not token:
        if tls_on:
            return ""
        if not may_create:
            raise FailedPrecondition(
                f"--auth without --tls-dir: agents authenticate with the cluster node token; copy "
                f"{NODE_TOKEN_FILE} from the first voter's data dir to {path} (mode 0600), or set "
                f"{NODE_TOKEN_ENV} (several voters: make one with `lepton-ctl tokens node-token FILE`)"
            )
        token, _ = new_token()
        write_atomic(path, (token + "\n").encode())  # 0600
        logger.warning("auth: made the cluster node token %s; copy it to every other agent", path)
    try:
        token_id(token)
    except InvalidArgument:
        raise InvalidArgument(f"the node token ({path} or {NODE_TOKEN_ENV}) is not a Lepton token") from None
    return token


def server_interceptor(agent: Agent) -> AuthInterceptor:
    """The interceptor for `agent`'s server; sets the node token on outgoing channels
    when TLS is off. Raises as `load_node_token`."""
    cfg = agent.config
    single_voter = cfg.dev_mode or (len(cfg.peers) == 1 and not cfg.join and cfg.advertise_address in cfg.peers)
    node_token = load_node_token(agent.data_dir, tls_on=agent.tls is not None, may_create=single_voter)
    if node_token and agent.tls is None:
        bearer.set_default_token(node_token)
    node_hash = hash_token(node_token) if node_token else ""
    node_tid = token_id(node_token) if node_token else ""
    cache = TokenCache(lambda token: introspect(agent, token))

    def is_node_token(token: str) -> bool:
        return bool(node_hash) and hmac.compare_digest(hash_token(token), node_hash)

    def lookup(token: str) -> Principal | None:
        if is_node_token(token):
            return Principal("node", Role.NODE, via="token", token_id=node_tid)
        coordinator = agent.coordinator  # voters: the tokens in the replicated state
        return coordinator.state.security.lookup(token) if coordinator is not None else cache.lookup(token)

    async def resolve(token: str) -> None:
        if agent.coordinator is None and not is_node_token(token):
            await cache.resolve(token)  # a worker: ask a voter, unless it answered lately

    def on_event(event: AuthEvent) -> None:
        if agent.agent_metrics is not None:  # metrics served
            agent.agent_metrics.on_auth_event(event)
        coordinator = agent.coordinator
        if coordinator is not None:
            coordinator.audit.on_event(event)

    logger.info("auth on: %s", "tokens and certificates" if agent.tls is not None else "tokens (no TLS)")
    return AuthInterceptor(lookup, use_certificates=True, allow_node_tokens=bool(node_token), on_event=on_event,
                           resolve_token=resolve)


async def introspect(agent: Agent, token: str) -> Principal | None:
    """A voter's answer about `token`, through the agent's link to the leader (following a
    redirect or two). Raises a LeptonError when no voter answers."""
    from lepton.agent.link import ServiceLink
    from lepton.v1 import security_pb2
    from lepton.v1.security_pb2_grpc import SecurityStub

    if agent.link is None:
        raise FailedPrecondition("the agent is still starting")
    service = ServiceLink(agent.link, SecurityStub)
    last: LeptonError | None = None
    for _ in range(3):
        try:
            answer = await service.call("Introspect", security_pb2.IntrospectRequest(token=token), INTROSPECT_TIMEOUT_S)
        except LeptonError as err:
            last = err
            continue
        if not answer.valid or answer.role not in PEOPLE_ROLES:
            return None
        return Principal(answer.name, Role(answer.role), via=answer.via or "token", token_id=answer.token_id)
    raise last
