"""Process-level helpers for `lepton.agent.tasks.runner`: the exit-recording wrapper, process
identity (to tell a live task from a reused pid), signalling a task's process group,
and small durable-file helpers. No asyncio here, and nothing that imports torch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from lepton.common.durable import write_atomic

# The wrapper every task runs under. It is the session and process-group leader, so one
# killpg reaches it and everything the task started. It records the command's status in
# exit.json itself, so an exit code survives an agent that is dead when the task ends.
# The traps (never `trap ''`: an ignored signal is inherited by the command, a trapped one
# is reset to the default) keep the wrapper alive to write exit.json after the command dies
# of the same SIGTERM/SIGINT/HUP; sh runs them only once the command has ended, and `$?`
# survives them. A signal that came before the command was forked skips it. One that lands
# within the instant of the fork itself can be lost to the command: SIGKILL after the grace
# period is the backstop.
# exit.json is written in place (one write; no `mv`, one process fewer per task): the runner
# reads it only once the wrapper is gone, and one SIGKILLed mid-write leaves it empty, which
# reads as no record (the wrapper's own status then counts).
# Self-fencing: with a lease file ($2, see lease.py), a watchdog in the same process group
# compares its expiry with /proc/uptime every second; once it has run out (the agent is
# dead, hung or cut off from the leader), it leaves a `fenced` mark and SIGKILLs the whole
# group, wrapper included. It needs nothing from the agent, so it works after a kill -9.
WRAPPER_SCRIPT = """x=$1; lease=$2; shift 2
rc=
trap 'rc=143' TERM; trap 'rc=130' INT; trap 'rc=129' HUP
w=
if [ -n "$lease" ]; then
  ( while sleep 1; do
      exp=; { read exp < "$lease"; } 2>/dev/null
      case $exp in ''|*[!0-9]*) exp=0;; esac
      read up _ < /proc/uptime
      if [ "${up%.*}${up#*.}" -ge "$exp" ]; then
        : > "${x%/*}/fenced"
        echo "lepton: fenced: this node lost the leader past the attempt's lease; killing the attempt" >&2
        kill -KILL 0
      fi
    done ) &
  w=$!
fi
[ -n "$rc" ] || { "$@"; rc=$?; }
[ -z "$w" ] || kill "$w" 2>/dev/null
printf '{"rc": %d}\\n' "$rc" > "$x"
exit "$rc"
"""
WRAPPER_NAME = "lepton-task"  # the wrapper's $0: shows in ps, and marks it for orphan search

_MAX_SIGNAL = int(getattr(signal, "SIGRTMAX", 64))
_HAVE_PROC = os.path.isdir("/proc/self")


FENCED_MARK = "fenced"  # in the attempt's folder: its watchdog killed it (lease ran out)


def wrapper_argv(exit_path: Path, command: tuple[str, ...], lease_path: Path | None = None) -> list[str]:
    """The argv to spawn: /bin/sh running WRAPPER_SCRIPT, then the task's own argv. With
    `lease_path`, the attempt kills itself once that lease runs out (see lease.py)."""
    return ["/bin/sh", "-c", WRAPPER_SCRIPT, WRAPPER_NAME, str(exit_path), str(lease_path or ""), *command]


def shell_status_to_exit_code(rc: int) -> int:
    """A shell's `$?` to subprocess convention: 128+N (N a signal number) becomes -N.

    sh cannot tell "killed by signal N" from "exit(128+N)"; the former is far more common
    for these values, so that is what we report.
    """
    if 128 < rc <= 128 + _MAX_SIGNAL:
        return -(rc - 128)
    return rc


def resolve_executable(name: str, env: dict[str, str], workdir: Path) -> str:
    """The path to exec for argv[0], searched on the task's PATH like execvp would.

    Returns an absolute path for bare names, so the wrapper never runs a shell builtin
    (`exit`, `trap`, `cd`...) in its place. Raises FileNotFoundError with the reason.
    """
    if "/" in name:
        path = Path(name) if os.path.isabs(name) else workdir / name
        if not path.is_file() or not os.access(path, os.X_OK):
            raise FileNotFoundError(f"no such executable: {name}")
        return name  # relative paths stay relative: the wrapper runs in workdir
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(f"no such executable on PATH: {name}")
    return os.path.abspath(found)


@dataclass(frozen=True)
class ProcInfo:
    """What identifies a process across pid reuse: its start time, and whether it is a zombie."""

    start: float  # clock ticks since boot on Linux (exact); create_time elsewhere
    zombie: bool


def proc_info(pid: int) -> ProcInfo | None:
    """The process `pid` as it is now, or None when there is none."""
    if pid <= 0:
        return None
    if _HAVE_PROC:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            return None
        # The command name (field 2) may hold spaces or ')'; fields after the last ')'
        # start at 3 (state); starttime is field 22.
        fields = data[data.rindex(b")") + 2:].split()
        return ProcInfo(start=float(fields[19]), zombie=fields[0] in (b"Z", b"X"))
    try:
        p = psutil.Process(pid)
        return ProcInfo(start=p.create_time(), zombie=p.status() == psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def same_start(a: float, b: float) -> bool:
    # Ticks compare exactly; psutil's create_time carries float noise from boot time.
    return a == b if _HAVE_PROC else abs(a - b) < 1.0


def boot_id() -> str:
    """Changes on every reboot: a task recorded under another boot id is gone for sure."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"boot-{int(psutil.boot_time())}"


def group_is_ours(pgid: int, start: float) -> bool:
    """May we signal process group `pgid`, led by a process that started at `start`?

    Yes while the leader is that very process (alive or zombie). Yes as well when no
    process has that pid: Linux keeps a pid number allocated while it is any live
    process's group id, so members left in the group are ours. No when a different
    process holds the pid: the group is gone and the number was reused.
    """
    info = proc_info(pgid)
    return info is None or same_start(info.start, start)


def signal_group(pgid: int, sig: int) -> bool:
    """killpg that treats a vanished group as done. Returns whether a signal was sent."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def find_wrapper(exit_path: Path) -> int:
    """The pid of a live wrapper whose argv names `exit_path` (0 when none).

    Only for an attempt whose agent died between spawn and recording the pid: slow (reads
    every process's argv), and that window is tiny.
    """
    want = str(exit_path)
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info.get("cmdline") or []
            if len(cmd) > 4 and cmd[3] == WRAPPER_NAME and cmd[4] == want and os.getsid(p.pid) == p.pid:
                return p.pid
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return 0


def write_json_atomic(path: Path, doc: dict[str, Any], *, mode: int = 0o600, durable: bool = True) -> None:
    """`doc` as JSON, all or nothing (`write_atomic`). Raises OSError.
    Mode 0600 by default: specs carry env secrets."""
    write_atomic(path, (json.dumps(doc, sort_keys=True) + "\n").encode(), mode=mode, durable=durable)
