"""Idle RSS, CPU and wake-ups of an agent: a dev-mode voter (its coordinator included), then
a worker joined to it.

Prints one JSON object with one entry per measured process (`voter`: alone, beside
`baseline_grpc_idle`: a bare grpc.aio server doing nothing, the floor gRPC's own threads set;
`worker`, and `voter_with_worker`: the voter watching it, beside `baseline_grpc_stream`: one
process holding both ends of a bare grpc.aio bidi stream with a message a second each way,
what a heartbeat stream costs gRPC's threads alone, over the same window; with
`--role raft`, three voters of one Raft cluster, `raft_0` .. `raft_2`, `raft_heartbeat_s`
apart):
- cpu_percent: of one core, averaged over the window; rss_mb / uss_mb: at the end.
- loop_wakeups_per_s: the asyncio loop's select() returns that could have slept, counted by
  the agent itself (LEPTON_COUNT_WAKEUPS=1, lepton.agent.wakeups; read via SIGUSR1).
- thread_wakeups_per_s: voluntary context switches of all its threads (/proc/PID/task/*/
  status): every time any thread (gRPC's pollers, the loop) slept and woke.
A node's attempt fence (agent/tasks/fence.py) is a process of its own, started at the node's
first spawn (an idle agent that never ran a task has none: `fence` is null then): each
agent's entry holds `agent` (that process alone), `fence` (its fence alone, when one runs)
and, at the top, their sums (cpu_percent, rss_mb, uss_mb, thread_wakeups_per_s, threads):
the node's footprint, which is what the targets are about.
Targets (issue 15), per node: CPU <= 1 %, RSS <= 60 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

from lepton.agent.tasks import fence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Agent, emit, free_port  # noqa: E402

SETTLE_S = 3.0  # past start-up: registration, first inventory, the first usage samples
IDLE_GRPC_SERVER = """
import asyncio, grpc
async def main():
    server = grpc.aio.server()
    server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await asyncio.Event().wait()
asyncio.run(main())
"""
# Both ends of one bidi stream in one process: a message a second, answered every second
# one (as heartbeats are).
GRPC_STREAM_1HZ = """
import asyncio, grpc
async def answer_every_second(requests, context):
    n = 0
    async for request in requests:
        n += 1
        if n % 2 == 0:
            yield request
async def main():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Idle", {"Beat": grpc.stream_stream_rpc_method_handler(answer_every_second)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    call = grpc.aio.insecure_channel(f"127.0.0.1:{port}").stream_stream("/bench.Idle/Beat")()
    async def read():
        async for _ in call:
            pass
    reader = asyncio.create_task(read())
    while True:
        await call.write(b"beat")
        await asyncio.sleep(1.0)
asyncio.run(main())
"""


def thread_wakeups(pid: int) -> int:
    """Voluntary context switches summed over the process's threads (0 where /proc lacks them)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
        except OSError:
            continue  # the thread ended
    return total


def loop_wakeups(agent: Agent | subprocess.Popen) -> int:
    """Ask the agent for its loop's count (SIGUSR1) and read it; 0 for the baseline."""
    if not isinstance(agent, Agent):
        return 0
    dump = agent.data_dir / "loop_wakeups.json"
    before = dump.stat().st_mtime_ns if dump.exists() else 0
    os.kill(agent.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if dump.exists() and dump.stat().st_mtime_ns != before:
            try:
                return json.loads(dump.read_text())["wakeups"]
            except (ValueError, KeyError):
                pass  # replaced as we read: read again
        time.sleep(0.02)
    raise RuntimeError(f"{agent.data_dir.name} wrote no loop_wakeups.json (LEPTON_COUNT_WAKEUPS unset?)")


def fence_pid(agent: Agent) -> int:
    """The pid of the agent's attempt fence, which it writes in its lock file; 0 when none runs."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((agent.data_dir / fence.LOCK_NAME).read_text())
        if psutil.pid_exists(pid):
            return pid
    return 0


class Sample:
    """CPU time, loop and thread wake-ups of one process (an agent, its fence, a baseline)
    at one moment."""

    def __init__(self, agent: Agent | subprocess.Popen | int):
        pid = agent if isinstance(agent, int) else agent.proc.pid if isinstance(agent, Agent) else agent.pid
        self.proc = psutil.Process(pid)
        self.counted = isinstance(agent, Agent)
        self.loop = loop_wakeups(agent) if self.counted else 0
        self.cpu = sum(self.proc.cpu_times()[:2])
        self.threads = thread_wakeups(pid)
        self.at = time.monotonic()

    def since(self, start: Sample) -> dict:
        window = self.at - start.at
        mem = self.proc.memory_full_info()
        return {
            "seconds": round(window, 1),
            "cpu_percent": round(100 * (self.cpu - start.cpu) / window, 2),
            # Less the 1 our own SIGUSR1 caused.
            "loop_wakeups_per_s": round((self.loop - start.loop - 1) / window, 2) if self.counted else None,
            "thread_wakeups_per_s": round((self.threads - start.threads) / window, 1),
            "rss_mb": round(mem.rss / 2**20, 1),
            "uss_mb": round(mem.uss / 2**20, 1),
            "threads": self.proc.num_threads(),
        }


SUMMED = ("cpu_percent", "thread_wakeups_per_s", "rss_mb", "uss_mb", "threads")


def measure(agents: dict[str, Agent | subprocess.Popen], seconds: float) -> dict[str, dict]:
    """Each process over one window; an agent together with its fence (see the module doc)."""
    time.sleep(SETTLE_S)
    procs: dict[str, Agent | subprocess.Popen | int] = dict(agents)
    fences = {name: f"{name}/fence" for name, a in agents.items() if isinstance(a, Agent) and fence_pid(a)}
    procs.update({fences[name]: fence_pid(agents[name]) for name in fences})
    starts = {name: Sample(p) for name, p in procs.items()}
    time.sleep(seconds)
    alone = {name: Sample(p).since(starts[name]) for name, p in procs.items()}
    out = {}
    for name in agents:
        if name not in fences:
            out[name] = {**alone[name], "fence": None} if isinstance(agents[name], Agent) else alone[name]
            continue
        agent, fenced = alone[name], alone[fences[name]]
        node = {key: round(agent[key] + fenced[key], 2) for key in SUMMED}
        out[name] = {**node, "seconds": agent["seconds"], "agent": agent, "fence": fenced}
    return out


def raft_cluster(stack: ExitStack, raft_heartbeat_s: float) -> dict[str, Agent]:
    """Three voters of one Raft cluster (leader and followers: each wakes for Raft beats)."""
    ports = [free_port() for _ in range(3)]
    peers = ",".join(f"127.0.0.1:{port}" for port in ports)
    voters: dict[str, Agent] = {}
    for i, port in enumerate(ports):
        root = voters["raft_0"].root if voters else None
        voters[f"raft_{i}"] = agent = Agent("--peers", peers, "--raft-heartbeat", str(raft_heartbeat_s),
                                            name=f"raft{i}", port=port, root=root)
        stack.callback(agent.stop)
    time.sleep(SETTLE_S)  # an election
    return voters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0, help="each measuring window")
    p.add_argument("--role", choices=("voter", "worker", "both", "raft"), default="both")
    p.add_argument("--raft-heartbeat", type=float, default=0.1, help="with --role raft (the default is 0.1 s)")
    args = p.parse_args()
    os.environ["LEPTON_COUNT_WAKEUPS"] = "1"  # the agents inherit it
    out: dict = {"targets": {"cpu_percent": 1.0, "rss_mb": 60.0}}
    with ExitStack() as stack:
        grpc_idle = subprocess.Popen([sys.executable, "-c", IDLE_GRPC_SERVER])
        stack.callback(grpc_idle.wait)
        stack.callback(grpc_idle.kill)
        if args.role == "raft":
            out["raft_heartbeat_s"] = args.raft_heartbeat
            out.update(measure({**raft_cluster(stack, args.raft_heartbeat), "baseline_grpc_idle": grpc_idle},
                               args.seconds))
            emit(out)
            return
        voter = Agent(name="voter")
        stack.callback(voter.stop)  # stopped last: the worker leaves through it
        if args.role in ("voter", "both"):
            out.update(measure({"voter": voter, "baseline_grpc_idle": grpc_idle}, args.seconds))
        if args.role in ("worker", "both"):
            worker = Agent("--join", voter.address, name="worker", root=voter.root)
            stack.callback(worker.stop)
            grpc_stream = subprocess.Popen([sys.executable, "-c", GRPC_STREAM_1HZ])
            stack.callback(grpc_stream.wait)
            stack.callback(grpc_stream.kill)
            out.update(measure({"worker": worker, "voter_with_worker": voter, "baseline_grpc_stream": grpc_stream},
                               args.seconds))
        emit(out)


if __name__ == "__main__":
    main()
