"""Spawning claimed attempts, several at once (for `lepton.agent.tasks.runner`).

The runner builds each attempt's spawn (its command, environment and folder: attempt_env)
and the node's attempt fence (fence.py) spawns a whole batch in one request: it is every
attempt's parent and writes run.json once, with the pid. Every batch is claimed and spawned
in the background (`SpawnQueue`: folders, claims' fsync and the fence's request in
threads), so the event loop (heartbeats, exits, the leader's own work when the agent is a
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
FIRST_CHUNK = 8  # the first request after a quiet spell: its attempts start sooner
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

    def prepare(self, batch: list[tuple[RunSpec, Path]]) -> Prepared:
        """Each attempt's request to the fence (its command, environment, folder), or why it
        cannot be made, in `batch`'s order. Never raises."""
        prepared = Prepared(["not spawned"] * len(batch), [], [])
        for i, (spec, att_dir) in enumerate(batch):
            try:
                command, env, workdir = self._env.prepare(spec, att_dir)
            except OSError as err:
                prepared.results[i] = str(err)
                continue
            except Exception as err:  # a bug must not lose the rest of the batch
                logger.exception("preparing task %s attempt %d failed", spec.task_id, spec.attempt)
                prepared.results[i] = f"internal error: {err}"
                continue
            run = {"spec": spec.to_json(), "boot_id": self._boot, "fence": True,
                   "deadline_mono": time.monotonic() + spec.timeout_s if spec.timeout_s > 0 else 0}
            prepared.items.append({"key": [spec.task_id, spec.attempt], "argv": list(command), "env": env,
                                   "cwd": str(workdir), "dir": str(att_dir), "run": run,
                                   "lease": "" if spec.keep_on_disconnect else self._lease})
            prepared.where.append(i)
        return prepared

    def spawn(self, prepared: Prepared) -> list[Spawned | str]:
        """Send the prepared requests in one batch; each attempt spawned (`Spawned`) or why
        not, in the prepared batch's order. Blocks until the fence answers; never raises."""
        results = prepared.results
        if not prepared.items:
            return results
        try:
            replies = self._link.spawn(prepared.items)
        except InDoubt:
            replies = [{"error": IN_DOUBT}] * len(prepared.items)
        except OSError as err:
            replies = [{"error": str(err)}] * len(prepared.items)
        for i, item, reply in zip(prepared.where, prepared.items, replies, strict=True):
            if "error" in reply:
                results[i] = str(reply["error"])
            else:
                results[i] = Spawned(int(reply["pid"]), float(reply["start"]), {**item["run"], **reply})
        return results


@dataclass
class Prepared:
    """A batch ready for the fence: `results` holds, by the batch's order, a reason for each
    attempt that will not be spawned; `items` are the requests of the others, `where` their
    places in the batch."""

    results: list[Spawned | str]
    items: list[dict[str, Any]]
    where: list[int]


Key = tuple[str, int]  # (task id, attempt)
Item = tuple[RunSpec, Path]  # an attempt and its folder


def claim_and_prepare(claims: ClaimLog, spawner: Spawner, made: Callable[[Key], bool],
                      chunk: list[Item]) -> Prepared:
    """A background chunk, in a thread: its folders made (exclusive; not those `made`
    already, by `launch` on the loop), its claims recorded (one fsync), its requests to the
    fence built: the event loop touches no disk for them. Nothing is spawned yet."""
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
        return Prepared(results, [], [])
    ready = spawner.prepare([chunk[i] for i in claimed])
    for i, result in zip(claimed, ready.results, strict=True):
        results[i] = result
    return Prepared(results, ready.items, [claimed[j] for j in ready.where])


class SpawnQueue:
    """Attempts claimed and spawned in the background (`prepare(chunk)` in a thread: their
    folders, claims and requests; then `spawn(prepared)` in a thread: the fence's request),
    so that the event loop (heartbeats, exits, the leader's own work when the agent is a
    voter) keeps going while thousands start. Pipelined: the next chunk is prepared while
    the fence spawns the one before, so the fence does not wait on this node's disk between
    chunks, and the first chunk after a quiet spell is small (FIRST_CHUNK), so the first
    attempts start before a whole chunk's folders are made. Chunks reach the fence one after
    another, in order. `on_spawned(chunk, results)` runs on the loop after each chunk.
    An attempt cancelled while it waits is taken back (`take_back`) and never starts; one
    cancelled once its chunk is being prepared or spawned is stopped as soon as it has
    started (`stop_when_started`)."""

    def __init__(self, prepare: Callable[[list[Item]], Prepared], spawn: Callable[[Prepared], list[Spawned | str]],
                 on_spawned: Callable[[list[Item], list[Spawned | str]], None],
                 ready: Callable[[], Awaitable[object]]):
        """`ready()` is awaited before each chunk is sent (the runner links to its fence then)."""
        self._prepare = prepare
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

    def _take(self, size: int) -> tuple[list[Item], set[Key], asyncio.Future[Prepared]] | None:
        """The next chunk out of the backlog, in flight from now on, its preparing begun;
        None when the backlog is empty."""
        while self._backlog:
            chunk, self._backlog = self._backlog[:size], self._backlog[size:]
            # Those taken back while they waited are out of `starting` (and reported).
            chunk = [(spec, d) for spec, d in chunk if (spec.task_id, spec.attempt) in self.starting]
            if chunk:
                keys = {(spec.task_id, spec.attempt) for spec, _ in chunk}
                self._in_flight |= keys
                return chunk, keys, asyncio.ensure_future(asyncio.to_thread(self._prepare, chunk))
        return None

    async def _run(self) -> None:
        following = self._take(FIRST_CHUNK)
        while following is not None:
            chunk, keys, preparing = following
            following = None
            try:
                prepared = await preparing
                await self._ready()
                following = self._take(SPAWN_CHUNK)  # prepared while this one spawns
                results = await asyncio.to_thread(self._spawn, prepared)
            except RuntimeError as err:  # the loop's executor is shut down: the process is ending
                results = [f"not spawned: {err}"] * len(chunk)
            finally:
                self._in_flight -= keys
            try:
                self._on_spawned(chunk, results)
            except Exception:
                logger.exception("handling spawned task attempts failed")
            if following is None:
                following = self._take(SPAWN_CHUNK)
