"""The agent's half of keeping the dataset table and the disks in agreement: it reports
what its shard store holds, and sweeps the blobs the leader calls orphans.

Each cycle (at start, when the agent (re-)registers, and every `interval_s`):

1. send the leader a digest of the whole inventory (SHA-256 over the sorted `id size`
   lines of the store's in-memory index, and the count): one small message;
2. only if the leader asks (it has not seen this digest since the table last changed),
   send the listing in pages of `PAGE` entries; each page's answer names its orphans;
3. otherwise re-check, in one page, the orphans that were too young to delete last time
   and whose grace has now passed.

An orphan is deleted only when the answer comes from a term no older than the newest this
agent has seen and the blob was stored or touched at least `grace_s` ago (an upload or pull
that finds it already stored touches it; `ShardStore.sweep` checks the age under the
store's lock). Ages are monotonic, never file times: a wall-clock jump sweeps nothing early,
and blobs found at start count from then (a restart delays sweeping by up to one grace).
`grace_s` 0 turns sweeping off; the reports still re-list copies.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable

from lepton.common.errors import LeptonError
from lepton.dataplane.shards import ShardStore
from lepton.v1 import datasets_pb2 as dpb

logger = logging.getLogger(__name__)

PAGE = 5000  # entries per request: ~400 KB (the leader refuses more)
CALL_TIMEOUT_S = 30.0
RETRY_S = 2.0  # after a failed cycle (no leader yet, not registered yet)


def digest(items: list[tuple[str, int]]) -> str:
    """SHA-256 hex over sorted "<id> <size>\\n" lines (the items must be sorted)."""
    h = hashlib.sha256()
    for shard_id, size in items:
        h.update(f"{shard_id} {size}\n".encode())
    return h.hexdigest()


class InventoryReporter:
    """Reports the store's inventory to the leader and sweeps orphans. `run_cycle()` does
    one report; `run()` repeats it."""

    def __init__(self, store: ShardStore, link, node_id: str, *, interval_s: float, grace_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self._store = store
        self._link = link  # the Datasets service through the agent's link (follows the leader)
        self.node_id = node_id
        self.interval_s = interval_s
        self.grace_s = grace_s
        self._clock = clock
        self._term = 0  # the newest term an answer came from
        self._young: dict[str, float] = {}  # orphans waiting for their grace: id -> due (clock)
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """Report now (the agent has just registered: a returning node is re-listed)."""
        self._wakeup.set()

    async def _call(self, req: dpb.ReportInventoryRequest) -> dpb.ReportInventoryResponse:
        req.node_id = self.node_id
        req.grace_ms = int(self.grace_s * 1000)
        return await self._link.call("ReportInventory", req, CALL_TIMEOUT_S)

    async def run_cycle(self) -> str:
        """One report. Returns the sentence it logs; raises LeptonError when the leader
        cannot be reached (the next cycle retries)."""
        items = await asyncio.to_thread(lambda: sorted(self._store.list().items()))
        dig = await asyncio.to_thread(digest, items)
        resp = await self._call(dpb.ReportInventoryRequest(digest=dig, count=len(items)))
        self._term = max(self._term, resp.term)
        swept = kept = held = 0
        pages = 0
        if resp.send_listing:
            self._young = {s: due for s, due in self._young.items() if self._store.has(s)}
            chunks = [items[i:i + PAGE] for i in range(0, len(items), PAGE)] or [[]]
            for i, chunk in enumerate(chunks):
                req = dpb.ReportInventoryRequest(
                    digest=dig, count=len(items), first=i == 0, last=i == len(chunks) - 1,
                    shards=[dpb.ShardEntry(id=s, size=z) for s, z in chunk])
                n_swept, n_kept, n_held = await self._judged(await self._call(req), [s for s, _ in chunk])
                swept, kept, held, pages = swept + n_swept, kept + n_kept, held + n_held, pages + 1
        else:
            now = self._clock()
            due = [s for s, at in sorted(self._young.items()) if at <= now][:PAGE]
            sizes = self._store.list()
            due = [s for s in due if s in sizes]
            if due:
                req = dpb.ReportInventoryRequest(digest=dig, count=len(items),
                                                 shards=[dpb.ShardEntry(id=s, size=sizes[s]) for s in due])
                swept, kept, held = await self._judged(await self._call(req), due)
        # The listing is not in the sentence: it would change every other cycle.
        logger.debug("inventory: %d shards, listed in %d pages", len(items), pages)
        sentence = f"{len(items)} shards"
        if held:
            sentence += f"; {held} held by puts in progress"
        if swept or kept:
            sentence += f"; swept {swept} orphans" + (f", {kept} within their grace" if kept else "")
        return sentence

    async def _judged(self, resp: dpb.ReportInventoryResponse, asked: list[str]) -> tuple[int, int, int]:
        """Act on one answer about `asked`: (swept, kept for now, held)."""
        stale = resp.term < self._term
        self._term = max(self._term, resp.term)
        if stale or resp.orphans_withheld:
            # A deposed leader's view (it may miss a newer dataset), or a new leader not yet
            # judging: keep everything, and ask about waiting orphans again later, not at once.
            later = self._clock() + max(1.0, min(self.grace_s, self.interval_s))
            for shard_id in asked:
                if shard_id in self._young:
                    self._young[shard_id] = max(self._young[shard_id], later)
            return 0, 0, 0 if stale else resp.held
        orphans = set(resp.orphans)
        for shard_id in asked:
            if shard_id not in orphans:
                self._young.pop(shard_id, None)  # wanted (again)
        if self.grace_s <= 0:
            return 0, len(orphans), resp.held
        swept = await asyncio.to_thread(
            lambda: [s for s in sorted(orphans) if self._store.sweep(s, self.grace_s)])
        for shard_id in swept:
            self._young.pop(shard_id, None)
        kept = 0
        for shard_id in orphans.difference(swept):
            age = self._store.age_s(shard_id)
            if age is None:
                self._young.pop(shard_id, None)
            else:
                self._young[shard_id] = self._clock() + self.grace_s - age
                kept += 1
        if swept:
            logger.info("swept %d orphan blobs (no dataset needs them here): %s", len(swept),
                        ", ".join(s[:12] for s in swept[:5]) + (" ..." if len(swept) > 5 else ""))
        return len(swept), kept, resp.held

    async def run(self) -> None:
        last = ""
        while True:
            try:
                sentence = await self.run_cycle()
                delay = self.interval_s
            except asyncio.CancelledError:
                raise
            except LeptonError as err:
                sentence = f"report failed ({err.code.name}: {err.message}); retrying"
                delay = min(RETRY_S, self.interval_s)
            except Exception:
                logger.exception("inventory cycle failed")
                sentence, delay = "inventory cycle crashed", min(RETRY_S, self.interval_s)
            if self._young:  # come back when the first waiting orphan is due
                delay = min(delay, max(0.1, min(self._young.values()) - self._clock()))
            if sentence != last:
                logger.info("inventory: %s", sentence)
                last = sentence
            try:
                await asyncio.wait_for(self._wakeup.wait(), delay)
            except asyncio.TimeoutError:
                pass
            self._wakeup.clear()
