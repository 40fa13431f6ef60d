"""`lepton-ctl local up/down`: a cluster of real lepton-agent processes on loopback.

Layout under the data dir (default `./.lepton-local`):

    cluster.json          what `down` needs: agents (name, pid, address, data_dir, ...)
    agent-1/              agent-1's --data-dir; agent.log holds its stdout and stderr
    agent-2/ ...

Agents are detached (own session): they outlive `lepton-ctl local up` until `local down`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lepton.common.durable import write_atomic
from lepton.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LeptonError,
)

from .client import Client

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_VOTERS",
    "LocalAgent",
    "LocalCluster",
    "agent_args",
    "agent_command",
    "down",
    "load_cluster",
    "task_path",
    "up",
]

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = ".lepton-local"
# Raft is not merged yet: agent-1 is a one-voter cluster and the rest join it. Once it is,
# A local cluster is for trying things out on one host: each agent is a process of its own.
MAX_AGENTS = 32
# 3 makes a real quorum (the first 3 agents get --peers, the rest --join them).
# None: 3 voters (Raft) when there are at least 3 agents, else a single voter.
DEFAULT_VOTERS = None
DEFAULT_WAIT_S = 60.0
CLUSTER_FILE = "cluster.json"
LOG_FILE = "agent.log"
STOP_GRACE_S = 10.0
_POLL_S = 0.2
_AGENT_DIR = re.compile(r"agent-\d+")


@dataclass
class LocalAgent:
    name: str
    pid: int
    address: str
    data_dir: str
    log: str
    # Process start time (psutil): a pid alone may be reused by an unrelated process.
    create_time: float = 0.0
    # Its Prometheus endpoint (URL); each agent gets its own port, since they share a host.
    metrics: str = ""


@dataclass
class LocalCluster:
    """The contents of cluster.json."""

    agents: list[LocalAgent]
    servers: str
    voters: int
    data_dir: str
    started_at_ms: int = 0
    # The PATH the agents give tasks (their --task-path), and the `python` found on it.
    task_path: str = ""
    python: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LocalCluster:
        return cls(
            agents=[LocalAgent(**a) for a in d.get("agents", [])],
            servers=d.get("servers", ""),
            voters=int(d.get("voters", 0)),
            data_dir=d.get("data_dir", ""),
            started_at_ms=int(d.get("started_at_ms", 0)),
            task_path=d.get("task_path", ""),
            python=d.get("python", ""),
        )


def agent_command() -> list[str]:
    """How to start an agent: the `lepton-agent` script beside this Python, else `-m`."""
    script = Path(sys.executable).with_name("lepton-agent")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "lepton.agent.main"]


def task_path(env: dict[str, str] | None = None) -> str:
    """The PATH local agents give tasks: `$LEPTON_TASK_PATH` when set, else the folder of
    the Python running lepton-ctl (a venv's bin: its `python`, `pip`, `lepton-ctl`), then
    this PATH. So `python` in a task is the interpreter that has lepton and its packages."""
    env = dict(os.environ) if env is None else env
    if env.get("LEPTON_TASK_PATH"):
        return env["LEPTON_TASK_PATH"]
    here = os.path.dirname(os.path.abspath(sys.executable))  # not resolved: the venv's bin
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != here]
    return os.pathsep.join([here, *rest])


def agent_args(
    index: int, addresses: Sequence[str], voters: int, data_dir: Path, metrics_listen: str = ""
) -> list[str]:
    """Flags for agent `index` (0-based) of a local cluster whose agents listen on `addresses`.

    One voter: it gets neither --peers nor --join (a cluster of its own); the rest --join it.
    K voters: the first K get --peers (all K), the rest --join (all K).
    `metrics_listen`: this agent's --metrics-listen (empty: the agent's default).
    """
    name = f"agent-{index + 1}"
    args = ["--data-dir", str(data_dir / name), "--listen", addresses[index], "--name", name]
    if metrics_listen:
        args += ["--metrics-listen", metrics_listen]
    voter_addrs = ",".join(addresses[:voters])
    if index < voters:
        if voters > 1:
            args += ["--peers", voter_addrs]
    else:
        args += ["--join", voter_addrs]
    return args


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free right now (bound to port 0, then released: racy but brief)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)  # held until all are picked, so the n ports differ
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def load_cluster(data_dir: str | Path) -> LocalCluster | None:
    path = Path(data_dir) / CLUSTER_FILE
    try:
        return LocalCluster.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        raise FailedPrecondition(f"{path} is not a cluster file ({e}); remove it by hand") from None


def _save_cluster(cluster: LocalCluster) -> None:
    path = Path(cluster.data_dir) / CLUSTER_FILE
    # Atomic: `down` never reads half a file, nor an empty one after a crash.
    write_atomic(path, (json.dumps(cluster.to_dict(), indent=2, sort_keys=True) + "\n").encode())


def _create_time(pid: int) -> float:
    import psutil  # lazily: only `local` needs it

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _alive(agent: LocalAgent) -> bool:
    """Whether this agent's process still runs (and is the one we started)."""
    import psutil

    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(agent.pid, os.WNOHANG)  # reap it if it is our child, or it stays a zombie
    try:
        proc = psutil.Process(agent.pid)
        if agent.create_time and abs(proc.create_time() - agent.create_time) > 1.0:
            return False  # the pid now belongs to someone else
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(agent: LocalAgent, sig: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            # The agent leads its own session; its workers go with it.
            os.killpg(agent.pid, sig)
        else:
            os.kill(agent.pid, sig)


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [
                ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()
            ]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def _stop(agents: Sequence[LocalAgent], grace: float) -> tuple[list[str], list[str]]:
    """SIGTERM, wait up to `grace`, SIGKILL the rest. Returns (stopped, killed) names."""
    running = [a for a in agents if _alive(a)]
    for a in running:
        _signal(a, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(a) for a in running):
        time.sleep(0.1)
    killed = [a for a in running if _alive(a)]
    for a in killed:
        _signal(a, signal.SIGKILL, group=True)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_alive(a) for a in killed):
        time.sleep(0.05)
    return [a.name for a in running if a not in killed], [a.name for a in killed]


def up(
    data_dir: str | Path = DEFAULT_DATA_DIR,
    agents: int = 3,
    voters: int | None = DEFAULT_VOTERS,
    *,
    wait: float = DEFAULT_WAIT_S,
    agent_cmd: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> LocalCluster:
    """Start `agents` agents, wait until every one is a ready node, write cluster.json.

    On any failure the agents started so far are stopped again and the error names the
    log to read. `agent_cmd` replaces the agent executable (tests).
    """
    if not 1 <= agents <= MAX_AGENTS:
        raise InvalidArgument(f"--agents must be between 1 and {MAX_AGENTS}, got {agents}")
    if voters is None:
        voters = 3 if agents >= 3 else 1
    if not 1 <= voters <= agents:
        raise InvalidArgument(f"--voters must be between 1 and --agents ({agents}), got {voters}")
    root = Path(data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    old = load_cluster(root)
    if old is not None:
        live = [a for a in old.agents if _alive(a)]
        if live:
            pids = ", ".join(str(a.pid) for a in live)
            raise FailedPrecondition(
                f"a local cluster is already running in {data_dir} (pids {pids}); "
                f"run `lepton-ctl local down --data-dir {data_dir}` first"
            )
        log.info("removing stale %s", root / CLUSTER_FILE)

    say = progress or (lambda _msg: None)
    cmd = list(agent_cmd) if agent_cmd is not None else agent_command()
    ports = free_ports(2 * agents)  # gRPC, then metrics: all agents share this host
    addresses = [f"127.0.0.1:{p}" for p in ports[:agents]]
    metrics = [f"127.0.0.1:{p}" for p in ports[agents:]]
    servers = ",".join(addresses[:voters])
    cluster = LocalCluster(
        agents=[],
        servers=servers,
        voters=voters,
        data_dir=str(root),
        started_at_ms=int(time.time() * 1000),
        task_path=task_path(),
    )
    cluster.python = shutil.which("python", path=cluster.task_path) or ""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    env = dict(os.environ, PYTHONUNBUFFERED="1", LEPTON_TASK_PATH=cluster.task_path)
    if not env.get("LEPTON_TASK_USER"):
        # A local cluster runs your own code on your own files, as you: even as root, not as
        # the agents' default task user (nobody), who could not reach them.
        env["LEPTON_TASK_USER"] = "none"

    def start(i: int) -> None:
        args = agent_args(i, addresses, voters, root, metrics_listen=metrics[i])
        name = f"agent-{i + 1}"
        agent_dir = root / name
        agent_dir.mkdir(parents=True, exist_ok=True)
        log_path = agent_dir / LOG_FILE
        with open(log_path, "ab") as logf:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            logf.write(f"--- lepton-ctl local up {stamp}: {' '.join(cmd + args)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                cmd + args, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, env=env,
            )  # fmt: skip
        procs[name] = proc
        cluster.agents.append(
            LocalAgent(
                name, proc.pid, addresses[i], str(agent_dir), str(log_path), _create_time(proc.pid),
                metrics=f"http://{metrics[i]}/metrics",
            )
        )
        _save_cluster(cluster)  # after each start: `down` can clean up whatever happens next

    deadline = time.monotonic() + wait
    try:
        # Voters first, and only then the rest, so a joiner never races the cluster it joins.
        for i in range(voters):
            start(i)
        say(f"waiting for {voters} voter(s) to be ready")
        _wait_ready(cluster, procs, cluster.agents[:voters], deadline, wait)
        for i in range(voters, agents):
            start(i)
        if agents > voters:
            say(f"waiting for {agents - voters} more agent(s) to join")
        _wait_ready(cluster, procs, cluster.agents, deadline, wait)
    except BaseException:
        # KeyboardInterrupt included: no half-started cluster is left behind.
        _stop(cluster.agents, grace=5.0)
        with contextlib.suppress(FileNotFoundError):
            (root / CLUSTER_FILE).unlink()
        raise
    finally:
        for proc in procs.values():
            # The agents outlive us on purpose; stop Popen warning that they still run.
            proc.returncode = proc.returncode if proc.returncode is not None else 0
    return cluster


def _wait_ready(
    cluster: LocalCluster,
    procs: dict[str, subprocess.Popen[bytes]],
    expected: Sequence[LocalAgent],
    deadline: float,
    wait: float,
) -> None:
    """Poll `nodes list` until each of `expected` is a ready node at its own address."""
    pending: dict[str, str] | None = None  # name -> why not ready, from the last answer
    last_error = ""
    with Client(cluster.servers, timeout=2.0, connect_timeout=0.0) as client:
        while True:
            for a in expected:
                code = procs[a.name].poll()
                if code is not None:
                    last = _last_line(a.log)
                    detail = f' (last log line: "{last}")' if last else ""
                    raise FailedPrecondition(
                        f"{a.name} exited with code {code} before it was ready{detail}; see {a.log}"
                    )
            try:
                nodes = {n.name: n for n in client.nodes()}
            except LeptonError as e:
                last_error = e.message
                log.debug("not ready yet: %s", e)
            else:
                pending = {}
                for a in expected:
                    n = nodes.get(a.name)
                    if n is None:
                        pending[a.name] = "not registered"
                    elif n.address != a.address:
                        pending[a.name] = f"registered at {n.address}, not {a.address}"
                    elif n.state != "ready":
                        pending[a.name] = n.state
                if not pending:
                    return
            if time.monotonic() >= deadline:
                if pending is None:
                    first = expected[0]
                    raise DeadlineExceeded(
                        f"{first.name} not answering after {wait:g}s ({last_error}); see {first.log}"
                    )
                first = next(a for a in expected if a.name in pending)
                others = f" and {len(pending) - 1} more" if len(pending) > 1 else ""
                raise DeadlineExceeded(
                    f"{first.name}{others} not ready after {wait:g}s ({pending[first.name]}); see {first.log}"
                )
            time.sleep(_POLL_S)


def _wipe(folder: Path, tries: int = 5) -> None:
    """Remove an agent's data dir. Its attempt fence, a process of its own, outlives the
    agent by a moment and then removes its socket (an attempt may still write its output
    meanwhile): what vanishes under us is fine, what appears is removed on the next try."""

    def vanished_is_fine(func: Callable[..., Any], path: str, exc_info: Any) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    for attempt in range(tries):
        try:
            shutil.rmtree(folder, onerror=vanished_is_fine)
            return
        except FileNotFoundError:
            return
        except OSError:
            if attempt == tries - 1:
                raise
            time.sleep(0.2)


@dataclass
class DownResult:
    found: bool
    stopped: list[str]
    killed: list[str]
    wiped: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def down(
    data_dir: str | Path = DEFAULT_DATA_DIR, *, wipe: bool = False, grace: float = STOP_GRACE_S
) -> DownResult:
    """Stop the local cluster in `data_dir` (SIGTERM, then SIGKILL after `grace`).

    Data dirs stay unless `wipe`; then only the `agent-N` dirs go (and `data_dir` itself
    if that leaves it empty), never anything else a mistyped --data-dir points at.
    """
    root = Path(data_dir).resolve()
    cluster = load_cluster(root)
    stopped: list[str] = []
    killed: list[str] = []
    if cluster is not None:
        stopped, killed = _stop(cluster.agents, grace)
        with contextlib.suppress(FileNotFoundError):
            (root / CLUSTER_FILE).unlink()
    wiped: list[str] = []
    if wipe and root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and _AGENT_DIR.fullmatch(d.name):
                _wipe(d)
                wiped.append(d.name)
        with contextlib.suppress(OSError):
            root.rmdir()  # only if empty
    return DownResult(found=cluster is not None, stopped=stopped, killed=killed, wiped=wiped)
