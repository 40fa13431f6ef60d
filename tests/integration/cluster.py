"""Real `lepton-agent` processes on loopback, with temp dirs and millisecond timings
(Nomad's TestServer in spirit). Used by every integration test."""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lepton.agent import shard_scratch

# Fast timings so failure detection takes a second, not minutes, in tests.
FAST = [
    "--heartbeat-interval", "0.2",
    "--suspect-after", "0.6",
    "--down-after", "1.0",
    "--failover-grace", "1.0",
]


def _ports_below_ephemeral() -> range | None:
    """Ports no outgoing connection is ever given: those below the kernel's ephemeral range."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(10000, low) if low > 12000 else None


_PORT_POOL = _ports_below_ephemeral()
_PORT_PICKS = random.SystemRandom()  # not the global generator a test may seed
_handed_out: set[int] = set()


def free_port(host: str = "") -> int:
    """A port for an agent to bind later on `host` (all IPv4 interfaces if empty). One the
    kernel gives for port 0 is ephemeral: between our close and the agent's bind, any
    process's outgoing connection may take it (likelier with parallel pytest workers). So
    it is drawn at random below that range, which only explicit binds use, checked free,
    and never handed out twice in this process; concurrent workers and sessions (which
    share this host) draw apart by chance."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200 if _PORT_POOL else 0):
        port = _PORT_PICKS.choice(_PORT_POOL)
        if port in _handed_out:
            continue
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(family) as s:
        s.bind((host or "127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; return its value. Not a timing assertion: the
    timeout only bounds a hang."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - the cluster may still be starting
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_exc})")


def others_can_pass(path: Path) -> bool:
    """Whether a user with no rights of its own (a task user) can reach `path`."""
    real = Path(os.path.realpath(path))
    return all(p.stat().st_mode & 0o001 for p in (real, *real.parents))


def others_can_exec(program: str) -> bool:
    """Whether a process of a task user (not root, no groups) may exec `program`."""
    real = Path(os.path.realpath(program))
    return bool(real.stat().st_mode & 0o001) and others_can_pass(real.parent)


_PASSABLE_ROOT: Path | None = None


def passable_folder(name: str) -> Path:
    """A new 0700 folder in this session's 0711 folder under the temp dir (removed at exit)."""
    global _PASSABLE_ROOT
    if _PASSABLE_ROOT is None:
        _PASSABLE_ROOT = Path(tempfile.mkdtemp(prefix="lepton-agents-"))
        os.chmod(_PASSABLE_ROOT, 0o711)
        atexit.register(shutil.rmtree, _PASSABLE_ROOT, True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_PASSABLE_ROOT))


def passable_data_dir(root: Path, name: str) -> Path:
    """`root/name` as a data dir an agent running tasks as nobody (the default as root) may
    use: pytest's base folder is 0700 (and reset so by every session sharing it), so when
    `root` is not passable the folder lives in this session's 0711 folder under the temp
    dir, and `root/name` links there (tests keep naming it under their tmp_path; what a test
    put there before moves along). Returns the real folder."""
    link = root / name
    if link.is_symlink():
        return Path(os.path.realpath(link))
    root.mkdir(parents=True, exist_ok=True)
    if others_can_pass(root):
        link.mkdir(exist_ok=True)
        return link
    real = passable_folder(name)
    if link.is_dir():
        for entry in link.iterdir():
            shutil.move(str(entry), str(real / entry.name))
        link.rmdir()
    link.symlink_to(real)
    return real


class AgentProcess:
    def __init__(self, root: Path, name: str, args: list[str] | None = None, port: int | None = None):
        self.name = name
        self.data_dir = passable_data_dir(root, name)
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.args = list(args or [])
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / "agent.log"

    def start(self, timeout: float = 20.0) -> AgentProcess:
        runtime = self.data_dir / "agent.json"
        if runtime.exists():
            runtime.unlink()  # stale after a kill -9
        # Metrics keep their default (off) unless a test asks: agents sharing a host coexist.
        cmd = [sys.executable, "-m", "lepton.agent.main", "--data-dir", str(self.data_dir),
               "--listen", self.address, "--name", self.name, *FAST, *self.args]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent {self.name} exited {self.proc.returncode}:\n{self.log()}")
            return runtime.exists() and json.loads(runtime.read_text())["pid"] == self.proc.pid

        wait_until(ready, timeout=timeout, what=f"agent {self.name} to start")
        self.node_id = (self.data_dir / "node_id").read_text().strip()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running {timeout:g}s after SIGTERM; its log ends:\n"
                                 f"{self.log()}") from None

    def wait_fence_gone(self) -> None:
        """Once the agent has stopped, wait for its attempt fence to exit: a process of its own
        that lingers a moment with no agent connected, then removes its socket, so wiping the
        data dir before then races it (rmtree failed on the vanished socket under load)."""
        try:
            pid = int((self.data_dir / "task-fence.lock").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return  # no fence was started

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_until(gone, timeout=60, what=f"{self.name}'s attempt fence to exit")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        # The shard scratch folders its torch tasks left in /dev/shm: an agent restarted on this
        # data dir would remove them, but a test's data dir is never started again.
        shard_scratch.remove(shard_scratch.stale(self.data_dir, ()))


def run_ctl(*args: str, server: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the real `lepton-ctl` in a subprocess."""
    cmd = [sys.executable, "-m", "lepton.client.cli", "--server", server, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"lepton-ctl {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out


RAFT_FAST = ["--raft-heartbeat", "0.05", "--election-timeout", "0.5"]


def start_voters(start, n: int = 3, *extra: str) -> list[AgentProcess]:
    """Start n voters that elect a coordinator among themselves (`start` is the `agents`
    fixture). Their ports are fixed up front because each must name all the others."""
    ports = [free_port() for _ in range(n)]
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    return [start(f"voter-{i + 1}", "--peers", peers, *RAFT_FAST, *extra, port=port)
            for i, port in enumerate(ports)]


def start_etcd_candidates(start, endpoints: list[str], n: int = 2, *extra: str) -> list[AgentProcess]:
    """Start n coordinator candidates keeping the state in the etcd at `endpoints` (issue 18);
    `start` is the `agents` fixture. Each links to all (their ports are fixed up front)."""
    ports = [free_port() for _ in range(n)]
    state = "etcd://" + ",".join(endpoints)
    everyone = ",".join(f"127.0.0.1:{p}" for p in ports)
    return [start(f"candidate-{i + 1}", "--state", state, "--join", everyone, *extra, port=port)
            for i, port in enumerate(ports)]


def servers(voters: list[AgentProcess]) -> str:
    return ",".join(v.address for v in voters)


def leader_of(client, voters: list[AgentProcess]) -> AgentProcess:
    address = client.cluster_status().leader
    return next(v for v in voters if v.address == address)
