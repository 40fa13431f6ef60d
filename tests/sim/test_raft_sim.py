"""Deterministic whole-cluster Raft simulation (see lepton.coordinator.raft.simulation).

LEPTON_SIM_SEEDS=N runs seeds 0..N-1 (default 500, what CI runs; `make sim SEEDS=N`);
LEPTON_SIM_SEED=S replays one seed; LEPTON_SIM_SEED_BASE=B shifts the range (exploration);
LEPTON_SIM_TRACE=1 adds the last events to a failure report.
"""

from __future__ import annotations

import os

import pytest

from lepton.coordinator.raft.simulation import run_seed


def _seeds() -> list[int]:
    one = os.environ.get("LEPTON_SIM_SEED")
    if one:
        return [int(one)]
    count = int(os.environ.get("LEPTON_SIM_SEEDS", "500"))
    base = int(os.environ.get("LEPTON_SIM_SEED_BASE", "0"))
    return list(range(base, base + count))


@pytest.mark.parametrize("seed", _seeds())
def test_seed(seed: int) -> None:
    # SimulationFailure's message ends with the line that replays this seed.
    result = run_seed(seed)
    assert result.leaders >= 1
