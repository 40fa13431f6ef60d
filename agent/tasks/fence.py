"""The node's attempt fence: one process per agent data dir that spawns every task attempt,
is its parent, records how each ended, and kills them once the node's attempt lease runs out.

Why a process of its own: attempts outlive the agent (a kill -9, a restart), and whatever
must still happen then has to live outside it. The fence
- spawns each attempt directly (argv exec'd; `/bin/sh -c` only for shell tasks) in a
  session of its own, stdout and stderr on output.log, and records it in run.json (one
  write, with the pid) before it lets it run (gate.py: a fence killed in between leaves
  nothing running unrecorded): a shell task costs one fork and one exec, a command given
  as argv one exec more (the gate's shell);
- is every attempt's parent, so it learns each exit status, even with the agent dead:
  it SIGKILLs what is left in the ended attempt's process group (its zombie leader keeps
  the group id from reuse), writes exit.json (`{"rc": N}`, the shell's `$?` convention:
  128+N for signal N) and only then reaps it, then tells the watching agent;
- self-fences: for every attempt spawned with a lease file (lease.py; not those marked
  keep_on_disconnect), it compares the lease's expiry with CLOCK_BOOTTIME at least every
  TICK_S and, once it has run out (the agent is dead, hung or cut off from the leader),
  leaves a `fenced` mark and a line in output.log and SIGKILLs the attempt's group. It needs
  nothing from the agent. Attempts of a fence that died are orphans: the next agent hands
  them to the new fence (`adopt`), which fences them too but cannot learn their status.

It runs as `python -m lepton.agent.tasks.fence DATA_DIR`: it takes DATA_DIR/task-fence.lock
and writes its pid there (another fence holds it: exit 3, the agent connects to that one),
listens on DATA_DIR/task-fence.sock (mode 0600, peers must be this uid), then forks: the
launcher exits 0 once the socket listens, so the fence is not the agent's child. It exits
once it has had no agent connected and no attempt held for LINGER_S. Protocol: one JSON
object per line.
  {"op": "watch"}  -> {"held": [[task, attempt, pid], ...]}, then {"exit": [task, attempt],
                      "pid": P, "rc": N, "size": output.log's size or -1} per ended
                      attempt, for as long as the connection lasts
  {"op": "spawn", "items": [{key, argv, env, cwd, dir, lease, run}]}
                   -> {"results": [{"pid", "start", "started_at_ms"} or {"error"}]}
  {"op": "adopt", "items": [{key, pid, start, dir, lease}]}  -> {"ok": true}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton.agent.tasks import gate
from lepton.agent.tasks import task_proc as tp
from lepton.common.failover import FENCE_CHECK_S

if TYPE_CHECKING:  # imported when a large batch first needs it: an idle fence stays small
    from concurrent.futures import ThreadPoolExecutor

SOCKET_NAME = "task-fence.sock"
LOCK_NAME = "task-fence.lock"
LOG_NAME = "task-fence.log"
TICK_S = FENCE_CHECK_S  # lease checks while an attempt with a lease is held (the leader waits for it)
SPAWN_THREADS = 4  # more gains little on a few cores: a spawn is mostly the kernel's work
LINGER_S = 2.0  # with no agent and no attempt, this long before it exits (an agent restarting)
MAX_OUTBOX = 4 << 20  # an agent this far behind (hung) is dropped: it rescans when it is back
ANOTHER_FENCE = 3  # the launcher's exit status when a fence already holds the lock


def socket_address(data_dir: Path, dir_fd: int | None) -> str:
    """The socket's address. Through an open folder (/proc/self/fd/N/...) where there is a
    /proc, so a long data dir never exceeds the 108 bytes of a unix socket path."""
    if dir_fd is not None and os.path.isdir("/proc/self/fd"):
        return f"/proc/self/fd/{dir_fd}/{SOCKET_NAME}"
    return str(data_dir / SOCKET_NAME)


def boottime_cs() -> int:
    """CLOCK_BOOTTIME in centiseconds, the lease file's clock (lease.now_cs)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * 100)


def read_lease_cs(path: str) -> int:
    """The lease's expiry; 0 (run out) when it is unreadable or garbled."""
    try:
        with open(path, "rb") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


class Held:
    """An attempt the fence holds. A plain class: dataclasses costs an idle fence ~1 MB."""

    __slots__ = ("child", "dir", "fenced", "key", "lease", "pid", "popen", "start")

    def __init__(self, key: tuple[str, int], pid: int, start: float, dir: Path, lease: str, *,  # noqa: A002
                 child: bool = True, popen: subprocess.Popen[bytes] | None = None):
        self.key = key
        self.pid = pid  # also the process group and session id
        self.start = start
        self.dir = dir
        self.lease = lease  # "" for none: never fenced
        self.child = child  # spawned by this fence (else adopted from a dead one: no exit status)
        self.popen = popen  # kept so subprocess never reaps it behind our back
        self.fenced = False


class _Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbox = b""
        self.outbox = bytearray()
        self.watching = False


class Fence:
    def __init__(self, listener: socket.socket):
        self._listener = listener
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        self.held: dict[int, Held] = {}  # by pid
        self._pool: ThreadPoolExecutor | None = None
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wake-up fd hears it
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self._sel.register(listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "child")

    def serve(self) -> None:
        next_tick = 0.0
        idle_since = time.monotonic()  # the launching agent connects within a moment
        while self._conns or self.held or time.monotonic() - idle_since < LINGER_S:
            fenced = bool(self.held)  # not a walk per wake-up: the tick skips what has no lease
            timeout = max(0.0, next_tick - time.monotonic()) if fenced else None
            if not self._conns and not self.held:
                timeout = max(0.0, idle_since + LINGER_S - time.monotonic())
            try:
                self._turn(timeout)
                if fenced and time.monotonic() >= next_tick:
                    self._tick()
                    next_tick = time.monotonic() + TICK_S
            except Exception:  # a bug must not end the fence, and with it every attempt's fencing
                traceback.print_exc(file=sys.stderr)
                sys.stderr.flush()
                time.sleep(0.1)  # and must not spin
            if self._conns or self.held:
                idle_since = time.monotonic()
        # Nobody watches and nothing is held: go, and let the next agent start a new fence.

    def _turn(self, timeout: float | None) -> None:
        for sel_key, events in self._sel.select(timeout):
            what = sel_key.data
            if what == "accept":
                self._accept()
            elif what == "child":
                with contextlib.suppress(OSError):
                    while os.read(self._wake_r, 4096):
                        pass
                self._reap()
            else:
                self._service(what, events)
        self._reap()  # a SIGCHLD that came while we spawned has woken us already; cheap anyway

    # ---- connections ---------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():  # only this node's agent (its user) may spawn here
            sock.close()
            return
        sock.setblocking(False)
        conn = self._conns[sock.fileno()] = _Conn(sock)
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()

    def _service(self, conn: _Conn, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._flush(conn)
        if not events & selectors.EVENT_READ or conn.sock.fileno() < 0:
            return
        try:
            data = conn.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.inbox += data
        while b"\n" in conn.inbox and conn.sock.fileno() >= 0:
            line, conn.inbox = conn.inbox.split(b"\n", 1)
            try:
                reply = self._handle(conn, json.loads(line))
            except (ValueError, TypeError, KeyError) as err:
                reply = {"error": f"bad request: {err}"}
            except Exception as err:  # a bug: the agent hears of it at once, not after its timeout
                traceback.print_exc(file=sys.stderr)
                reply = {"error": f"internal error: {err!r}"}
            if reply is None:
                self._close(conn)
                return
            self._send(conn, reply)

    def _send(self, conn: _Conn, doc: dict[str, Any], *, event: bool = False) -> None:
        conn.outbox += json.dumps(doc).encode() + b"\n"
        if event and len(conn.outbox) > MAX_OUTBOX:
            print(f"fence: dropping an agent {len(conn.outbox)} bytes behind", file=sys.stderr, flush=True)
            self._close(conn)
            return
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        del conn.outbox[:sent]
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbox else 0)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(conn.sock, mask, conn)

    def _handle(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any] | None:
        """The reply; None to drop the connection unanswered."""
        op = req.get("op")
        if op == "watch":
            conn.watching = True
            return {"held": [[*h.key, h.pid] for h in self.held.values()]}
        if op == "spawn":
            items = req["items"]
            if _hung_up(conn.sock):
                # Its agent gave up waiting (we were stopped or slow) and takes the batch for
                # in doubt: it finds what runs by run.json and our held list, so what we have
                # not started must stay unstarted (its retry may run elsewhere).
                print(f"fence: dropping a spawn of {len(items)} attempt(s): the agent hung up",
                      file=sys.stderr, flush=True)
                return None
            if len(items) <= 1:
                return {"results": [self._spawn(item) for item in items]}
            # fork_exec lets go of the GIL: while one thread waits for its child to exec,
            # others spawn theirs. Exits are reaped by this thread once the batch is done.
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(SPAWN_THREADS, thread_name_prefix="spawn")
            return {"results": list(self._pool.map(self._spawn, items))}
        if op == "adopt":
            for item in req["items"]:
                pid = int(item["pid"])
                if pid > 0 and pid not in self.held:
                    self.held[pid] = Held((str(item["key"][0]), int(item["key"][1])), pid, float(item["start"]),
                                          Path(item["dir"]), str(item["lease"]), child=False)
            return {"ok": True}
        return {"error": f"unknown op {op!r}"}

    # ---- attempts ------------------------------------------------------------------------

    def _spawn(self, item: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._spawn_one(item)
        except Exception as err:  # a bug must not lose the rest of the batch, nor the fence
            print(f"fence: spawning {item.get('key')} failed: {err!r}", file=sys.stderr, flush=True)
            return {"error": f"internal error: {err}"}

    def _spawn_one(self, item: dict[str, Any]) -> dict[str, Any]:
        att_dir = Path(item["dir"])
        try:
            log_fd = os.open(att_dir / "output.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as err:
            return {"error": f"cannot write {att_dir}: {err}"}
        try:
            # It waits at its gate until run.json names it (gate.py): killed before that, we
            # leave nothing running that no record finds.
            gated = gate.spawn_gated(item["argv"], item["env"], item["cwd"], log_fd)
        except (OSError, ValueError, TypeError, subprocess.SubprocessError) as err:
            return {"error": str(err)}
        finally:
            os.close(log_fd)
        info = tp.proc_info(gated.pid)  # our unreaped child: present, if only as a zombie
        started = {"pid": gated.pid, "start": info.start if info else 0.0, "started_at_ms": int(time.time() * 1000)}
        try:
            # Not fsync'd: it serves a restart in this boot; a power cut ends every attempt.
            tp.write_json_atomic(att_dir / "run.json", {**item["run"], **started}, durable=False)
        except OSError as err:
            gate.close_gate(gated)  # unrecorded, it never runs
            return {"error": f"cannot record the pid: {err}"}
        key = (str(item["key"][0]), int(item["key"][1]))
        self.held[gated.pid] = Held(key, gated.pid, started["start"], att_dir, str(item.get("lease") or ""),
                                    popen=gated.proc)
        gate.open_gate(gated)
        return started

    def _reap(self) -> None:
        """Record and reap every ended child: leftovers of its group killed, exit.json
        written, then reaped (so a reader who finds it gone finds exit.json), then told."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            pid = info.si_pid
            rc = info.si_status if info.si_code == os.CLD_EXITED else 128 + info.si_status
            held = self.held.pop(pid, None)
            size = -1
            if held is not None:
                tp.signal_group(pid, signal.SIGKILL)  # what the attempt left running dies with it
                with contextlib.suppress(OSError):  # in place: one write; torn reads as no record
                    with open(held.dir / "exit.json", "wb") as f:
                        f.write(b'{"rc": %d}\n' % rc)
                with contextlib.suppress(OSError):  # for the output cap: no stat on the agent's loop
                    size = os.stat(held.dir / "output.log").st_size
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            if held is None:
                continue
            if held.popen is not None:
                held.popen.returncode = rc
            for conn in list(self._conns.values()):
                if conn.watching:
                    self._send(conn, {"exit": list(held.key), "pid": pid, "rc": rc, "size": size}, event=True)

    def _tick(self) -> None:
        """Fence every held attempt whose lease has run out; forget adopted ones that ended."""
        now = boottime_cs()
        expiry: dict[str, int] = {}
        for held in list(self.held.values()):
            if not held.child:
                info = tp.proc_info(held.pid)
                if info is None or info.zombie or not tp.same_start(info.start, held.start):
                    del self.held[held.pid]  # ended: its agent reports it (no status to record)
                    continue
            if not held.lease or held.fenced:
                continue
            if held.lease not in expiry:
                expiry[held.lease] = read_lease_cs(held.lease)
            if now >= expiry[held.lease]:
                self._fence(held)

    def _fence(self, held: Held) -> None:
        held.fenced = True
        tp.mark_fenced(held.dir)
        if held.child or tp.group_is_ours(held.pid, held.start):
            tp.signal_group(held.pid, signal.SIGKILL)
        if not held.child:
            self.held.pop(held.pid, None)


def _hung_up(sock: socket.socket) -> bool:
    """The peer closed its end (and sent nothing more)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m lepton.agent.tasks.fence DATA_DIR", file=sys.stderr)
        return 2
    data_dir = Path(argv[0]).resolve()
    lock_fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return ANOTHER_FENCE
    dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    (data_dir / SOCKET_NAME).unlink(missing_ok=True)  # a dead fence's; we hold the lock
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_address(data_dir, dir_fd))
    os.chmod(data_dir / SOCKET_NAME, 0o600)
    listener.listen(64)
    os.close(dir_fd)
    if os.fork():
        os._exit(0)  # the launcher: the socket listens; the fence lives on, nobody's child
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, f"{os.getpid()}\n".encode())  # who fences this node (ps, tests)
    os.chdir("/")
    try:
        Fence(listener).serve()
    finally:
        # Still holding the lock: no new fence can bind before the socket is gone.
        with contextlib.suppress(OSError):
            (data_dir / SOCKET_NAME).unlink()
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
