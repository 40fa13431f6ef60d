"""Runs the task attempts the coordinator wants on this machine, and reports on them.

The leader pushes a *desired set* of attempts; `TaskRunner.reconcile` starts what is
missing and stops what is no longer wanted (level-triggered). Tasks outlive the agent: the
node's attempt fence (fence.py, a process of its own) spawns each attempt directly in its own
session, with stdout and stderr on one file, is its parent, records its exit status and
kills it once the node's attempt lease runs out. A restarted agent re-adopts the attempts
that still run and reports the ones that ended meanwhile.

Each attempt has a folder, `data_dir/tasks/<task_id>/<attempt>/` (its files: attempt.py).
The folder itself is the record that the attempt ran: it is made exclusively before
anything starts, and each batch's claims are recorded durably in one file first (claims.py,
`data_dir/task-claims/`), so an attempt never runs twice on this node, even after a power
cut. With a retention, `sweep` deletes it once its exit is reported and the coordinator
no longer wants the attempt.
`data_dir/runner.json` keeps the newest leader term seen, for fencing across restarts.

Choices:
- Events go to `on_event` synchronously (it must not block): from `launch`/`reconcile`,
  `start` (attempts that ended while no runner watched) and the loop. EXITED is
  at-least-once (reports.py); STARTED is sent once, by the runner that spawned the attempt
  (a re-adopted one shows in `running()`, which reconciliation reports carry).
- Exit codes: exit.json holds the shell's `$?` convention, so 128+N is reported as -N
  (killed by signal N), like subprocess; a task that calls exit(130) itself reads as -2.
- When an attempt's process ends, whatever is left in its process group is SIGKILLed (like
  a container): a task's background processes die with it.
- What an attempt is spawned with (command, environment, GPUs, --task-user, shipped code)
  is built by `attempt_env`; the fence spawns a batch per request, every batch from a
  thread (spawn.py: the loop never waits on the disk or the fence; those being spawned
  count as running, pid 0, and a cancel meanwhile stops them before or right after they
  start). The fence is started at the first spawn and let go when idle (fence_keeper.py);
  a request it left unanswered is settled by run.json and its held list, never guessed
  (spawn_outcomes.py, which owns what each spawn became).
- No polling: exits come from the fence or pidfds, deadlines are timers (live.py, which
  owns the live attempts); only where no pidfd can be had is an attempt polled (POLL_S),
  and every attempt is checked every SCAN_S as a backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path

from lepton.agent.tasks import task_logs
from lepton.agent.tasks import task_proc as tp
from lepton.agent.tasks.attempt import Attempt, unreported
from lepton.agent.tasks.attempt_env import AttemptEnv, inherited_env
from lepton.agent.tasks.claims import ClaimLog
from lepton.agent.tasks.fence_keeper import FenceKeeper
from lepton.agent.tasks.fence_link import Key
from lepton.agent.tasks.live import LiveAttempts
from lepton.agent.tasks.reports import FAILED_TO_START_CODE, Reports, now_ms
from lepton.agent.tasks.retention import Retention
from lepton.agent.tasks.spawn import (
    Spawner,
    SpawnQueue,
    claim_and_prepare,
)
from lepton.agent.tasks.spawn_outcomes import SpawnOutcomes
from lepton.agent.tasks.task_spec import (
    RunningTask,
    RunSpec,
    TaskEvent,
    TaskEventKind,
    validate_ids,
)
from lepton.agent.tasks.task_user import TaskUser
from lepton.common.durable import read_json
from lepton.common.errors import FailedPrecondition, InvalidArgument

__all__ = ["FAILED_TO_START_CODE", "Chunk", "RunSpec", "RunningTask", "TaskEvent", "TaskEventKind", "TaskRunner", "validate_ids"]

Chunk = task_logs.Chunk

logger = logging.getLogger(__name__)

POLL_S = 0.1  # exit checks of attempts without a pidfd (exit_watch), and follow()'s tail interval
SCAN_S = 5.0  # every attempt checked anyway (a missed wake-up costs this at most); idle wake-ups
SETTLE_S = 10.0  # attempt claims made durable in their folders, in a thread (claims.py)
LOG_CHECK_S = 1.0  # output sizes against the cap: a stat per running attempt
SWEEP_S = 60.0  # retention sweeps: a walk of every attempt folder, in a thread
FENCE_IDLE_S = 60.0  # with no attempt running or starting this long, the fence is let go
CHUNK_BYTES = 64 * 1024


class TaskRunner:
    """Starts, watches, stops and re-adopts this node's task attempts. See the module doc."""

    def __init__(
        self,
        data_dir: Path,
        on_event: Callable[[TaskEvent], None],
        *,
        base_env: Mapping[str, str] | None = None,
        log_max_bytes: int = 0,
        retention_s: float = 0.0,
        log_check_s: float = LOG_CHECK_S,
        sweep_s: float = SWEEP_S,
        clock: Callable[[], float] = time.monotonic,
        acknowledged_by_caller: bool = False,
        lease_path: Path | None = None,
        task_user: TaskUser | None = None,
        task_path: str = "",
    ):
        """`log_max_bytes`: rotate output.log past this (0: no cap); `retention_s`: see `sweep`
        (0: keep forever), aged on `clock` (monotonic). `acknowledged_by_caller`: an EXITED counts as reported only once
        `acknowledge()` is called (after the coordinator took it), not when `on_event`
        returns. `lease_path`: the node's attempt lease (lease.py); each attempt not marked
        keep_on_disconnect kills itself once it runs out (None: attempts never fence).
        Raises InvalidArgument for negative or non-finite values."""
        for name, value in (("log_max_bytes", log_max_bytes), ("retention_s", retention_s),
                            ("log_check_s", log_check_s), ("sweep_s", sweep_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise InvalidArgument(f"{name} must be a finite number >= 0, not {value!r}")
        self._root = Path(data_dir) / "tasks"
        self._term_path = Path(data_dir) / "runner.json"
        self._boot = tp.boot_id()
        self._reports = Reports(on_event, acknowledged_by_caller)
        self._made: set[Key] = set()  # folders `launch` made on the loop, claimed by the spawn thread
        self._fence = FenceKeeper(Path(data_dir), str(lease_path or ""), lambda *e: self._outcomes.on_fence_exit(*e),
                                  lambda held: self._outcomes.on_linked(held))
        # The agent's environment does not change while it runs: filtered once, not per attempt.
        env = dict(base_env) if base_env is not None else inherited_env(os.environ)
        self._spawner = Spawner(AttemptEnv(env, task_path, task_user),
                                lease_path, self._boot, self._fence.link)
        self._claims = ClaimLog(self._root)
        self._spawns = SpawnQueue(functools.partial(claim_and_prepare, self._claims, self._spawner, self._made.__contains__),
                                  self._spawner.spawn,
                                  lambda batch, results: self._outcomes.spawned(batch, results), self._fence.ensure)
        self._settling: asyncio.Task[int] | None = None
        self._releasing: asyncio.Task[None] | None = None  # the fence let go when idle
        self._sweep_s = sweep_s if retention_s else math.inf
        self._watcher: asyncio.Task[None] | None = None
        self._max_term = 0
        self._outputs = task_logs.OutputLogs(int(log_max_bytes))
        self._attempts = LiveAttempts(self._reports, self._outputs, self._boot, str(lease_path or ""))
        self._live = self._attempts.by_key  # read here; changed by LiveAttempts alone
        # Called with each attempt's spec as it is tracked (spawned or adopted), on the loop.
        self.started_listeners: list[Callable[[RunSpec], None]] = self._attempts.started_listeners
        self._outcomes = SpawnOutcomes(self._reports, self._attempts, self._fence, self._spawns, self._boot, self.cancel,
                                       self._made)
        self._in_doubt = self._outcomes.in_doubt  # read here; changed by SpawnOutcomes alone
        self._log_check_s = log_check_s
        self._retention = Retention(self._root, self._outputs, retention_s, sweep_s, clock, lambda: self._live)

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Re-adopt the attempts a previous agent process left running, report those that
        ended unreported, and start watching. A no-op when already started.
        No fence is started for nothing: only to fence orphans found here, or at the first
        spawn (an agent that runs no task does not pay for one).
        Raises OSError when the data dir cannot be made or read, or a running attempt fence
        does not answer, or none can be started for the orphans that need one."""
        if self._watcher is not None:
            return
        self._root.mkdir(parents=True, exist_ok=True)
        held = await self._fence.open_running()  # first: from here on it tells us of every exit
        orphans: list[Attempt] = []
        doc = read_json(self._term_path) or {}
        self._max_term = max(self._max_term, int(doc.get("term", 0)))
        adopted = ended = 0
        claimed = self._claims.pending()  # what ran since the claims were last settled
        for (task_id, attempt), term in claimed.items():
            att_dir = self._attempt_dir(task_id, attempt)
            if not att_dir.exists():  # a power cut took its folder: it ran, and is over
                att_dir.mkdir(parents=True)
                self._reports.exited(att_dir, TaskEvent(task_id, attempt, term, TaskEventKind.EXITED,
                                                reason="lost", at_ms=now_ms()))
                ended += 1
        for key, att_dir in unreported(self._root):
            try:
                if self._recover(*key, att_dir, claimed.get(key, 0), held, orphans):
                    adopted += 1
                else:
                    ended += 1
            except Exception:  # one bad record must not stop the agent
                logger.exception("cannot recover attempt %s", att_dir)
        await self._fence.start_for(orphans)
        self._watcher = asyncio.create_task(self._watch(), name="task-runner")
        logger.info("task runner started: re-adopted %d running attempt(s), reported %d that ended "
                    "while no agent watched", adopted, ended)

    async def stop(self) -> None:
        """Stop watching. Does not signal any task: they outlive the agent, and the next
        `start()` (in this process or a new one) re-adopts them."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self._spawns.close(keep=self._made.__contains__)
        await self._retention.stop()
        await self._outputs.close()
        if self._settling is not None:
            await asyncio.gather(self._settling, return_exceptions=True)
            self._settling = None
        self._attempts.close()
        await self._reports.close()
        if self._releasing is not None:
            await asyncio.gather(self._releasing, return_exceptions=True)
        await self._fence.close()  # the fence keeps the attempts, and fences them on its own
        self._outcomes.clear()  # the next start() finds those in doubt by their run.json
        self._made.clear()

    # ---- commands ----------------------------------------------------------------------

    def launch(self, spec: RunSpec) -> None:
        """Start this attempt; a no-op while it runs. A spawn failure is not raised: it is an
        EXITED event (reason "failed to start: ...", exit code 127; FENCE_DOWN, for requeue
        as no failure of the task, when the link to the node's fence was down).
        Raises InvalidArgument for a bad spec, FailedPrecondition when the runner is not
        started or this attempt ever ran on this node before, OSError when the data dir
        cannot take the attempt's folder."""
        if (att_dir := self._claim(spec)) is not None:
            self._made.add((spec.task_id, spec.attempt))
            self._spawns.add([(spec, att_dir)])  # claimed durably and spawned in a thread

    def refuse(self, spec: RunSpec, why: str) -> None:
        """Record this attempt as failed to start (`why`; e.g. its code could not be
        fetched) without running anything. Raises as `launch` does."""
        if (att_dir := self._claim(spec)) is not None:
            self._reports.failed_to_start(spec, att_dir, why)

    def _claim(self, spec: RunSpec) -> Path | None:
        """The attempt's new folder; None while it runs. Raises as `launch` does."""
        spec.validate()
        if self._watcher is None:
            raise FailedPrecondition("task runner is not started")
        if (key := (spec.task_id, spec.attempt)) in self._live or key in self._spawns.starting or key in self._in_doubt:
            return None
        att_dir = self._attempt_dir(spec.task_id, spec.attempt)
        att_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            att_dir.mkdir()  # exclusive: the "this attempt ran here" mark (claims.py: through a power cut)
        except FileExistsError:
            raise FailedPrecondition(
                f"attempt {spec.attempt} of task {spec.task_id} already ran on this node") from None
        return att_dir

    def cancel(self, task_id: str, attempt: int, *, reason: str = "cancelled", grace_s: float | None = None) -> None:
        """SIGTERM the attempt's whole process group now, SIGKILL it after `grace_s` (default:
        the spec's). Its EXITED event carries `reason`. A no-op when the attempt is not
        running; when it is already stopping, the first reason stays and a shorter grace can
        only bring the SIGKILL forward. Raises InvalidArgument for bad ids or a negative grace."""
        validate_ids(task_id, attempt)
        if grace_s is not None and (not math.isfinite(grace_s) or grace_s < 0):
            raise InvalidArgument(f"grace_s must be a finite number >= 0, not {grace_s!r}")
        key = (task_id, attempt)
        att = self._live.get(key)
        if att is None:
            if (spec := self._spawns.take_back(key)) is not None:  # queued: it never starts
                # Not claimed yet: its folder says it is done here (never run, never again).
                self._attempt_dir(*key).mkdir(parents=True, exist_ok=True)
                self._reports.exited(self._attempt_dir(*key), TaskEvent(task_id, attempt, spec.term, TaskEventKind.EXITED,
                                                                reason=reason, at_ms=now_ms()))
            elif key in self._spawns.starting:  # in a spawning thread now
                self._spawns.stop_when_started.setdefault(key, (reason, grace_s))
            elif not self._outcomes.stop_when_found(key, reason, grace_s):
                logger.debug("cancel %s/%d: not running", task_id, attempt)
            return
        self._attempts.stop(att, reason, grace_s)

    def running(self) -> list[RunningTask]:
        """The attempts alive now (including those being stopped, and those being started:
        pid 0), sorted by (task, attempt)."""
        out = [RunningTask(a.spec.task_id, a.spec.attempt, a.spec.term, a.pid, a.started_at_ms)
               for a in self._live.values()]
        out += [RunningTask(s.task_id, s.attempt, s.term, 0, 0) for s in self._spawns.starting.values()]
        out += [RunningTask(s.task_id, s.attempt, s.term, 0, 0) for s, _, _ in self._in_doubt.values()]
        return sorted(out, key=lambda r: (r.task_id, r.attempt))

    def _idle(self) -> bool:
        return not (self._live or self._in_doubt or self._spawns.starting)

    def _alive(self, key: Key) -> bool:
        """Running, or being started."""
        return key in self._live or key in self._spawns.starting or key in self._in_doubt

    def log_path(self, task_id: str, attempt: int) -> Path:
        """Where the attempt's output goes (it may not exist). Raises InvalidArgument for bad ids."""
        return self._attempt_dir(task_id, attempt) / "output.log"

    async def output(self, task_id: str, attempt: int, *, offset: int = 0, follow: bool = True) -> AsyncIterator[Chunk]:
        """Output chunks (data at most CHUNK_BYTES) from stream offset `offset` (see
        `task_logs`: offsets count rotated-away output too). Without `follow`, what is there
        now: from 0, output.log.1 then output.log, after a note when older output was dropped.
        With it, tails until this runner has seen the attempt exit and the output is drained.
        Raises (on first iteration) InvalidArgument for bad ids or offset, NotFound when the
        attempt never ran on this node, or its folder was deleted by the retention."""
        key = (task_id, attempt)
        async for chunk in task_logs.attempt_output(
                self._outputs, self._attempt_dir(*key), offset, keep_following=lambda: follow and self._alive(key),
                starting=lambda: key in self._spawns.starting, chunk_bytes=CHUNK_BYTES, poll_s=POLL_S):
            yield chunk

    async def follow(self, task_id: str, attempt: int, *, offset: int = 0, follow: bool = True) -> AsyncIterator[bytes]:
        """`output` as bytes alone (notes included)."""
        async for chunk in self.output(task_id, attempt, offset=offset, follow=follow):
            yield chunk.data

    async def sweep(self) -> int:
        """Delete the attempt (and torch job) folders the retention allows (see `retention`).
        Returns how many attempt folders were deleted."""
        return await self._retention.sweep()

    def reconcile(self, desired: Iterable[RunSpec], term: int, *,
                  removed: Iterable[tuple[str, int]] | None = None) -> str:
        """Make the running set match `desired`: launch the attempts not running (and never
        run here), cancel the running ones not in it. A set from a term older than the newest
        seen is ignored (fencing). Bad specs are skipped and counted, not raised.
        With `removed`, `desired` is a change to the last set, not the whole set (the
        leader's deltas): cancel the `removed` (task, attempt)s, launch `desired`, leave the
        rest; the work is O(change), not O(set).
        Returns a sentence such as "started 2, stopped 1, 3 running".
        Raises FailedPrecondition when the runner is not started."""
        if self._watcher is None:
            raise FailedPrecondition("task runner is not started")
        if term < self._max_term:
            logger.warning("ignoring a desired set from term %d: term %d is newer", term, self._max_term)
            return f"ignored a desired set from term {term}: term {self._max_term} is newer"
        if term > self._max_term:
            self._max_term = term
            try:
                tp.write_json_atomic(self._term_path, {"term": term})
            except OSError as err:
                logger.warning("cannot persist term %d: %s", term, err)
        want: dict[tuple[str, int], RunSpec] = {}
        rejected = 0
        for spec in desired:
            try:
                spec.validate()
            except InvalidArgument as err:
                logger.warning("reconcile: rejecting a spec: %s", err.message)
                rejected += 1
                continue
            want[(spec.task_id, spec.attempt)] = spec
        if removed is None:
            self._retention.desired = set(want)  # kept: the coordinator still wants them
            stop = [key for key, att in self._live.items() if key not in want and not att.stop_reason]
            stop += [key for key in self._spawns.starting if key not in want and self._spawns.wanted(key)]
        else:
            removed = list(removed)
            stop = [key for key in removed if key in self._live and not self._live[key].stop_reason
                    or self._spawns.wanted(key)]
            if self._retention.desired is not None:  # changed in place: the sweep's thread only
                self._retention.desired.difference_update(removed)  # reads it, under the GIL
                self._retention.desired.update(want)
        for key in stop:
            self.cancel(*key)
        stopped = len(stop)
        started = finished = 0
        new: list[tuple[RunSpec, Path]] = []
        for key, spec in want.items():
            if key in self._live or key in self._spawns.starting or key in self._in_doubt:
                continue
            if (att_dir := self._attempt_dir(*key)).exists():
                finished += 1  # ran before; its EXITED event is the coordinator's answer
                continue
            new.append((spec, att_dir))
        if new:  # claimed (folders, one fsync) and spawned in a thread, a chunk at a time
            self._spawns.add(new)
            started = len(new)
        if removed is None:
            alive = sum(1 for a in self._live.values() if not a.stop_reason) + \
                sum(1 for key in self._spawns.starting if self._spawns.wanted(key))
            parts = [f"started {started}", f"stopped {stopped}", f"{alive} running"]
        else:  # not a walk over every attempt per change: those stopping count too
            parts = [f"started {started}", f"stopped {stopped}", f"{len(self._live) + len(self._spawns.starting)} live"]
        for n, what in ((finished, "already ran"), (rejected, "rejected")):
            if n:
                parts.append(f"{n} {what}")
        sentence = ", ".join(parts)
        if started or stopped or rejected:
            logger.info("reconcile (term %d): %s", term, sentence)
        return sentence

    # ---- internals ---------------------------------------------------------------------

    def _attempt_dir(self, task_id: str, attempt: int) -> Path:
        validate_ids(task_id, attempt)
        return self._root / task_id / str(attempt)

    def _recover(self, task_id: str, attempt: int, att_dir: Path, claimed_term: int,
                 held: dict[Key, int], orphans: list[Attempt]) -> bool:
        """Re-adopt one unreported attempt (True) or report how it ended (False).
        `claimed_term`: the term its claim recorded (0: none left); `held`: the fence's
        attempts; one it does not hold goes to `orphans`."""
        att = Attempt.load(att_dir)
        if att is None:
            # Died before the intent was written, or a power cut took it: nothing runs now.
            self._reports.exited(att_dir, TaskEvent(task_id, attempt, claimed_term, TaskEventKind.EXITED,
                                            reason="lost", at_ms=now_ms()))
            return False
        self._max_term = max(self._max_term, att.spec.term)
        if self._attempts.take_up(att, held, orphans):
            logger.info("re-adopted task %s attempt %d (pid %d)", task_id, attempt, att.pid)
            return True
        return False

    async def _watch(self) -> None:
        """Exits and timers come by themselves (live.py); this loop polls the
        attempts without a pidfd, checks output sizes, scans every attempt now and then
        (a backstop), and starts retention sweeps and claim settling."""
        now = time.monotonic()
        next_logs, next_scan, next_settle = now, now + SCAN_S, now + SETTLE_S
        busy_at = now  # when an attempt last ran or started here
        while True:
            if self._attempts.polled:
                wait = POLL_S
            elif self._live:
                wait = min(self._log_check_s, SCAN_S, self._sweep_s) or POLL_S
            else:
                wait = min(SCAN_S, self._sweep_s)
            await asyncio.sleep(wait)
            now = time.monotonic()
            check_logs = now >= next_logs
            if check_logs:
                next_logs = now + self._log_check_s
            scan = now >= next_scan
            if scan:
                next_scan = now + SCAN_S
            self._attempts.scan(everything=scan, check_logs=check_logs)
            self._retention.tick(now)
            if self._live or self._in_doubt or self._spawns.starting:
                busy_at = now
            elif scan and self._fence.link.up and now - busy_at >= FENCE_IDLE_S:
                busy_at = now  # one try per idle period
                self._releasing = asyncio.create_task(self._fence.release(self._idle), name="task-fence-release")
            if scan and self._fence.link.up:
                self._fence.resume_if_stopped()  # stopped, it would neither fence nor report exits
            # Lost, or the last try to start one failed: once more (once it gave up, only the
            # next spawn tries: a fence that cannot start costs an idle node nothing).
            if scan and not self._fence.link.up and (self._live or self._in_doubt or
                                                     self._fence.failures and not self._fence.gave_up):
                self._fence.lost()
            if now >= next_settle and (self._settling is None or self._settling.done()):
                next_settle = now + SETTLE_S
                self._settling = asyncio.create_task(asyncio.to_thread(self._claims.settle), name="task-claims")

    def acknowledge(self, task_id: str, attempt: int) -> None:
        """The coordinator has taken this attempt's EXITED event: never report it again."""
        self._reports.acknowledge(task_id, attempt)
