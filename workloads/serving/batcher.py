"""Dynamic batching for a replica: requests that arrive within a window run as one model call.

The first request waiting starts a window of `max_wait_s` (counted from its arrival, so a
request that queued behind a running batch does not wait a second window); requests join
the batch until it holds `max_batch` rows or the window closes. The model runs in a thread,
so the event loop keeps accepting (and the next batch keeps filling) meanwhile; a model whose
calls take under `inline_below_s` (a moving average) runs on the loop instead, as handing
such a call to a thread costs more than the call (3x the CPU per request for the digits MLP
one row at a time) and blocks the loop for less than a millisecond. A CPU model's cost is
its thread's CPU time (`cost_clock`): wall time on a busy machine counts the time others ran,
which sent quick calls to the thread just when the hop costs most. Each caller
gets its own rows of the output back. A request larger than `max_batch` runs alone; one
that would overflow the batch waits for the next. When a batch with several requests fails,
each request is run alone once, so one caller's bad rows fail only that caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

RunBatch = Callable[[np.ndarray], np.ndarray]
INLINE_BELOW_S = 0.001  # model calls this quick run on the event loop (see the module doc)


@dataclass
class _Request:
    x: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, int]]
    arrived: float = field(default_factory=time.monotonic)


class BatcherClosed(Exception):
    """The batcher stopped accepting requests (the replica is shutting down)."""


class Batcher:
    """Runs `run_batch(x) -> y` (row i of y answers row i of x) on batches of requests."""

    def __init__(self, run_batch: RunBatch, *, max_batch: int, max_wait_s: float,
                 clock: Callable[[], float] = time.monotonic, inline_below_s: float = INLINE_BELOW_S,
                 cost_clock: Callable[[], float] = time.perf_counter):
        self._run = run_batch
        self._cost_clock = cost_clock
        self.inline_below_s = inline_below_s
        self._cost_s = float("inf")  # moving average of a model call; the first goes to a thread
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s)) if self.max_batch > 1 else 0.0
        self._clock = clock
        self._queue: deque[_Request] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # model calls made (observability, tests)
        self.rows = 0

    async def predict(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """(this request's output rows, rows in the batch it ran in). Raises BatcherClosed
        after `close()`, or what the model raised for these rows."""
        return await self.submit(x)

    def submit(self, x: np.ndarray) -> asyncio.Future[tuple[np.ndarray, int]]:
        """`predict` without a coroutine: the future of its answer (a caller that answers
        from a callback needs no task per request). Raises BatcherClosed after `close()`."""
        if self._closed:
            raise BatcherClosed("the replica is shutting down")
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name="batcher")
        req = _Request(x, asyncio.get_running_loop().create_future(), self._clock())
        self._queue.append(req)
        self._wake.set()
        return req.future

    async def close(self) -> None:
        """Stop accepting; finish every request already queued (the grace of a SIGTERM)."""
        self._closed = True
        self._wake.set()
        if self._worker is not None:
            await self._worker

    async def _work(self) -> None:
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
            batch = await self._collect()
            await self._run_batch(batch)

    async def _collect(self) -> list[_Request]:
        """The next batch: the oldest request, then whatever fits within its window."""
        first = self._queue.popleft()
        batch, rows = [first], len(first.x)
        deadline = first.arrived + self.max_wait_s
        while rows < self.max_batch:
            if self._queue:
                nxt = self._queue[0]
                if rows + len(nxt.x) > self.max_batch:
                    break  # runs first in the next batch
                batch.append(self._queue.popleft())
                rows += len(nxt.x)
                continue
            remaining = deadline - self._clock()
            if remaining <= 0 or self._closed:
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)
        return batch

    async def _run_batch(self, batch: list[_Request]) -> None:
        live = [r for r in batch if not r.future.done()]  # a caller may have gone (deadline)
        if not live:
            return
        x = live[0].x if len(live) == 1 else np.concatenate([r.x for r in live])
        try:
            if self._cost_s < self.inline_below_s:
                y, cost = self._timed(x)
            else:
                y, cost = await asyncio.to_thread(self._timed, x)
            self._cost_s = cost if self._cost_s == float("inf") else 0.8 * self._cost_s + 0.2 * cost
            if len(y) != len(x):
                raise RuntimeError(f"the model answered {len(y)} rows for {len(x)}")
        except Exception as err:  # noqa: BLE001 - handed to the callers, never lost
            if len(live) == 1:
                _fail(live[0], err)
                return
            logger.warning("a batch of %d requests failed (%s); running each alone", len(live), err)
            for r in live:
                await self._run_batch([r])
            return
        self.batches += 1
        self.rows += len(x)
        start = 0
        for r in live:
            end = start + len(r.x)
            if not r.future.done():
                r.future.set_result((y[start:end], len(x)))
            start = end


    def _timed(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        start = self._cost_clock()
        y = self._run(x)
        return y, self._cost_clock() - start


def _fail(req: _Request, err: Exception) -> None:
    if not req.future.done():
        req.future.set_exception(err)
