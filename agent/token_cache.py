"""Bearer tokens on a worker. Workers hold no replicated state, so they ask a voter who a
token stands for (`Security.Introspect`) and keep the answer briefly: people's and tasks'
tokens then work on workers too (shard reads and writes, transfers, task logs).

- A valid answer is kept `VALID_S`: a revoked token (or an ended task's credential) may
  still pass on a worker that long. An invalid one `INVALID_S`. Failures (no leader) are
  not kept: the call is refused as unknown and the next one asks again.
- At most `MAX_ASKS_PER_S` questions a second leave a worker, so a flood of made-up tokens
  cannot be passed on to the leader: past it, unknown tokens are refused unasked.
- Concurrent calls with the same token share one question. Keys are the tokens' keyed
  hashes, never the tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from lepton.common.auth import Principal, hash_token

logger = logging.getLogger(__name__)

VALID_S = 5.0
INVALID_S = 2.0
MAX_ENTRIES = 10_000
MAX_ASKS_PER_S = 50.0
MAX_TOKEN_CHARS = 1024

Introspect = Callable[[str], Awaitable["Principal | None"]]


class TokenCache:
    """`lookup(token)` for the interceptor (sync, the cache only); `resolve(token)` (async)
    fills it first. `introspect(token)`: the voter's answer; raises when there is none."""

    def __init__(self, introspect: Introspect, *, clock: Callable[[], float] = time.monotonic):
        self._introspect = introspect
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Principal | None, float]] = OrderedDict()
        self._asking: dict[str, asyncio.Future[None]] = {}
        self._allowance = MAX_ASKS_PER_S
        self._refilled = clock()

    def lookup(self, token: str) -> Principal | None:
        entry = self._entries.get(hash_token(token))
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    async def resolve(self, token: str) -> None:
        """Ask a voter about `token` unless a fresh answer is here. Never raises."""
        if len(token) > MAX_TOKEN_CHARS or not token.startswith("lep"):
            return  # not a token this cluster makes
        key = hash_token(token)
        entry = self._entries.get(key)
        if entry is not None and entry[1] > self._clock():
            return
        asking = self._asking.get(key)
        if asking is not None:
            await asyncio.shield(asking)
            return
        if not self._take():
            logger.warning("auth: over %g token questions a second; refusing unknown tokens unasked", MAX_ASKS_PER_S)
            return
        future = self._asking[key] = asyncio.get_running_loop().create_future()
        try:
            principal = await self._introspect(token)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - no answer: refused now, asked again next time
            logger.info("auth: cannot ask a voter about a token: %s", getattr(err, "message", err))
        else:
            self._store(key, principal)
        finally:
            del self._asking[key]
            future.set_result(None)

    def _store(self, key: str, principal: Principal | None) -> None:
        self._entries[key] = (principal, self._clock() + (VALID_S if principal is not None else INVALID_S))
        self._entries.move_to_end(key)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)

    def _take(self) -> bool:
        now = self._clock()
        self._allowance = min(MAX_ASKS_PER_S, self._allowance + (now - self._refilled) * MAX_ASKS_PER_S)
        self._refilled = now
        if self._allowance < 1:
            return False
        self._allowance -= 1
        return True
