"""In-process placement throughput of `lepton.coordinator.scheduler.schedule`.

Simulated clusters of 1,000 and 10,000 nodes (80% CPU nodes, 20% 8-GPU nodes in
three zones, about a quarter full with priority-0 work), and a mixed pending queue:
small cpu tasks, big-memory tasks, GPU tasks (1-8 devices, some with a memory floor),
zone-constrained tasks and 4-member gangs, priorities 0-3 (so some preemption).

One schedule() call per repetition places the whole queue; the time includes turning
the snapshot into arrays. placements_per_s = placements in the plan / wall time of
the call, median of REPEATS. Prints exactly one JSON object to stdout.

    .venv/bin/python benchmarks/scheduler.py [--quick]
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

from lepton.coordinator.scheduler import (
    Allocation,
    ClusterSnapshot,
    NodeView,
    TaskRequest,
    schedule,
)

GiB = 1 << 30
REPEATS = 3
ZONES = ("a", "b", "c")


def make_cluster(n_nodes: int, rng: np.random.Generator) -> ClusterSnapshot:
    nodes = []
    for i in range(n_nodes):
        nid = f"node-{i:05d}"
        zone = ZONES[i % 3]
        if i % 5 == 4:
            mem_per_gpu = 80 * GiB if i % 10 == 9 else 40 * GiB
            gpus = {d: mem_per_gpu for d in range(8)}
            cpu, mem = 96_000, 1024 * GiB
        else:
            gpus, cpu, mem = {}, 64_000, 256 * GiB
        # about a quarter full with preemptible priority-0 work
        allocs = []
        for j in range(int(rng.integers(1, 4))):
            allocs.append(Allocation(f"{nid}-run{j}", nid, 0, cpu // 12, mem // 12,
                                     (j,) if gpus and j < 2 else ()))
        nodes.append(NodeView(nid, cpu, mem, gpus, {"zone": zone}, True, tuple(allocs)))
    return ClusterSnapshot(tuple(nodes))


def make_tasks(n_tasks: int, rng: np.random.Generator) -> list[TaskRequest]:
    tasks: list[TaskRequest] = []
    kinds = rng.choice(5, size=n_tasks, p=[0.68, 0.14, 0.08, 0.06, 0.04])
    prios = rng.choice(4, size=n_tasks, p=[0.55, 0.25, 0.15, 0.05])
    for k, (kind, prio) in enumerate(zip(kinds.tolist(), prios.tolist(), strict=True)):
        tid = f"t{k:07d}"
        at = k  # submission order
        if kind == 0:  # small cpu task
            tasks.append(TaskRequest(tid, prio, at, 500, 1 * GiB))
        elif kind == 1:  # big memory
            tasks.append(TaskRequest(tid, prio, at, 4_000, 48 * GiB))
        elif kind == 2:  # GPU task, sometimes with a memory floor
            g = int(rng.choice([1, 2, 4, 8], p=[0.5, 0.3, 0.15, 0.05]))
            floor = 60 * GiB if k % 4 == 0 else 0
            tasks.append(TaskRequest(tid, prio, at, 8_000 * g, 32 * GiB * g, g, floor))
        elif kind == 3:  # zone-constrained cpu task
            tasks.append(TaskRequest(tid, prio, at, 2_000, 4 * GiB,
                                     constraints={"zone": ZONES[k % 3]}))
        else:  # one member of a 4-member gang, built together below
            pass
    # gangs: every 25th slot's worth, 4 members each (half GPU, half cpu)
    n_gangs = int((kinds == 4).sum()) // 4
    for gi in range(n_gangs):
        gid = f"gang{gi:05d}"
        gpu = gi % 2 == 0
        for m in range(4):
            tasks.append(TaskRequest(
                f"{gid}-{m}", 2, gi, 16_000 if gpu else 8_000, 64 * GiB if gpu else 16 * GiB,
                2 if gpu else 0, gang_id=gid, gang_size=4))
    return tasks


def bench(n_nodes: int, n_tasks: int) -> dict:
    rng = np.random.default_rng(n_nodes)
    snap = make_cluster(n_nodes, rng)
    tasks = make_tasks(n_tasks, rng)
    now_ms = len(tasks) + 60_000

    setup = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        schedule(snap, [], now_ms=now_ms)
        setup.append(time.perf_counter() - t0)

    walls, plan = [], None
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        plan = schedule(snap, tasks, now_ms=now_ms)
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    assert plan is not None
    placed = len(plan.placements)
    return {
        "placements_per_s": round(placed / wall),
        "tasks": len(tasks),
        "placed": placed,
        "preempted": len(plan.preemptions),
        "unschedulable": len(plan.unschedulable),
        "waiting": len(plan.waiting()),
        "wall_s": round(wall, 3),
        "snapshot_setup_ms": round(statistics.median(setup) * 1000, 1),
        "allocations_in_snapshot": len(snap.allocations),
    }


def main() -> None:
    quick = "--quick" in sys.argv
    scales = {1_000: 5_000, 10_000: 5_000} if quick else {1_000: 20_000, 10_000: 20_000}
    results = {f"nodes_{n}": bench(n, t) for n, t in scales.items()}
    out = {
        "placements_per_s": {k: v["placements_per_s"] for k, v in results.items()},
        **results,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
