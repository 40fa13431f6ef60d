"""The agent's own hold on the attempt lease (lease.py), beside the fence's (fence.py).

The leader replaces a lost node's attempts once their lease has run out (plus the fence's
check and a margin), trusting that they are dead by then. The node's attempt fence kills
them on its own, even with the agent dead; but a fence that is stopped (SIGSTOP, a debugger)
or hung kills nothing. So the agent, while it lives, holds the same line: a timer at the
lease's expiry (re-read then: renewals move it; one file read per lease period, no polling)
and, once the lease has run out, it fences every attempt under the lease itself: the
`fenced` mark, a line in its output, SIGKILL to its process group. Whichever of the two
comes first does it; the other finds it done. What remains: the agent and the fence both
stopped or dead (then nothing on this node kills them; a whole machine paused pauses its
attempts too, and the fence, first to run its check on resume, kills them).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable

from lepton.agent.tasks import task_proc as tp
from lepton.agent.tasks.attempt import Attempt
from lepton.agent.tasks.fence import read_lease_cs
from lepton.agent.tasks.lease import now_cs

logger = logging.getLogger(__name__)


class LeaseGuard:
    """Fences the attempts `attempts()` under the lease at `lease_path` once it runs out
    ("": none, never fences). Use on the event loop."""

    def __init__(self, lease_path: str, attempts: Callable[[], Iterable[Attempt]]):
        self._path = lease_path
        self._attempts = attempts
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """An attempt is tracked: have a check due at the lease's expiry."""
        if self._path and self._timer is None:
            self._schedule(read_lease_cs(self._path))

    def check(self) -> int:
        """Fence each attempt under the lease when it has run out, else check again at its
        expiry. Returns how many were fenced now."""
        leased = [att for att in self._attempts() if not att.spec.keep_on_disconnect]
        if not self._path or not leased:
            return 0  # nothing to guard: the next tracked attempt arms the timer again
        expiry = read_lease_cs(self._path)
        if expiry > now_cs():
            if self._timer is None:
                self._schedule(expiry)
            return 0
        fenced = 0
        for att in leased:
            if att.fenced:
                continue
            att.fenced = True
            if tp.mark_fenced(att.dir):  # else the fence got there first
                fenced += 1
            att.signal_group(signal.SIGKILL)
        if fenced:
            logger.warning("the attempt lease ran out (no answer from the leader in time): fenced %d "
                           "attempt(s)", fenced)
        return fenced

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, expiry_cs: int) -> None:
        delay = max(0.0, (expiry_cs - now_cs()) / 100)
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        try:
            self.check()
        except Exception:  # the scan's backstop calls it again
            logger.exception("checking the attempt lease failed")
