"""PendingQueue: the scheduling loop's pending tasks in order, with lazy deletion."""

from __future__ import annotations

import random

from lepton.coordinator.loops.pending_queue import PendingQueue


def test_most_urgent_first_by_priority_then_age_then_id() -> None:
    q = PendingQueue()
    q.push("late", 0, 300)
    q.push("early", 0, 100)
    q.push("urgent", 5, 900)
    q.push("b", 0, 200)
    q.push("a", 0, 200)
    assert q.smallest(10) == ["urgent", "early", "a", "b", "late"]
    assert q.smallest(2) == ["urgent", "early"]
    assert q.smallest(0) == []


def test_discarded_tasks_are_skipped_and_a_requeued_one_appears_once() -> None:
    q = PendingQueue()
    for i in range(5):
        q.push(f"t{i}", 0, i)
    q.discard("t0")
    q.discard("t2")
    q.discard("missing")  # never queued: nothing happens
    assert q.smallest(10) == ["t1", "t3", "t4"]
    q.push("t0", 0, 0)  # requeued: its stale entry and the new one hold the same key
    q.push("t0", 0, 0)
    assert q.smallest(10) == ["t0", "t1", "t3", "t4"] and len(q) == 4


def test_matches_a_full_sort_under_random_churn() -> None:
    rng = random.Random(15)
    q = PendingQueue()
    live: dict[str, tuple[int, int, str]] = {}
    for step in range(20_000):
        task_id = f"t{rng.randrange(3000)}"
        if rng.random() < 0.55:
            prio, at = rng.randrange(-2, 3), rng.randrange(1000)
            if task_id in live:  # a pending task's spec does not change: same key again
                prio, at = -live[task_id][0], live[task_id][1]
            q.push(task_id, prio, at)
            live[task_id] = (-prio, at, task_id)
        else:
            q.discard(task_id)
            live.pop(task_id, None)
        if step % 997 == 0:
            k = rng.randrange(1, 200)
            assert q.smallest(k) == [key[2] for key in sorted(live.values())[:k]]
    assert len(q) == len(live)
    # Stale entries never pile up past twice the live ones (plus a little slack).
    assert len(q._heap) <= 2 * len(live) + 64 + 1
