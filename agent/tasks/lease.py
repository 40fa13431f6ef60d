"""The attempts' lease: how long this node's task attempts may run without the leader.

The agent renews it on every answer from the leader (`renew`); the node's attempt fence
(fence.py) reads it every FENCE_CHECK_S and kills each attempt's process group once it has
run out: the agent was killed, hung, or cut off from the leader for longer than the lease. The leader waits the lease (plus a margin) after marking the node down before it
starts a replacement (common/failover.py), so two copies of an attempt never overlap.

The file holds one integer: the expiry in centiseconds of CLOCK_BOOTTIME, the clock behind
/proc/uptime. Boot time is monotonic
and keeps counting through a suspend: a wall-clock jump moves nothing. Linux only; elsewhere
attempts run without a lease (`supported()` is False and the agent logs it once).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lepton.common.durable import write_atomic

logger = logging.getLogger(__name__)

LEASE_FILE = "attempt-lease"  # in the agent's data dir
_UPTIME = Path("/proc/uptime")
RENEW_STEP_CS = 50  # renewals closer together than this (or a 20th of the lease) are skipped


def supported() -> bool:
    return _UPTIME.exists() and hasattr(time, "CLOCK_BOOTTIME")


def now_cs() -> int:
    """CLOCK_BOOTTIME in centiseconds: what `/proc/uptime` says, as the wrapper reads it."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * 100)


class AttemptLease:
    """This node's attempt lease file. `renew` is cheap enough to call on every answer."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / LEASE_FILE
        self.enabled = supported()
        self._warned = False
        self._written = -1  # the expiry in the file, as this process last wrote it
        if not self.enabled:
            logger.warning("no /proc/uptime or CLOCK_BOOTTIME here: task attempts run without a "
                           "lease and are not stopped when this agent loses the leader")

    def renew(self, duration_s: float) -> None:
        """The leader answered: attempts may run `duration_s` more seconds from now."""
        if not self.enabled:
            return
        expiry = now_cs() + int(duration_s * 100)
        # A busy leader answers many times a second: a renewal that moves the expiry on by
        # less than this is skipped (the file then says a little earlier: the fence can only
        # kill sooner, never later). One that shortens the lease is always written.
        if 0 <= expiry - self._written < min(RENEW_STEP_CS, int(duration_s * 5)):
            return
        try:
            # Not fsync'd: after a crash of the host, no attempt survives to read it anyway.
            write_atomic(self.path, f"{expiry}\n".encode(), durable=False)
            self._written = expiry
            self._warned = False
        except OSError as err:
            if not self._warned:  # the old lease runs out, and the attempts with it
                logger.warning("cannot renew the attempt lease %s: %s", self.path, err)
                self._warned = True

    def remaining_s(self) -> float:
        """Seconds left on the lease (negative: expired; -inf: none)."""
        try:
            return (int(self.path.read_text().strip()) - now_cs()) / 100
        except (OSError, ValueError):
            return float("-inf")
