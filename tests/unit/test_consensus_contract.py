"""The `Consensus` contract, run against every implementation (torch's rendezvous_backend_test style).

Each implementation provides a factory: `make(tmp_path) -> Harness` with `start()`,
`leader()` (the Consensus to propose to), `restart()` and `stop()`.
"""

from __future__ import annotations

import asyncio

import pytest

from lepton.common.errors import InvalidArgument, Unavailable
from lepton.coordinator.consensus import SingleVoterConsensus
from lepton.coordinator.storage.log_store import FileLogStore


class CountingMachine:
    """A tiny deterministic state machine: a list of applied commands."""

    def __init__(self) -> None:
        self.applied_index = 0
        self.log: list[bytes] = []

    def apply(self, index: int, data: bytes, answered: bool = True) -> object:
        assert index == self.applied_index + 1, "applied out of order or twice"
        self.applied_index = index
        if data == b"bad":
            return InvalidArgument("bad command")
        self.log.append(data)
        return len(self.log)

    def snapshot(self) -> bytes:
        return b"\n".join(self.log)

    def restore(self, data: bytes, index: int) -> None:
        self.log = data.split(b"\n") if data else []
        self.applied_index = index


class SingleVoterHarness:
    def __init__(self, path, snapshot_every=1000):
        self.path = path
        self.snapshot_every = snapshot_every
        self.sm = CountingMachine()
        self.consensus = None
        self.events: list[tuple[bool, int]] = []

    async def start(self):
        self.sm = CountingMachine()
        store = FileLogStore(self.path)
        self.consensus = SingleVoterConsensus("n1", "127.0.0.1:1", store, self.sm, snapshot_every=self.snapshot_every)
        self.consensus.add_leadership_listener(lambda leader, term: self.events.append((leader, term)))
        await self.consensus.start()

    def leader(self):
        return self.consensus

    async def restart(self):
        await self.consensus.stop()
        await self.start()

    async def stop(self):
        await self.consensus.stop()


IMPLEMENTATIONS = {"single-voter": SingleVoterHarness}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
async def harness(request, tmp_path):
    h = IMPLEMENTATIONS[request.param](tmp_path / "c")
    await h.start()
    yield h
    await h.stop()


async def test_propose_returns_the_state_machine_result(harness):
    c = harness.leader()
    assert await c.propose(b"a", timeout=5) == 1
    assert await c.propose(b"b", timeout=5) == 2
    assert c.is_leader()
    assert c.status().applied_index >= 2


async def test_state_machine_errors_come_back_as_values(harness):
    result = await harness.leader().propose(b"bad", timeout=5)
    assert isinstance(result, InvalidArgument)


async def test_concurrent_proposals_apply_once_each_in_one_order(harness):
    c = harness.leader()
    results = await asyncio.gather(*(c.propose(f"x{i}".encode(), timeout=10) for i in range(200)))
    assert sorted(results) == list(range(1, 201))
    assert sorted(harness.sm.log) == sorted(f"x{i}".encode() for i in range(200))


async def test_restart_replays_exactly_the_acknowledged_commands(harness):
    c = harness.leader()
    for i in range(30):
        await c.propose(f"k{i}".encode(), timeout=5)
    before = list(harness.sm.log)
    term = c.status().term
    await harness.restart()
    assert harness.sm.log == before
    assert harness.leader().status().term > term  # a restart is a new term: old orders are fenced


async def test_snapshots_compact_and_restore(tmp_path):
    h = SingleVoterHarness(tmp_path / "s", snapshot_every=10)
    await h.start()
    for i in range(25):
        await h.leader().propose(f"v{i}".encode(), timeout=5)
    await h.restart()
    assert h.sm.log == [f"v{i}".encode() for i in range(25)]
    assert h.consensus._store.snapshot() is not None
    await h.stop()


async def test_stopped_consensus_refuses(harness):
    c = harness.leader()
    await harness.stop()
    with pytest.raises(Unavailable):
        await c.propose(b"late", timeout=1)
    await harness.start()  # so the fixture's stop() has something to stop


async def test_leadership_listener_hears_about_leadership(harness):
    assert harness.events and harness.events[-1][0] is True


async def test_await_within_times_out_settling_the_future_and_drops_the_late_outcome() -> None:
    from lepton.common.errors import DeadlineExceeded
    from lepton.coordinator.consensus import await_within

    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    with pytest.raises(DeadlineExceeded, match="command not committed within 0.05s; outcome unknown"):
        await await_within(fut, 0.05, "command not committed")
    assert fut.done()  # whoever commits it later finds it settled and drops the result
    done = loop.create_future()
    loop.call_soon(done.set_result, 7)
    assert await await_within(done, 10, "x") == 7
    waiting = loop.create_future()
    caller = asyncio.ensure_future(await_within(waiting, 10, "x"))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert waiting.cancelled()  # a cancelled caller's proposal is skipped if not yet appended
