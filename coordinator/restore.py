"""Offline restore of a backup (`lepton-ctl snapshot save`) into a stopped voter's data dir,
or into the etcd prefix of a cluster whose candidates are all stopped (`restore_etcd`).

The backup's state snapshot becomes the base of a fresh Raft log at `<data-dir>/raft`
(`FileLogStore.save_snapshot`, an empty log, the hard state at the snapshot's term), so
the agent starts from it. The raft folder that was there is kept beside it, renamed
`raft.before-restore-<ms>`. The node's identity (`node_id`) is left alone.
In etcd the backup becomes the prefix's snapshot (chunks and pointer, the layout of
lepton.coordinator.etcd) and the log is emptied; the first candidate started leads from it.
"""

from __future__ import annotations

import fcntl
import json
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


async def restore_etcd(path: str | os.PathLike[str], endpoints: list[str], prefix: str, tls=None, *,
                       cluster: str) -> RestoreResult:
    """Install the backup at `path` as the state under `prefix` in the etcd at `endpoints`
    (`tls`: an EtcdTls) for the cluster named `cluster` (--cluster-name). Offline: refused
    while a candidate leads there (the leader key exists). `<prefix>/meta` is claimed or
    checked as a candidate's start does, and the state already there must be the backup's
    cluster's (lepton.coordinator.etcd.restore.install_snapshot). Raises InvalidArgument
    (not a backup...), FailedPrecondition (a candidate leads, another cluster's prefix or
    state), Unavailable (etcd unreachable)."""
    from lepton.coordinator.etcd.restore import described, install_snapshot

    b = backup.load(path)
    try:
        ClusterStateMachine().restore(b.payload, b.index)
    except Exception as err:  # noqa: BLE001 - any parse failure means a bad payload
        raise InvalidArgument(f"{path}: the state snapshot does not parse: {err}") from None
    where = described(endpoints, prefix)

    def same_cluster(current: ClusterStateMachine) -> None:
        held = current.security.cluster_id
        if held and held != b.cluster_id:
            raise FailedPrecondition(f"{path} belongs to cluster {b.cluster_id!r}, but {where} holds cluster "
                                     f"{held!r}; refusing to restore it there (use another --etcd-prefix)")

    await install_snapshot(endpoints, prefix, tls, b.payload, b.index, cluster=cluster,
                           current=ClusterStateMachine(), check=same_cluster)
    logger.info("restored %s into %s: cluster %s, index %d", path, where, b.cluster_id, b.index)
    return RestoreResult(where, b.index, b.term, b.cluster_id, "")


def main(argv: list[str] | None = None) -> int:
    """`python -m lepton.coordinator.restore FILE DATA_DIR` or `... FILE --etcd etcd://HOST:PORT,...
    [--etcd-prefix P] [--etcd-ca F --etcd-cert F --etcd-key F]`: the offline restore as its
    own process, so `lepton-ctl snapshot restore` runs the coordinator's storage code without
    the client importing it. Prints the result as JSON; an error as one JSON line
    (`{"code": ..., "message": ...}`) on stdout with exit status 1."""
    import argparse
    import asyncio

    from lepton.common.errors import LeptonError

    p = argparse.ArgumentParser(prog="python -m lepton.coordinator.restore")
    p.add_argument("file")
    p.add_argument("data_dir", nargs="?", default="")
    p.add_argument("--etcd", default="", help="etcd://HOST:PORT,...: restore into etcd instead of a data dir")
    p.add_argument("--etcd-prefix", default="")
    p.add_argument("--cluster-name", default="default")
    p.add_argument("--etcd-ca", default="")
    p.add_argument("--etcd-cert", default="")
    p.add_argument("--etcd-key", default="")
    args = p.parse_args(argv)
    target = args.etcd or args.data_dir
    try:
        if bool(args.etcd) == bool(args.data_dir):
            raise InvalidArgument("give either a data dir or --etcd etcd://HOST:PORT,... (not both)")
        if args.etcd:
            endpoints, prefix, tls = _etcd_target(args)
            result = asyncio.run(restore_etcd(args.file, endpoints, prefix, tls, cluster=args.cluster_name))
        else:
            result = restore(args.file, args.data_dir)
    except LeptonError as err:
        print(json.dumps({"code": err.code.name, "message": err.message}))
        return 1
    except OSError as err:
        print(json.dumps({"code": "FAILED_PRECONDITION", "message": f"cannot restore into {target}: {err}"}))
        return 1
    print(json.dumps(result.to_dict()))
    return 0


def _etcd_target(args) -> tuple[list[str], str, object]:
    """Endpoints, prefix and TLS as the agent would take them (AgentConfig's checks)."""
    from lepton.common.config import AgentConfig
    from lepton.coordinator.etcd.tls import EtcdTls

    config = AgentConfig(state=args.etcd, etcd_prefix=args.etcd_prefix, cluster_name=args.cluster_name,
                         etcd_ca=args.etcd_ca, etcd_cert=args.etcd_cert, etcd_key=args.etcd_key,
                         task_user="none")
    if not config.uses_etcd:
        raise InvalidArgument(f"--etcd {args.etcd!r} is not etcd://HOST:PORT[,HOST:PORT...]")
    tls = EtcdTls(config.etcd_ca, config.etcd_cert or None, config.etcd_key or None) if config.etcd_ca else None
    return config.etcd_endpoints, config.etcd_prefix, tls


if __name__ == "__main__":
    raise SystemExit(main())
