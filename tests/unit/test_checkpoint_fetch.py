"""A job resumes only from its own checkpoint: a `ckpt-<job>` dataset another user put
first (or one that is not a checkpoint) is ignored, never fetched."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

from lepton.workloads import torch_task


class FakeClient:
    def __init__(self, ds, job_owner: str):
        self.ds, self.job_owner, self.fetched = ds, job_owner, []

    def dataset(self, name):
        assert name == "ckpt-j-1"
        return self.ds

    def job(self, job_id):
        return SimpleNamespace(owner=self.job_owner)


@pytest.mark.parametrize("kind, owner, fetched", [
    ("checkpoint", "alice", True),
    ("checkpoint", "mallory", False),  # the name taken by another user
    ("data", "alice", False),
    ("model", "alice", False),
])
def test_only_the_jobs_own_checkpoint_is_fetched(monkeypatch, tmp_path, kind, owner, fetched):
    client = FakeClient(SimpleNamespace(name="ckpt-j-1", kind=kind, owner=owner,
                                        source="epoch_000002.safetensors"), job_owner="alice")
    monkeypatch.setattr(torch_task, "_client", lambda launch: contextlib.nullcontext(client))
    import lepton.workloads.recipes.cluster as cluster

    monkeypatch.setattr(cluster, "get_file", lambda c, name, out: client.fetched.append(out))
    said = torch_task.fetch_checkpoint({"job_id": "j-1"}, tmp_path)
    assert bool(client.fetched) == fetched, said
    if not fetched:
        assert said.startswith("ignoring ckpt-j-1") and owner in said
    else:
        assert client.fetched == [tmp_path / "epoch_000002.safetensors"]
