"""Offline restore of a backup (`lepton-ctl snapshot save`) into a stopped voter's data dir.

The backup's state snapshot becomes the base of a fresh Raft log at `<data-dir>/raft`
(`FileLogStore.save_snapshot`, an empty log, the hard state at the snapshot's term), so
the agent starts from it. The raft folder that was there is kept beside it, renamed
`raft.before-restore-<ms>`. The node's identity (`node_id`) is left alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lepton.common import backup
from lepton.common.errors import FailedPrecondition, InvalidArgument, NotFound
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.coordinator.storage.log_store import FileLogStore, Snapshot

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    data_dir: str
    index: int
    term: int
    cluster_id: str
    moved_aside: str  # the previous raft folder, or ""

    def to_dict(self) -> dict[str, object]:
        return {"data_dir": self.data_dir, "index": self.index, "term": self.term,
                "cluster_id": self.cluster_id, "moved_aside": self.moved_aside}


def _cluster_id_of(raft_dir: Path) -> str:
    """The cluster id the state in `raft_dir` holds ("" for none). Raises OSError."""
    if not (raft_dir / "snapshot").exists() and not (raft_dir / "log").exists():
        return ""
    store = FileLogStore(raft_dir)
    try:
        sm = ClusterStateMachine()
        snap = store.snapshot()
        if snap is not None:
            sm.restore(snap.data, snap.index)
        last = store.last_index()
        if last >= store.first_index():
            for entry in store.entries(max(store.first_index(), sm.applied_index + 1), last + 1):
                sm.apply(entry.index, entry.data)
        return sm.security.cluster_id
    finally:
        store.close()


def restore(path: str | os.PathLike[str], data_dir: str | os.PathLike[str]) -> RestoreResult:
    """Install the backup at `path` as the state of the agent whose data dir is `data_dir`.

    Raises NotFound (no such file or data dir), InvalidArgument (not a backup, truncated,
    corrupt, or a payload that does not parse), FailedPrecondition (another cluster's
    backup, a newer format, or an agent still running on `data_dir`), OSError.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise NotFound(f"data dir {d} does not exist")
    b = backup.load(path)
    try:
        ClusterStateMachine().restore(b.payload, b.index)
    except Exception as err:  # noqa: BLE001 - any parse failure means a bad payload
        raise InvalidArgument(f"{path}: the state snapshot does not parse: {err}") from None
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FailedPrecondition(f"a lepton-agent is running on {d}: stop it first") from None
        raft = d / "raft"
        current = _cluster_id_of(raft) if raft.is_dir() else ""
        if current and current != b.cluster_id:
            raise FailedPrecondition(
                f"{path} belongs to cluster {b.cluster_id!r}, but {d} holds cluster {current!r}; "
                "refusing to restore it here (empty the data dir's raft folder to override)"
            )
        moved = ""
        if raft.exists():
            aside = d / f"raft.before-restore-{int(time.time() * 1000)}"
            raft.rename(aside)
            moved = str(aside)
        store = FileLogStore(raft)
        try:
            store.set_hard_state(b.term, "")
            store.save_snapshot(Snapshot(b.index, b.term, b.payload))
            store.sync()
        finally:
            store.close()
    finally:
        os.close(fd)
    logger.info("restored %s into %s: cluster %s, index %d, term %d", path, d, b.cluster_id, b.index, b.term)
    return RestoreResult(str(d), b.index, b.term, b.cluster_id, moved)


def main(argv: list[str] | None = None) -> int:
    """`python -m lepton.coordinator.restore FILE DATA_DIR`: the offline restore as its
    own process, so `lepton-ctl snapshot restore` runs the coordinator's storage code without
    the client importing it. Prints the result as JSON; an error as one JSON line
    (`{"code": ..., "message": ...}`) on stdout with exit status 1."""
    import json
    import sys

    from lepton.common.errors import LeptonError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m lepton.coordinator.restore FILE DATA_DIR", file=sys.stderr)
        return 2
    try:
        result = restore(args[0], args[1])
    except LeptonError as err:
        print(json.dumps({"code": err.code.name, "message": err.message}))
        return 1
    except OSError as err:
        print(json.dumps({"code": "FAILED_PRECONDITION", "message": f"cannot restore into {args[1]}: {err}"}))
        return 1
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
