"""Bounds the disk a task attempt's output and finished attempts use, for `runner.TaskRunner`.

Output cap. The task writes `output.log` itself, through an inherited O_APPEND descriptor
(it outlives the agent), so the agent cannot rename the file away. When the runner's watcher
finds it past the cap (`OutputLogs.check`, about once a second), its head is copied in a
thread to `output.log.1.tmp` (fsync'd), then cut from `output.log`, and the copy renamed
over `output.log.1`:
- by FALLOC_FL_COLLAPSE_RANGE where the filesystem has it (ext4, XFS): the copied head,
  whole blocks of it, is removed atomically with respect to the task's appends, so nothing
  is lost; `output.log` keeps the last partial block.
- elsewhere (tmpfs, btrfs, NFS...) by copy-truncate: after the copy has caught up with the
  file, on the event loop, `output.log` is truncated to 0 and the task's next write lands at
  the new end. Bytes written between that last read and the truncate (microseconds) are lost
  without a trace; the catch-up after the fsync'd bulk is not fsync'd itself.
Disk use per attempt: output.log up to the cap plus what the task writes between two checks,
output.log.1 about the same, and for a moment during a rotation a third copy (the .tmp).

Offsets. Readers address an attempt's output by *stream offsets*: every byte the task wrote
counts, rotated away or not, so offsets only grow and resuming at one is exact. `rotation.json`
maps them to files: output.log's first byte is at `base`, output.log.1 holds `prev_len` bytes
from `prev_base`. A reader behind `prev_base` gets one note line, "[lepton: output rotated:
N earlier bytes dropped]", and goes on with the oldest output kept. The map and the files change
together, synchronously on the event loop (only copies run in threads), so a reader, also on
the loop, never sees one without the other.

Retention (`sweep_finished`, in a thread): attempt folders whose exit was reported
(`reported.json`) more than the retention ago are deleted, unless the runner says to keep
them (running, or still in the coordinator's desired set: see `TaskRunner.sweep`). The
same rules hold for torch jobs' folders (`sweep_jobs`: `jobs/<job id>/`, with the rank
logs, error files and checkpoint staging of every restart): one goes when no member
attempt of the job is running or desired here and all of them were reported over the
retention ago. Members are known by their ids, `<job id>-<rank>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path

from lepton.agent.tasks import task_proc as tp
from lepton.agent.tasks.task_spec import TASK_ID_RE
from lepton.common.durable import read_json
from lepton.common.errors import InvalidArgument, NotFound
from lepton.common.job_ids import job_of  # a member task's job: the jobs/<job id> folder

logger = logging.getLogger(__name__)

OUTPUT = "output.log"
ROTATED = "output.log.1"
ROTATED_TMP = "output.log.1.tmp"
STATE = "rotation.json"
TRASH_SUFFIX = ".deleting"  # an attempt folder being deleted: `.<attempt>.deleting`
COPY_BYTES = 1 << 20
TAIL_MAX = 1 << 20  # at most this much is copied on the event loop before a truncate
CACHE_SIZE = 4096  # rotation maps kept in memory; the others are read from rotation.json
_FALLOC_FL_COLLAPSE_RANGE = 0x08


@dataclass(frozen=True)
class Rotation:
    """Where output.log and output.log.1 sit in the attempt's stream offsets."""

    base: int = 0  # the offset of output.log's first byte
    prev_base: int = 0  # the offset of output.log.1's first byte
    prev_len: int = 0  # bytes in output.log.1 (0: there is none)
    prev_ino: int = 0  # output.log.1's inode: another one means the map is stale (a crash)
    rotations: int = 0


@dataclass(frozen=True)
class Chunk:
    """A piece of output at stream `offset`; with `note`, a line from the agent instead,
    which takes no offsets (the next chunk starts at `offset`)."""

    offset: int
    data: bytes
    note: bool = False


def load_rotation(att_dir: Path) -> Rotation:
    """The attempt's map as on disk. When output.log.1 is not the file the map names (the
    agent died in the middle of a rotation, or the map was lost), it is repaired assuming
    the cut was made: offsets may then be off by one rotation, but no output is lost."""
    doc = read_json(att_dir / STATE) or {}
    try:
        rot = Rotation(**{k: int(doc.get(k, 0)) for k in Rotation.__dataclass_fields__})
    except (TypeError, ValueError):
        rot = Rotation()
    try:
        st = os.stat(att_dir / ROTATED)
    except OSError:
        return rot
    if st.st_ino != rot.prev_ino:
        rot = Rotation(base=rot.base + st.st_size, prev_base=rot.base, prev_len=st.st_size,
                       prev_ino=st.st_ino, rotations=rot.rotations + 1)
    return rot


def _collapse_head(path: Path, length: int) -> OSError | None:
    """Cut the first `length` bytes out of `path` (FALLOC_FL_COLLAPSE_RANGE); the error if not."""
    fallocate = _libc_fallocate()
    if fallocate is None:
        return OSError(errno.ENOSYS, "no fallocate in this C library")
    fd = os.open(path, os.O_WRONLY)
    try:
        if fallocate(fd, _FALLOC_FL_COLLAPSE_RANGE, 0, length) != 0:
            err = ctypes.get_errno()
            return OSError(err, os.strerror(err))
        return None
    finally:
        os.close(fd)


_FALLOCATE: list = []


def _libc_fallocate():
    if not _FALLOCATE:
        fn = None
        with contextlib.suppress(OSError, AttributeError, TypeError):
            fn = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
        _FALLOCATE.append(fn)
    return _FALLOCATE[0]


def _copy(src: Path, dst: Path, start: int, stop: int | None, *, sync: bool) -> int:
    """Append src[start:stop) (stop None: to its end now) to dst, which is created anew when
    `start` is 0. With `sync`, fsync dst, and flush src's dirty pages so that cutting it
    (on the event loop) has little left to write. Returns the offset reached in src."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if start == 0 else os.O_APPEND)
    fin = os.open(src, os.O_RDONLY)
    try:
        fout = os.open(dst, flags, 0o600)
        try:
            end = os.fstat(fin).st_size if stop is None else stop
            pos = start
            while pos < end:
                buf = os.pread(fin, min(COPY_BYTES, end - pos), pos)
                if not buf:
                    break
                os.write(fout, buf)
                pos += len(buf)
            if sync:
                os.fsync(fout)
                with contextlib.suppress(OSError):
                    os.fdatasync(fin)
            return pos
        finally:
            os.close(fout)
    finally:
        os.close(fin)


class OutputLogs:
    """The runner's side of output rotation: checks sizes, rotates, keeps the maps."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes  # 0: no cap
        self._maps: OrderedDict[Path, Rotation] = OrderedDict()
        self._sizes: dict[Path, int] = {}  # output.log's size at the last check (live attempts)
        self._rotating: dict[Path, asyncio.Task[None]] = {}
        self._collapse = True  # until the filesystem says it cannot
        self._failed: set[Path] = set()  # attempts whose rotation failed (warned once)

    def rotation(self, att_dir: Path) -> Rotation:
        rot = self._maps.get(att_dir)
        if rot is None:
            rot = self._maps[att_dir] = load_rotation(att_dir)
            while len(self._maps) > CACHE_SIZE:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(att_dir)
        return rot

    def _set(self, att_dir: Path, rot: Rotation) -> None:
        self._maps[att_dir] = rot
        try:
            # Not fsync'd: after a power loss, load_rotation repairs a stale map.
            tp.write_json_atomic(att_dir / STATE, asdict(rot), durable=False)
        except OSError as err:
            logger.warning("cannot record the output rotation of %s: %s", att_dir, err)

    def check(self, att_dir: Path, size: int | None = None) -> None:
        """Start a rotation when output.log is past the cap (a no-op while one runs).
        Also notices a truncation by someone else, so that readers skip past it.
        `size`: output.log's size when the caller knows it (else a stat)."""
        if att_dir in self._rotating:
            return
        if size is None or size < 0:
            try:
                size = os.stat(att_dir / OUTPUT).st_size
            except OSError:
                return
        seen = self._sizes.get(att_dir, 0)
        self._sizes[att_dir] = size
        if size < seen:  # e.g. an operator's logrotate with copytruncate
            rot = self.rotation(att_dir)
            logger.warning("%s shrank from %d to %d bytes outside lepton", att_dir / OUTPUT, seen, size)
            self._set(att_dir, Rotation(base=rot.base + seen, prev_base=rot.prev_base, prev_len=rot.prev_len,
                                        prev_ino=rot.prev_ino, rotations=rot.rotations))
        if self.max_bytes and size > self.max_bytes:
            task = asyncio.create_task(self._rotate(att_dir), name=f"rotate-{att_dir}")
            self._rotating[att_dir] = task
            task.add_done_callback(lambda _t, d=att_dir: self._rotating.pop(d, None))

    def finished(self, att_dir: Path, size: int | None = None) -> None:
        """The attempt ended (`size`: what it left in output.log, when known): cap that,
        and stop tracking its size."""
        self.check(att_dir, size)
        self._sizes.pop(att_dir, None)

    def forget(self, att_dir: Path) -> None:
        """The attempt's folder is gone."""
        self._maps.pop(att_dir, None)
        self._sizes.pop(att_dir, None)
        self._failed.discard(att_dir)

    async def close(self) -> None:
        """Let rotations in flight finish (a cancelled one would leave its copy thread
        writing output.log.1.tmp under the next runner's feet), then cancel the slow ones."""
        tasks = list(self._rotating.values())
        if tasks:
            await asyncio.wait(tasks, timeout=10.0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _rotate(self, att_dir: Path) -> None:
        src, tmp = att_dir / OUTPUT, att_dir / ROTATED_TMP
        try:
            block = os.statvfs(src).f_bsize if self._collapse else 0
            size = os.stat(src).st_size
            # Whole blocks, short of the end: what a collapse can cut.
            head = (size - 1) // block * block if block else 0
            copied = await asyncio.to_thread(_copy, src, tmp, 0, head or None, sync=True)
            if head and copied == head:
                rot = self.rotation(att_dir)  # before the rename: load_rotation would "repair" it
                err = _collapse_head(src, head)  # on the loop: readers see the cut and the map at once
                if err is None:
                    os.replace(tmp, att_dir / ROTATED)
                    self._rotated(att_dir, rot, head)
                    return
                self._collapse = False
                logger.info("the filesystem of %s cannot collapse file ranges (%s): task output is "
                            "rotated by copy-truncate, which may lose a few bytes each time", att_dir, err)
            for _ in range(3):  # catch up in the thread until the tail is small
                if os.stat(src).st_size - copied <= TAIL_MAX:
                    break
                copied = await asyncio.to_thread(_copy, src, tmp, copied, None, sync=True)
            rot = self.rotation(att_dir)
            moved = _copy(src, tmp, copied, None, sync=False)  # the tail, then cut at once
            os.truncate(src, 0)
            os.replace(tmp, att_dir / ROTATED)
            self._rotated(att_dir, rot, moved)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                self._drop(att_dir, err)
            elif att_dir not in self._failed:
                self._failed.add(att_dir)  # once per attempt: this repeats every check
                logger.warning("cannot rotate %s: %s", src, err)

    def _drop(self, att_dir: Path, err: OSError) -> None:
        """No room for the copy: drop the output instead, as the cap is there to keep room."""
        try:
            size = os.stat(att_dir / OUTPUT).st_size
            os.truncate(att_dir / OUTPUT, 0)
        except OSError:
            return
        rot = self.rotation(att_dir)
        self._set(att_dir, Rotation(base=rot.base + size, prev_base=rot.prev_base, prev_len=rot.prev_len,
                                    prev_ino=rot.prev_ino, rotations=rot.rotations))
        if att_dir in self._sizes:
            self._sizes[att_dir] = 0
        logger.warning("dropped %d bytes of %s: no room to rotate it (%s)", size, att_dir / OUTPUT, err)

    def _rotated(self, att_dir: Path, rot: Rotation, moved: int) -> None:
        ino = os.stat(att_dir / ROTATED).st_ino
        self._set(att_dir, Rotation(base=rot.base + moved, prev_base=rot.base, prev_len=moved,
                                    prev_ino=ino, rotations=rot.rotations + 1))
        if att_dir in self._sizes:  # still live
            with contextlib.suppress(OSError):
                self._sizes[att_dir] = os.stat(att_dir / OUTPUT).st_size
        logger.debug("rotated %s: %d bytes to %s", att_dir / OUTPUT, moved, ROTATED)


def _note(text: str, at_line_start: bool) -> bytes:
    return (b"" if at_line_start else b"\n") + f"[lepton: {text}]\n".encode()


async def attempt_output(logs: OutputLogs, att_dir: Path, offset: int, *, keep_following: Callable[[], bool],
                         starting: Callable[[], bool], chunk_bytes: int, poll_s: float) -> AsyncIterator[Chunk]:
    """`read_output` of an attempt's folder, once made (while `starting()`, a spawning
    thread makes it). Raises InvalidArgument for a bad offset, NotFound without the folder."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidArgument(f"offset must be an integer >= 0, not {offset!r}")
    while not att_dir.is_dir() and starting():
        await asyncio.sleep(poll_s)
    if not att_dir.is_dir():
        raise NotFound(f"attempt {att_dir.name} of task {att_dir.parent.name} has no output on this node "
                       "(it never ran here, or the task retention deleted it)")
    async for chunk in read_output(logs, att_dir, offset, keep_following=keep_following,
                                   chunk_bytes=chunk_bytes, poll_s=poll_s):
        yield chunk


async def read_output(logs: OutputLogs, att_dir: Path, offset: int, *, keep_following: Callable[[], bool],
                      chunk_bytes: int, poll_s: float) -> AsyncIterator[Chunk]:
    """The attempt's output from stream `offset`: output.log.1, then output.log, with a
    note where output was rotated away. Tails while `keep_following()`; once it says no,
    ends when drained. An offset past the end waits for output (or ends, not following)."""
    pos, at_line_start = offset, True
    fd = None
    try:
        while True:
            done = not keep_following()  # decided before reading: bytes written before exit are drained
            rot = logs.rotation(att_dir)
            if fd is None:
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(att_dir / OUTPUT, os.O_RDONLY)
            data, skip_to, why = b"", 0, ""
            if pos >= rot.base:
                if fd is not None:
                    data = os.pread(fd, chunk_bytes, pos - rot.base)
            elif rot.prev_len and rot.prev_base <= pos < rot.prev_base + rot.prev_len:
                with contextlib.suppress(OSError), open(att_dir / ROTATED, "rb", buffering=0) as f:
                    f.seek(pos - rot.prev_base)
                    data = f.read(min(chunk_bytes, rot.prev_base + rot.prev_len - pos))
                if not data:
                    skip_to, why = rot.base, f"{ROTATED} is gone"
            elif rot.prev_len and pos < rot.prev_base:
                skip_to, why = rot.prev_base, "output rotated"
            else:  # between output.log.1's end and output.log's start: cut by someone else
                skip_to, why = rot.base, "output truncated"
            if why:
                text = f"{why}: {skip_to - pos} earlier bytes dropped"
                yield Chunk(skip_to, _note(text, at_line_start), note=True)
                pos, at_line_start = skip_to, True
            elif data:
                yield Chunk(pos, data)
                pos += len(data)
                at_line_start = data.endswith(b"\n")
            elif done:
                return
            else:
                await asyncio.sleep(poll_s)
    finally:
        if fd is not None:
            os.close(fd)


def _disk_use(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class FirstSeen:
    """Ages on a monotonic clock since this process first saw each key (a reported attempt's
    folder, a job folder). File times follow the wall clock, which can jump a day; these
    cannot. What a restarted agent finds counts from its first sweep: a restart delays a
    deletion by up to one retention, never hastens one. One sweep at a time uses it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._first: dict[str, float] = {}
        self._seen: set[str] = set()

    def age_s(self, key: str) -> float:
        now = self._clock()
        self._seen.add(key)
        return now - self._first.setdefault(key, now)

    def forget_unseen(self) -> None:
        """Drop the keys not asked about since the last call (deleted, or wanted again)."""
        self._first = {k: t for k, t in self._first.items() if k in self._seen}
        self._seen = set()


def sweep_finished(root: Path, retention_s: float, keep: Collection[tuple[str, int]],
                   ages: FirstSeen) -> tuple[list[Path], int, list[Path]]:
    """Delete the attempt folders under `root` (tasks/<id>/<n>) whose reported exit `ages`
    has known for over `retention_s`, and not in `keep`. Blocking: run it in a thread.
    Returns (the folders deleted, bytes freed, the task folders that may now be empty).
    Errors are logged, never raised."""
    removed: list[Path] = []
    freed = 0
    touched: list[Path] = []
    try:
        task_dirs = [d for d in root.iterdir() if TASK_ID_RE.fullmatch(d.name) and d.name not in (".", "..")
                     and d.is_dir()]
    except OSError as err:
        logger.warning("retention: cannot list %s: %s", root, err)
        return removed, freed, touched
    for task_dir in task_dirs:
        try:
            entries = list(task_dir.iterdir())
        except OSError:
            continue
        for att_dir in entries:
            name = att_dir.name
            if name.startswith(".") and name.endswith(TRASH_SUFFIX):  # a sweep cut short
                shutil.rmtree(att_dir, ignore_errors=True)
                continue
            if not name.isdigit() or (task_dir.name, int(name)) in keep:
                continue
            if not (att_dir / "reported.json").exists():
                continue  # running, or its exit is not reported yet: the report needs these files
            if ages.age_s(str(att_dir)) < retention_s:
                continue
            trash = task_dir / f".{name}{TRASH_SUFFIX}"
            try:
                # First out of the way, whole: a half-deleted folder must never look like an
                # unreported attempt to a restarted runner.
                os.rename(att_dir, trash)
            except OSError as err:
                logger.warning("retention: cannot remove %s: %s", att_dir, err)
                continue
            freed += _disk_use(trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(att_dir)
        touched.append(task_dir)
    return removed, freed, touched




def finished_jobs(jobs_root: Path, tasks_root: Path, retention_s: float, keep: Collection[tuple[str, int]],
                  ages: FirstSeen) -> list[Path]:
    """The job folders under `jobs_root` (jobs/<job id>) that may go: no member attempt of
    the job in `keep` (running or still desired here), and every member attempt folder under
    `tasks_root` reported, and the folder itself seen, over `retention_s` ago. A restart reuses
    the job folder, but brings a desired (then running) attempt first. Blocking: run it in a
    thread. Removes what a cut-short deletion left. Errors are logged, never raised."""
    try:
        entries = list(jobs_root.iterdir())
    except FileNotFoundError:
        return []
    except OSError as err:
        logger.warning("retention: cannot list %s: %s", jobs_root, err)
        return []
    kept = {job_of(task_id) for task_id, _ in keep}
    members: dict[str, list[Path]] = {}
    try:
        for task_dir in tasks_root.iterdir():
            if job := job_of(task_dir.name):
                members.setdefault(job, []).append(task_dir)
    except FileNotFoundError:
        pass
    except OSError as err:  # without the members' records, nothing can be judged finished
        logger.warning("retention: cannot list %s: %s", tasks_root, err)
        return []
    found: list[Path] = []
    for job_dir in entries:
        name = job_dir.name
        if name.startswith("."):
            if name.endswith(TRASH_SUFFIX):  # a sweep cut short
                shutil.rmtree(job_dir, ignore_errors=True)
            continue
        if name in kept or not job_dir.is_dir():
            continue
        try:
            youngest = ages.age_s(f"job {job_dir}")
            for task_dir in members.get(name, ()):
                for att_dir in task_dir.iterdir():
                    if att_dir.name.isdigit():
                        if not (att_dir / "reported.json").exists():
                            raise FileNotFoundError(att_dir)  # running, or not reported yet
                        youngest = min(youngest, ages.age_s(str(att_dir)))
        except OSError:
            continue
        if youngest >= retention_s:
            found.append(job_dir)
    return found


async def sweep_jobs(jobs_root: Path, tasks_root: Path, retention_s: float,
                     keep: Callable[[], Collection[tuple[str, int]]], ages: FirstSeen) -> tuple[int, int]:
    """Delete the job folders `finished_jobs` finds (rank logs, error files, checkpoint
    staging). `keep()` is asked again on the event loop just before each folder is moved
    away: a member attempt launched meanwhile (launch() runs on the loop too) keeps it.
    Returns (folders deleted, bytes freed)."""
    found = await asyncio.to_thread(finished_jobs, jobs_root, tasks_root, retention_s, keep(), ages)
    if not found:
        return 0, 0
    kept = {job_of(task_id) for task_id, _ in keep()}
    trash: list[Path] = []
    for job_dir in found:
        if job_dir.name in kept:
            continue
        moved = job_dir.with_name(f".{job_dir.name}{TRASH_SUFFIX}")
        try:
            os.rename(job_dir, moved)  # at once, on the loop: a torch task never sees half of it
        except OSError as err:
            logger.warning("retention: cannot remove %s: %s", job_dir, err)
            continue
        trash.append(moved)
    return len(trash), await asyncio.to_thread(_delete_all, trash)


def _delete_all(paths: list[Path]) -> int:
    freed = 0
    for path in paths:
        freed += _disk_use(path)
        shutil.rmtree(path, ignore_errors=True)
    return freed
