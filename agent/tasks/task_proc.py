"""Process-level helpers for `lepton.agent.tasks.runner` and the attempt fence: exit codes,
process identity (to tell a live task from a reused pid), signalling a task's process group,
and small durable-file helpers. No asyncio here, and nothing that imports torch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, NamedTuple

from lepton.common.durable import write_atomic

_MAX_SIGNAL = int(getattr(signal, "SIGRTMAX", 64))
_HAVE_PROC = os.path.isdir("/proc/self")


FENCED_MARK = "fenced"  # in the attempt's folder: the fence killed it (lease ran out; fence.py)
FENCED_NOTE = b"lepton: fenced: this node lost the leader past the attempt's lease; killing the attempt\n"


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

    Returns an absolute path for bare names (a shell builtin such as `exit` is no program). Raises FileNotFoundError with the reason.
    """
    if "/" in name:
        path = Path(name) if os.path.isabs(name) else workdir / name
        if not path.is_file() or not os.access(path, os.X_OK):
            raise FileNotFoundError(f"no such executable: {name}")
        return name  # relative paths stay relative: the attempt runs in workdir
    search = env.get("PATH", os.defpath)
    if (hit := _FOUND.get((name, search))) is not None and time.monotonic() < hit[1]:
        return hit[0]
    found = shutil.which(name, path=search)
    if found is None:
        raise FileNotFoundError(f"no such executable on PATH: {name}")
    if len(_FOUND) >= 256:
        _FOUND.clear()
    _FOUND[(name, search)] = (found := os.path.abspath(found)), time.monotonic() + FOUND_TTL_S
    return found


# Bare names found on a PATH, briefly: a batch of the same command looks it up once (a stat
# per PATH entry each time). Only what was found is kept, so a program just installed is seen.
FOUND_TTL_S = 2.0
_FOUND: dict[tuple[str, str], tuple[str, float]] = {}


class ProcInfo(NamedTuple):
    """What identifies a process across pid reuse: its start time, and whether it is a zombie.
    (Not a dataclass: the fence imports this module, and dataclasses costs it ~1 MB.)"""

    start: float  # clock ticks since boot on Linux (exact); create_time elsewhere
    zombie: bool
    stopped: bool = False  # by a signal (SIGSTOP, SIGTSTP; not a tracer's stop)


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
        return ProcInfo(start=float(fields[19]), zombie=fields[0] in (b"Z", b"X"), stopped=fields[0] == b"T")
    import psutil  # only where there is no /proc: the fence imports this module, and stays small

    try:
        p = psutil.Process(pid)
        status = p.status()
        return ProcInfo(start=p.create_time(), zombie=status == psutil.STATUS_ZOMBIE,
                        stopped=status == psutil.STATUS_STOPPED)
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
        import psutil

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
    """killpg that treats a vanished group as done. Returns whether a signal was sent.
    A pgid under 2 is never signalled: 0 is the caller's own group (an attempt whose spawn
    is still pending has pid 0) and 1 is init's."""
    if pgid < 2:
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def mark_fenced(att_dir: Path) -> bool:
    """Leave the attempt's `fenced` mark and a line in its output, once (the fence and the
    agent may both fence it). Returns whether this call left them."""
    try:
        os.close(os.open(att_dir / FENCED_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    except OSError:
        pass  # its folder is gone or unwritable: the kill still matters
    try:
        with open(att_dir / "output.log", "ab") as f:
            f.write(FENCED_NOTE)
    except OSError:
        pass
    return True


def write_json_atomic(path: Path, doc: dict[str, Any], *, mode: int = 0o600, durable: bool = True) -> None:
    """`doc` as JSON, all or nothing (`write_atomic`). Raises OSError.
    Mode 0600 by default: specs carry env secrets."""
    write_atomic(path, (json.dumps(doc, sort_keys=True) + "\n").encode(), mode=mode, durable=durable)
