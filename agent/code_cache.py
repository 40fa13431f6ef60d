"""The node's cache of shipped code (`--working-dir`), and each attempt's fresh copy of it.

A task whose spec names a `code_digest` runs only once its archive is unpacked here. The
first assignment that needs it starts a fetch: the manifest of the dataset `code-<digest>`
from the leader, the blob from its holders (the data plane's puller, hash-verified, like a
shard), then `code_archive.unpack` (no way out of the folder) into a temporary folder that
is renamed into place. Layout under `<data_dir>/code/`:

    trees/<digest>/   unpacked, read by the agent only (0700); never changed once there
    tmp/<digest>/     a fetch in progress: the puller's store and the tree being unpacked;
                      emptied at start and once the tree is in place

Each attempt then gets a copy of its tree as `<attempt>/work` (the task user's, with
--task-user), its working directory and the head of its PYTHONPATH: the task may write there
freely and the next attempt starts clean. A fetch that fails is remembered for
RETRY_AFTER_S: the attempts that need it meanwhile fail to start with its reason.
A tree no attempt started from for UNUSED_TREE_S (a week) is deleted when the agent starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from lepton.agent.tasks.task_user import TaskUser
from lepton.common.channels import TlsConfig
from lepton.common.errors import FailedPrecondition, LeptonError, NotFound, Unavailable
from lepton.dataplane import code_archive as ca
from lepton.v1 import datasets_pb2 as dpb

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 10.0
# A tree no attempt started from for this long is deleted when the agent starts (a later
# attempt that needs it fetches it again). Its folder's mtime says when it was last used:
# a wall-clock jump can only cost a fetch.
UNUSED_TREE_S = 7 * 86400.0
MANIFEST_TRIES = 5


class CodeCache:
    """Fetches and unpacks code archives, once per digest. Used on one event loop."""

    def __init__(self, data_dir: str | os.PathLike[str], datasets, *, tls: TlsConfig | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """`datasets`: the link's Datasets service (`CoordinatorLink.datasets`)."""
        self.root = Path(data_dir) / "code"
        self._trees = self.root / "trees"
        self._tmp = self.root / "tmp"
        self._datasets = datasets
        self._tls = tls
        self._clock = clock
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self.fetched = 0  # archives fetched by this process (tests, logs)
        shutil.rmtree(self._tmp, ignore_errors=True)
        for folder in (self.root, self._trees, self._tmp):
            folder.mkdir(mode=0o700, exist_ok=True)
        self._forget_unused()

    def _forget_unused(self) -> None:
        cutoff = time.time() - UNUSED_TREE_S
        gone = 0
        for tree in self._trees.iterdir():
            with contextlib.suppress(OSError):
                if tree.stat().st_mtime < cutoff:
                    shutil.rmtree(tree)
                    gone += 1
        if gone:
            logger.info("code cache: deleted %d tree(s) unused for %d days", gone, UNUSED_TREE_S // 86400)

    def tree(self, digest: str) -> Path | None:
        """The unpacked tree of `digest` when this node has it."""
        path = self._trees / ca.check_digest(digest)
        if not path.is_dir():
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: see UNUSED_TREE_S
        return path

    def failure(self, digest: str) -> str:
        """Why the last fetch of `digest` failed, while that is recent; else ""."""
        failed = self._failed.get(digest)
        if failed is None:
            return ""
        if self._clock() - failed[0] >= RETRY_AFTER_S:
            del self._failed[digest]
            return ""
        return failed[1]

    def fetch(self, digest: str, on_done: Callable[[], None]) -> None:
        """Start fetching `digest` unless that is under way; `on_done()` once it is in place
        or has failed (then `failure` says why)."""
        if digest in self._fetching:
            return
        task = asyncio.ensure_future(self._fetch(digest))
        self._fetching[digest] = task

        def done(_: asyncio.Future) -> None:
            self._fetching.pop(digest, None)
            on_done()

        task.add_done_callback(done)

    async def close(self) -> None:
        for task in list(self._fetching.values()):
            task.cancel()
        await asyncio.gather(*self._fetching.values(), return_exceptions=True)

    async def _fetch(self, digest: str) -> None:
        started = self._clock()
        try:
            shard, sources = await self._manifest(digest)
            await asyncio.to_thread(self._pull_and_unpack, digest, shard.size, sources)
        except asyncio.CancelledError:
            raise
        except LeptonError as err:
            self._failed[digest] = (self._clock(), f"cannot fetch code {digest[:12]}: {err.message}")
            logger.warning("%s", self._failed[digest][1])
            return
        except Exception as err:  # never a traceback for one bad archive: say why
            logger.exception("fetching code %s failed", digest[:12])
            self._failed[digest] = (self._clock(), f"cannot fetch code {digest[:12]}: {err}")
            return
        self.fetched += 1
        logger.info("code %s: fetched and unpacked (%d bytes) in %.1fs", digest[:12], shard.size,
                    self._clock() - started)

    async def _manifest(self, digest: str) -> tuple[dpb.Shard, list[str]]:
        """The archive's shard and its holders' addresses, from the leader."""
        req = dpb.GetDatasetRequest(name=ca.dataset_name(digest))
        for attempt in range(MANIFEST_TRIES):
            try:
                view = await self._datasets.call("GetDataset", req, timeout=10)
                break
            except NotFound:
                raise NotFound(f"the cluster does not store it (dataset {req.name} is gone)") from None
            except LeptonError as err:
                if attempt == MANIFEST_TRIES - 1:
                    raise
                logger.info("code %s: asking for its manifest failed (%s); again", digest[:12], err.message)
                await asyncio.sleep(0.2 * 2**attempt)
        shards = view.dataset.shards
        if len(shards) != 1 or shards[0].id != digest:
            raise FailedPrecondition(f"dataset {req.name} does not hold that archive")
        sources = [view.addresses[n] for n in shards[0].replicas if n in view.addresses]
        if not sources:
            raise Unavailable("no node holding it is known")
        return shards[0], sources

    def _pull_and_unpack(self, digest: str, size: int, sources: list[str]) -> None:
        from lepton.dataplane.shards import ShardStore
        from lepton.dataplane.transfer import Puller

        work = self._tmp / digest  # one fetch of a digest at a time (`_fetching`)
        store = ShardStore(work / "store")
        puller = Puller(store, tls=self._tls)
        staging = work / "tree"
        try:
            puller.pull(digest, size, sources)
            ca.unpack(store.path(digest), staging)
            try:
                staging.rename(self._trees / digest)
            except OSError:
                if self.tree(digest) is None:  # not a twin fetch that won: a real failure
                    raise
        finally:
            puller.close()
            shutil.rmtree(work, ignore_errors=True)


def copy_code(tree: Path, dest: Path, task_user: TaskUser | None = None) -> Path:
    """A fresh copy of `tree` as `dest` (made, or the task user's empty folder), owned by the
    task user when there is one. Returns `dest`. Raises OSError."""
    if not tree.is_dir():
        raise FileNotFoundError(f"code tree {tree} is missing on this node")
    dest.mkdir(mode=0o700, exist_ok=True)
    shutil.copytree(tree, dest, symlinks=True, dirs_exist_ok=True)
    os.chmod(dest, 0o700)
    if task_user is not None:
        for folder, dirs, files in os.walk(dest):
            os.lchown(folder, task_user.uid, task_user.gid)
            for name in (*dirs, *files):
                os.lchown(os.path.join(folder, name), task_user.uid, task_user.gid)
    return dest
