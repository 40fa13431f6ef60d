"""Tasks at process speed (issue 15): N x `true` end to end on one real agent.

One `lepton-agent` on 127.0.0.1 is the whole cluster (voter and worker). For each N in
`--sizes` (default 100, 1,000, 10,000): `Client.submit_many` of N tasks running `true`
(default resources: cpu 0, so all of them may run at once), then wait until every one is
final. The time runs from the first submission until the leader recorded the last one
final (its finished_at), so the wait's polling adds nothing; every task must have
succeeded. Before each N, the spawn ceiling of this machine in the same run: plain
`subprocess.run(["true"])` one after another, for `--ceiling-spawns` processes.

Prints one JSON object:
- tasks_per_s: {N: tasks per second};
- spawn_ceiling_per_s: {N: the ceiling measured just before that N};
- over_ceiling: {N: tasks_per_s / ceiling} (target >= 0.4 at every N);
- flatness: tasks_per_s at the largest N / at the smallest (target >= 0.8);
- cpu_ms_per_task: {N: CPU time per task of the agent (voter and worker; with the children
  it reaped) and of its attempt fence (with the attempts it reaped)}: steadier than rates
  on a shared machine, where other load takes the cores;
- fence_ceiling_per_s: `true` spawned through the node's attempt fence (agent/tasks/fence.py,
  which every attempt runs under), one after another, each awaited until the fence reports
  its exit, no agent: what one task's processes and the fence's bookkeeping cost by themselves.
`--profile FILE` runs the agent under cProfile (its event loop thread) and writes the
stats there when it stops; `--top K` also prints the K costliest functions to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Agent, emit, free_port  # noqa: E402

from lepton.agent.tasks.fence_link import FenceLink  # noqa: E402
from lepton.client import Client  # noqa: E402

ACTIVE = ("pending", "assigned", "running")


def spawn_ceiling(count: int, argv: list[str] | None = None) -> float:
    """Processes per second that plain subprocess spawns `true` (or `argv`) at, one after another."""
    argv = argv or ["true"]
    start = time.perf_counter()
    for _ in range(count):
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
    return count / (time.perf_counter() - start)


def fence_ceiling(count: int) -> float:
    """Processes per second that a fence of its own spawns `true` at, one after another, each
    awaited until the fence reports its exit: a task's processes and records, no agent."""
    async def run(tmp: Path) -> float:
        ended = asyncio.Event()
        link = FenceLink(tmp, lambda *_: ended.set(), lambda: None)
        await link.open()
        argv = [shutil.which("true")]
        try:
            start = time.perf_counter()
            for i in range(count):
                att_dir = tmp / str(i)
                att_dir.mkdir()
                ended.clear()
                [result] = link.spawn([{"key": ["bench", i], "argv": argv, "env": {}, "cwd": str(tmp),
                                        "dir": str(att_dir), "run": {}, "lease": ""}])
                if "error" in result:
                    raise RuntimeError(f"the fence did not spawn true: {result['error']}")
                await ended.wait()
            return count / (time.perf_counter() - start)
        finally:
            await link.close()

    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(run(Path(tmp)))


def active_tasks(metrics_url: str) -> float | None:
    """Tasks not final yet, by the leader's metrics; None when a scrape had no task counts
    (the collector can miss a sample while the state changes under it, or fail: HTTP 500)."""
    try:
        text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    except urllib.error.HTTPError:
        return None
    counts = [line.rpartition(" ") for line in text.splitlines() if line.startswith("lepton_tasks{")]
    if not counts:
        return None
    return sum(float(value) for name, _, value in counts if any(f'state="{s}"' in name for s in ACTIVE))


def cpu_s(pid: int) -> float:
    """CPU seconds of process `pid` and of the children it reaped (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def node_cpu_s(agent: Agent) -> float:
    """The agent's CPU seconds and its attempt fence's (pid in task-fence.lock)."""
    try:
        fence_pid = int((agent.data_dir / "task-fence.lock").read_text())
    except (OSError, ValueError):
        fence_pid = 0
    return cpu_s(agent.proc.pid) + (cpu_s(fence_pid) if fence_pid else 0.0)


def run_n(client: Client, metrics_url: str, n: int, timeout_s: float) -> float:
    """Tasks per second for `n` x `true`, from submission to the last one recorded final."""
    t0_ms = time.time() * 1000
    done = client.submit_many([{"argv": ["true"], "name": "bench"} for _ in range(n)])
    ids = {t.id for t in done}
    deadline = time.monotonic() + timeout_s
    while active_tasks(metrics_url) != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} tasks not done after {timeout_s:g}s")
        time.sleep(0.5)  # the end time is the leader's; a scrape walks every task, so not often
    mine = [t for t in client.tasks() if t.id in ids]
    bad = [t for t in mine if t.state != "succeeded"]
    if len(mine) != n or bad:
        raise RuntimeError(f"{len(mine)} of {n} tasks found, {len(bad)} not succeeded "
                           f"(e.g. {bad[0].id} {bad[0].state})" if bad else f"{len(mine)} of {n} tasks found")
    last_ms = max(t.finished_at_ms for t in mine)
    return n / ((last_ms - t0_ms) / 1000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,1000,10000", help="comma-separated task counts")
    p.add_argument("--ceiling-spawns", type=int, default=1000, help="spawns timed for the ceiling")
    p.add_argument("--task-user", default="none",
                   help="the agent's --task-user (default none: tasks run as this user)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for one N")
    p.add_argument("--profile", default="", help="run the agent under cProfile, stats to this file")
    p.add_argument("--top", type=int, default=0, help="with --profile: print the K costliest functions")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        p.error("--sizes needs task counts >= 1")
    metrics_port = free_port()
    python_args = ("-m", "cProfile", "-o", os.path.abspath(args.profile)) if args.profile else ()
    # Finished tasks stay in the state (GC keeps 5,000 by default): every one is checked.
    agent = Agent("--metrics-listen", f"127.0.0.1:{metrics_port}", "--task-user", args.task_user,
                  "--gc-keep-finished", "1000000", name="tasks", python_args=python_args)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    rates: dict[str, float] = {}
    ceilings: dict[str, float] = {}
    cpu_ms: dict[str, float] = {}
    try:
        with Client(agent.address, timeout=120) as client:
            run_n(client, metrics_url, 10, args.timeout)  # warm-up: the node registered, paths cached
            for n in sizes:
                ceilings[str(n)] = round(spawn_ceiling(args.ceiling_spawns), 1)
                cpu0 = node_cpu_s(agent)
                rates[str(n)] = round(run_n(client, metrics_url, n, args.timeout), 1)
                cpu_ms[str(n)] = round((node_cpu_s(agent) - cpu0) * 1000 / n, 2)
        # Last: its folder's removal must not slow the runs above. On ext4 without a journal
        # (this project's VMs) a new inode is searched for past every inode freed in the
        # last minute or more (ext4's recently_deleted()), so files made just after many
        # were removed cost several times as much: a whole run's CPU per task doubled.
        fenced = round(fence_ceiling(max(50, args.ceiling_spawns // 4)), 1)
    finally:
        agent.stop()
    doc = {
        "sizes": sizes, "task_user": args.task_user,
        "tasks_per_s": rates, "spawn_ceiling_per_s": ceilings,
        "over_ceiling": {n: round(rates[n] / ceilings[n], 3) for n in rates},
        "fence_ceiling_per_s": fenced, "cpu_ms_per_task": cpu_ms,
        "flatness": round(rates[str(sizes[-1])] / rates[str(sizes[0])], 3),
    }
    if args.profile and args.top:
        pstats.Stats(args.profile, stream=sys.stderr).sort_stats("cumulative").print_stats(args.top)
        pstats.Stats(args.profile, stream=sys.stderr).sort_stats("tottime").print_stats(args.top)
    emit(doc)


if __name__ == "__main__":
    main()
