"""The leader's garbage-collection loop: finished tasks and jobs leave the state.

Every `interval_s` the leader checks, on its own copy of the state, whether the retention
(`Retention`: keep at most `keep_finished` finished tasks and jobs, none finished more than
`max_age_s` ago) would collect anything or the history is over its bound, and if so
proposes one `CollectGarbageCmd`. The state machine decides what goes from the command's
numbers and its stamped time (coordinator/state/retention.py), so every replica removes
the same tasks. `lepton-ctl cluster gc` proposes the same command at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lepton.common.errors import InvalidArgument
from lepton.common.loops import run_cycles
from lepton.coordinator.state.retention import Collected, select
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import state_pb2

logger = logging.getLogger(__name__)

Commit = Callable[[state_pb2.Command], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Retention:
    """How much finished work the state keeps (AgentConfig.gc_*)."""

    keep_finished: int = 5_000
    max_age_s: float = 24 * 3600.0  # 0: no age limit
    history: int = 20_000
    interval_s: float = 60.0


class GarbageCollector:
    def __init__(self, state: ClusterStateMachine, commit: Commit, retention: Retention, *,
                 is_leader: Callable[[], bool], wall_ms: Callable[[], int]):
        self._state = state
        self._commit = commit
        self.retention = retention
        self._is_leader = is_leader
        self._wall_ms = wall_ms

    def command(self, keep_finished: int | None = None, max_age_s: float | None = None) -> state_pb2.Command:
        """The command for the cluster's retention, narrowed (never widened) by the
        arguments, which an admin's `cluster gc --keep/--older-than` gives."""
        r = self.retention
        if keep_finished is not None and keep_finished < 0:
            raise InvalidArgument(f"keep_finished is {keep_finished}; it must be >= 0")
        if max_age_s is not None and not 0 <= max_age_s < 1e12:
            raise InvalidArgument(f"max_age_s is {max_age_s}; it must be a number of seconds >= 0")
        keep = r.keep_finished if keep_finished is None else min(keep_finished, r.keep_finished)
        ages = [a for a in (r.max_age_s or None, max_age_s) if a is not None]
        cmd = state_pb2.CollectGarbageCmd(keep_finished=keep, history_limit=r.history)
        if ages:
            cmd.max_age_ms = int(min(ages) * 1000)
        return state_pb2.Command(collect_garbage=cmd)

    def due(self, cmd: state_pb2.Command) -> bool:
        """Whether the command would change anything now (checked before proposing, so an
        idle cluster writes nothing to its log)."""
        c = cmd.collect_garbage
        max_age = c.max_age_ms if c.HasField("max_age_ms") else None
        doomed, _ = select(self._state.tasks, c.keep_finished, max_age, self._wall_ms())
        return bool(doomed) or len(self._state.tasks.history) > c.history_limit

    async def collect(self, keep_finished: int | None = None, max_age_s: float | None = None) -> Collected:
        """Collect now (the leader only), in as many commands as it takes (each collects
        at most retention.MAX_PER_COMMAND tasks); returns what they did in all."""
        cmd = self.command(keep_finished, max_age_s)
        tasks = jobs = 0
        while True:
            done = await self._commit(cmd)
            tasks, jobs = tasks + done.tasks, jobs + done.jobs
            if not done.more:
                return Collected(tasks, jobs, done.finished_kept, done.history_size)

    async def run_cycle(self) -> str:
        if not self._is_leader():
            return "not the leader: nothing to collect"
        cmd = self.command()
        if not self.due(cmd):
            return "nothing to collect"
        done = await self.collect()
        return (f"collected {done.tasks} finished tasks ({done.jobs} jobs); {done.finished_kept} "
                f"finished kept, {done.history_size} in the history")

    async def run(self) -> None:
        await run_cycles("gc", self.run_cycle, interval_s=self.retention.interval_s, logger=logger)
