"""An in-memory token table for the interceptor's tests: the `token_lookup` contract
(token -> Principal | None) that the replicated security state fulfils in production."""

from __future__ import annotations

import time
from dataclasses import dataclass

from lepton.common.auth import Principal, Role, match_token, new_token, token_id


@dataclass(slots=True)
class TokenRecord:
    id: str
    hash: str
    name: str
    role: str
    expires_ms: int = 0  # 0 = never
    revoked: bool = False


class TokenTable:
    def __init__(self) -> None:
        self._records: dict[str, TokenRecord] = {}

    def create(self, name: str, role: str, *, now_ms: int | None = None,
               ttl_s: float = 0) -> tuple[str, TokenRecord]:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        token, token_hash = new_token()
        record = TokenRecord(token_id(token), token_hash, name, Role.parse(role).value,
                             now_ms + int(ttl_s * 1000) if ttl_s > 0 else 0)
        self._records[record.id] = record
        return token, record

    def revoke(self, tid: str) -> None:
        self._records[tid].revoked = True

    def lookup(self, token: str, now_ms: int | None = None) -> Principal | None:
        record = match_token(token, self._records)
        if record is None:
            return None
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if record.expires_ms and now_ms >= record.expires_ms:
            return None
        return Principal(record.name, Role(record.role), via="token", token_id=record.id)
