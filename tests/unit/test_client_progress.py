"""`data put` and `data get` report progress from several threads at once (uploads, pulls):
one counter, kept under a lock, so no byte is lost and the reported total only grows."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from lepton.client.data import _progress_counter


def test_ticks_from_many_threads_add_up_and_are_reported_in_order() -> None:
    seen: list[tuple[int, int]] = []
    tick = _progress_counter(lambda done, total: seen.append((done, total)), total=8 * 2000)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: [tick(1) for _ in range(2000)], range(8)))
    assert seen[-1] == (16000, 16000)
    assert [done for done, _ in seen] == list(range(1, 16001))


def test_no_callback_is_fine() -> None:
    _progress_counter(None, 10)(5)
