"""The replica's dynamic batcher: windows, the row cap, and errors that stay with their caller."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from lepton.workloads.serving.batcher import Batcher, BatcherClosed


class Recorder:
    """A model that doubles its input and records the batches it saw; it may be held."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.release.wait(30)
        if (x < 0).any():
            raise ValueError("negative rows")
        self.batches.append(len(x))
        return x * 2


def rows(start: int, n: int = 1) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1)


async def test_requests_within_the_window_run_as_one_batch_and_each_gets_its_rows():
    model = Recorder()
    b = Batcher(model, max_batch=64, max_wait_s=5.0)
    # All three are queued before the worker first runs; the window (5 s) is cut short by
    # close(), which still runs what is queued: one batch of 6 rows.
    calls = [asyncio.ensure_future(b.predict(rows(10 * i, 2))) for i in range(3)]
    await asyncio.sleep(0)
    await b.close()  # closes the window early; queued requests still run
    results = await asyncio.gather(*calls)
    assert model.batches == [6]
    for i, (y, batch_rows) in enumerate(results):
        assert batch_rows == 6
        np.testing.assert_array_equal(y, rows(10 * i, 2) * 2)


async def test_a_full_batch_runs_without_waiting_out_the_window():
    model = Recorder()
    b = Batcher(model, max_batch=4, max_wait_s=3600.0)  # an hour: only a full batch can run
    results = await asyncio.gather(*(b.predict(rows(i)) for i in range(4)))
    assert model.batches == [4]
    assert [r[1] for r in results] == [4, 4, 4, 4]
    await b.close()


async def test_max_batch_caps_rows_and_an_overflowing_request_waits_for_the_next_batch():
    model = Recorder()
    model.release.clear()  # hold the first batch so the rest queue up behind it
    b = Batcher(model, max_batch=4, max_wait_s=0.0)
    first = asyncio.ensure_future(b.predict(rows(0)))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not b._queue:  # the worker took the first request (and is held in the model)
            break
    queued = [asyncio.ensure_future(b.predict(rows(i, n))) for i, n in ((1, 3), (2, 2), (3, 1), (4, 9))]
    await asyncio.sleep(0)
    model.release.set()
    results = await asyncio.gather(first, *queued)
    # 3 rows, then 2+1 (the next 9 would overflow), then the 9 alone (larger than max_batch).
    assert model.batches == [1, 3, 3, 9]
    assert [r[1] for r in results] == [1, 3, 3, 3, 9]
    await b.close()


async def test_batching_off_runs_each_request_alone():
    model = Recorder()
    b = Batcher(model, max_batch=1, max_wait_s=1.0)
    assert b.max_wait_s == 0.0
    await asyncio.gather(*(b.predict(rows(i)) for i in range(3)))
    assert model.batches == [1, 1, 1]
    await b.close()


async def test_one_callers_bad_rows_fail_only_that_caller():
    model = Recorder()
    b = Batcher(model, max_batch=64, max_wait_s=5.0)
    good = asyncio.ensure_future(b.predict(rows(1, 2)))
    bad = asyncio.ensure_future(b.predict(-rows(1)))
    other = asyncio.ensure_future(b.predict(rows(5)))
    await asyncio.sleep(0)
    await b.close()
    np.testing.assert_array_equal((await good)[0], rows(1, 2) * 2)
    np.testing.assert_array_equal((await other)[0], rows(5) * 2)
    with pytest.raises(ValueError, match="negative"):
        await bad
    assert model.batches == [2, 1]  # the batch of 4 failed; each request then ran alone


async def test_a_caller_that_gave_up_does_not_break_the_batch():
    model = Recorder()
    model.release.clear()
    b = Batcher(model, max_batch=64, max_wait_s=0.0)
    first = asyncio.ensure_future(b.predict(rows(0)))
    await asyncio.sleep(0.05)
    gone = asyncio.ensure_future(b.predict(rows(1)))
    kept = asyncio.ensure_future(b.predict(rows(2)))
    await asyncio.sleep(0)
    gone.cancel()
    model.release.set()
    await first
    np.testing.assert_array_equal((await kept)[0], rows(2) * 2)
    assert model.batches == [1, 1]
    await b.close()


async def test_closed_batcher_refuses_new_requests():
    b = Batcher(Recorder(), max_batch=8, max_wait_s=0.0)
    await b.predict(rows(0))
    await b.close()
    with pytest.raises(BatcherClosed):
        await b.predict(rows(1))


async def test_a_quick_model_runs_on_the_loop_and_a_slow_one_in_a_thread():
    threads: list[int] = []

    def model(x: np.ndarray) -> np.ndarray:
        threads.append(threading.get_ident())
        return x

    quick = Batcher(model, max_batch=1, max_wait_s=0.0, inline_below_s=3600.0)
    for i in range(3):
        await quick.predict(rows(i))
    await quick.close()
    loop_thread = threading.get_ident()
    assert threads[0] != loop_thread  # the first call's cost is unknown: a thread
    assert threads[1:] == [loop_thread, loop_thread]
    threads.clear()
    slow = Batcher(model, max_batch=1, max_wait_s=0.0, inline_below_s=0.0)
    for i in range(3):
        await slow.predict(rows(i))
    await slow.close()
    assert loop_thread not in threads


async def test_a_cpu_models_cost_is_its_cpu_time_not_the_wall_time_others_took():
    """A model that waits (as a busy machine makes a quick one wait for a core) but uses
    little CPU still runs on the loop when the batcher counts CPU time."""
    threads: list[int] = []

    def waits(x: np.ndarray) -> np.ndarray:
        threads.append(threading.get_ident())
        time.sleep(0.01)  # 10 ms of wall, next to no CPU
        return x

    by_cpu = Batcher(waits, max_batch=1, max_wait_s=0.0, inline_below_s=0.005, cost_clock=time.thread_time)
    by_wall = Batcher(waits, max_batch=1, max_wait_s=0.0, inline_below_s=0.005)
    loop_thread = threading.get_ident()
    for b in (by_cpu, by_wall):
        threads.clear()
        for i in range(3):
            await b.predict(rows(i))
        await b.close()
        assert (loop_thread in threads[1:]) == (b is by_cpu)
