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
import threading
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
    """This node's attempt lease file. `renew` is cheap enough to call on every answer.

    With `background=True` (the agent) a renewal that extends the lease is written by a
    thread of its own: the rename waits on the file system's journal (~20 ms under fsync
    load), which on the event loop delayed Raft acks and heartbeats. The thread writes only
    expiries the loop computed, the newest first, so a stalled loop extends nothing. The
    first write and any shortening are made at once, in the caller."""

    def __init__(self, data_dir: Path, *, background: bool = False):
        self.path = Path(data_dir) / LEASE_FILE
        self.enabled = supported()
        self._warned = False
        self._written = -1  # the expiry in the file (or handed to the writer), as this process last wrote it
        self._background = background
        self._pending: int | None = None
        self._seq = 0  # renewals handed on so far: the writer drops a value a newer one followed
        self._wake = threading.Condition()
        self._file_lock = threading.Lock()  # one write at a time, in the order decided
        self._writer: threading.Thread | None = None
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
        extends = self._written >= 0 and expiry > self._written
        self._written = expiry
        with self._wake:
            self._seq += 1
            if self._background and extends:
                self._pending = expiry
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_loop, name="attempt-lease", daemon=True)
                    self._writer.start()
                self._wake.notify()
                return
            self._pending = None  # an older extension queued must not land after this one
        with self._file_lock:
            self._write(expiry)

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while self._pending is None:
                    self._wake.wait()
                expiry, self._pending, seq = self._pending, None, self._seq
            with self._file_lock:
                if seq == self._seq:  # else a newer renewal is queued or was written in the caller
                    self._write(expiry)

    def _write(self, expiry: int) -> None:
        try:
            # Not fsync'd: after a crash of the host, no attempt survives to read it anyway.
            write_atomic(self.path, f"{expiry}\n".encode(), durable=False)
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
