"""One live task attempt as the runner sees it (`lepton.agent.tasks.runner`): its record,
whether its process has ended, and how it ended (exit code and reason).

Layout, per attempt, in `data_dir/tasks/<task_id>/<attempt>/`:
  output.log     stdout+stderr of the task (one open file for both, so their order holds)
  output.log.1   with a cap on output: the previous chunk of it (see `task_logs`, which
  rotation.json  also maps the offsets readers use onto these two files)
  run.json       spec, pid (= pgid = sid), process start time, boot id, deadline (on
                 CLOCK_MONOTONIC: one clock for every process of this boot). Written once
                 by the fence, right after the spawn; not fsync'd (it serves a restart in
                 this boot; a power cut ends every attempt).
  stop.json      a cancel/timeout in progress: reason, SIGKILL time, whether SIGKILL went out
  exit.json      {"rc": N}, the shell's `$?` convention, written by the fence when it ends
  fenced         the fence killed it: the node's lease ran out (lease.py)
  reported.json  the EXITED event as reported: its presence means "done, never again"
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lepton.agent.tasks import task_proc as tp
from lepton.agent.tasks.task_spec import FENCED, TASK_ID_RE, RunSpec
from lepton.common.durable import read_json

logger = logging.getLogger(__name__)


def recorded_mono(doc: dict, key: str) -> float:
    """A time recorded as `<key>_mono` (time.monotonic(), CLOCK_MONOTONIC on Linux: the same
    for every process of a boot, and a wall-clock jump moves it not at all; the attempt's boot
    id says which boot), or as wall time `<key>` by an older agent. 0: none."""
    if doc.get(f"{key}_mono"):
        return float(doc[f"{key}_mono"])
    wall = float(doc.get(key) or 0)
    return time.monotonic() + (wall - time.time()) if wall else 0.0


def unreported(root: Path) -> Iterator[tuple[tuple[str, int], Path]]:
    """(key, folder) of each attempt under `root` (`<task_id>/<attempt>/`) whose exit is not
    marked reported, in order."""
    for task_dir in sorted(root.iterdir()):
        if not task_dir.is_dir() or not TASK_ID_RE.fullmatch(task_dir.name):
            continue
        for att_dir in sorted(task_dir.iterdir()):
            if att_dir.is_dir() and att_dir.name.isdigit() and not (att_dir / "reported.json").exists():
                yield (task_dir.name, int(att_dir.name)), att_dir


@dataclass
class Attempt:
    """The runner's view of one live attempt."""

    spec: RunSpec
    dir: Path
    pid: int  # also the process group and session id
    start: float  # the process's start time (see task_proc.ProcInfo), against pid reuse
    boot: str
    started_at_ms: int
    deadline: float = 0.0  # monotonic; 0 = none
    held: bool = False  # the node's fence is its parent and reports its exit (fence.py)
    stop_reason: str = ""
    kill_at: float = 0.0  # monotonic
    killed: bool = False
    fenced: bool = False  # the agent killed it: the lease ran out (lease_guard.py)
    timer: asyncio.TimerHandle | None = None  # at the deadline or kill_at, whichever is next

    @classmethod
    def load(cls, att_dir: Path) -> Attempt | None:
        """The attempt recorded in `att_dir` (run.json, and stop.json when a stop was under
        way), or None without a readable record."""
        run = read_json(att_dir / "run.json")
        try:
            spec = RunSpec.from_json(run["spec"]) if run else None
        except (TypeError, KeyError):
            spec = None
        if spec is None or run is None:
            return None
        att = cls(spec=spec, dir=att_dir, pid=int(run.get("pid", 0)), start=float(run.get("start", 0)),
                  boot=run.get("boot_id", ""), started_at_ms=int(run.get("started_at_ms", 0)),
                  deadline=recorded_mono(run, "deadline"))
        stop = read_json(att_dir / "stop.json")
        if stop:
            att.stop_reason = str(stop.get("reason", "cancelled"))
            att.kill_at = recorded_mono(stop, "kill_at")
            att.killed = bool(stop.get("killed", False))
        return att

    @property
    def key(self) -> tuple[str, int]:
        return self.spec.task_id, self.spec.attempt

    def arm(self, on_time: Callable[[tuple[str, int]], None]) -> None:
        """(Re)arm the timer for whichever of the deadline or the SIGKILL time is next (none
        once SIGKILL went out): `on_time(key)` then, on the running loop."""
        self.disarm()
        when = (0.0 if self.killed else self.kill_at) if self.stop_reason else self.deadline
        if when:  # loop.time() is time.monotonic(), the clock of these times
            self.timer = asyncio.get_running_loop().call_at(when, on_time, self.key)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def begin_stop(self, reason: str, grace: float, on_time: Callable[[tuple[str, int]], None]) -> None:
        """SIGTERM its group now (SIGKILL at once without a grace), SIGKILL at `kill_at`
        (`on_time` then); recorded so a restarted agent finishes the job, with this reason."""
        self.stop_reason = reason
        self.kill_at = time.monotonic() + grace
        self.persist_stop()
        if grace <= 0:
            self.kill()
        else:
            logger.info("stopping task %s attempt %d (%s): SIGTERM, SIGKILL in %gs", *self.key, reason, grace)
            self.signal_group(signal.SIGTERM)
        self.arm(on_time)

    def kill(self) -> None:
        self.killed = True
        self.persist_stop()
        self.signal_group(signal.SIGKILL)

    def signal_group(self, sig: int) -> None:
        if tp.group_is_ours(self.pid, self.start):  # not a reused pid
            tp.signal_group(self.pid, sig)

    def persist_stop(self) -> None:
        doc = {"reason": self.stop_reason, "kill_at_mono": self.kill_at, "killed": self.killed}
        try:
            tp.write_json_atomic(self.dir / "stop.json", doc, durable=False)  # moot after a power loss
        except OSError as err:
            logger.warning("cannot record the stop of task %s attempt %d: %s", *self.key, err)

    def poll_exit(self) -> tuple[bool, int | None]:
        """(ended, its `$?` when we reaped it ourselves). The zombie of a `held` attempt is
        not over yet: the fence records (exit.json) and reaps it in a moment. Any other
        zombie is over (init reaps it); we reap it ourselves only where orphans come to us."""
        info = tp.proc_info(self.pid)
        if info is None or not tp.same_start(info.start, self.start):
            return True, None  # gone, or the pid now belongs to someone else
        if not info.zombie:
            return False, None
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return not self.held, None
        if pid != self.pid:
            return not self.held, None
        code = os.waitstatus_to_exitcode(status)
        return True, (code if code >= 0 else 128 - code)

    def outcome(self, rc: int | None, now_ms: int) -> tuple[int | None, str, int]:
        """(exit code, reason, when it ended in ms) of the ended attempt; `rc`: its `$?`
        when known (the fence told us), else exit.json says."""
        exit_path = self.dir / "exit.json"
        at_ms = now_ms
        if rc is None:
            doc = read_json(exit_path)
            if doc is not None and isinstance(doc.get("rc"), int):
                rc = doc["rc"]
                with contextlib.suppress(OSError):
                    at_ms = exit_path.stat().st_mtime_ns // 1_000_000  # when it really ended
        if rc is not None:
            code: int | None = tp.shell_status_to_exit_code(rc)
        elif self.killed:
            code = -signal.SIGKILL
        else:
            code = None
        if self.stop_reason:
            reason = self.stop_reason
        elif (code is None or code < 0) and (self.dir / tp.FENCED_MARK).exists():
            reason = FENCED  # the fence killed it: the lease ran out; the leader requeues it
        elif code is None:
            reason = "lost"
        elif code < 0:
            reason = f"killed by signal {-code}"
        else:
            reason = "exited"
        return code, reason, at_ms
