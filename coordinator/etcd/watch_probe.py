"""Noticing a watch stream that went silent: its etcd member is frozen or cut off.

A watch on a member that stops answering (SIGSTOP, a hung host, a half-open connection)
just delivers nothing: the candidate's applied state lags the log, and a failover to it
waits for it to catch up. gRPC's channel keep-alive notices only after its ping period
plus timeout (~7 s), and the lease keep-alives, on their own connection, move on after one
timeout without telling the watch. So the watch asks etcd for its progress on the stream
itself (a WatchProgressRequest: etcd answers at once with its revision, events or not) a
few times per lease TTL; when nothing at all has come back for most of a TTL, the owner
moves its connection to the next endpoint and reopens the watch there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aetcd import rpc

logger = logging.getLogger(__name__)

PROBES_PER_TTL = 4  # progress requests per lease TTL on the stream
_PROGRESS = rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())


class WatchProbe:
    """Probes one watch `call`: `heard()` on every response read from it; `run()` sends a
    progress request every `ttl / PROBES_PER_TTL` seconds and calls `on_stall(silent_s)`
    once (then returns) when the stream has been silent for `ttl * 3/4` seconds, so the
    watch moves within about one TTL. Cancel `run()` when the stream ends."""

    def __init__(self, call, ttl: float, on_stall: Callable[[float], None]):
        self._call = call
        self._every = ttl / PROBES_PER_TTL
        self._stall_after = ttl * 3 / 4
        self._on_stall = on_stall
        self._loop = asyncio.get_running_loop()
        self._heard = self._loop.time()
        self._write: asyncio.Future | None = None

    def heard(self) -> None:
        self._heard = self._loop.time()

    async def run(self) -> None:
        try:
            while True:
                due = self._loop.time() + self._every
                await asyncio.sleep(self._every)
                now = self._loop.time()
                if now - due > self._every:
                    # This loop was blocked (a long apply, a busy coordinator): an answer may
                    # be waiting for the reader's turn. Judge on the next round.
                    continue
                silent = now - self._heard
                if silent > self._stall_after:
                    self._on_stall(silent)
                    return
                if self._write is None or self._write.done():
                    # Not awaited: a write to a member that stopped reading must never hold
                    # up the check above. Never cancelled either: that would end the call.
                    self._write = asyncio.ensure_future(self._call.write(_PROGRESS))
                    self._write.add_done_callback(_consume)
        finally:
            self._write = None


def _consume(write: asyncio.Future) -> None:
    """A probe's write fails when the stream ended meanwhile; the reader sees that too."""
    if not write.cancelled() and write.exception() is not None:
        logger.debug("etcd watch progress request not sent: %s", write.exception())
