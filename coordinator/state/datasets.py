"""Datasets in the replicated state: named, versioned manifests of shards and their replicas.

Called from `ClusterStateMachine.apply`; deterministic (time from the command, never a
clock). Errors are raised as LeptonErrors, which `apply` turns into returned values.

A shard entry's `replicas` lists the nodes holding a verified copy. Shards are content
addressed, so one shard id may appear in several datasets: replica changes apply to every
entry with that id. A node that goes DOWN or LEFT is removed from every replica list
(`node_gone`); the leader's ReplicationLoop then copies under-replicated shards elsewhere.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from lepton.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from lepton.common.validation import MAX_REPLICATION, check_dataset_name, check_labels
from lepton.v1 import common_pb2, datasets_pb2, state_pb2

if TYPE_CHECKING:
    from lepton.coordinator.state.state_machine import ClusterStateMachine

MAX_SHARDS = 100_000
_LIVE = (common_pb2.NODE_STATE_READY, common_pb2.NODE_STATE_SUSPECT)
# How models and checkpoints were stored before datasets had a kind: a model from the file
# "model.pt", a job's checkpoint as "ckpt-<job id>" from "epoch_NNNNNN.pt".
_LEGACY_MODEL_SOURCE = "model.pt"
_LEGACY_CHECKPOINT = re.compile(r"^ckpt-.+$"), re.compile(r"^epoch_\d+\.pt$")


def derive_kind(ds: datasets_pb2.Dataset) -> None:
    """Give a dataset recorded before kinds existed (kind unset: data) the kind its name and
    source say; deterministic, so every replica derives the same when applying old entries."""
    if ds.kind != datasets_pb2.DATASET_KIND_DATA:
        return
    if ds.source == _LEGACY_MODEL_SOURCE:
        ds.kind = datasets_pb2.DATASET_KIND_MODEL
    elif _LEGACY_CHECKPOINT[0].match(ds.name) and _LEGACY_CHECKPOINT[1].match(ds.source):
        ds.kind = datasets_pb2.DATASET_KIND_CHECKPOINT


def copy_dataset(ds: datasets_pb2.Dataset) -> datasets_pb2.Dataset:
    out = datasets_pb2.Dataset()
    out.CopyFrom(ds)
    return out


def check_owner(ds: datasets_pb2.Dataset, only_owner: str) -> None:
    """Raises PermissionDenied naming the owner unless `only_owner` is empty (an admin, or
    auth off) or owns `ds`. Checked when applied, so a put or delete that raced a change of
    owner (deleted, then put by someone else) cannot touch the new owner's dataset."""
    if only_owner and ds.owner != only_owner:
        raise PermissionDenied(
            f'dataset "{ds.name}" belongs to {ds.owner or "nobody (made without --auth)"}; '
            f"{only_owner} may not replace or delete it")


def kind_noun(kind: int) -> str:
    """ "dataset", "model" or "checkpoint", for messages."""
    if kind == datasets_pb2.DATASET_KIND_DATA:
        return "dataset"
    return datasets_pb2.DatasetKind.Name(kind).removeprefix("DATASET_KIND_").lower()


def check_kind_and_labels(ds: datasets_pb2.Dataset) -> None:
    """Raises InvalidArgument for a kind this version does not know or labels past the limits."""
    if ds.kind not in datasets_pb2.DatasetKind.values():
        raise InvalidArgument(f"unknown dataset kind {ds.kind}")
    check_labels(ds.labels)


class DatasetTable:
    """The datasets part of the state machine, with a shard id -> datasets index."""

    def __init__(self, sm: ClusterStateMachine):
        self._sm = sm
        self.datasets: dict[str, datasets_pb2.Dataset] = {}
        self.by_shard: dict[str, set[str]] = {}  # shard id -> names of datasets holding it
        # Bumped by every change (local, not replicated): the leader's inventory cache key.
        self.changes = 0

    # -- derived index -----------------------------------------------------------------
    def _index(self, ds: datasets_pb2.Dataset, add: bool) -> None:
        for shard in ds.shards:
            names = self.by_shard.setdefault(shard.id, set())
            if add:
                names.add(ds.name)
            else:
                names.discard(ds.name)
                if not names:
                    del self.by_shard[shard.id]

    def rebuild(self, datasets: list[datasets_pb2.Dataset]) -> None:
        self.datasets = {d.name: copy_dataset(d) for d in datasets}
        self.by_shard = {}
        self.changes += 1
        for ds in self.datasets.values():
            derive_kind(ds)  # a snapshot from before kinds
            self._index(ds, True)

    # -- reads -------------------------------------------------------------------------
    def get(self, name: str) -> datasets_pb2.Dataset:
        """The dataset itself (callers copy before handing it out); raises NotFound."""
        ds = self.datasets.get(name)
        if ds is None:
            raise NotFound(f'dataset "{name}" not found')
        return ds

    def referenced(self, shard_id: str) -> bool:
        return bool(self.by_shard.get(shard_id))

    def entries(self, shard_id: str) -> list[datasets_pb2.Shard]:
        return [s for name in sorted(self.by_shard.get(shard_id, ())) for s in self.datasets[name].shards
                if s.id == shard_id]

    def under_replicated(self) -> list[tuple[datasets_pb2.Shard, int]]:
        """(shard, replication wanted) for each distinct shard with too few live replicas."""
        out: dict[str, tuple[datasets_pb2.Shard, int]] = {}
        for name in sorted(self.datasets):
            ds = self.datasets[name]
            for shard in ds.shards:
                live = sum(1 for n in shard.replicas if self._live(n))
                want = max(ds.replication, out[shard.id][1] if shard.id in out else 0)
                if live < want:
                    out[shard.id] = (shard, want)
        return list(out.values())

    def _live(self, node_id: str) -> bool:
        node = self._sm.nodes.get(node_id)
        return node is not None and node.state in _LIVE

    # -- commands ----------------------------------------------------------------------
    def put(self, c: state_pb2.PutDatasetCmd, at_ms: int) -> datasets_pb2.Dataset:
        """Create the dataset, or replace it with the next version. Replicas on nodes that
        are not live are left out."""
        new = copy_dataset(c.dataset)
        check_dataset_name(new.name)
        check_kind_and_labels(new)
        derive_kind(new)
        if not 1 <= new.replication <= MAX_REPLICATION:
            raise InvalidArgument(f"replication must be 1-{MAX_REPLICATION}")
        if len(new.shards) > MAX_SHARDS:
            raise InvalidArgument(f"{len(new.shards)} shards; at most {MAX_SHARDS}")
        old = self.datasets.get(new.name)
        if old is not None:
            check_owner(old, c.only_owner)
            if old.kind != new.kind:  # a model is never silently replaced by data, or back
                raise FailedPrecondition(
                    f'"{new.name}" is a {kind_noun(old.kind)}; remove it before putting a '
                    f"{kind_noun(new.kind)} by that name")
        new.version = old.version + 1 if old is not None else 1
        new.created_at_ms = at_ms
        new.rows = sum(s.rows for s in new.shards)
        new.size = sum(s.size for s in new.shards)
        for shard in new.shards:
            live = [n for n in dict.fromkeys(shard.replicas) if self._live(n)]
            if not live:
                raise FailedPrecondition(f"shard {shard.id[:12]} has no replica on a live node")
            del shard.replicas[:]
            shard.replicas.extend(live)
        if old is not None:
            self._index(old, False)
        self.changes += 1
        self.datasets[new.name] = new
        self._index(new, True)
        return copy_dataset(new)

    def delete(self, c: state_pb2.DeleteDatasetCmd, at_ms: int) -> datasets_pb2.Dataset:
        ds = self.get(c.name)
        check_owner(ds, c.only_owner)
        self._index(ds, False)
        self.changes += 1
        del self.datasets[c.name]
        return ds

    def add_replicas(self, c: state_pb2.AddReplicasCmd, at_ms: int) -> int:
        """Record verified copies; stale entries (node not live, shard gone) are skipped.
        Returns how many replica lists changed."""
        changed = 0
        for rc in c.replicas:
            if not self._live(rc.node_id):
                continue
            for shard in self.entries(rc.shard_id):
                if rc.node_id not in shard.replicas:
                    shard.replicas.append(rc.node_id)
                    changed += 1
        self.changes += 1
        return changed

    def drop_replicas(self, c: state_pb2.DropReplicasCmd, at_ms: int) -> int:
        changed = 0
        for rc in c.replicas:
            for shard in self.entries(rc.shard_id):
                if rc.node_id in shard.replicas:
                    shard.replicas.remove(rc.node_id)
                    changed += 1
        self.changes += 1
        return changed

    def node_gone(self, node_id: str, reason: str, at_ms: int) -> None:
        """The node is down or left: its copies no longer count."""
        self.changes += 1
        for ds in self.datasets.values():
            for shard in ds.shards:
                if node_id in shard.replicas:
                    shard.replicas.remove(node_id)
