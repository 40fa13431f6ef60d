"""What became of each spawn the runner asked the node's fence for (for
`lepton.agent.tasks.runner`): started (tracked, STARTED reported), not started (reported
for requeue or as failed), or in doubt (the request went unanswered: settled once a fence
answers again, by the attempt's run.json and that fence's held list, never guessed).

run.json is written before an attempt's command can run (gate.py), so an attempt with no
run.json surely never ran: reporting it not started cannot let a rerun elsewhere overlap it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from lepton.agent.tasks.attempt import Attempt
from lepton.agent.tasks.fence_keeper import FenceKeeper
from lepton.agent.tasks.fence_link import NOT_LINKED, Key
from lepton.agent.tasks.live import LiveAttempts
from lepton.agent.tasks.reports import FAILED_TO_START_CODE, Reports, now_ms
from lepton.agent.tasks.spawn import ALREADY_RAN, IN_DOUBT, Spawned, SpawnQueue
from lepton.agent.tasks.task_spec import FENCE_DOWN, RunSpec, TaskEvent, TaskEventKind

logger = logging.getLogger(__name__)

Stop = tuple[str, float | None]  # a cancel that came while the attempt was being started: reason, grace


class SpawnOutcomes:
    """Owns the spawns in doubt and the exits that came before their spawn's reply.
    `cancel(task_id, attempt, reason=, grace_s=)` stops an attempt found running that was
    cancelled meanwhile; `made`: the runner's set of folders `launch` made."""

    def __init__(self, reports: Reports, attempts: LiveAttempts, fence: FenceKeeper, spawns: SpawnQueue,
                 boot: str, cancel: Callable[..., None], made: set[Key]):
        self._reports = reports
        self._attempts = attempts
        self._fence = fence
        self._spawns = spawns
        self._boot = boot
        self._cancel = cancel
        self.in_doubt: dict[Key, tuple[RunSpec, Path, Stop | None]] = {}  # spawn requests the fence did not answer
        self._made = made  # folders `launch` made on the loop: done with once spawned
        self._early_exits: dict[Key, tuple[int, int, int]] = {}  # ended while its spawn reply was on the way

    def clear(self) -> None:
        """The runner stops: the next start() finds these by their run.json."""
        self.in_doubt.clear()
        self._early_exits.clear()

    def stop_when_found(self, key: Key, reason: str, grace_s: float | None) -> bool:
        """Cancel an attempt in doubt once it is found running (the first cancel stays).
        False when it is not in doubt."""
        if key not in self.in_doubt:
            return False
        spec, att_dir, stop = self.in_doubt[key]
        if stop is None:
            self.in_doubt[key] = (spec, att_dir, (reason, grace_s))
        return True

    def spawned(self, batch: list[tuple[RunSpec, Path]], results: list[Spawned | str]) -> None:
        """On the loop, in the batch's order: track what started, report what did not."""
        for (spec, att_dir), result in zip(batch, results, strict=True):
            key = (spec.task_id, spec.attempt)
            stop = self._spawns.done(key)
            self._made.discard(key)
            if result == ALREADY_RAN:
                logger.info("task %s attempt %d already ran on this node", *key)
                continue
            if result == IN_DOUBT:  # it may run: settled by run.json and the next link's held list
                self.in_doubt[key] = (spec, att_dir, stop)
                self._fence.lost()
                continue
            if result == NOT_LINKED:  # nothing was sent, so it surely did not start
                self.not_started(spec, att_dir)
                continue
            if isinstance(result, str):
                self._reports.failed_to_start(spec, att_dir, result)
                continue
            att = Attempt(spec=spec, dir=att_dir, pid=result.pid, start=result.start, boot=self._boot,
                          started_at_ms=result.run["started_at_ms"], held=True,
                          deadline=result.run["deadline_mono"])
            self._attempts.track(att)
            logger.info("started task %s attempt %d (term %d) as pid %d", spec.task_id, spec.attempt,
                        spec.term, att.pid)
            self._reports.emit(TaskEvent(spec.task_id, spec.attempt, spec.term, TaskEventKind.STARTED,
                                         pid=att.pid, at_ms=att.started_at_ms))
            early = self._early_exits.pop(key, None)
            if early is not None and early[0] == att.pid:
                self._attempts.finish(att, early[1], early[2])
            elif stop is not None:  # cancelled while it was being spawned
                self._cancel(*key, reason=stop[0], grace_s=stop[1])

    def not_started(self, spec: RunSpec, att_dir: Path) -> None:
        """Report an attempt that surely never started for want of a fence: requeued (no
        failure of its task), unless the fence has failed to start too often in a row."""
        if self._fence.gave_up:
            self._reports.failed_to_start(spec, att_dir, f"this node's attempt fence cannot start "
                                          f"({self._fence.failures} tries in a row): {self._fence.error}")
        else:
            self._reports.exited(att_dir, TaskEvent(spec.task_id, spec.attempt, spec.term, TaskEventKind.EXITED,
                                                    exit_code=FAILED_TO_START_CODE, reason=FENCE_DOWN, at_ms=now_ms()))
        self._fence.lost()  # relink now, not at the next scan

    def on_fence_exit(self, key: Key, pid: int, rc: int, output_size: int) -> None:
        """The fence reaped this attempt, which ended with `$?` `rc` (exit.json holds it)."""
        if not self._attempts.on_fence_exit(key, pid, rc, output_size) and key in self._spawns.starting:
            self._early_exits[key] = (pid, rc, output_size)  # its spawn's reply is still on the way

    def on_linked(self, held: dict[Key, int]) -> list[Attempt]:
        """A new fence (`held`: what it holds): every live attempt the old one held is an
        orphan now (the new one cannot learn their exit status: their pidfds tell us they
        ended, but it fences them as the old one did); then spawns that went unanswered are
        settled. Returns the orphans, for the fence."""
        return self._attempts.orphaned(held) + self._settle_in_doubt(held)

    def _settle_in_doubt(self, held: dict[Key, int]) -> list[Attempt]:
        """The attempts of unanswered spawn requests, now that a fence answers (`held`): each
        that runs is tracked (and STARTED reported), each that ended is reported; one never
        recorded (no run.json) did not start: the fence drops a request its agent hung up on
        (fence.py), records every spawn before it answers a new watch, and no command runs
        before its record (gate.py). Returns those to hand to the fence (orphans)."""
        doubts = dict(self.in_doubt)
        self.in_doubt.clear()
        orphans: list[Attempt] = []
        for key, (spec, att_dir, stop) in doubts.items():
            att = Attempt.load(att_dir)
            if att is None or att.boot != self._boot or (att.spec.term, att.spec.attempt) != (spec.term, spec.attempt):
                logger.warning("task %s attempt %d was not started by the fence that did not answer", *key)
                self.not_started(spec, att_dir)
                continue
            self._reports.emit(TaskEvent(spec.task_id, spec.attempt, spec.term, TaskEventKind.STARTED,
                                         pid=att.pid, at_ms=att.started_at_ms))
            if self._attempts.take_up(att, held, orphans):
                logger.info("found task %s attempt %d running (pid %d) after its spawn went unanswered", *key, att.pid)
                if stop is not None:
                    self._cancel(*key, reason=stop[0], grace_s=stop[1])
        return orphans

