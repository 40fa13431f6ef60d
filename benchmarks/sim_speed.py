"""Speed of the deterministic Raft simulation: prints one JSON object.

Usage: .venv/bin/python benchmarks/sim_speed.py [--seeds N] [--base B]
(default: the 500 seeds CI runs via `make sim`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from lepton.coordinator.raft.simulation import SimulationFailure, run_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=int(os.environ.get("LEPTON_SIM_SEEDS", "500")))
    parser.add_argument("--base", type=int, default=0)
    args = parser.parse_args()
    steps = acked = proposed = sim_time = 0.0
    failed: list[int] = []
    start = time.perf_counter()
    for seed in range(args.base, args.base + args.seeds):
        try:
            r = run_seed(seed)
        except SimulationFailure:
            failed.append(seed)
            continue
        steps += r.steps
        acked += r.acked
        proposed += r.proposed
        sim_time += r.sim_time
    wall = time.perf_counter() - start
    print(json.dumps({
        "seeds": args.seeds,
        "seeds_failed": failed,
        "wall_s": round(wall, 2),
        "seeds_per_s": round(args.seeds / wall, 1),
        "steps_per_s": round(steps / wall),
        "steps_per_seed": round(steps / max(1, args.seeds - len(failed))),
        "simulated_s_per_wall_s": round(sim_time / wall, 1),
        "commands_acked": int(acked),
        "commands_proposed": int(proposed),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
