"""Durable claims of task attempts, one fsync per batch (for `lepton.agent.tasks.runner`).

An attempt's folder is the record that it ran on this node, so it is never run twice. Made
with a plain mkdir it survives an agent crash, but only a fsync of its parent folder
keeps it through a power cut, and every task has a parent of its own: one fsync per
attempt. Instead, each batch of attempts the runner is about to start is written, before
any of them starts, as one file in `task-claims/` beside `tasks/` (task id, attempt, term: one line
each), fsync'd once with its folder. A restart after a power cut finds the claims whose
folder did not survive and reports them lost rather than running them again.

`settle` (in a thread, off the spawn path, a while later) makes the claimed folders
durable themselves and then deletes the claim files: claims never pile up. By then the
file system has usually committed the folders already, and those fsyncs cost little.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

from lepton.common.durable import fsync_dir, write_atomic

logger = logging.getLogger(__name__)

CLAIMS_DIR = "task-claims"  # in the data dir, beside tasks/ (whose names are task ids)

Claim = tuple[str, int, int]  # task id, attempt, term


class ClaimLog:
    """The claim files of the attempt folders in `tasks_root`. Not thread-safe: `record`
    runs in one spawning thread at a time (spawn.py), `pending` on the runner's event loop,
    `settle` in one thread at a time."""

    def __init__(self, tasks_root: Path):
        self._root = Path(tasks_root)
        self._dir = self._root.parent / CLAIMS_DIR

    def record(self, claims: Iterable[Claim]) -> None:
        """Durably record these attempts as claimed (one file, one fsync of it and one of
        its folder). Raises OSError; then none of them may start."""
        lines = "".join(json.dumps({"task_id": t, "attempt": a, "term": term}) + "\n" for t, a, term in claims)
        if not lines:
            return
        new_dir = not self._dir.is_dir()
        self._dir.mkdir(parents=True, exist_ok=True)
        if new_dir:
            fsync_dir(self._dir.parent)
        # Time first: files sort in the order they were written.
        write_atomic(self._dir / f"{time.time_ns():020d}-{secrets.token_hex(4)}", lines.encode())

    def pending(self) -> dict[tuple[str, int], int]:
        """Every claim not yet settled: (task id, attempt) -> term. A torn line (a crash
        before the file was complete never leaves one: files appear whole) is skipped."""
        out: dict[tuple[str, int], int] = {}
        for path in self._files():
            with contextlib.suppress(OSError):
                for line in path.read_text().splitlines():
                    try:
                        doc = json.loads(line)
                        out[(str(doc["task_id"]), int(doc["attempt"]))] = int(doc["term"])
                    except (ValueError, KeyError, TypeError):
                        logger.warning("skipping a bad claim line in %s", path)
        return out

    def settle(self) -> int:
        """Make the folders of every recorded claim durable, then drop the claims. Blocking:
        run it in a thread. Returns how many claim files were settled; errors are logged."""
        files = self._files()
        done = 0
        for path in files:
            try:
                parents = set()
                for line in path.read_text().splitlines():
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        parents.add(str(json.loads(line)["task_id"]))
                for task_id in sorted(parents):
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # swept meanwhile
                        fsync_dir(self._root / task_id)
                fsync_dir(self._root)  # the task folders' own entries
                path.unlink()  # not fsync'd: a claim file that comes back settles again
                done += 1
            except OSError as err:
                logger.warning("cannot settle the attempt claims in %s: %s", path, err)
        return done

    def _files(self) -> list[Path]:
        try:
            return sorted(p for p in self._dir.iterdir() if not p.name.startswith("."))  # .tmp: unfinished
        except FileNotFoundError:
            return []
        except OSError as err:
            logger.warning("cannot list the attempt claims in %s: %s", self._dir, err)
            return []

