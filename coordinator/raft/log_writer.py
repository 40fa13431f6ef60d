"""`LogWriter`: one thread that persists the leader's Readies, in order.

`asyncio.to_thread` per Ready cost the leader an executor hand-off each time (a work item,
a context copy, a chained future, an idle-worker check) and, with several idle workers,
alternated the writes among them, each a thread to wake. One long-lived thread taking
Readies off a queue does the same write with the least Python around it.
"""

from __future__ import annotations

import asyncio
import queue
import threading

from lepton.coordinator.raft.messages import Ready, persist
from lepton.coordinator.storage.log_store import LogStore


class LogWriter:
    def __init__(self, store: LogStore, name: str):
        self._store = store
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def write(self, rd: Ready) -> asyncio.Future[None]:
        """`persist(store, rd)` on the writer thread; the future settles on the caller's loop
        (with the store's OSError when the write fails)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.put((rd, loop, fut))
        return fut

    def close(self) -> None:
        """Finish what was queued, then end the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            rd, loop, fut = item
            try:
                persist(self._store, rd)
                outcome = None
            except Exception as err:  # noqa: BLE001 - handed to the loop, which stops the node
                outcome = err
            try:
                loop.call_soon_threadsafe(_settle, fut, outcome)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                pass


def _settle(fut: asyncio.Future[None], err: Exception | None) -> None:
    if fut.done():  # the waiting task was cancelled (stop)
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)
