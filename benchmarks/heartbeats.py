"""N simulated agents heartbeating against one real coordinator process.

The agents beat as real ones do: one HeartbeatStream each, at the interval the leader
hands out (in RegisterNodeResponse, then in the stream's answers: its heartbeat budget
stretches it past `--max-heartbeats-per-s` live nodes a second). They are spread over
`--procs` load-generator processes, each with its own event loop and channels, so that one
Python process is not the bottleneck.

Measuring starts once the coordinator keeps up (settle_s): registering thousands of agents
leaves it a backlog. Prints one JSON object: agents, interval_ms (what the leader hands out,
from its metrics), offered_per_s, heartbeats_per_s (beats the coordinator processed in the
window, from its metrics), sent_per_s (beats the agents wrote), coordinator_cpu_cores (CPU
seconds of the coordinator process per wall second, psutil), loadgen_cpu_cores (all
load-generator processes), host_cpu_busy (all cores, 0-1; others share the host),
p99_ms (a beat's write on the stream), p50/p99_answer_ms (a beat to the leader's answer),
failed_streams (must be 0 for a clean run; reasons by phase: setup or window),
failed_reads, failed_registrations, clean.
Target (issue 2): 5,000 agents with the coordinator under one core.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import multiprocessing as mp
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Agent, emit, free_port  # noqa: E402

from lepton.common.grpc_util import CHANNEL_OPTIONS  # noqa: E402
from lepton.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc  # noqa: E402

# Each channel its own TCP connection, as agents on separate machines have (grpc shares a
# subchannel between channels of equal arguments otherwise).
BENCH_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


def coordinator_view(metrics_url: str) -> tuple[float, float]:
    """(heartbeats the coordinator has processed, the interval it hands out), from its
    /metrics: the heartbeat-gap histogram's count and the assigned-interval gauge."""
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("lepton_heartbeat_interval_seconds_count", "lepton_heartbeat_interval_assigned_seconds"):
            found[name] = float(value)
    return found["lepton_heartbeat_interval_seconds_count"], found["lepton_heartbeat_interval_assigned_seconds"]


def settle(metrics_url: str, agents: int, limit_s: float = 90.0) -> float:
    """Wait until the coordinator processes beats at the rate the agents send them, twice
    in a row: registrations and thousands of new streams leave it a backlog to work off
    first, and measuring that would flatter it. Returns the seconds waited."""
    t_start = time.monotonic()
    seen, interval = coordinator_view(metrics_url)
    t, steady = time.monotonic(), 0
    while steady < 2 and time.monotonic() - t_start < limit_s:
        time.sleep(max(1.0, 2 * interval))
        now_seen, interval = coordinator_view(metrics_url)
        now = time.monotonic()
        rate, offered = (now_seen - seen) / (now - t), agents / interval
        steady = steady + 1 if abs(rate - offered) <= 0.05 * offered else 0
        seen, t = now_seen, now
    return time.monotonic() - t_start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[int(q * (len(values) - 1))]


async def _simulate(address: str, ids: list[str], channels: int, mode: str, conn) -> dict:
    """One load-generator process: register `ids`, beat until the window the parent sends
    is over, report what happened in the window."""
    chans = [grpc.aio.insecure_channel(address, options=BENCH_CHANNEL_OPTIONS) for _ in range(channels)]
    stubs = [coordinator_pb2_grpc.CoordinatorStub(c) for c in chans]
    cap = common_pb2.Capacity(cpu_logical=8, cpu_physical=4, memory_bytes=32 << 30, disk_bytes=1 << 40)
    usage = common_pb2.Usage(cpu_percent=12.5, memory_used_bytes=8 << 30, disk_free_bytes=1 << 39)
    sem = asyncio.Semaphore(128)
    intervals: dict[str, float] = {}  # agent -> the interval it uses now (seconds)
    reg_failures: Counter[str] = Counter()

    reg_retries = 0

    async def register(i: int) -> None:
        nonlocal reg_retries
        req = coordinator_pb2.RegisterNodeRequest(
            node_id=ids[i], name=ids[i], address=f"127.0.0.1:{10000 + i % 50000}", capacity=cap)
        async with sem:
            for attempt in range(5):  # an agent retries (with backoff) too
                try:
                    resp = await stubs[i % channels].RegisterNode(req, timeout=120)
                    intervals[ids[i]] = resp.heartbeat_interval_ms / 1000 or 1.0
                    return
                except grpc.aio.AioRpcError as err:
                    if attempt == 4 or err.code() != grpc.StatusCode.UNAVAILABLE:
                        reg_failures[f"{err.code()}: {err.details()}"] += 1
                        return
                    reg_retries += 1
                    await asyncio.sleep(0.1 * 2 ** attempt)

    # Connect first, a channel at a time: a hundred TCP handshakes at once against a busy
    # server time out, which says nothing about heartbeats.
    for c in chans:
        await asyncio.wait_for(c.channel_ready(), 60)
    await asyncio.gather(*(register(i) for i in range(len(ids))))
    window = [math.inf, math.inf]  # wall-clock [start, end), sent by the parent
    beats = 0
    write_lat: list[float] = []
    answer_lat: list[float] = []
    failures: Counter[str] = Counter()
    read_failures: Counter[str] = Counter()

    def in_window() -> bool:
        return window[0] <= time.time() < window[1]

    def phase() -> str:  # failures while registering/settling vs. while measured
        return "setup" if time.time() < window[0] else "window"

    async def read(stream, node_id: str, pending: collections.deque) -> None:
        try:
            while (resp := await stream.read()) is not grpc.aio.EOF:
                if resp.heartbeat_interval_ms:
                    intervals[node_id] = resp.heartbeat_interval_ms / 1000
                if pending:
                    sent = pending.popleft()
                    if in_window():
                        answer_lat.append(time.perf_counter() - sent)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                read_failures[f"{phase()}: {err.code()}: {err.details()}"] += 1
        except asyncio.CancelledError:
            pass

    async def agent(i: int) -> None:
        nonlocal beats
        node_id = ids[i]
        if node_id not in intervals:
            return  # its registration failed (counted)
        stub = stubs[i % channels]
        req = coordinator_pb2.HeartbeatRequest(node_id=node_id, usage=usage)
        next_at = time.monotonic() + intervals[node_id] * i / len(ids)  # spread over the interval
        stream = reader = None
        pending: collections.deque[float] = collections.deque()  # beats the leader will answer
        count = 0
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if time.time() >= window[1]:
                break
            if mode == "stream" and stream is None:
                # Opened at the first beat, as an agent does: all at once, thousands of new
                # calls overrun the server's queue of calls not yet taken (see the docs).
                stream = stub.HeartbeatStream()
                reader = asyncio.create_task(read(stream, node_id, pending))
            t0 = time.perf_counter()
            count += 1
            if stream is not None:
                if count == 1 or count % 2 == 0:  # the leader answers these (service.py)
                    pending.append(t0)
                try:
                    await stream.write(req)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    failures[f"{phase()}: {await stream.code()}: {await stream.details()}"] += 1
                    return
            else:
                try:
                    resp = await stub.Heartbeat(req, timeout=10)
                except grpc.aio.AioRpcError as err:
                    failures[f"{phase()}: {err.code()}: {err.details()}"] += 1
                    return
                intervals[node_id] = resp.heartbeat_interval_ms / 1000 or intervals[node_id]
                answer_lat.append(time.perf_counter() - t0)
            if in_window():
                write_lat.append(time.perf_counter() - t0)
                beats += 1
            next_at += intervals[node_id]
        if stream is not None:
            try:
                await stream.done_writing()
                await asyncio.sleep(0.5)  # the last answers
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the window is over; the reader has recorded any failure
            reader.cancel()

    loop = asyncio.get_running_loop()
    running = asyncio.gather(*(agent(i) for i in range(len(ids))))
    await asyncio.sleep(0.1)
    conn.send("ready")
    window[0], window[1] = await loop.run_in_executor(None, conn.recv)
    await running
    for c in chans:
        await c.close()
    return {
        "beats": beats, "write_lat": write_lat, "answer_lat": answer_lat,
        "failures": dict(failures), "read_failures": dict(read_failures),
        "reg_failures": dict(reg_failures), "reg_retries": reg_retries,
        "intervals_ms": sorted({round(v * 1000) for v in intervals.values()}),
    }


def _worker(address: str, ids: list[str], channels: int, mode: str, conn) -> None:
    try:
        result = asyncio.run(_simulate(address, ids, channels, mode, conn))
    except BaseException as err:  # noqa: BLE001 - the parent reports it
        result = {"crashed": repr(err)}
    conn.send(("done", result))


def run(agents: int, seconds: float, procs: int, channels: int, mode: str, budget: float | None) -> dict:
    # Relaxed thresholds: this measures the heartbeat path; a late load generator on a
    # shared host would otherwise add suspect/ready log writes to the coordinator's bill.
    extra = ["--max-heartbeats-per-s", str(budget)] if budget else []
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    coord = Agent("--down-after", "30", "--suspect-after", "20", *extra,
                  "--metrics-listen", f"127.0.0.1:{metrics_port}", name="coordinator")
    ctx = mp.get_context("spawn")
    workers = []
    try:
        ids = [f"sim-{i:05d}" for i in range(agents)]
        for k in range(procs):
            mine = ids[k::procs]
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(coord.address, mine, channels, mode, child), daemon=True)
            p.start()
            child.close()  # so that a dead worker's pipe reads EOF instead of hanging
            workers.append((p, parent))
        setup_t0 = time.monotonic()
        for _, parent in workers:
            msg = parent.recv()  # every agent of that process registered and beating
            if msg != "ready":
                raise RuntimeError(f"load generator failed before it was ready: {msg}")
        setup_s = time.monotonic() - setup_t0
        settle_s = settle(metrics_url, agents)
        start = time.time() + 0.5
        end = start + seconds
        for _, parent in workers:
            parent.send((start, end))
        coord_proc = psutil.Process(coord.proc.pid)
        gens = [psutil.Process(p.pid) for p, _ in workers]
        time.sleep(max(0.0, start - time.time()))
        cpu0, gen0, t0 = sum(coord_proc.cpu_times()[:2]), sum(sum(g.cpu_times()[:2]) for g in gens), time.time()
        seen0, interval0 = coordinator_view(metrics_url)
        psutil.cpu_percent(None)
        time.sleep(max(0.0, end - time.time()))
        cpu1, gen1, t1 = sum(coord_proc.cpu_times()[:2]), sum(sum(g.cpu_times()[:2]) for g in gens), time.time()
        seen1, interval1 = coordinator_view(metrics_url)
        busy = psutil.cpu_percent(None) / 100
        results = [parent.recv()[1] for _, parent in workers]
    finally:
        for p, _ in workers:
            p.join(30)
            if p.is_alive():
                p.kill()
        coord.stop()
    crashed = [r["crashed"] for r in results if "crashed" in r]
    if crashed:
        raise RuntimeError(f"load generator crashed: {crashed}")
    merged: dict[str, Counter[str]] = {k: Counter() for k in ("failures", "read_failures", "reg_failures")}
    for r in results:
        for k in merged:
            merged[k].update(r[k])
    intervals_ms = sorted({ms for r in results for ms in r["intervals_ms"]})
    failed = sum(merged["failures"].values())
    return {
        "agents": agents,
        "mode": mode,
        "procs": procs,
        "channels_per_proc": channels,
        "max_heartbeats_per_s": budget or "coordinator default",
        # The leader's, at the window's start and end; and what the agents ended up using.
        "interval_ms": round(interval0 * 1000) if interval0 == interval1 else [interval0 * 1000, interval1 * 1000],
        "agents_interval_ms": intervals_ms[0] if len(intervals_ms) == 1 else intervals_ms,
        "offered_per_s": round(agents / interval1, 1),
        # What the coordinator processed (its metrics), and what the agents wrote: a
        # coordinator that falls behind shows as the first below the second.
        "heartbeats_per_s": round((seen1 - seen0) / (t1 - t0), 1),
        "sent_per_s": round(sum(r["beats"] for r in results) / seconds, 1),
        "coordinator_cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
        "loadgen_cpu_cores": round((gen1 - gen0) / (t1 - t0), 3),
        "host_cpu_busy": round(busy, 2),
        "p99_ms": round(percentile([x for r in results for x in r["write_lat"]], 0.99) * 1000, 2),
        "p50_answer_ms": round(percentile([x for r in results for x in r["answer_lat"]], 0.5) * 1000, 2),
        "p99_answer_ms": round(percentile([x for r in results for x in r["answer_lat"]], 0.99) * 1000, 2),
        "seconds_measured": round(t1 - t0, 1),
        "setup_s": round(setup_s, 1),  # starting processes, registering every agent
        "settle_s": round(settle_s, 1),  # until the coordinator kept up with the beats
        "failed_streams": failed,
        "failed_stream_reasons": dict(merged["failures"]),
        "failed_reads": dict(merged["read_failures"]),
        "failed_registrations": dict(merged["reg_failures"]),
        "registration_retries": sum(r["reg_retries"] for r in results),
        "clean": failed == 0 and not merged["read_failures"] and not merged["reg_failures"],
        "host_cpus": psutil.cpu_count(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=5000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--procs", type=int, default=4, help="load-generator processes")
    # HTTP/2 servers allow ~100 concurrent streams per connection: one channel per 50 agents.
    p.add_argument("--channels", type=int, default=0, help="per process; default: one per 50 of its agents")
    p.add_argument("--mode", choices=["stream", "unary"], default="stream",
                   help="stream: HeartbeatStream as agents use it; unary: one call per beat")
    p.add_argument("--max-heartbeats-per-s", dest="budget", type=float, default=None,
                   help="the coordinator's heartbeat budget (default: its own default); a huge "
                        "value measures every agent at the base 1 s interval")
    args = p.parse_args()
    procs = max(1, min(args.procs, args.agents))
    channels = args.channels or max(1, args.agents // procs // 50)
    emit(run(args.agents, args.seconds, procs, channels, args.mode, args.budget))


if __name__ == "__main__":
    main()
