"""The task retention of `lepton.agent.tasks.runner`: finished attempts' folders (and torch
jobs' `jobs/<job id>` folders) are deleted once their exit was reported long enough ago.

A folder goes when its exit was reported (as first seen by this agent, on its monotonic
clock) more than `retention_s` ago, it is not running, and it is not in the last desired set
(the coordinator forgets an attempt only once it has its exit; until then it must stay "ran
here"). Nothing goes before the first desired set. The walks run in a thread, periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from pathlib import Path

from lepton.agent.tasks import task_logs

logger = logging.getLogger(__name__)

Key = tuple[str, int]  # (task id, attempt)


class Retention:
    def __init__(self, tasks_root: Path, outputs: task_logs.OutputLogs, retention_s: float, sweep_s: float,
                 clock: Callable[[], float], live: Callable[[], Collection[Key]]):
        """`live()`: the attempts running now (always kept). `retention_s` 0: keep forever."""
        self._root = tasks_root
        self._outputs = outputs
        self._retention_s = retention_s
        self._sweep_s = sweep_s
        self._ages = task_logs.FirstSeen(clock)  # when each finished attempt was first seen
        self._live = live
        # The attempts the last accepted desired set named; None until one came.
        self.desired: set[Key] | None = None
        self._sweeper: asyncio.Task[int] | None = None
        self._next = time.monotonic()

    def tick(self, now: float) -> None:
        """From the runner's watch loop: start a sweep in the background when one is due."""
        if self._retention_s and now >= self._next and (self._sweeper is None or self._sweeper.done()):
            self._next = now + self._sweep_s
            self._sweeper = asyncio.create_task(self._sweep_logged(), name="task-retention")

    async def stop(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    async def _sweep_logged(self) -> int:
        try:
            return await self.sweep()
        except Exception:  # the next sweep tries again
            logger.exception("retention sweep failed")
            return 0

    async def sweep(self) -> int:
        """Delete the attempt and job folders the retention allows (see the module doc).
        Returns how many attempt folders were deleted."""
        if not self._retention_s or self.desired is None:
            return 0
        jobs, jobs_freed = await task_logs.sweep_jobs(
            self._root.parent / "jobs", self._root, self._retention_s,
            lambda: set(self._live()) | (self.desired or set()), self._ages)
        if jobs:
            logger.info("retention: deleted %d finished job folder(s) (%.1f MiB)", jobs, jobs_freed / (1 << 20))
        keep = set(self._live()) | self.desired
        removed, freed, touched = await asyncio.to_thread(
            task_logs.sweep_finished, self._root, self._retention_s, keep, self._ages)
        self._ages.forget_unseen()
        for att_dir in removed:
            self._outputs.forget(att_dir)
        for task_dir in touched:  # here, not in the thread: launch() makes these on the loop
            with contextlib.suppress(OSError):
                task_dir.rmdir()  # only when empty
        if removed:
            logger.info("retention: deleted %d finished attempt folder(s) reported over %gs ago (%.1f MiB)",
                        len(removed), self._retention_s, freed / (1 << 20))
        return len(removed)
