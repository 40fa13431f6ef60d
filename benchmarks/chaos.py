"""Leader freezes while tasks run: 3 voters + 2 workers on loopback, the leader stopped with
SIGSTOP for 2-8 s per round (tests/integration/chaos.py, the scenario the integration test
runs 3 rounds of). Prints one JSON object: rounds, faults, freeze_s, acked, lost, failed
(with reasons), overlaps (a task's completion recorded twice), never_completed, requeued,
wrongly_down (nodes marked down that were not a frozen leader), seconds.

    .venv/bin/python benchmarks/chaos.py --rounds 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import emit  # noqa: E402

from tests.integration.chaos import freeze_the_leader  # noqa: E402
from tests.integration.cluster import AgentProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lepton-chaos-"))
    started: list[AgentProcess] = []

    def start(name: str, *agent_args: str, port: int | None = None) -> AgentProcess:
        agent = AgentProcess(root, name, list(agent_args), port=port).start()
        started.append(agent)
        return agent

    began = time.monotonic()
    try:
        figures = freeze_the_leader(start, root, args.rounds, args.seed)
    finally:
        for agent in started:
            agent.stop()
    figures["seconds"] = round(time.monotonic() - began, 1)
    figures["logs"] = str(root)
    emit(figures)


if __name__ == "__main__":
    main()
