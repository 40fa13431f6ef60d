"""Who may speak Raft: a member of this server's current configuration, as itself.

Raft ids are advertised addresses. Every Raft call carries the sender's address in
`lepton-raft-from` metadata, and every message in it must be from that address. The
receiver accepts it only when the address is a member (a voter, or the leader's learner; a
server with no configuration yet: the `--join` addresses it was given) and the caller proves
it is that member:

- with TLS, the caller's node certificate must be the one the server listening at that
  address presents: we dial the address ourselves and read its certificate (cached per
  address, `lepton.common.served_certs`). A worker's or
  a user's certificate, valid as it is, never matches a voter's address.
- without TLS, `lepton-raft-mac` is an HMAC-SHA256 of the address under a key derived from
  the voters' peer secret (`--peer-secret-file`), which workers do not hold.

With neither (auth off, no TLS, no peer secret) nothing is checked: anyone may call anything.
Refusals are PermissionDenied; the interceptor counts and audits them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from lepton.common import tls as _tls
from lepton.common.channels import TlsConfig
from lepton.common.errors import PermissionDenied
from lepton.common.served_certs import RECHECK_S, ServedCertificates

logger = logging.getLogger(__name__)

FROM_HEADER = "lepton-raft-from"
MAC_HEADER = "lepton-raft-mac"
LOG_EVERY_S = 10.0
VOUCH_TTL_S = 30.0  # a sender our members vouched for counts this long (we catch up meanwhile)
_KEY_INFO = b"lepton raft peer key v1"


def peer_key(secret: bytes) -> bytes:
    """The MAC key for Raft calls, derived from the voters' peer secret (never used as is)."""
    return hmac.new(secret, _KEY_INFO, hashlib.sha256).digest()


def _mac(key: bytes, address: str) -> str:
    return hmac.new(key, b"raft-from\0" + address.encode(), hashlib.sha256).hexdigest()


def peer_metadata(me: str, key: bytes | None) -> tuple[tuple[str, str], ...]:
    """What a Raft call from `me` sends: its address, and its MAC when there is a key."""
    if key is None:
        return ((FROM_HEADER, me),)
    return ((FROM_HEADER, me), (MAC_HEADER, _mac(key, me)))


class PeerCheck:
    """The receiving side. `members()`: the addresses that may speak Raft to us now."""

    def __init__(self, members: Callable[[], Collection[str]], *, tls: TlsConfig | None,
                 key: bytes | None, vouch: Callable[[str], Awaitable[bool]] | None = None):
        self._members = members
        self._key = key
        # Asks the members we know whether a sender we do not know is one of theirs (we
        # may have missed a configuration change); answers kept VOUCH_TTL_S.
        self._vouch = vouch
        self._vouched: dict[str, tuple[bool, float]] = {}  # address -> (yes, asked at)
        self._served = ServedCertificates(tls) if tls is not None else None
        self.refused = 0  # calls refused, for lepton_raft_peer_refused_total
        self._logged_at = -LOG_EVERY_S

    @property
    def enabled(self) -> bool:
        return self._served is not None or self._key is not None

    async def caller(self, context: Any, method: str) -> str:
        """The member address the call speaks for ("" when nothing is checked).
        Raises PermissionDenied naming what is missing."""
        meta = _metadata(context)
        address = meta.get(FROM_HEADER, "")
        if not self.enabled:
            return ""
        if not address:
            raise self.deny(f"{method}: Raft calls must name their sender ({FROM_HEADER})")
        member = self._is_member(address)
        if not member and self._vouch is None:
            raise self._not_member(address, method)
        if self._key is not None and not hmac.compare_digest(meta.get(MAC_HEADER, ""), _mac(self._key, address)):
            raise self.deny(f"{method}: the call does not prove the Raft peer secret")
        if self._served is not None:
            ident = _tls.peer_identity(context)
            if ident is None or ident.kind != "node":
                raise self.deny(f"{method}: only the node certificate of a Raft member may call it")
            holder = await self._served.serves(address, ident.name)
            if holder != ident.name:
                raise self.deny(f"{method}: certificate {ident.name} is not the one serving {address}"
                                + (f" ({holder})" if holder else ""))
        # Proven to be `address`; if we do not know it, ask the members we know (only now,
        # so a caller that proves nothing cannot make us ask anyone).
        if not member and not await self._vouched_for(address):
            raise self._not_member(address, method)
        return address

    def still_member(self, address: str, method: str) -> None:
        """Raises PermissionDenied once `address` is not a member (checked per batch on a
        long-lived stream, so a removed voter's open stream stops counting)."""
        if self.enabled and not self._is_member(address):
            raise self._not_member(address, method)

    def _is_member(self, address: str) -> bool:
        if address in self._members():
            return True
        yes, at = self._vouched.get(address, (False, 0.0))
        return yes and time.monotonic() - at < VOUCH_TTL_S

    def _not_member(self, address: str, method: str) -> PermissionDenied:
        return self.deny(f"{method}: {address} is not a member of this server's Raft configuration")

    async def _vouched_for(self, address: str) -> bool:
        """Whether a member we know counts `address` as one of its members; a "no" is
        asked again only after RECHECK_S."""
        yes, at = self._vouched.get(address, (False, float("-inf")))
        age = time.monotonic() - at
        if self._vouch is None or (yes and age < VOUCH_TTL_S) or (not yes and age < RECHECK_S):
            return yes and age < VOUCH_TTL_S
        yes = await self._vouch(address)
        self._vouched[address] = (yes, time.monotonic())
        if yes:
            logger.info("raft: %s is a member by our members' configuration, not yet by ours", address)
        return yes

    def deny(self, message: str) -> PermissionDenied:
        """Count a refusal and log it (at most every LOG_EVERY_S: callers cannot flood the
        log); returns the error to raise."""
        self.refused += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            logger.warning("raft: refused %s (%d refused so far)", message, self.refused)
        return PermissionDenied(message)


def _metadata(context: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key in (FROM_HEADER, MAC_HEADER) and isinstance(value, str):
            if key in out:  # two of them: ambiguous, so neither counts
                out[key] = "\0"
            else:
                out[key] = value
    return out
