"""The runner's hold on the node's attempt fence (for `lepton.agent.tasks.runner`): linking
to it lazily, relinking after it is lost, handing orphans over, and bounding requeues when
none can start.

- Lazy: `open_running()` (at the runner's start) links only to a fence that already runs;
  `ensure()` (before each spawn, and after a loss) starts one when none does, so an agent
  that runs no task has no fence (~11 MB less per node), and `release()` lets it go once
  the node has run nothing for a while (the runner's FENCE_IDLE_S): with no agent and no
  attempt it exits.
- Relinking: `lost()` (the watch broke, or a request went unanswered) relinks in the
  background; `on_linked(held)` then lets the runner hand the new fence its orphans and
  settle the spawns that went unanswered.
- Alive: a fence that is stopped (SIGSTOP) neither fences attempts nor reports their exits:
  `resume_if_stopped()` (the runner's scan, every few seconds) sends it SIGCONT; a fence
  that does not answer a new link is resumed when stopped; one that does not answer twice
  running is killed as hung (its attempts run on, orphans that the next fence adopts and
  fences) and one more try made.
- Bounded: after FENCE_DOWN_REQUEUES failed starts in a row, `gave_up` says so, and the
  runner reports attempts launched without a fence as failed (their task's retries are
  spent), not requeued: a node whose fence can never start must not take the same attempt
  back forever. Any later successful link resets the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from lepton.agent.tasks import fence
from lepton.agent.tasks import task_proc as tp
from lepton.agent.tasks.attempt import Attempt
from lepton.agent.tasks.fence_link import FenceLink, Key, NoAnswer

logger = logging.getLogger(__name__)

FENCE_DOWN_REQUEUES = 3  # failed fence starts in a row before attempts without one count as failed
HUNG_EXIT_S = 5.0  # a hung fence, SIGKILLed, is gone (its lock let go) within this


class FenceKeeper:
    """`on_exit(key, pid, rc, size)`: the fence reaped an attempt; `on_linked(held)`: a new
    link is up (held: key -> pid of what that fence holds); returns the orphans to adopt.
    Both are called on the event loop."""

    def __init__(self, data_dir: Path, lease: str, on_exit: Callable[[Key, int, int, int], None],
                 on_linked: Callable[[dict[Key, int]], list[Attempt]]):
        self.link = FenceLink(data_dir, on_exit, self.lost)
        self._dir = Path(data_dir)
        self._lease = lease
        self._on_linked = on_linked
        self._lock: asyncio.Lock | None = None  # one open at a time; made on the loop
        self._relinking: asyncio.Task[bool] | None = None
        self.failures = 0  # fence starts failed in a row
        self.error = ""  # the last one's
        self.active = False  # the runner runs: losses relink

    @property
    def gave_up(self) -> bool:
        return self.failures >= FENCE_DOWN_REQUEUES

    async def open_running(self) -> dict[Key, int]:
        """Link to the fence that runs (none is started); what it holds. Raises OSError
        when one runs but does not answer."""
        self._lock = asyncio.Lock()
        self.active = True
        return await self._open(start=False) or {}

    async def start_for(self, orphans: list[Attempt]) -> None:
        """A fence for these orphans (found at start) when they need one, and hand them over.
        Raises OSError when none can be started."""
        if self._lease and any(not att.spec.keep_on_disconnect for att in orphans) and not self.link.up:
            await self._open()  # a fresh fence holds nothing
        await self.adopt(orphans)

    def lost(self) -> None:
        """The fence is gone (killed) or did not answer: relink in the background."""
        if self.active and (self._relinking is None or self._relinking.done()):
            self._relinking = asyncio.create_task(self.ensure(), name="task-fence-relink")

    async def ensure(self) -> bool:
        """Linked, starting a fence when none runs; False when none can be reached (logged;
        the runner's watcher retries)."""
        assert self._lock is not None, "open_running() first"
        async with self._lock:
            if self.link.up:
                return True
            try:
                held = await self._open()
            except OSError as err:
                self.failures += 1
                self.error = str(err)
                logger.error("no attempt fence on this node (%s): attempts started now are %s; retrying",
                             err, "failed" if self.gave_up else "requeued")
                return False
            self.failures = 0
            assert held is not None
            await self.adopt(self._on_linked(held))
            return True

    async def _open(self, *, start: bool = True) -> dict[Key, int] | None:
        """`link.open`; a fence that does not answer is resumed when stopped, else given one
        more try and then killed as hung (a busy fence answers within the first)."""
        for tries in range(3):
            try:
                return await self.link.open(start=start)
            except NoAnswer as err:
                if tries == 2 or not await asyncio.to_thread(self._unstick, str(err), tries == 0):
                    raise
        raise AssertionError("unreachable")

    def fence_pid(self) -> int:
        """The pid of this data dir's fence (its lock file says), if one runs; else 0."""
        try:
            pid = int((self._dir / fence.LOCK_NAME).read_text())
        except (OSError, ValueError):
            return 0
        try:  # not a reused pid: the fence's command line names it
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return pid if b"lepton.agent.tasks.fence" in f.read() else 0
        except OSError:
            return 0

    def resume_if_stopped(self) -> bool:
        """SIGCONT the fence when it is stopped (it neither fences nor reaps meanwhile)."""
        pid = self.fence_pid()
        info = tp.proc_info(pid)
        if info is None or not info.stopped:
            return False
        os.kill(pid, signal.SIGCONT)
        logger.warning("the node's attempt fence (pid %d) was stopped: resumed it (stopped, it fences no "
                       "attempt and reports no exit)", pid)
        return True

    def _unstick(self, why: str, first: bool) -> bool:
        """A fence that did not answer (`why`): resumed when stopped, else (past the `first`
        time) killed as hung. Blocking. Returns whether another try may get an answer."""
        if self.resume_if_stopped():
            return True
        if not (pid := self.fence_pid()):
            return False
        if first:
            logger.warning("%s (pid %d, not stopped): trying once more before taking it for hung", why, pid)
            return True
        logger.error("%s and is not stopped: killing it as hung (pid %d); its attempts run on and the "
                     "next fence takes them over", why, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + HUNG_EXIT_S
        while (info := tp.proc_info(pid)) is not None and not info.zombie and time.monotonic() < deadline:
            time.sleep(0.02)
        return True

    async def adopt(self, orphans: list[Attempt]) -> None:
        """Have the fence fence these attempts (those with a lease), spawned by one that is gone."""
        items = [{"key": list(att.key), "pid": att.pid, "start": att.start, "dir": str(att.dir), "lease": self._lease}
                 for att in orphans if self._lease and not att.spec.keep_on_disconnect]
        try:
            await asyncio.to_thread(self.link.adopt, items)
        except OSError as err:
            logger.error("cannot hand %d orphaned attempt(s) to the node's fence: %s", len(items), err)

    async def release(self, idle: Callable[[], bool]) -> None:
        """Unlink, when `idle()` still says nothing runs or starts (asked under the lock, so
        no spawn is under way): the fence, with no agent and no attempt, exits."""
        assert self._lock is not None, "open_running() first"
        async with self._lock:
            if self.link.up and idle():
                await self.link.close()
                logger.info("let the node's attempt fence go: no attempt ran here for a while")

    async def close(self) -> None:
        """Unlinked; the fence keeps the attempts, and fences them on its own."""
        self.active = False
        relinking, self._relinking = self._relinking, None
        if relinking is not None:
            relinking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relinking
        await self.link.close()
