"""SpawnQueue's pipeline (agent/tasks/spawn.py), with recording fakes for the thread work:
a small first chunk, the next chunk prepared while the fence spawns the one before, chunks
sent and handed on in order, and in-flight attempts never taken back."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from lepton.agent.tasks import spawn as spawn_mod
from lepton.agent.tasks.spawn import Prepared, SpawnQueue
from lepton.agent.tasks.task_spec import RunSpec


def items(n: int) -> list[tuple[RunSpec, Path]]:
    return [(RunSpec(task_id=f"t{i:03d}", attempt=1, term=1, argv=("true",)), Path(f"/x/t{i:03d}/1"))
            for i in range(n)]


class Recorder:
    """prepare/spawn fakes: what each saw, in order; the first spawn waits for `release`."""

    def __init__(self) -> None:
        self.log: list[tuple[str, list[str]]] = []
        self.release = threading.Event()
        self.first_spawning = threading.Event()
        self.handed: list[list[str]] = []
        self.queue: SpawnQueue | None = None

    def prepare(self, chunk):
        self.log.append(("prepare", [spec.task_id for spec, _ in chunk]))
        return Prepared([f"ok {spec.task_id}" for spec, _ in chunk], [], [])

    def spawn(self, prepared: Prepared):
        names = [r.split()[1] for r in prepared.results]
        self.log.append(("spawn", names))
        if not self.first_spawning.is_set():
            self.first_spawning.set()
            assert self.release.wait(10)
        return prepared.results

    def on_spawned(self, chunk, results):
        assert results == [f"ok {spec.task_id}" for spec, _ in chunk]
        self.handed.append([spec.task_id for spec, _ in chunk])
        for spec, _ in chunk:
            self.queue.done((spec.task_id, spec.attempt))  # as the runner's outcomes do


async def ready() -> bool:
    return True


async def wait_for(cond, what: str) -> None:
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_the_next_chunk_is_prepared_while_the_fence_spawns_and_all_go_in_order():
    rec = Recorder()
    queue = rec.queue = SpawnQueue(rec.prepare, rec.spawn, rec.on_spawned, ready)
    batch = items(spawn_mod.FIRST_CHUNK + 2 * spawn_mod.SPAWN_CHUNK + 3)
    queue.add(batch)
    await wait_for(rec.first_spawning.is_set, "the first spawn")
    # The first chunk is small, and while it spawns the next one is being prepared.
    await wait_for(lambda: len(rec.log) >= 3, "the second chunk's preparing")
    assert [kind for kind, _ in rec.log[:3]] == ["prepare", "spawn", "prepare"]
    assert len(rec.log[0][1]) == spawn_mod.FIRST_CHUNK
    assert len(rec.log[2][1]) == spawn_mod.SPAWN_CHUNK
    # Prepared, not spawned yet: in flight, so a cancel cannot take it back (it is stopped
    # once started instead); one still queued can be.
    in_flight, queued = batch[spawn_mod.FIRST_CHUNK][0], batch[-1][0]
    assert queue.take_back((in_flight.task_id, 1)) is None
    assert queue.take_back((queued.task_id, 1)) is queued
    assert rec.handed == []
    rec.release.set()
    await wait_for(lambda: not queue.starting, "every chunk")
    await queue.close(lambda key: True)
    spawned = [names for kind, names in rec.log if kind == "spawn"]
    prepared = [names for kind, names in rec.log if kind == "prepare"]
    assert spawned == prepared == rec.handed  # each chunk sent once, in order, handed on in order
    everything = [name for names in spawned for name in names]
    assert everything == [spec.task_id for spec, _ in batch if spec is not queued]


async def test_after_a_quiet_spell_the_first_chunk_is_small_again():
    rec = Recorder()
    rec.first_spawning.set()  # no spawn waits
    queue = rec.queue = SpawnQueue(rec.prepare, rec.spawn, rec.on_spawned, ready)
    for n in (3, spawn_mod.SPAWN_CHUNK):
        queue.add(items(n) if n == 3 else [(RunSpec(task_id=f"u{i:03d}", attempt=1, term=1, argv=("true",)),
                                            Path(f"/x/u{i:03d}/1")) for i in range(n)])
        await wait_for(lambda: not queue.starting, "the batch")
    sizes = [len(names) for kind, names in rec.log if kind == "spawn"]
    assert sizes == [3, spawn_mod.FIRST_CHUNK, spawn_mod.SPAWN_CHUNK - spawn_mod.FIRST_CHUNK]
