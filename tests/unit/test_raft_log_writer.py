"""LogWriter: the leader's one log-writing thread (coordinator/raft/log_writer.py)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from lepton.coordinator.raft.log_writer import LogWriter
from lepton.coordinator.raft.messages import Ready
from lepton.coordinator.storage.log_store import Entry, FileLogStore


def ready(*indices: int) -> Ready:
    return Ready(entries=[Entry(i, 1, b"e%d" % i) for i in indices], must_sync=True)


class RecordingStore(FileLogStore):
    def __init__(self, path: Path, **kw) -> None:
        super().__init__(path, **kw)
        self.sync_threads: list[int] = []

    def sync(self) -> None:
        self.sync_threads.append(threading.get_ident())
        super().sync()


async def test_writes_in_order_on_one_thread_off_the_loop(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path)
    writer = LogWriter(store, "test-writer")
    try:
        await asyncio.gather(*(writer.write(ready(2 * k + 1, 2 * k + 2)) for k in range(50)))
    finally:
        writer.close()
    assert [e.index for e in store.entries(1, 101)] == list(range(1, 101))
    assert len(set(store.sync_threads)) == 1 and threading.get_ident() not in store.sync_threads
    store.close()
    reopened = FileLogStore(tmp_path)  # durable: fsync'd before each future settled
    assert reopened.last_index() == 100
    reopened.close()


async def test_a_failed_write_reaches_the_caller_and_close_finishes_what_was_queued(tmp_path: Path) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    store = FileLogStore(tmp_path, fsync=failing_fsync)
    writer = LogWriter(store, "test-writer")
    first, second = writer.write(ready(1)), writer.write(ready(2))
    writer.close()  # returns once both ran: their outcomes are on their way to the loop
    with pytest.raises(OSError, match="No space"):
        await first
    with pytest.raises(OSError, match="failed earlier"):  # the store refuses after a failure
        await second
    store.close()
