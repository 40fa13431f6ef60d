"""TaskHub's wake-ups of WaitTask callers (the per-node change logs: test_assignment_deltas)."""

from __future__ import annotations

import asyncio

from lepton.coordinator.api.task_hub import TaskHub
from lepton.v1 import tasks_pb2


def test_a_change_wakes_every_waiter_once_per_burst() -> None:
    async def main() -> None:
        hub = TaskHub()
        waiters = [asyncio.create_task(hub.wait_for_change(60)) for _ in range(3)]
        await asyncio.sleep(0)
        for i in range(5):  # one burst: one wake-up
            hub.on_task_change(tasks_pb2.Task(id=f"t-{i}"), "")
        await asyncio.wait_for(asyncio.gather(*waiters), 10)
        assert not hub._waiters and not hub._dirty

    asyncio.run(main())


def test_without_a_change_a_waiter_returns_at_its_timeout() -> None:
    async def main() -> None:
        hub = TaskHub()
        await asyncio.wait_for(hub.wait_for_change(0.01), 10)
        assert not hub._waiters

    asyncio.run(main())


def test_changes_with_nobody_waiting_schedule_nothing() -> None:
    async def main() -> None:
        hub = TaskHub()
        hub.on_task_change(tasks_pb2.Task(id="t-1"), "")
        assert not hub._dirty

    asyncio.run(main())


def test_a_cancelled_waiter_is_forgotten() -> None:
    async def main() -> None:
        hub = TaskHub()
        waiter = asyncio.create_task(hub.wait_for_change(60))
        await asyncio.sleep(0)
        assert len(hub._waiters) == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert not hub._waiters

    asyncio.run(main())
