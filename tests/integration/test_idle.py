"""An idle agent sleeps (issue 15): a real dev-mode voter, its event loop's wake-ups
counted by the agent itself (LEPTON_COUNT_WAKEUPS=1, read with SIGUSR1). Counts, not
timings: a loaded machine makes fewer wake-ups, never more."""

from __future__ import annotations

import json
import os
import signal
import time

from tests.integration.cluster import wait_until

# The production timings (the suite's FAST ones beat five times as often).
DEFAULT_TIMINGS = ["--heartbeat-interval", "1", "--suspect-after", "2", "--down-after", "3",
                   "--failover-grace", "3"]
WINDOW_S = 5.0
# Idle: ~4 a second (a beat, the scheduler's and replication's timers, gRPC completions);
# it was ~22 with the 0.2 s liveness poll, the 0.5 s audit poll and a stream to itself.
MAX_WAKEUPS_PER_S = 10.0


def loop_wakeups(agent) -> tuple[int, float]:
    """(wake-ups so far, the agent's monotonic time of the count)."""
    dump = agent.data_dir / "loop_wakeups.json"
    before = dump.read_text() if dump.exists() else ""
    os.kill(agent.proc.pid, signal.SIGUSR1)
    wait_until(lambda: dump.exists() and dump.read_text() not in ("", before), what="the wake-up count")
    doc = json.loads(dump.read_text())
    return doc["wakeups"], doc["monotonic"]


def test_an_idle_voter_wakes_a_few_times_a_second(agents, monkeypatch):
    monkeypatch.setenv("LEPTON_COUNT_WAKEUPS", "1")
    voter = agents("voter", *DEFAULT_TIMINGS)
    time.sleep(2.0)  # past start-up (registration, the first cycles); not an assertion
    count0, at0 = loop_wakeups(voter)
    time.sleep(WINDOW_S)
    count1, at1 = loop_wakeups(voter)
    rate = (count1 - count0 - 1) / (at1 - at0)  # less our own SIGUSR1
    assert 0 < rate <= MAX_WAKEUPS_PER_S, f"{rate:.1f} wake-ups/s"
