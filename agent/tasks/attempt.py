"""One live task attempt as the runner sees it (`lepton.agent.tasks.runner`): its record,
whether its wrapper has ended, and how it ended (exit code and reason)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lepton.agent.tasks import task_proc as tp
from lepton.agent.tasks.task_spec import FENCED, RunSpec
from lepton.common.durable import read_json


def recorded_mono(doc: dict, key: str) -> float:
    """A time recorded as `<key>_mono` (time.monotonic(), CLOCK_MONOTONIC on Linux: the same
    for every process of a boot, and a wall-clock jump moves it not at all; the attempt's boot
    id says which boot), or as wall time `<key>` by an older agent. 0: none."""
    if doc.get(f"{key}_mono"):
        return float(doc[f"{key}_mono"])
    wall = float(doc.get(key) or 0)
    return time.monotonic() + (wall - time.time()) if wall else 0.0


@dataclass
class Attempt:
    """The runner's view of one live attempt."""

    spec: RunSpec
    dir: Path
    pid: int  # the wrapper's pid; also the process group and session id
    start: float  # the wrapper's start time (see task_proc.ProcInfo), against pid reuse
    boot: str
    started_at_ms: int
    deadline: float = 0.0  # monotonic; 0 = none
    proc: subprocess.Popen[bytes] | None = None  # our own child; None when re-adopted
    stop_reason: str = ""
    kill_at: float = 0.0  # monotonic
    killed: bool = False
    timer: asyncio.TimerHandle | None = None  # at the deadline or kill_at, whichever is next

    @classmethod
    def load(cls, att_dir: Path, boot: str, own: Mapping[int, subprocess.Popen[bytes]]) -> Attempt | None:
        """The attempt recorded in `att_dir` (run.json, and stop.json when a stop was under
        way), or None without a readable record. In this boot (`boot`), an attempt whose agent
        died between its spawn and recording the pid is found by its wrapper's argv, and one
        this process spawned gets its Popen back from `own`."""
        run = read_json(att_dir / "run.json")
        try:
            spec = RunSpec.from_json(run["spec"]) if run else None
        except (TypeError, KeyError):
            spec = None
        if spec is None or run is None:
            return None
        pid, start = int(run.get("pid", 0)), float(run.get("start", 0))
        same_boot = run.get("boot_id") == boot
        if same_boot and pid == 0:
            pid = tp.find_wrapper(att_dir / "exit.json")  # the agent died mid-launch
            info = tp.proc_info(pid)
            start = info.start if info else 0.0
        att = cls(spec=spec, dir=att_dir, pid=pid, start=start, boot=run.get("boot_id", ""),
                  started_at_ms=int(run.get("started_at_ms", 0)), deadline=recorded_mono(run, "deadline"),
                  proc=own.get(pid) if same_boot else None)
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

    def poll_exit(self) -> tuple[bool, int | None]:
        """(exited, the wrapper's exit code when we reaped it). Reaps our own children."""
        if self.proc is not None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                # Reaped elsewhere: exit.json still says how it ended. Popen would take 0.
                if self.proc.returncode is None:
                    self.proc.returncode = 0
                return True, None
            if pid == 0:
                return False, None
            self.proc.returncode = code = os.waitstatus_to_exitcode(status)
            return True, code
        info = tp.proc_info(self.pid)
        if info is None or not tp.same_start(info.start, self.start):
            return True, None  # gone, or the pid now belongs to someone else
        if not info.zombie:
            return False, None
        try:  # a zombie: ours to reap when this process spawned it under an earlier runner
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return True, None
        return True, (os.waitstatus_to_exitcode(status) if pid == self.pid else None)

    def outcome(self, wait_code: int | None, now_ms: int) -> tuple[int | None, str, int]:
        """(exit code, reason, when it ended in ms) of the ended wrapper; `wait_code`: its own
        status when we reaped it."""
        exit_path = self.dir / "exit.json"
        at_ms = now_ms
        if wait_code is not None and wait_code >= 0:
            # We reaped the wrapper and it exited: its status is the command's `$?`, the same
            # number exit.json holds (`exit "$rc"`), and the pidfd told us at once: no file to read.
            doc: dict | None = {"rc": wait_code}
        else:
            doc = read_json(exit_path)
            if doc is not None:
                with contextlib.suppress(OSError):
                    at_ms = exit_path.stat().st_mtime_ns // 1_000_000  # when it really ended
        if doc is not None and isinstance(doc.get("rc"), int):
            code: int | None = tp.shell_status_to_exit_code(doc["rc"])
        elif wait_code is not None:
            code = tp.shell_status_to_exit_code(wait_code)  # the wrapper died too (SIGKILL)
        elif self.killed:
            code = -signal.SIGKILL
        else:
            code = None
        if self.stop_reason:
            reason = self.stop_reason
        elif (code is None or code < 0) and (self.dir / tp.FENCED_MARK).exists():
            reason = FENCED  # its watchdog: the lease ran out; the leader requeues it
        elif code is None:
            reason = "lost"
        elif code < 0:
            reason = f"killed by signal {-code}"
        else:
            reason = "exited"
        return code, reason, at_ms
