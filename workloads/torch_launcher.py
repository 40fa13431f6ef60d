"""Starts this node's share of a torch.distributed job and watches it, like torchrun would.

Given one node's part of a job (`NodeLaunch`: argv, nproc_per_node, node_rank, nnodes, the
master address and port the coordinator picked, the restart count...), `TorchLauncher`
starts the `nproc_per_node` workers with torchrun's environment (`lepton.workloads.torch_env`),
each in its own session and process group, and waits for them.

- Output: each worker's stdout and stderr share one pipe (so their order holds); the
  launcher prefixes every line with `[rank R] ` and appends it to `log_dir/rank_<R>.log`.
  A line longer than `MAX_LINE_BYTES` is cut into several prefixed pieces. With
  `log_max_bytes`, a rank's log is rotated between two lines once the next would take it
  past the cap: closed, renamed over `rank_<R>.log.1`, reopened empty (`RankLog`), so a
  rank keeps at most about 2x the cap on disk. `on_log_rotate(path)` is called just
  before the rename, when the file is complete: a reader can finish it then.
- Error files: `log_dir/rank_<R>.error.json` is the worker's TORCHELASTIC_ERROR_FILE, where
  torch's `@record` decorator writes the exception that killed it; a stale one is removed
  before the worker starts, and the failing rank's one goes into the result.
- Failure: when any worker ends with a non-zero code or a signal (named in the reason:
  "rank 1 killed by signal 6 (SIGABRT)"), the launcher tears the whole node down at once
  (SIGTERM to every worker's group, SIGKILL after `grace_s`) rather than let the others
  hang in a collective until its timeout. The first failure is the one
  reported; workers killed by the teardown are not failures. A worker that exits 0 is done:
  the others keep running, as with torchrun.
- Leftovers: when a worker's main process has ended, whatever it left in its process group
  is SIGKILLed (dataloader workers and the like), like a container.
- The workers are children of this process and do not outlive it (unlike `runner.py`'s
  tasks): a job whose agent dies is failed and restarted by the coordinator.

No torch import here. asyncio: `start()`, `wait()`, `stop()` run on the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton.common.durable import read_json
from lepton.common.validation import join_host_port
from lepton.workloads import torch_env

__all__ = [
    "FAILED_TO_START_CODE",
    "LaunchResult",
    "NodeLaunch",
    "RankLog",
    "TorchLauncher",
    "WorkerExit",
    "run_node",
]

logger = logging.getLogger(__name__)

FAILED_TO_START_CODE = 127  # what a shell reports for a command it cannot run
MAX_LINE_BYTES = 64 * 1024
READ_BYTES = 64 * 1024
DRAIN_S = 5.0  # how long to wait for a dead worker's pipe to reach EOF before giving up on it


@dataclass(frozen=True)
class NodeLaunch:
    """This node's part of one job attempt. See `torch_env.worker_env` for the meaning of
    the topology fields. `shards[i]` is the shard list of local rank i (empty: no shards)."""

    job_id: str
    argv: tuple[str, ...]
    nproc_per_node: int
    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int
    log_dir: Path
    restart_count: int = 0
    max_restarts: int = 0
    run_id: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    dataset: str = ""
    shards: tuple[tuple[str, ...], ...] = ()
    checkpoint_dir: str = ""
    grace_s: float = 10.0
    log_max_bytes: int = 0  # rotate each rank's log past this (0: no cap)

    def validate(self) -> None:
        """Raises ValueError when the spec cannot be launched as it is."""
        if not self.argv or not self.argv[0] or not all(isinstance(a, str) for a in self.argv):
            raise ValueError("argv must be a non-empty sequence of strings")
        if self.shards and len(self.shards) != self.nproc_per_node:
            raise ValueError(f"shards must list one shard list per local rank "
                             f"({self.nproc_per_node}), not {len(self.shards)}")
        if not math.isfinite(self.grace_s) or self.grace_s < 0:
            raise ValueError(f"grace_s must be a finite number >= 0, not {self.grace_s!r}")
        if isinstance(self.log_max_bytes, bool) or not isinstance(self.log_max_bytes, int) \
                or self.log_max_bytes < 0:
            raise ValueError(f"log_max_bytes must be an integer >= 0, not {self.log_max_bytes!r}")
        if isinstance(self.nproc_per_node, bool) or not isinstance(self.nproc_per_node, int) \
                or self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be an integer >= 1, not {self.nproc_per_node!r}")
        for local_rank in range(self.nproc_per_node):
            self.worker_env({}, local_rank)  # the topology checks live there

    def rank(self, local_rank: int) -> int:
        return torch_env.global_rank(self.node_rank, self.nproc_per_node, local_rank)

    def log_path(self, local_rank: int) -> Path:
        return Path(self.log_dir) / f"rank_{self.rank(local_rank)}.log"

    def error_path(self, local_rank: int) -> Path:
        return Path(self.log_dir) / f"rank_{self.rank(local_rank)}.error.json"

    def worker_env(self, base_env: Mapping[str, str], local_rank: int) -> dict[str, str]:
        """The environment of one worker. Raises ValueError for a bad topology."""
        return torch_env.worker_env(
            base_env, self.env,
            job_id=self.job_id, node_rank=self.node_rank, nnodes=self.nnodes,
            nproc_per_node=self.nproc_per_node, local_rank=local_rank,
            master_addr=self.master_addr, master_port=self.master_port,
            restart_count=self.restart_count, max_restarts=self.max_restarts,
            run_id=self.run_id, error_file=str(self.error_path(local_rank)),
            dataset=self.dataset, shards=self.shards[local_rank] if self.shards else (),
            checkpoint_dir=self.checkpoint_dir,
        )


@dataclass(frozen=True)
class WorkerExit:
    """How one worker ended. `exit_code` < 0: killed by that signal (subprocess convention)."""

    rank: int
    local_rank: int
    pid: int
    exit_code: int


@dataclass(frozen=True)
class LaunchResult:
    """The outcome of this node's part of a job attempt.

    `ok`: every worker exited 0. Otherwise `failed_rank`/`failed_code` name the first worker
    that failed (None when the node was stopped from outside, `reason` says why), and
    `error` holds that worker's error file (torch's `@record` format) when it wrote one.
    """

    ok: bool
    reason: str
    exits: tuple[WorkerExit, ...] = ()
    failed_rank: int | None = None
    failed_local_rank: int | None = None
    failed_code: int | None = None
    error: dict[str, Any] | None = None

    @property
    def error_message(self) -> str:
        """The failing worker's exception message from its error file, or ""."""
        msg = (self.error or {}).get("message", "")
        if isinstance(msg, dict):
            msg = msg.get("message", "")
        return msg if isinstance(msg, str) else ""


class _WorkerProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Resolves `exited` with the exit code as soon as the process has ended. (In Python
    3.11, `Process.wait()` also waits for the pipes to close, which a leftover child or a
    forked helper holding the pipe can postpone for ever.)"""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop):
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future[int] = loop.create_future()
        self._transport_ref: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._transport_ref = transport

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done() and self._transport_ref is not None:
            code = self._transport_ref.get_returncode()
            self.exited.set_result(code if code is not None else -signal.SIGKILL)


@dataclass
class _Worker:
    local_rank: int
    rank: int
    pid: int  # also its process group id
    transport: asyncio.SubprocessTransport
    pump: asyncio.Task[None]
    waiter: asyncio.Future[int]


class TorchLauncher:
    """One node's workers of one job attempt: `await start()`, then `await wait()`.
    `stop()` tears them down from outside (job cancelled, a peer node failed)."""

    def __init__(self, spec: NodeLaunch, *, base_env: Mapping[str, str] | None = None,
                 on_log_rotate: Callable[[Path], None] | None = None):
        """`base_env`: the agent's environment for workers (default: this process's).
        `on_log_rotate(path)`: see `RankLog`. Raises ValueError for an invalid spec."""
        spec.validate()
        self.spec = spec
        self._on_log_rotate = on_log_rotate
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._workers: list[_Worker] = []
        self._started = False
        self._stop_reason = ""
        self._stop_grace: float | None = None
        self._stop_event = asyncio.Event()
        self._result: LaunchResult | None = None

    @property
    def pids(self) -> dict[int, int]:
        """Global rank -> pid (= its process group id) of the workers started."""
        return {w.rank: w.pid for w in self._workers}

    async def start(self) -> None:
        """Start every worker of this node (none when `stop()` came first). On a failure to
        start one, the ones already started are killed and the error raised: OSError (no such
        executable, log dir not writable...). Raises RuntimeError when called twice."""
        if self._started:
            raise RuntimeError("this launcher was started already")
        self._started = True
        spec = self.spec
        if self._stop_reason:  # stopped before it started: start nothing
            return
        log_dir = Path(spec.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for local_rank in range(spec.nproc_per_node):
                self._workers.append(await self._spawn(local_rank))
        except BaseException:
            await self._kill_all_now()
            raise
        logger.info("job %s node %d/%d attempt %d: started %d worker(s) (ranks %d..%d), master %s",
                    spec.job_id, spec.node_rank, spec.nnodes, spec.restart_count, spec.nproc_per_node,
                    spec.rank(0), spec.rank(spec.nproc_per_node - 1),
                    join_host_port(spec.master_addr, spec.master_port))

    async def _spawn(self, local_rank: int) -> _Worker:
        spec = self.spec
        env = spec.worker_env(self._base_env, local_rank)
        with contextlib.suppress(FileNotFoundError):
            spec.error_path(local_rank).unlink()  # a stale one would be blamed on this attempt
        log = RankLog(spec.log_path(local_rank), spec.log_max_bytes, self._on_log_rotate)  # closed by the pump
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _WorkerProtocol(READ_BYTES, loop), *spec.argv,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=env, cwd=spec.cwd, start_new_session=True, close_fds=True)
        except BaseException:
            log.close()
            raise
        rank = spec.rank(local_rank)
        assert protocol.stdout is not None
        pump = asyncio.create_task(_pump(protocol.stdout, log, f"[rank {rank}] ".encode()),
                                   name=f"torch-log-{spec.job_id}-{rank}")
        return _Worker(local_rank, rank, transport.get_pid(), transport, pump, protocol.exited)

    def stop(self, reason: str = "stopped", *, grace_s: float | None = None) -> None:
        """Tear the workers down (SIGTERM, SIGKILL after `grace_s`, default the spec's);
        `wait()` then returns a result with `ok` False and this reason, unless every worker
        had already exited 0. The first reason stays. Raises ValueError for a bad grace."""
        if grace_s is not None and (not math.isfinite(grace_s) or grace_s < 0):
            raise ValueError(f"grace_s must be a finite number >= 0, not {grace_s!r}")
        if not self._stop_reason:
            self._stop_reason = reason or "stopped"
            self._stop_grace = grace_s
        self._stop_event.set()

    async def wait(self) -> LaunchResult:
        """Wait until every worker has ended (tearing the node down on the first failure or
        on `stop()`), and say how it went. Cancelling it tears the workers down (SIGKILL at
        once) before the CancelledError propagates. Raises RuntimeError when not started."""
        if not self._started:
            raise RuntimeError("this launcher was not started")
        if self._result is not None:
            return self._result
        try:
            self._result = await self._watch()
        except BaseException:
            await self._kill_all_now()
            raise
        return self._result

    async def _watch(self) -> LaunchResult:
        spec = self.spec
        pending = {w.waiter: w for w in self._workers}
        exits: dict[int, WorkerExit] = {}
        failed: WorkerExit | None = None
        stop_wait = asyncio.create_task(self._stop_event.wait())
        try:
            while pending:
                done, _ = await asyncio.wait([*pending, stop_wait], return_when=asyncio.FIRST_COMPLETED)
                # Exits seen in one round are taken in rank order, so blame is deterministic.
                for t in sorted((t for t in done if t in pending), key=lambda t: pending[t].rank):
                    w = pending.pop(t)
                    code = t.result()
                    exits[w.rank] = WorkerExit(w.rank, w.local_rank, w.pid, code)
                    # Its leftovers. The pid is reaped, but Linux keeps the number while it is
                    # the group id of a live process, so this reaches only that group.
                    _signal_group(w.pid, signal.SIGKILL)
                    if code != 0 and failed is None and not self._stop_reason:
                        failed = exits[w.rank]
                        logger.warning("job %s: rank %d exited with code %d; tearing down this node's "
                                       "%d other worker(s)", spec.job_id, w.rank, code, len(pending))
                if pending and (failed is not None or stop_wait in done):
                    grace = spec.grace_s if self._stop_grace is None or failed else self._stop_grace
                    await self._teardown([pending[t] for t in pending], grace)
                    for t, w in pending.items():
                        exits[w.rank] = WorkerExit(w.rank, w.local_rank, w.pid, t.result())
                    pending.clear()
        finally:
            stop_wait.cancel()
        await self._drain()
        ordered = tuple(exits[r] for r in sorted(exits))
        if failed is not None:
            error = read_json(spec.error_path(failed.local_rank))
            how = (f"killed by signal {_signal_name(-failed.exit_code)}" if failed.exit_code < 0
                   else f"exited with code {failed.exit_code}")
            return LaunchResult(False, f"rank {failed.rank} {how}", ordered, failed.rank,
                                failed.local_rank, failed.exit_code, error)
        if ordered and all(e.exit_code == 0 for e in ordered):
            return LaunchResult(True, "succeeded", ordered)
        return LaunchResult(False, self._stop_reason or "stopped", ordered)

    async def _teardown(self, workers: Sequence[_Worker], grace: float) -> None:
        """SIGTERM every group, SIGKILL those still alive after `grace`; waits for all."""
        for w in workers:
            _signal_group(w.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        waiters = [w.waiter for w in workers]
        if grace > 0:
            _, alive = await asyncio.wait(waiters, timeout=grace)
            if alive:
                logger.warning("job %s: %d worker(s) outlived the %gs grace period; killing them",
                               self.spec.job_id, len(alive), grace)
        for w in workers:
            if not w.waiter.done():
                _signal_group(w.pid, signal.SIGKILL)
        await asyncio.wait(waiters)
        for w in workers:
            _signal_group(w.pid, signal.SIGKILL)  # leftovers in each group

    async def _kill_all_now(self) -> None:
        """SIGKILL everything started, reap it, close the logs (also on cancellation)."""
        for w in self._workers:
            _signal_group(w.pid, signal.SIGKILL)
        waiters = [w.waiter for w in self._workers]
        if waiters:
            with contextlib.suppress(BaseException):
                await asyncio.shield(asyncio.wait(waiters))
        await self._drain()

    async def _drain(self) -> None:
        """Let the pumps write what the pipes still hold; cancel those stuck on a pipe that
        something outside the groups keeps open. Then close the transports (their pipes)."""
        pumps = [w.pump for w in self._workers if not w.pump.done()]
        if pumps:
            _, stuck = await asyncio.wait(pumps, timeout=DRAIN_S)
            for p in stuck:
                logger.warning("job %s: a worker's output pipe is still open after it ended; "
                               "dropping the rest of its output", self.spec.job_id)
                p.cancel()
            for p in stuck:
                with contextlib.suppress(asyncio.CancelledError):
                    await p
        for w in self._workers:
            w.transport.close()


async def run_node(spec: NodeLaunch, *, base_env: Mapping[str, str] | None = None) -> LaunchResult:
    """Start the node's workers and wait for them. A failure to start is a result (code
    FAILED_TO_START_CODE, reason "failed to start: ..."), not an exception.
    Raises ValueError for an invalid spec."""
    launcher = TorchLauncher(spec, base_env=base_env)
    try:
        await launcher.start()
    except OSError as err:
        logger.warning("job %s node %d: failed to start: %s", spec.job_id, spec.node_rank, err)
        return LaunchResult(False, f"failed to start: {err}", failed_code=FAILED_TO_START_CODE)
    return await launcher.wait()


class RankLog:
    """One rank's log file, appended to in whole lines. With `max_bytes` (0: no cap), before
    a line that would take it past the cap, the file is rotated: `on_rotate(path)` (the file
    is complete: a reader may finish it), close, rename over `<name>.1`, reopen empty. Only
    a single line longer than the cap (at most MAX_LINE_BYTES + prefix) makes a file exceed
    it. Raises OSError from the constructor when the file cannot be opened."""

    def __init__(self, path: Path, max_bytes: int = 0, on_rotate: Callable[[Path], None] | None = None):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.rotations = 0
        self._on_rotate = on_rotate
        self._file: Any = None
        self._size = 0
        self._failing = False  # warned about a failed write: once until one succeeds
        self._open()

    def _open(self) -> None:
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (closed by close/_rotate)
        self._size = os.fstat(self._file.fileno()).st_size

    def write_lines(self, lines: Sequence[bytes]) -> None:
        """Append these lines (each ending with a newline), rotating between two of them."""
        batch: list[bytes] = []
        size = 0
        for line in lines:
            if self.max_bytes and self._size + size + len(line) > self.max_bytes and self._size + size:
                self._write(b"".join(batch))
                batch, size = [], 0
                self._rotate()
            batch.append(line)
            size += len(line)
        if batch:
            self._write(b"".join(batch))

    def _write(self, data: bytes) -> None:
        if self._file is None:  # a failed reopen: try again, the disk may have room now
            try:
                self._open()
            except OSError:
                return  # warned about already
        try:
            view = memoryview(data)
            while view:  # FileIO may write less than asked (a full disk, a signal)
                n = self._file.write(view)
                self._size += n
                view = view[n:]
            self._failing = False
        except OSError as err:  # a full disk must not stop the job, nor the draining of its pipe
            if not self._failing:
                self._failing = True
                logger.warning("cannot write %s: %s (dropping its output until it works again)",
                               self.path, err)

    def _rotate(self) -> None:
        if self._on_rotate is not None:
            try:
                self._on_rotate(self.path)
            except Exception:  # the reader's trouble must not stop the job's output
                logger.exception("on_rotate failed for %s", self.path)
        self.close()
        try:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        except OSError as err:
            # Cannot keep it: drop it rather than let it grow past the cap.
            logger.warning("cannot rotate %s (%s): truncating it", self.path, err)
            with contextlib.suppress(OSError):
                os.truncate(self.path, 0)
        self.rotations += 1
        try:
            self._open()
        except OSError as err:
            logger.warning("cannot reopen %s after rotating it: %s", self.path, err)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def _pump(stream: asyncio.StreamReader, log: RankLog, prefix: bytes) -> None:
    """Copy `stream` to `log` line by line, each line prefixed; closes `log` at the end."""
    pending = b""
    try:
        while True:
            chunk = await stream.read(READ_BYTES)
            if not chunk:
                break
            pending += chunk
            complete = pending.split(b"\n")
            pending = complete.pop()
            lines = [line[i:i + MAX_LINE_BYTES] for line in complete
                     for i in range(0, max(len(line), 1), MAX_LINE_BYTES)]  # long lines cut
            while len(pending) >= MAX_LINE_BYTES:  # no newline in sight: cut it
                lines.append(pending[:MAX_LINE_BYTES])
                pending = pending[MAX_LINE_BYTES:]
            if lines:
                log.write_lines([prefix + line + b"\n" for line in lines])
        if pending:
            log.write_lines([prefix + pending + b"\n"])
    finally:
        log.close()


def _signal_name(number: int) -> str:
    """"6 (SIGABRT)": the number as the exit status has it, and the name a reader looks for."""
    try:
        return f"{number} ({signal.Signals(number).name})"
    except ValueError:  # a real-time signal, or one this Python does not name
        return str(number)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
