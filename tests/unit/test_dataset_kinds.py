"""Dataset kinds (data | model | checkpoint) and labels in the replicated state."""

from __future__ import annotations

from lepton.common.errors import FailedPrecondition, InvalidArgument
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import datasets_pb2, state_pb2
from tests.unit.test_datasets import A, B, World

MODEL, CKPT, DATA = (datasets_pb2.DATASET_KIND_MODEL, datasets_pb2.DATASET_KIND_CHECKPOINT,
                     datasets_pb2.DATASET_KIND_DATA)


def put(w: World, name: str, source: str, **fields):
    ds = datasets_pb2.Dataset(name=name, replication=1, source=source, **fields)
    ds.shards.add(id=A, size=100, rows=10, dtype="|u1", replicas=["n1"])
    return w.apply(put_dataset=state_pb2.PutDatasetCmd(dataset=ds))


def test_kind_and_labels_are_recorded_and_survive_a_snapshot():
    w = World()
    m = put(w, "m", "model.safetensors", kind=MODEL, labels={"dataset": "d", "metrics": '{"train_loss": 0.1}'})
    assert m.kind == MODEL and dict(m.labels) == {"dataset": "d", "metrics": '{"train_loss": 0.1}'}
    assert put(w, "d", "d.npz").kind == DATA  # unset: data
    copy = ClusterStateMachine()
    copy.restore(w.sm.snapshot(), w.index)
    assert copy.datasets.get("m").kind == MODEL and copy.datasets.get("m").labels["dataset"] == "d"


def test_entries_from_before_kinds_derive_them_from_name_and_source():
    w = World()
    assert put(w, "old-model", "model.pt").kind == MODEL
    assert put(w, "ckpt-j-123", "epoch_000002.pt").kind == CKPT
    assert put(w, "ckpt-mine", "mine.npz").kind == DATA  # a user's name alone decides nothing
    assert put(w, "epochs", "epoch_000002.pt").kind == DATA
    # A snapshot written before kinds: rebuild derives the same.
    old = datasets_pb2.Dataset(name="ckpt-j-9", source="epoch_000001.pt", replication=1)
    old.shards.add(id=B, size=1, rows=1, dtype="|u1", replicas=["n1"])
    w.sm.datasets.rebuild([old])
    assert w.sm.datasets.get("ckpt-j-9").kind == CKPT


def test_unknown_kind_and_bad_labels_are_refused():
    w = World()
    assert isinstance(put(w, "x", "", kind=7), InvalidArgument)
    assert isinstance(put(w, "x", "", labels={"bad key": "v"}), InvalidArgument)
    assert isinstance(put(w, "x", "", labels={"k": "v" * 300}), InvalidArgument)
    assert w.sm.datasets.datasets == {}


def test_a_put_never_changes_a_names_kind():
    w = World()
    put(w, "m", "model.safetensors", kind=MODEL)
    refused = put(w, "m", "d.npz")
    assert isinstance(refused, FailedPrecondition)
    assert refused.message == '"m" is a model; remove it before putting a dataset by that name'
    assert w.sm.datasets.get("m").kind == MODEL and w.sm.datasets.get("m").version == 1
    assert put(w, "m", "model.safetensors", kind=MODEL).version == 2  # a new version of the same kind
    put(w, "old", "model.pt")  # derived: a model
    assert put(w, "old", "model.pt").version == 2
