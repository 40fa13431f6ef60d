"""Spawning claimed attempts, several at once (for `lepton.agent.tasks.runner`).

The spawn of one attempt (its environment, run.json, output.log, the wrapper process) is
blocking work that touches no runner state, so a batch of them runs on a few threads
(`Spawner`; large batches in the background: `SpawnQueue`):
`fork_exec` releases the GIL, and while one thread waits for its child to exec, others
spawn theirs. The runner waits for the batch and then handles the results on its event loop,
in the batch's order (tracking, events), so nothing about ordering or fencing changes.

run.json is not fsync'd: it serves a restart in this boot only (the page cache survives an
agent crash); after a power cut every attempt is over, and the claims (claims.py) say
which ran.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton.agent.tasks import task_proc as tp
from lepton.agent.tasks.attempt_env import AttemptEnv
from lepton.agent.tasks.task_spec import RunSpec

logger = logging.getLogger(__name__)

SPAWN_THREADS = 4  # more gains little on a few cores: each spawn is mostly the kernel's work
SYNC_SPAWNS = 8  # batches up to this size are spawned before the runner's call returns
SPAWN_CHUNK = 64  # larger ones in the background (SpawnQueue), this many at a time


@dataclass
class Spawned:
    proc: subprocess.Popen[bytes]
    run: dict[str, Any]  # what run.json holds: spec, pid, start, boot_id, started_at_ms, deadline_mono


class Spawner:
    """Spawns attempts' wrappers, a batch at a time (see the module doc)."""

    def __init__(self, spawn_env: AttemptEnv, lease_path: Path | None, boot: str):
        self._env = spawn_env
        self._lease_path = lease_path
        self._boot = boot
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def spawn_all(self, batch: list[tuple[RunSpec, Path]]) -> list[Spawned | str]:
        """Each attempt spawned (`Spawned`), or why not (a reason), in `batch`'s order.
        Blocks until every one is done; never raises."""
        if len(batch) <= 1:
            return [self._spawn_one(item) for item in batch]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(SPAWN_THREADS, thread_name_prefix="task-spawn")
            pool = self._pool
        return list(pool.map(self._spawn_one, batch))

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _spawn_one(self, item: tuple[RunSpec, Path]) -> Spawned | str:
        spec, att_dir = item
        try:
            return self._spawn(spec, att_dir)
        except Exception as err:  # a bug must not lose the rest of the batch
            logger.exception("spawning task %s attempt %d failed", spec.task_id, spec.attempt)
            return f"internal error: {err}"

    def _spawn(self, spec: RunSpec, att_dir: Path) -> Spawned | str:
        try:
            command, env, workdir = self._env.prepare(spec, att_dir)
        except OSError as err:
            return str(err)
        run: dict[str, Any] = {
            "spec": spec.to_json(), "pid": 0, "start": 0, "boot_id": self._boot, "started_at_ms": 0,
            "deadline_mono": time.monotonic() + spec.timeout_s if spec.timeout_s > 0 else 0,
        }
        try:
            tp.write_json_atomic(att_dir / "run.json", run, durable=False)  # intent: lets a restart find an orphan
            log_fd = os.open(att_dir / "output.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as err:
            return f"cannot write {att_dir}: {err}"
        try:
            proc = subprocess.Popen(
                tp.wrapper_argv(att_dir / "exit.json", command,
                                None if spec.keep_on_disconnect else self._lease_path),
                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,  # one file description
                cwd=workdir, env=env, start_new_session=True, close_fds=True,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as err:
            return str(err)
        finally:
            os.close(log_fd)
        info = tp.proc_info(proc.pid)  # our unreaped child: present, if only as a zombie
        run.update(pid=proc.pid, start=info.start if info else 0.0, started_at_ms=int(time.time() * 1000))
        try:
            tp.write_json_atomic(att_dir / "run.json", run, durable=False)
        except OSError as err:
            # Unrecorded, a restarted agent could not find it: better not to leave it running.
            tp.signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"cannot record the pid: {err}"
        return Spawned(proc, run)


Key = tuple[str, int]  # (task id, attempt)
Item = tuple[RunSpec, Path]  # a claimed attempt and its folder


class SpawnQueue:
    """Claimed attempts spawned in the background, SPAWN_CHUNK at a time, so that the event
    loop (heartbeats, exits, the leader's own work when the agent is a voter) keeps going
    while thousands start. `on_spawned(chunk, results)` runs on the loop after each chunk.
    An attempt cancelled while it waits is taken back (`take_back`) and never starts; one
    cancelled while its chunk spawns is stopped as soon as it has started
    (`stop_when_started`)."""

    def __init__(self, spawner: Spawner, on_spawned: Callable[[list[Item], list[Spawned | str]], None]):
        self._spawner = spawner
        self._on_spawned = on_spawned
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

    async def close(self) -> None:
        """Start nothing more (what waited stays claimed, never started: a runner's next
        start reports it lost); let the chunk in its threads finish and be handed on."""
        self._backlog.clear()
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
                results = await asyncio.to_thread(self._spawner.spawn_all, chunk)
            except RuntimeError as err:  # the loop's executor is shut down: the process is ending
                results = [f"not spawned: {err}"] * len(chunk)
            finally:
                self._in_flight -= keys
            try:
                self._on_spawned(chunk, results)
            except Exception:
                logger.exception("handling spawned task attempts failed")
