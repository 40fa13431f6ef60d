"""Who waits on task changes, and what changed per node since each assignment stream last sent.

Every applied task change reaches `TaskHub.on_task_change` (a TaskTable listener). It wakes
WaitTask callers, and for a node with an open assignment stream it records the task id in
that node's change log (`NodeChanges`): numbered, so a stream that sent up to number `s`
asks for the ids changed after `s` and sends only those (a delta). The log is bounded: it
keeps what the slowest stream of the node has not sent yet, up to `limit` entries; a stream
further behind than that gets the whole set again. Local to this leader: every new stream
(and every new term) starts with a whole set, so nothing here is replicated.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lepton.v1 import tasks_pb2

# Changes one node's log holds for its slowest stream: past this a whole set costs less.
CHANGE_LOG_LIMIT = 10_000


class NodeChanges:
    """The ids of one node's tasks, numbered in the order they changed."""

    def __init__(self, limit: int = CHANGE_LOG_LIMIT) -> None:
        self.seq = 0  # the number of the latest change
        self.floor = 0  # changes numbered up to here are forgotten
        self._entries: deque[tuple[int, str]] = deque()
        self._limit = limit

    def record(self, task_id: str) -> None:
        self.seq += 1
        self._entries.append((self.seq, task_id))
        if len(self._entries) > self._limit:
            self.floor = self._entries.popleft()[0]

    def since(self, seq: int) -> list[str] | None:
        """The ids changed after change `seq`, each once, oldest first; None when the log
        no longer reaches back that far (the caller sends the whole set). O(changes since)."""
        if seq < self.floor:
            return None
        ids: dict[str, None] = {}
        for number, task_id in reversed(self._entries):
            if number <= seq:
                break
            ids[task_id] = None
        return list(reversed(ids))

    def trim(self, seq: int) -> None:
        """Forget the changes up to `seq` (every stream of the node has sent them)."""
        while self._entries and self._entries[0][0] <= seq:
            self.floor = self._entries.popleft()[0]

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(eq=False)
class NodeWatch:
    """One assignment stream of a node: woken on its node's changes; `seq`: sent up to."""

    node_id: str
    seq: int
    event: asyncio.Event = field(default_factory=asyncio.Event)


class TaskHub:
    """Wakes whoever waits on task changes: WaitTask callers and each node's assignment
    stream, which learns from it what changed on its node (`changes`)."""

    def __init__(self, change_limit: int = CHANGE_LOG_LIMIT) -> None:
        self._watches: dict[str, set[NodeWatch]] = {}
        self._logs: dict[str, NodeChanges] = {}  # only for nodes with a stream open
        self._change_limit = change_limit
        # WaitTask callers, woken together at the end of a burst of changes. Plain futures:
        # with none waiting (the usual case) a burst costs nothing; a Condition cost a task
        # and a lock per burst on the submit path.
        self._waiters: set[asyncio.Future[None]] = set()
        self._dirty = False
        # Called with ("whole" or "delta", messages, entries) per batch a stream sends: metrics.
        self.on_sent: Callable[[str, int, int], object] | None = None

    def on_task_change(self, task: tasks_pb2.Task, old_node: str) -> None:
        for node_id in {task.node_id, old_node} - {""}:
            log = self._logs.get(node_id)
            if log is None:
                continue  # no stream: the next one starts with a whole set anyway
            log.record(task.id)
            for watch in self._watches[node_id]:
                watch.event.set()
        if self._waiters and not self._dirty:  # one wake-up of the WaitTask callers per burst
            self._dirty = True
            asyncio.get_running_loop().call_soon(self._notify)

    def wake_all(self, *_: object) -> None:
        """Leadership moved: every stream must re-check whether it may still serve."""
        for watches in self._watches.values():
            for watch in watches:
                watch.event.set()

    def _notify(self) -> None:
        self._dirty = False
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def subscribe(self, node_id: str) -> NodeWatch:
        """A stream opens: it is owed the node's changes from now on (after its whole set)."""
        log = self._logs.get(node_id)
        if log is None:
            log = self._logs[node_id] = NodeChanges(self._change_limit)
        watch = NodeWatch(node_id, log.seq)
        self._watches.setdefault(node_id, set()).add(watch)
        return watch

    def unsubscribe(self, watch: NodeWatch) -> None:
        watches = self._watches.get(watch.node_id, set())
        watches.discard(watch)
        if not watches:
            self._watches.pop(watch.node_id, None)
            self._logs.pop(watch.node_id, None)
        else:
            self._trim(watch.node_id)

    def changes(self, watch: NodeWatch) -> tuple[list[str] | None, int]:
        """(ids changed on the node since the watch sent, or None when too many have; the
        number of the latest change). Hand that number to `sent` once the changes are out."""
        log = self._logs[watch.node_id]
        return log.since(watch.seq), log.seq

    def sent(self, watch: NodeWatch, seq: int) -> None:
        watch.seq = seq
        self._trim(watch.node_id)

    def _trim(self, node_id: str) -> None:
        """Keep only what the node's slowest stream has yet to send. O(streams of the node)."""
        self._logs[node_id].trim(min(w.seq for w in self._watches[node_id]))

    def log_size(self, node_id: str) -> int:
        log = self._logs.get(node_id)
        return len(log) if log is not None else 0

    async def wait_for_change(self, timeout: float) -> None:
        """Until a task changes (any task), or `timeout` seconds."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiters.add(fut)
        timer = loop.call_later(timeout, _settle, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiters.discard(fut)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
