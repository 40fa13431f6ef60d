"""Group commit in the client (client/_coalesce.py), with fake send functions."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from lepton.client._coalesce import Coalescer
from lepton.common.errors import InvalidArgument, Overloaded, Unavailable


class Wire:
    """Records calls; `gate` holds the first call on the wire until released."""

    def __init__(self, refuse: set[int] | None = None, down: bool = False):
        self.calls: list[list[int]] = []
        self.gate = threading.Event()
        self.refuse = refuse or set()
        self.down = down
        self.lock = threading.Lock()

    def _record(self, specs: list[int]) -> None:
        with self.lock:
            first = not self.calls
            self.calls.append(specs)
        if first:
            assert self.gate.wait(10)
        if self.down:
            raise Unavailable("no leader")

    def one(self, spec: int) -> str:
        self._record([spec])
        if spec in self.refuse:
            raise InvalidArgument(f"spec {spec} is bad")
        return f"task-{spec}"

    def many(self, specs) -> list[str]:
        self._record(list(specs))
        if self.refuse & set(specs):
            raise InvalidArgument("specs[k]: bad")
        return [f"task-{s}" for s in specs]


def run_16(c: Coalescer, wire: Wire) -> list[object]:
    def one(i: int) -> object:
        try:
            return c.submit(i)
        except Exception as err:  # noqa: BLE001 - the test compares outcomes
            return err

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, 0)]
        while not wire.calls:  # the first call is on the wire, held by the gate
            threading.Event().wait(0.001)
        futures += [pool.submit(one, i) for i in range(1, 16)]
        while sum(1 for _ in c._queue) < 15:  # the other 15 have queued behind it
            threading.Event().wait(0.001)
        wire.gate.set()
        return [f.result(timeout=10) for f in futures]


def test_a_lone_caller_sends_its_own_call():
    wire = Wire()
    wire.gate.set()
    c = Coalescer(wire.one, wire.many)
    assert [c.submit(1), c.submit(2)] == ["task-1", "task-2"]
    assert wire.calls == [[1], [2]]


def test_callers_that_queue_behind_a_call_share_the_next_one():
    wire = Wire()
    c = Coalescer(wire.one, wire.many)
    assert run_16(c, wire) == [f"task-{i}" for i in range(16)]
    assert wire.calls == [[0], list(range(1, 16))]  # two calls for 16 submissions


def test_a_refused_batch_is_retried_one_by_one_so_each_gets_its_own_answer():
    wire = Wire(refuse={7})
    c = Coalescer(wire.one, wire.many)
    got = run_16(c, wire)
    assert isinstance(got[7], InvalidArgument) and "spec 7" in got[7].message
    assert [g for i, g in enumerate(got) if i != 7] == [f"task-{i}" for i in range(16) if i != 7]
    assert wire.calls[1] == list(range(1, 16)) and sorted(x for call in wire.calls[2:] for x in call) == list(range(1, 16))


def test_a_transient_failure_is_every_callers_answer_without_retries():
    wire = Wire(down=True)
    c = Coalescer(wire.one, wire.many)
    got = run_16(c, wire)
    assert all(isinstance(g, Unavailable) for g in got)
    assert len(wire.calls) == 2


class ShedWire(Wire):
    """The leader shed every call, and the client's retries ran out of budget."""

    def _record(self, specs: list[int]) -> None:
        super()._record(specs)
        raise Overloaded("the leader is busy", 5000)


def test_a_shed_batch_is_every_callers_answer_not_sent_again_one_by_one():
    wire = ShedWire()
    c = Coalescer(wire.one, wire.many)
    got = run_16(c, wire)
    assert all(isinstance(g, Overloaded) for g in got)
    assert len(wire.calls) == 2  # more calls would only add to the leader's load


def test_batches_respect_the_size_limit():
    wire = Wire()
    c = Coalescer(wire.one, wire.many, max_batch=4)
    assert run_16(c, wire) == [f"task-{i}" for i in range(16)]
    assert [len(call) for call in wire.calls] == [1, 4, 4, 4, 3]


def test_batches_respect_the_byte_limit():
    wire = Wire()
    c = Coalescer(wire.one, wire.many, size_of=lambda spec: 10, max_bytes=25)
    assert run_16(c, wire) == [f"task-{i}" for i in range(16)]
    assert [len(call) for call in wire.calls] == [1, 2, 2, 2, 2, 2, 2, 2, 1]


@pytest.mark.parametrize("n", [1, 3])
def test_results_reach_the_right_threads(n):
    wire = Wire()
    wire.gate.set()
    c = Coalescer(wire.one, wire.many)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(c.submit, range(200 * n)))
    assert got == [f"task-{i}" for i in range(200 * n)]
