"""Spawning an attempt that cannot run before it is recorded (for the attempt fence, fence.py).

The fence spawns the attempt's process, writes its run.json (with the pid), and only then
lets it run its command. Until then the process waits at a gate: `/bin/sh` reading one line
from a pipe on its stdin, whose write end only the fence holds. The fence opens the gate
with that line; if the fence dies first (kill -9 between the spawn and the record), the
kernel closes the write end, the shell reads end-of-file and exits (status NOT_RUN) without
running anything. So "the command runs" implies "run.json names its pid": a fence killed
mid-spawn never leaves an attempt running unrecorded, which its agent would settle as not
started and the leader could run again elsewhere while this one ran on. Past the gate,
stdin is /dev/null again.

Why this and not the alternatives: a record written before the spawn cannot name the pid,
and finding unrecorded processes afterwards needs a cgroup per attempt (unprivileged agents
have none) or guesses from /proc (environment markers a task may drop). A gate in a forked
Python child (os.fork, then exec) took 2-3x the fence's CPU per spawn, in copy-on-write
faults (it has threads and a heap; subprocess's vfork copies nothing). The shell gate keeps
subprocess's vfork: a shell task's script runs in the gate's own shell (its first line is
the gate: no extra process); a command given as argv is exec'd by that shell, one exec more.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

SHELL = "/bin/sh"
GO = b"go\n"
NOT_RUN = 125  # the gate's exit status when it closed: nothing was run
# The gate, then stdin back on /dev/null. `read` takes one byte at a time up to the newline.
_GATE = f"read -r _ || exit {NOT_RUN}; exec </dev/null"


def gated_argv(argv: list[str], env: dict[str, str]) -> list[str]:
    """`argv` behind the gate: a shell task (`/bin/sh -c SCRIPT ...`) runs its script in the
    gate's shell, after the gate line; any other command is exec'd by it, with the
    environment it was given (the shell exports PWD: dropped unless `env` has one)."""
    if len(argv) >= 3 and argv[0] == SHELL and argv[1] == "-c":
        return [SHELL, "-c", f"{_GATE}\n{argv[2]}", *argv[3:]]
    unset = "" if "PWD" in (env or {}) else "unset PWD; "
    return [SHELL, "-c", f'{_GATE}; {unset}exec "$@"', "lepton-gate", *argv]


class Gated:
    """An attempt's process waiting at its gate."""

    __slots__ = ("fd", "proc")

    def __init__(self, proc: subprocess.Popen[bytes], fd: int):
        self.proc = proc  # kept so subprocess never reaps it behind the fence's back
        self.fd = fd  # the gate's write end: the fence's alone (close-on-exec)

    @property
    def pid(self) -> int:
        return self.proc.pid


def spawn_gated(argv: list[str], env: dict[str, str], cwd: str, log_fd: int) -> Gated:
    """Spawn `argv` in a session of its own, stdout and stderr on `log_fd`, held at its gate.
    Raises OSError, ValueError, TypeError or SubprocessError when it cannot be spawned (an
    executable that is missing or not executable included): then nothing runs."""
    if not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError("argv must be a non-empty list of strings")
    if os.path.dirname(argv[0]):  # the shell would find out only past the gate, as exit 126/127
        exe = os.path.join(cwd, argv[0])
        if not os.path.isfile(exe) or not os.access(exe, os.X_OK):
            err = FileNotFoundError if not os.path.exists(exe) else PermissionError
            raise err(f"cannot run {argv[0]}: {'no such file' if err is FileNotFoundError else 'not an executable file'}")
    read_end, write_end = os.pipe()  # both close-on-exec; the child gets read_end as stdin
    try:
        proc = subprocess.Popen(gated_argv(argv, env), stdin=read_end, stdout=log_fd, stderr=log_fd,
                                cwd=cwd, env=env, start_new_session=True, close_fds=True)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return Gated(proc, write_end)


def open_gate(gated: Gated) -> None:
    """Let it run (its record is written). A process that died at the gate is not told:
    the fence reaps it as any other."""
    try:
        os.write(gated.fd, GO)
    except BrokenPipeError:
        pass
    finally:
        os.close(gated.fd)


def close_gate(gated: Gated) -> None:
    """It must not run: it exits at the gate, reaped here."""
    os.close(gated.fd)
    with contextlib.suppress(ChildProcessError):
        gated.proc.wait()

