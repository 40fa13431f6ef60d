"""A burst of submissions must not starve liveness (issue 14).

3 voters and 2 workers (real `lepton-agent` processes on 127.0.0.1, default timings)
while `--clients` processes each call `Client.submit_many` for their share of `--tasks`
tasks (1,000 per call). Meanwhile a probe node of our own beats every `--probe-interval`
seconds with unary Heartbeat calls to the leader, as an agent's renewal would, timing each
answer. In the default mode the tasks carry a constraint no node has, so they stay pending
and the burst measures the control plane; `--run` lets them run (`true`) on the workers.

Prints one JSON object:
- leader_changes: leaderships won during the burst, from the voters' logs (target 0);
- nodes_marked_down: nodes the leader marked suspect or down during it (target 0);
- heartbeat_p50_ms / p99_ms / max_ms: the probe's heartbeat answer latency;
  heartbeat_failures: probe beats that got no answer;
- leader_rss_start_mb / leader_rss_peak_mb: the leader's resident memory before, and its
  peak (VmHWM) after;
- submit_s: until every submit_many returned; drain_s: until every voter applied the
  last entry (and with --run, every task finished);
- tasks_lost: tasks acknowledged but not in the leader's state at the end (target 0);
- shed: calls the leader refused with RESOURCE_EXHAUSTED (admission) and clients retried.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import re
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Agent, emit, free_port  # noqa: E402

from lepton.common.grpc_util import CHANNEL_OPTIONS  # noqa: E402
from lepton.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc  # noqa: E402

LEADING = re.compile(r"leading term (\d+)")
MARKED = re.compile(r"node \S+ \((\S+)\) is (suspect|down):")


def submit_share(servers: str, count: int, run: bool, out: mp.Queue) -> None:
    """One client process: submit_many of `count` tasks; reports ids, time and sheds."""
    import logging

    from lepton.client import Client

    shed = [0]

    class CountShed(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "shed" in record.getMessage():
                shed[0] += 1

    log = logging.getLogger("lepton.client.client")
    log.setLevel(logging.DEBUG)
    log.addHandler(CountShed())
    extra = {"constraints": {"pool": "work" if run else "nowhere"}}
    tasks = [dict(argv=["true"], name="burst", cpu=0.01, **extra) for _ in range(count)]
    t0 = time.monotonic()
    with Client(servers, timeout=120) as c:
        done = c.submit_many(tasks)
    out.put({"ids": [t.id for t in done], "seconds": time.monotonic() - t0, "shed": shed[0]})


class Probe:
    """A node of our own that beats with unary Heartbeat calls and times each answer."""

    def __init__(self, addresses: list[str]):
        self.addresses = addresses
        self.channels = {a: grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses}
        self.leader = addresses[0]
        self.node_id = "probe-" + uuid.uuid4().hex[:8]
        self.latencies: list[float] = []
        self.failures = 0

    def stub(self) -> coordinator_pb2_grpc.CoordinatorStub:
        return coordinator_pb2_grpc.CoordinatorStub(self.channels[self.leader])

    async def _to_leader(self, call) -> object:
        last = None
        for _ in range(200):
            try:
                return await call(self.stub())
            except grpc.aio.AioRpcError as err:
                last = err
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                hint = dict(err.trailing_metadata() or ()).get("lepton-leader", "")
                i = self.addresses.index(self.leader)
                self.leader = hint if hint in self.channels else self.addresses[(i + 1) % len(self.addresses)]
                await asyncio.sleep(0.05)
        raise RuntimeError(f"no leader answered: {last.code() if last else ''} {last.details() if last else ''}")

    async def register(self) -> None:
        req = coordinator_pb2.RegisterNodeRequest(
            node_id=self.node_id, name=self.node_id, address="127.0.0.1:1",
            labels={"probe": "1"}, capacity=common_pb2.Capacity(cpu_logical=1, memory_bytes=1 << 30))  # no tasks: no label fits
        await self._to_leader(lambda s: s.RegisterNode(req, timeout=10))

    async def beat_forever(self, interval: float) -> None:
        req = coordinator_pb2.HeartbeatRequest(node_id=self.node_id)
        while True:
            t0 = time.perf_counter()
            try:
                await self.stub().Heartbeat(req, timeout=5)
                self.latencies.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError:
                self.failures += 1
                try:
                    await self._to_leader(lambda s: s.Heartbeat(req, timeout=5))
                except RuntimeError:
                    pass
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t0)))

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[int(q * (len(values) - 1))] * 1000, 1) if values else float("nan")


async def run(args: argparse.Namespace) -> dict:
    ports = [free_port() for _ in range(3)]
    metrics = [free_port() for _ in range(3)]
    addrs = [f"127.0.0.1:{p}" for p in ports]
    peers = ",".join(addrs)
    bound = 10_000_000 if args.no_admission else args.max_submit_inflight
    off = ["--max-submit-inflight", str(bound)] if bound else []
    off += ["--task-user", "none"]  # tasks as our own user: the data dirs are private temp dirs
    voters = [Agent("--peers", peers, "--metrics-listen", f"127.0.0.1:{m}", "--log-level", "INFO", *off,
                    name=f"v{i + 1}", port=p) for i, (p, m) in enumerate(zip(ports, metrics, strict=True))]
    root = voters[0].root
    workers = []
    probe = Probe(addrs)
    beating = None
    try:
        workers = [Agent("--join", peers, "--labels", "pool=work", "--task-user", "none", name=f"w{i + 1}", root=root) for i in range(2)]
        await probe.register()
        beating = asyncio.ensure_future(probe.beat_forever(args.probe_interval))
        leader = next(i for i, a in enumerate(addrs) if a == probe.leader)
        urls = [f"http://127.0.0.1:{m}/metrics" for m in metrics]
        await asyncio.sleep(args.settle)  # every node registered and beating
        log_start = [v.data_dir.joinpath("agent.log").stat().st_size for v in voters]
        rss_start = proc_kb(voters[leader].proc.pid, "VmRSS")
        probe.latencies.clear()
        probe.failures = 0

        ctx = mp.get_context("spawn")
        queue: mp.Queue = ctx.Queue()
        share = args.tasks // args.clients
        counts = [share + (1 if i < args.tasks % args.clients else 0) for i in range(args.clients)]
        t0 = time.monotonic()
        procs = [ctx.Process(target=submit_share, args=(peers, n, args.run, queue)) for n in counts]
        for p in procs:
            p.start()
        results = [await asyncio.to_thread(queue.get) for _ in procs]
        for p in procs:
            p.join()
        submit_s = time.monotonic() - t0

        leader = next(i for i, a in enumerate(addrs) if a == probe.leader)
        while True:  # drained: every voter applied what the leader committed (and tasks ended)
            views = [await asyncio.to_thread(scrape, u) for u in urls]
            commit = views[leader]["lepton_raft_commit_index"]
            caught_up = all(v["lepton_raft_applied_index"] >= commit for v in views)
            active = sum(views[leader].get(f'lepton_tasks{{state="{s}"}}', 0)
                         for s in ("pending", "assigned", "running"))
            if caught_up and (not args.run or active == 0):
                break
            await asyncio.sleep(0.5)
        drain_s = time.monotonic() - t0
        beating.cancel()

        ids = {i for r in results for i in r["ids"]}
        stored = sum(v for k, v in views[leader].items() if k.startswith("lepton_tasks{"))
        logs = [v.data_dir.joinpath("agent.log").read_text(errors="replace")[s:]
                for v, s in zip(voters, log_start, strict=True)]
        return {
            "tasks": args.tasks, "clients": args.clients, "run": args.run,
            "admission": not args.no_admission, "max_submit_inflight": bound or "default",
            "leader_changes": sum(len(LEADING.findall(text)) for text in logs),
            "nodes_marked_down": len({m.group(1) for text in logs for m in MARKED.finditer(text)}),
            "heartbeat_p50_ms": pct(probe.latencies, 0.5),
            "heartbeat_p99_ms": pct(probe.latencies, 0.99),
            "heartbeat_max_ms": pct(probe.latencies, 1.0),
            "heartbeat_failures": probe.failures,
            "leader_rss_start_mb": round(rss_start / 1024, 1),
            "leader_rss_peak_mb": round(max(proc_kb(v.proc.pid, "VmHWM") for v in voters) / 1024, 1),
            "submit_s": round(submit_s, 1),
            "drain_s": round(drain_s, 1),
            "tasks_acknowledged": len(ids),
            "tasks_lost": max(0, int(len(ids) - stored)),
            "shed": sum(r["shed"] for r in results),
        }
    finally:
        if beating is not None:
            beating.cancel()
        await probe.close()
        for a in workers + voters:
            a.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=1, help="processes calling submit_many at once")
    p.add_argument("--run", action="store_true", help="let the tasks run on the workers")
    p.add_argument("--no-admission", action="store_true",
                   help="baseline: bound the leader's submit queue so high it never sheds")
    p.add_argument("--max-submit-inflight", type=int, default=0,
                   help="the voters' --max-submit-inflight (0: their default)")
    p.add_argument("--probe-interval", type=float, default=0.2, help="seconds between probe beats")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before the burst")
    emit(asyncio.run(run(p.parse_args())))


if __name__ == "__main__":
    main()
