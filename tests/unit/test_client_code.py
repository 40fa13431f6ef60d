"""The client's half of --working-dir, over a fake data API: ask first, upload only what the
cluster lacks, one copy when two cannot be placed, a name holding other bytes refused, and
`working_dir=` turned into the archive's digest (once per folder in one call)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lepton.client.code import CodeMethods
from lepton.client.data import DatasetInfo, ShardInfo
from lepton.common.errors import FailedPrecondition, InvalidArgument, NotFound


class FakeData(CodeMethods):
    def __init__(self, ready_nodes: int = 2):
        self.stored: dict[str, DatasetInfo] = {}
        self.puts: list[tuple[str, int]] = []
        self.ready_nodes = ready_nodes

    def dataset(self, name, *, timeout=None):
        if name not in self.stored:
            raise NotFound(f'dataset "{name}" not found')
        return self.stored[name]

    def put_shards(self, name, metas, files, *, replicas=2, source="", progress=None):
        assert Path(files[metas[0].id]).is_file()
        self.puts.append((name, replicas))
        if replicas > self.ready_nodes:
            raise FailedPrecondition(f"replication {replicas} needs {replicas} ready nodes")
        shard = ShardInfo(metas[0].id, metas[0].size, 0, metas[0].dtype, [], "", ["n1"])
        self.stored[name] = DatasetInfo(name, 1, replicas, 0, metas[0].size, 0, source, [shard])
        return self.stored[name]


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "train.py").write_text("print('hi')\n")
    return tmp_path / "proj"


def test_an_unchanged_folder_is_uploaded_once(folder):
    fake = FakeData()
    first = fake.push_code(folder)
    second = fake.push_code(folder)
    assert first.uploaded and not second.uploaded
    assert first.digest == second.digest and fake.puts == [(f"code-{first.digest}", 2)]
    assert "already stored" in second.describe() and "(uploaded)" in first.describe()
    (folder / "train.py").write_text("print('changed')\n")
    assert fake.push_code(folder).uploaded


def test_one_copy_when_two_cannot_be_placed(folder):
    fake = FakeData(ready_nodes=1)
    upload = fake.push_code(folder)
    assert upload.uploaded and [r for _, r in fake.puts] == [2, 1]


def test_a_name_holding_other_bytes_is_refused(folder):
    fake = FakeData()
    digest = fake.push_code(folder).digest
    fake.stored[f"code-{digest}"].shards[0].id = "0" * 64
    with pytest.raises(FailedPrecondition, match="does not hold the code archive"):
        fake.push_code(folder)


def test_working_dir_becomes_the_digest_once_per_folder(folder):
    fake = FakeData()
    shipped: dict[str, str] = {}
    a = fake._with_code({"cpu": 1, "working_dir": str(folder)}, shipped)
    b = fake._with_code({"working_dir": folder}, shipped)
    assert a == {"cpu": 1, "code_digest": b["code_digest"]} and len(fake.puts) == 1
    assert fake._with_code({"cpu": 2}) == {"cpu": 2}
    with pytest.raises(InvalidArgument, match="not both"):
        fake._with_code({"working_dir": folder, "code_digest": "ab" * 32})
    with pytest.raises(InvalidArgument, match="not a folder"):
        fake._with_code({"working_dir": folder / "nope"})
