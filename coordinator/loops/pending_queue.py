"""The pending tasks in scheduling order, kept between cycles: the leader's full pass takes
the most urgent few thousand of 200,000 pending tasks in O(k log k), not by sorting them all.

Order: higher base priority first, then earlier submission, then task id (the order the
pure scheduler starts from; it applies aging itself). A binary heap with lazy deletion:
a task that leaves PENDING is only dropped from `_live`; its heap entry is skipped when
met and the heap is rebuilt once stale entries outnumber live ones (amortised O(1)).
"""

from __future__ import annotations

import heapq

Key = tuple[int, int, str]  # (-priority, created_at_ms, task id)


class PendingQueue:
    def __init__(self) -> None:
        self._heap: list[Key] = []
        self._live: dict[str, Key] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._live

    def push(self, task_id: str, priority: int, created_at_ms: int) -> None:
        key = (-priority, created_at_ms, task_id)
        if self._live.get(task_id) == key:
            return  # already queued (a requeue keeps its place)
        self._live[task_id] = key
        heapq.heappush(self._heap, key)

    def discard(self, task_id: str) -> None:
        if self._live.pop(task_id, None) is not None and len(self._heap) > 2 * len(self._live) + 64:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)

    def clear(self) -> None:
        self._heap, self._live = [], {}

    def smallest(self, k: int) -> list[str]:
        """The ids of the `k` most urgent tasks, most urgent first: a walk down the heap
        from its root that visits O(k + stale) entries."""
        heap, live = self._heap, self._live
        out: list[str] = []
        if not heap or k <= 0:
            return out
        frontier = [(heap[0], 0)]
        taken: set[str] = set()  # a task pushed again after a discard has two entries
        while frontier and len(out) < k:
            key, i = heapq.heappop(frontier)
            task_id = key[2]
            if live.get(task_id) == key and task_id not in taken:
                taken.add(task_id)
                out.append(task_id)
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))
        return out
