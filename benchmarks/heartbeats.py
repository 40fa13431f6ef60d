"""N simulated agents heartbeating at 1 Hz against one real coordinator process.

Prints one JSON object: agents, heartbeats_per_s (achieved), offered_per_s,
coordinator_cpu_cores (CPU seconds the coordinator used per wall second), p99_ms.
Target (issue 2): 5,000 agents with the coordinator under one core.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Agent, emit  # noqa: E402

from lepton.common.grpc_util import CHANNEL_OPTIONS  # noqa: E402
from lepton.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc  # noqa: E402


async def run(agents: int, seconds: float, channels: int, mode: str) -> dict:
    coord = Agent("--down-after", "30", "--suspect-after", "20", name="coordinator")
    try:
        chans = [grpc.aio.insecure_channel(coord.address, options=CHANNEL_OPTIONS) for _ in range(channels)]
        stubs = [coordinator_pb2_grpc.CoordinatorStub(c) for c in chans]
        cap = common_pb2.Capacity(cpu_logical=8, cpu_physical=4, memory_bytes=32 << 30, disk_bytes=1 << 40)
        ids = [f"sim-{i:05d}" for i in range(agents)]
        sem = asyncio.Semaphore(256)

        async def register(i: int) -> None:
            async with sem:
                await stubs[i % channels].RegisterNode(coordinator_pb2.RegisterNodeRequest(
                    node_id=ids[i], name=ids[i], address=f"127.0.0.1:{10000 + i % 50000}", capacity=cap),
                    timeout=60)

        await asyncio.gather(*(register(i) for i in range(agents)))

        latencies: list[float] = []
        failures: Counter[str] = Counter()
        read_failures: Counter[str] = Counter()
        done = 0
        usage = common_pb2.Usage(cpu_percent=12.5, memory_used_bytes=8 << 30, disk_free_bytes=1 << 39)
        stop_at = time.monotonic() + seconds

        async def drain(stream) -> None:
            try:
                while await stream.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError as err:
                read_failures[f"{err.code()}: {err.details()}"] += 1
            except asyncio.CancelledError:
                pass

        async def agent_loop(i: int) -> None:
            nonlocal done
            stub = stubs[i % channels]
            req = coordinator_pb2.HeartbeatRequest(node_id=ids[i], usage=usage)
            next_at = time.monotonic() + (i / agents)  # spread agents over the second
            stream = stub.HeartbeatStream() if mode == "stream" else None
            first = True
            while True:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                if time.monotonic() >= stop_at:
                    break
                t0 = time.perf_counter()
                if stream is not None:  # what agents do: one long-lived stream each
                    try:
                        await stream.write(req)
                    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        failures[f"{await stream.code()}: {await stream.details()}"] += 1
                        return
                    if first:  # like an agent: a reader consumes the answers (every 2nd beat)
                        first = False
                        asyncio.create_task(drain(stream))
                else:
                    await stub.Heartbeat(req, timeout=10)
                latencies.append(time.perf_counter() - t0)
                done += 1
                next_at += 1.0
            if stream is not None:
                await stream.done_writing()

        proc = psutil.Process(coord.proc.pid)
        warm = asyncio.gather(*(agent_loop(i) for i in range(agents)))
        await asyncio.sleep(min(2.0, seconds / 3))  # let the first round settle
        cpu0, t0, done0, lat0 = sum(proc.cpu_times()[:2]), time.monotonic(), done, len(latencies)
        await warm
        cpu1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
        window = sorted(latencies[lat0:])
        p99 = window[int(0.99 * (len(window) - 1))] if window else float("nan")
        for c in chans:
            await c.close()
        return {
            "agents": agents,
            "mode": mode,
            "offered_per_s": agents,
            "heartbeats_per_s": round((done - done0) / (t1 - t0), 1),
            "coordinator_cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
            "p99_ms": round(p99 * 1000, 2),
            "seconds_measured": round(t1 - t0, 1),
            "channels": channels,
            "failed_streams": dict(failures),
            "failed_reads": dict(read_failures),
            "host_cpus": psutil.cpu_count(),
        }
    finally:
        coord.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--agents", type=int, default=5000)
    p.add_argument("--seconds", type=float, default=10.0)
    # HTTP/2 servers allow ~100 concurrent streams per connection: one channel per 50 agents.
    p.add_argument("--channels", type=int, default=0, help="default: one per 50 agents")
    p.add_argument("--mode", choices=["stream", "unary"], default="stream",
                   help="stream: HeartbeatStream as agents use it; unary: one call per beat")
    args = p.parse_args()
    channels = args.channels or max(1, args.agents // 50)
    emit(asyncio.run(run(args.agents, args.seconds, channels, args.mode)))


if __name__ == "__main__":
    main()
