"""Which certificate a server presents at an address: how a node certificate is tied to an
address it claims (a Raft voter's, a coordinator's).

A certificate's name says who holds it, not where it listens: node certificates all carry
localhost, and a host's SAN fits every agent on that host. So we dial the address ourselves
(mutual TLS, the cluster CA) and read the certificate served there: only the process that
listens at the address and holds that certificate's key presents it. Answers are cached
per address; a caller whose name differs from the cached one makes us look again at most
every `RECHECK_S`, so callers cannot make us dial in a loop; a match is looked at again
after `CONFIRMED_S`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from lepton.common import tls as _tls
from lepton.common.errors import InvalidArgument, PermissionDenied
from lepton.common.validation import split_host_port

logger = logging.getLogger(__name__)

RECHECK_S = 2.0
DIAL_TIMEOUT_S = 3.0
CONFIRMED_S = 300.0  # a match is trusted this long, then looked at again (addresses move)

# Called with the method's name; raises PermissionDenied.
CoordinatorCheck = Callable[[str], Awaitable[None]]


class ServedCertificates:
    """Create and use on one event loop. `tls`: a `lepton.common.channels.TlsConfig`."""

    def __init__(self, tls: Any):
        self._tls = tls
        self._ssl: ssl.SSLContext | None = None
        self._seen: dict[str, tuple[str, float]] = {}  # address -> (node name, looked at)
        self._locks: dict[str, asyncio.Lock] = {}

    def known(self, address: str) -> str:
        """The name seen served at `address` within CONFIRMED_S ("" if none); no dialling."""
        name, at = self._seen.get(address, ("", float("-inf")))
        return name if time.monotonic() - at < CONFIRMED_S else ""

    async def serves(self, address: str, name: str) -> str:
        """The node certificate name served at `address` ("" when unreachable or not a
        node's), looked up again when it is not `name` and the last look is RECHECK_S old,
        or when it is and the last look is CONFIRMED_S old."""
        seen, at = self._seen.get(address, ("", float("-inf")))
        if seen == name and time.monotonic() - at < CONFIRMED_S:
            return seen
        async with self._locks.setdefault(address, asyncio.Lock()):
            seen, at = self._seen.get(address, ("", float("-inf")))
            age = time.monotonic() - at
            if (seen == name and age < CONFIRMED_S) or (seen != name and age < RECHECK_S):
                return seen
            seen = await self._dial(address)
            self._seen[address] = (seen, time.monotonic())
            return seen

    async def _dial(self, address: str) -> str:
        if self._ssl is None:
            self._ssl = self._tls.client_ssl_context()
            self._ssl.set_alpn_protocols(["h2"])  # what a gRPC server expects
        writer = None
        try:
            host, port = split_host_port(address)
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=self._ssl, server_hostname=host),
                DIAL_TIMEOUT_S,
            )
            ident = _tls.identity_from_ssl(writer.get_extra_info("ssl_object"))
        except (OSError, ValueError, InvalidArgument, asyncio.TimeoutError, ssl.SSLError) as err:
            logger.warning("cannot check the certificate served at %s: %s", address, err)
            return ""
        finally:
            if writer is not None:
                # Abort, not close: a TLS close waits (up to 30 s) for the server's
                # close_notify, which a gRPC server that saw no HTTP/2 never sends.
                writer.transport.abort()
        return ident.name if ident is not None and ident.kind == "node" else ""


async def served_by_one_of(served: ServedCertificates, addresses: list[str], name: str) -> bool:
    """Whether the node certificate `name` is the one served at any of `addresses`
    (what is known first: the other addresses are not dialled again on every call)."""
    if any(served.known(address) == name for address in addresses):
        return True
    for address in addresses:
        if await served.serves(address, name) == name:
            return True
    return False


def coordinators_only(tls: Any, addresses: Callable[[], list[str]]) -> CoordinatorCheck | None:
    """For what only the coordinator orders an agent to do (delete or pull shards): a node
    certificate passes only when it is the one served at one of `addresses()` (the voters
    this agent knows: --peers/--join and the leaders it was sent to). People pass (the
    method table decides for them). None without TLS: nodes share one token there, which
    names no node."""
    if tls is None:
        return None
    served = ServedCertificates(tls)

    async def check(method: str) -> None:
        from lepton.common.auth import Role, current_principal

        p = current_principal()
        if p is None or p.role != Role.NODE or p.via != "certificate":
            return
        if not await served_by_one_of(served, addresses(), p.name):
            raise PermissionDenied(f"{method}: node {p.name} is not a coordinator of this cluster; "
                                   "only the leader may order it")

    return check


async def check_caller_serves(served: ServedCertificates | None, address: str) -> None:
    """When a node certificate is the caller, `address` must be where it serves (a node
    registering may not claim another's address: the leader sends that address shard
    deletes and pulls meant for it). Skipped without TLS (`served` None) and for people.
    Raises PermissionDenied."""
    from lepton.common.auth import Role, current_principal

    p = current_principal()
    if served is None or p is None or p.role != Role.NODE or p.via != "certificate":
        return
    holder = await served.serves(address, p.name)
    if holder != p.name:
        raise PermissionDenied(f"node {p.name} may not register {address}: the certificate served there is "
                               + (holder or "not reachable or not a node's"))
