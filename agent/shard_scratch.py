"""The scratch folders torch tasks decrypt shards into, and their removal by the agent.

A torch task (lepton.workloads.torch_task) decrypts its ranks' shards into a private folder
in memory (/dev/shm) and removes it when it ends; SIGKILL (or SIGTERM while it stages data)
skips that, and the plaintext would stay in memory until reboot. So the agent names each
folder (`scratch_prefix`, handed to the task in its launch) after this node and the attempt,
`/dev/shm/lepton-shards-<node key>-<task id>-<attempt>-<random>`, removes an attempt's as it
ends (`remove_attempt`) and, at start, every one of this node's whose attempt no longer runs
(`stale`, then `remove`). The node key (from the data dir's path) keeps several agents on one
host off each other's folders.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

SHM = Path("/dev/shm")
PREFIX = "lepton-shards-"

Key = tuple[str, int]


def node_key(data_dir: str | os.PathLike[str]) -> str:
    """A short tag of this agent's data dir: whose scratch folders are whose on a shared host."""
    return hashlib.blake2b(os.path.realpath(data_dir).encode(), digest_size=6).hexdigest()


def scratch_prefix(data_dir: str | os.PathLike[str], task_id: str, attempt: int, root: Path = SHM) -> str:
    """The path prefix of this attempt's scratch folder (the task adds a random suffix), or ""
    where `root` is no writable folder (the task then uses its job folder, on disk)."""
    if not (root.is_dir() and os.access(root, os.W_OK)):
        return ""
    return str(root / f"{PREFIX}{node_key(data_dir)}-{task_id}-{attempt}-")


def _owner(name: str, key: str) -> Key | None:
    """The (task id, attempt) a folder name of node `key` belongs to, or None."""
    head = f"{PREFIX}{key}-"
    if not name.startswith(head):
        return None
    # The random suffix (tempfile's) and the attempt hold no '-'; a task id may.
    parts = name[len(head):].rsplit("-", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _folders(data_dir: str | os.PathLike[str], root: Path) -> list[tuple[Key, Path]]:
    key = node_key(data_dir)
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    found = []
    for entry in entries:
        owner = _owner(entry.name, key)
        if owner is not None and entry.is_dir(follow_symlinks=False):  # never a planted link
            found.append((owner, Path(entry.path)))
    return found


def remove(paths: Iterable[Path]) -> int:
    """Delete these scratch folders; how many went. Never raises."""
    removed = 0
    for path in paths:
        try:
            shutil.rmtree(path)
            removed += 1
        except FileNotFoundError:
            pass  # the task removed it itself
        except OSError as err:
            logger.warning("cannot remove the shard scratch folder %s: %s", path, err)
    return removed


def remove_attempt(data_dir: str | os.PathLike[str], task_id: str, attempt: int, root: Path = SHM) -> int:
    """Delete what this (ended) attempt left in `root`; how many folders went."""
    return remove(p for owner, p in _folders(data_dir, root) if owner == (task_id, attempt))


def stale(data_dir: str | os.PathLike[str], running: Iterable[Key], root: Path = SHM) -> list[Path]:
    """This node's scratch folders whose attempt is not in `running`."""
    live = set(running)
    return [p for owner, p in _folders(data_dir, root) if owner not in live]
