"""Spawning claimed attempts, several at once (for `lepton.agent.tasks.runner`).

The runner builds each attempt's spawn (its command, environment and folder: attempt_env)
and the node's attempt fence (fence.py) spawns a whole batch in one request: it is every
attempt's parent and writes run.json once, with the pid. Every batch is claimed and spawned
in the background (`SpawnQueue`: folders, claims' fsync and the fence's request in a
thread), so the event loop (heartbeats, exits, the leader's own work when the agent is a
voter) never waits on the disk or on the fence (a hung one included) while thousands start.
The runner handles the results on its loop, in the batch's order (tracking, events), so
nothing about ordering or fencing changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton.agent.tasks.attempt_env import AttemptEnv
from lepton.agent.tasks.claims import ClaimLog
from lepton.agent.tasks.fence_link import FenceLink, InDoubt
from lepton.agent.tasks.task_spec import RunSpec

logger = logging.getLogger(__name__)

SPAWN_CHUNK = 64  # attempts per request to the fence (SpawnQueue)
ALREADY_RAN = "already ran on this node"  # a background attempt whose folder existed: not spawned
# The request was sent and not answered: some may run. The runner settles each by its
# run.json and the held list of the next link before reporting anything.
IN_DOUBT = "in doubt: the node's attempt fence did not answer"


@dataclass
class Spawned:
    pid: int
    start: float  # the process's start time (task_proc.ProcInfo), against pid reuse
    run: dict[str, Any]  # what run.json holds: spec, pid, start, boot_id, started_at_ms, deadline_mono


class Spawner:
    """Spawns attempts through the node's fence, a batch at a time (see the module doc)."""

    def __init__(self, spawn_env: AttemptEnv, lease_path: Path | None, boot: str, link: FenceLink):
        self._env = spawn_env
        self._lease = str(lease_path or "")
        self._boot = boot
        self._link = link

    def spawn_all(self, batch: list[tuple[RunSpec, Path]]) -> list[Spawned | str]:
        """Each attempt spawned (`Spawned`), or why not (a reason), in `batch`'s order.
        Blocks until every one is done; never raises."""
        results: list[Spawned | str] = ["not spawned"] * len(batch)
        items: list[dict[str, Any]] = []
        where: list[int] = []
        for i, (spec, att_dir) in enumerate(batch):
            try:
                command, env, workdir = self._env.prepare(spec, att_dir)
            except OSError as err:
                results[i] = str(err)
                continue
            except Exception as err:  # a bug must not lose the rest of the batch
                logger.exception("preparing task %s attempt %d failed", spec.task_id, spec.attempt)
                results[i] = f"internal error: {err}"
                continue
            run = {"spec": spec.to_json(), "boot_id": self._boot, "fence": True,
                   "deadline_mono": time.monotonic() + spec.timeout_s if spec.timeout_s > 0 else 0}
            items.append({"key": [spec.task_id, spec.attempt], "argv": list(command), "env": env,
                          "cwd": str(workdir), "dir": str(att_dir), "run": run,
                          "lease": "" if spec.keep_on_disconnect else self._lease})
            where.append(i)
        if not items:
            return results
        try:
            replies = self._link.spawn(items)
        except InDoubt:
            replies = [{"error": IN_DOUBT}] * len(items)
        except OSError as err:
            replies = [{"error": str(err)}] * len(items)
        for i, item, reply in zip(where, items, replies, strict=True):
            if "error" in reply:
                results[i] = str(reply["error"])
            else:
                results[i] = Spawned(int(reply["pid"]), float(reply["start"]), {**item["run"], **reply})
        return results


Key = tuple[str, int]  # (task id, attempt)
Item = tuple[RunSpec, Path]  # an attempt and its folder


def claim_and_spawn(claims: ClaimLog, spawner: Spawner, made: Callable[[Key], bool],
                    chunk: list[Item]) -> list[Spawned | str]:
    """A background chunk, in a spawning thread: its folders made (exclusive; not those
    `made` already, by `launch` on the loop), its claims recorded (one fsync), then spawned:
    the event loop touches no disk for them."""
    results: list[Spawned | str] = [ALREADY_RAN] * len(chunk)
    claimed: list[int] = []
    for i, (spec, att_dir) in enumerate(chunk):
        if made((spec.task_id, spec.attempt)):
            claimed.append(i)
            continue
        try:
            att_dir.parent.mkdir(parents=True, exist_ok=True)
            att_dir.mkdir()
            claimed.append(i)
        except FileExistsError:
            pass  # it ran here before; its EXITED event is the coordinator's answer
        except OSError as err:
            results[i] = f"cannot make the attempt's folder: {err}"
    try:
        claims.record((chunk[i][0].task_id, chunk[i][0].attempt, chunk[i][0].term) for i in claimed)
    except OSError as err:
        for i in claimed:
            results[i] = f"cannot record the attempt's claim: {err}"
        return results
    for i, result in zip(claimed, spawner.spawn_all([chunk[i] for i in claimed]), strict=True):
        results[i] = result
    return results


class SpawnQueue:
    """Attempts claimed and spawned in the background, SPAWN_CHUNK at a time (`spawn(chunk)`
    in a thread: their folders, claims and spawns), so that the event loop (heartbeats,
    exits, the leader's own work when the agent is a voter) keeps going while thousands
    start. `on_spawned(chunk, results)` runs on the loop after each chunk.
    An attempt cancelled while it waits is taken back (`take_back`) and never starts; one
    cancelled while its chunk spawns is stopped as soon as it has started
    (`stop_when_started`)."""

    def __init__(self, spawn: Callable[[list[Item]], list[Spawned | str]],
                 on_spawned: Callable[[list[Item], list[Spawned | str]], None],
                 ready: Callable[[], Awaitable[object]]):
        """`ready()` is awaited before each chunk (the runner links to its fence then)."""
        self._spawn = spawn
        self._on_spawned = on_spawned
        self._ready = ready
        self.starting: dict[Key, RunSpec] = {}  # every attempt queued or spawning now
        self.stop_when_started: dict[Key, tuple[str, float | None]] = {}  # reason, grace
        self._backlog: list[Item] = []
        self._in_flight: set[Key] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, items: list[Item]) -> None:
        for spec, _ in items:
            self.starting[(spec.task_id, spec.attempt)] = spec
        self._backlog.extend(items)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="task-spawns")

    def wanted(self, key: Key) -> bool:
        """Queued or spawning, and not cancelled meanwhile."""
        return key in self.starting and key not in self.stop_when_started

    def take_back(self, key: Key) -> RunSpec | None:
        """Its spec, out of the queue before it started; None when it is not waiting (not
        queued, or a thread spawns it now)."""
        if key not in self.starting or key in self._in_flight:
            return None
        return self.starting.pop(key)

    def done(self, key: Key) -> tuple[str, float | None] | None:
        """Out of the queue, spawned (or not): the cancel that came meanwhile, if any."""
        self.starting.pop(key, None)
        return self.stop_when_started.pop(key, None)

    async def close(self, keep: Callable[[Key], bool]) -> None:
        """Start nothing more but what `keep` says (those `launch` made folders for: they
        are done here, so they must run); what else waited is not claimed yet: the leader's
        next set starts it. Let the chunks in the threads finish and be handed on."""
        self._backlog = [(spec, d) for spec, d in self._backlog if keep((spec.task_id, spec.attempt))]
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.starting.clear()
        self.stop_when_started.clear()

    async def _run(self) -> None:
        while self._backlog:
            chunk, self._backlog = self._backlog[:SPAWN_CHUNK], self._backlog[SPAWN_CHUNK:]
            # Those taken back while they waited are out of `starting` (and reported).
            chunk = [(spec, d) for spec, d in chunk if (spec.task_id, spec.attempt) in self.starting]
            keys = {(spec.task_id, spec.attempt) for spec, _ in chunk}
            self._in_flight |= keys
            try:
                await self._ready()
                results = await asyncio.to_thread(self._spawn, chunk)
            except RuntimeError as err:  # the loop's executor is shut down: the process is ending
                results = [f"not spawned: {err}"] * len(chunk)
            finally:
                self._in_flight -= keys
            try:
                self._on_spawned(chunk, results)
            except Exception:
                logger.exception("handling spawned task attempts failed")
