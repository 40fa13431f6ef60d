"""Counting the agent's event-loop wake-ups (debug; `LEPTON_COUNT_WAKEUPS=1`).

An idle agent should sleep: every wake-up is a select() that returned, whatever woke it
(a timer, a socket, gRPC's poller). With the variable set, the loop runs on a selector that
counts them, and SIGUSR1 writes the counts to `<data dir>/loop_wakeups.json`
(benchmarks/agent_footprint.py reads it at both ends of its window). Unset, the loop is
asyncio's default and nothing here runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import time
from pathlib import Path

from lepton.common.durable import write_atomic

ENV = "LEPTON_COUNT_WAKEUPS"
DUMP_NAME = "loop_wakeups.json"


class CountingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The platform's default selector, counting its returns."""

    def __init__(self) -> None:
        super().__init__()
        self.iterations = 0  # every select(): one turn of the loop
        self.wakeups = 0  # selects that could sleep (timeout None or > 0): the loop slept, then woke

    def select(self, timeout: float | None = None):
        events = super().select(timeout)
        self.iterations += 1
        if timeout is None or timeout > 0:
            self.wakeups += 1
        return events


class _CountingPolicy(asyncio.DefaultEventLoopPolicy):  # type: ignore[misc,valid-type]
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.SelectorEventLoop(CountingSelector())


def count_wakeups_if_asked() -> bool:
    """With `LEPTON_COUNT_WAKEUPS=1`, make new event loops count (call before asyncio.run)."""
    if os.environ.get(ENV) != "1":
        return False
    asyncio.set_event_loop_policy(_CountingPolicy())
    return True


def install_dump(loop: asyncio.AbstractEventLoop, data_dir: Path) -> bool:
    """On a counting loop, make SIGUSR1 write the counts to `data_dir/loop_wakeups.json`.
    False (nothing installed) on any other loop."""
    selector = getattr(loop, "_selector", None)  # asyncio keeps it private; debug only
    if not isinstance(selector, CountingSelector):
        return False

    def dump() -> None:
        doc = {"wakeups": selector.wakeups, "iterations": selector.iterations, "monotonic": time.monotonic()}
        write_atomic(data_dir / DUMP_NAME, json.dumps(doc).encode(), durable=False)

    loop.add_signal_handler(signal.SIGUSR1, dump)
    return True
