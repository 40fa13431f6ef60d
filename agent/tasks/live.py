"""The attempts that run on this node now, as the runner watches them (for
`lepton.agent.tasks.runner`): tracking each, learning when it ends, its deadline and its
stop (SIGTERM, then SIGKILL after the grace), and reporting how it ended.

No polling: the fence tells the runner of each exit of its own attempts (`on_fence_exit`);
an attempt it does not hold (one of a fence that died, or of an older agent) has a pidfd
(exit_watch.py); deadlines and SIGKILL times are timers (attempt.py); only where no pidfd can
be had is an attempt polled (`polled`), and `scan` checks every attempt as a backstop.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

from lepton.agent.tasks import task_logs
from lepton.agent.tasks import task_proc as tp
from lepton.agent.tasks.attempt import Attempt
from lepton.agent.tasks.exit_watch import ExitWatch
from lepton.agent.tasks.lease_guard import LeaseGuard
from lepton.agent.tasks.reports import Reports, now_ms
from lepton.agent.tasks.task_spec import RunSpec, TaskEvent, TaskEventKind

logger = logging.getLogger(__name__)

Key = tuple[str, int]


class LiveAttempts:
    """Owns the live attempts (`by_key`), their exit watches and timers, and the agent's
    hold on their lease (`lease_path`, "" for none: lease_guard.py)."""

    def __init__(self, reports: Reports, outputs: task_logs.OutputLogs, boot: str, lease_path: str = ""):
        self.by_key: dict[Key, Attempt] = {}
        self.lease = LeaseGuard(lease_path, self.by_key.values)
        self._reports = reports
        self._outputs = outputs
        self._boot = boot
        self._exits = ExitWatch(self._on_exit)
        # Called with each attempt's spec as it is tracked (spawned or adopted), on the loop.
        self.started_listeners: list[Callable[[RunSpec], None]] = []

    def __contains__(self, key: Key) -> bool:
        return key in self.by_key

    def __len__(self) -> int:
        return len(self.by_key)

    def get(self, key: Key) -> Attempt | None:
        return self.by_key.get(key)

    @property
    def polled(self) -> set:
        """Attempts without a pidfd: the runner's loop polls these every POLL_S."""
        return self._exits.polled

    def take_up(self, att: Attempt, held: dict[Key, int], orphans: list[Attempt]) -> bool:
        """Track `att` if it still runs (True; in `orphans` unless the fence `held` it), or
        report how it ended."""
        att.held = held.get(att.key) == att.pid
        exited, code = (True, None) if att.boot != self._boot or att.pid == 0 else att.poll_exit()
        if exited:
            self.finish(att, code)
            return False
        if not att.held:
            orphans.append(att)
        self.track(att)
        return True

    def track(self, att: Attempt) -> None:
        """Watch a live attempt: its pidfd wakes us when it ends (else it is polled), and a
        timer at its deadline or SIGKILL time."""
        self.by_key[att.key] = att
        for listener in self.started_listeners:
            listener(att.spec)
        if not att.held:  # the fence tells us of its own attempts' exits
            self._exits.watch(att.key, att.pid, att.start)
        att.arm(self._on_wake)
        self.lease.arm()

    def orphaned(self, held: dict[Key, int]) -> list[Attempt]:
        """A new fence holds `held`: every live attempt the old one held is an orphan now
        (the new one cannot learn its exit status: its pidfd tells us it ended)."""
        orphans = [att for att in self.by_key.values() if held.get(att.key) != att.pid]
        for att in orphans:
            if att.held:
                att.held = False
                self._exits.watch(att.key, att.pid, att.start)
        return orphans

    def on_fence_exit(self, key: Key, pid: int, rc: int, output_size: int) -> bool:
        """The fence reaped this attempt, which ended with `$?` `rc`. False: not tracked (yet)."""
        att = self.by_key.get(key)
        if att is None or att.pid != pid:
            return False
        self.finish(att, rc, output_size)
        return True

    def stop(self, att: Attempt, reason: str, grace_s: float | None) -> None:
        """SIGTERM its group now, SIGKILL after `grace_s` (default: the spec's). When it is
        already stopping, the first reason stays and a shorter grace can only bring the
        SIGKILL forward."""
        grace = att.spec.grace_s if grace_s is None else grace_s
        if not att.stop_reason:
            att.begin_stop(reason, grace, self._on_wake)
        elif not att.killed and time.monotonic() + grace < att.kill_at:
            att.kill_at = time.monotonic() + grace
            att.persist_stop()
            att.arm(self._on_wake)

    def scan(self, *, everything: bool, check_logs: bool) -> None:
        """Check the polled attempts (all of them with `everything`: the backstop), and each
        one's output size against the cap with `check_logs`."""
        polled = self._exits.polled
        due = list(self.by_key.values()) if everything or check_logs else \
            [self.by_key[k] for k in polled if k in self.by_key]
        if everything:
            self.lease.check()  # its timer's backstop
        for att in due:
            if everything or att.key in polled:
                self._check_logged(att)
            if check_logs and att.key in self.by_key:
                try:
                    self._outputs.check(att.dir)
                except Exception:  # keep watching the others
                    logger.exception("checking the output of task %s attempt %d failed", *att.key)

    def close(self) -> None:
        """Stop watching (the attempts run on; the fence holds their lease)."""
        self.lease.close()
        self._exits.close()
        for att in self.by_key.values():
            att.disarm()
        self.by_key.clear()

    def _on_exit(self, key: Key) -> None:
        """Its pidfd says the process ended."""
        if (att := self.by_key.get(key)) is not None:
            self._check_logged(att)
            if key in self.by_key:  # not reapable yet (it should be): poll it from now on
                self._exits.poll_from_now(key)

    def _on_wake(self, key: Key) -> None:
        """Its timer: a deadline or a SIGKILL time has come."""
        if (att := self.by_key.get(key)) is not None:
            att.timer = None
            self._check_logged(att)
            if key in self.by_key and att.timer is None:
                att.arm(self._on_wake)  # the loop may fire a timer a hair early: once more then

    def _check_logged(self, att: Attempt) -> None:
        try:
            self._check(att)
        except Exception:  # keep watching the others
            logger.exception("watching task %s attempt %d failed", *att.key)

    def _check(self, att: Attempt) -> None:
        exited, code = att.poll_exit()
        if exited:
            self.finish(att, code)
            return
        now = time.monotonic()
        if not att.stop_reason and att.deadline and now >= att.deadline:
            logger.info("task %s attempt %d ran past its %gs timeout", *att.key, att.spec.timeout_s)
            att.begin_stop("timeout", att.spec.grace_s, self._on_wake)
        elif att.stop_reason and not att.killed and now >= att.kill_at:
            logger.info("task %s attempt %d outlived its grace period; killing it", *att.key)
            att.kill()

    def finish(self, att: Attempt, rc: int | None, output_size: int | None = None) -> None:
        """The attempt's process is gone (`rc`: its `$?`, `output_size`: output.log's size,
        when known): clear its group, work out the exit code and report it."""
        self.by_key.pop(att.key, None)
        self._exits.unwatch(att.key)
        att.disarm()
        self._outputs.finished(att.dir, output_size)
        # Leftovers in the task's group (the fence killed those of its own before the reap).
        if not att.held and att.pid and att.boot == self._boot and tp.group_is_ours(att.pid, att.start):
            tp.signal_group(att.pid, signal.SIGKILL)
        code, reason, at_ms = att.outcome(rc, now_ms())
        logger.info("task %s attempt %d ended: %s (exit code %s)", *att.key, reason, code)
        self._reports.exited(att.dir, TaskEvent(att.spec.task_id, att.spec.attempt, att.spec.term, TaskEventKind.EXITED,
                                                exit_code=code, reason=reason, pid=att.pid, at_ms=at_ms))
