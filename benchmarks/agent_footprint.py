"""Idle RSS and CPU of one agent (a dev-mode voter, so the coordinator is included).

Prints one JSON object: rss_mb (at the end), cpu_percent (of one core, averaged over the
window), seconds. Target (issue 2): RSS <= 60 MB, CPU <= 1 %.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Agent, emit  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--worker", action="store_true", help="measure a worker joined to a voter instead")
    args = p.parse_args()
    voter = Agent(name="voter")
    agent = Agent("--join", voter.address, name="worker") if args.worker else voter
    try:
        proc = psutil.Process(agent.proc.pid)
        time.sleep(2.0)  # past start-up
        cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        time.sleep(args.seconds)
        cpu1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
        mem = proc.memory_full_info()
        emit({
            "role": "worker" if args.worker else "voter",
            "seconds": round(t1 - t0, 1),
            "cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
            "rss_mb": round(mem.rss / 2**20, 1),
            "uss_mb": round(mem.uss / 2**20, 1),
            "threads": proc.num_threads(),
        })
    finally:
        if agent is not voter:
            agent.stop()
        voter.stop()


if __name__ == "__main__":
    main()
