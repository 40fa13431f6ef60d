"""Admission for user submissions on the leader (Kubernetes' API Priority and Fairness in
miniature): a bounded queue of proposals from SubmitTask/SubmitTasks/SubmitJob, so that a
flood cannot pile up work ahead of Raft traffic, heartbeats and lease renewals, which share
the leader's one event loop. Those never pass through here.

A submission is admitted while the tasks and bytes already in flight (proposed, not yet
committed and applied) stay within the bounds; one call is always admitted when nothing is
in flight, so a large batch is never refused forever. Otherwise it is shed before anything
is logged: RESOURCE_EXHAUSTED with `retry-after-ms` in the trailing metadata (an estimate of
when the queue will have room, from how long recent submissions took), and the client waits
that long and sends the same request again; request ids make that safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lepton.common.errors import Overloaded

# Defaults: two full SubmitTasks calls, or many single submits, at once; bytes well under
# what the leader may buffer for followers.
DEFAULT_MAX_TASKS = 2000
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
RETRY_MIN_MS = 50
RETRY_MAX_MS = 5000
_EWMA_WEIGHT = 0.2  # of the newest sample in the running commit-time estimate


class SubmitAdmission:
    """Counts what user submissions have in flight and sheds past the bounds.

    `admit(tasks, nbytes)` is a context manager around the proposal: raises Overloaded, or
    holds the room until the block exits. `clock` is injectable for tests.
    """

    def __init__(self, max_tasks: int = DEFAULT_MAX_TASKS, max_bytes: int = DEFAULT_MAX_BYTES,
                 clock: Callable[[], float] = time.monotonic):
        if max_tasks < 1 or max_bytes < 1:
            raise ValueError("admission bounds must be positive")
        self.max_tasks = max_tasks
        self.max_bytes = max_bytes
        self._clock = clock
        self.tasks = 0  # in flight now
        self.bytes = 0
        self.calls = 0
        self.shed = 0  # refused so far
        self.on_shed: Callable[[], object] | None = None  # a metrics hook
        self._commit_s = 0.05  # running estimate of one admitted call's time to commit

    def retry_after_ms(self) -> int:
        """Roughly when the queue will have room: the share of the bound in flight, times
        how long a call takes to commit. Clamped; clients add jitter."""
        share = max(self.tasks / self.max_tasks, self.bytes / self.max_bytes, 1.0)
        ms = int(self._commit_s * share * 1000)
        return max(RETRY_MIN_MS, min(RETRY_MAX_MS, ms))

    @contextmanager
    def admit(self, tasks: int, nbytes: int) -> Iterator[None]:
        if self.calls and (self.tasks + tasks > self.max_tasks or self.bytes + nbytes > self.max_bytes):
            self.shed += 1
            if self.on_shed is not None:
                self.on_shed()
            raise Overloaded(
                f"the leader is busy: {self.calls} submissions ({self.tasks} tasks, {self.bytes} "
                f"bytes) in flight, at most {self.max_tasks} tasks or {self.max_bytes} bytes; retry "
                f"in {self.retry_after_ms()} ms",
                self.retry_after_ms(),
            )
        self.tasks += tasks
        self.bytes += nbytes
        self.calls += 1
        started = self._clock()
        try:
            yield
        finally:
            self.tasks -= tasks
            self.bytes -= nbytes
            self.calls -= 1
            took = self._clock() - started
            self._commit_s += _EWMA_WEIGHT * (took - self._commit_s)
