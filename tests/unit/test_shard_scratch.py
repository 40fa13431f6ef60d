"""agent/shard_scratch.py: which scratch folders are whose, and what the agent removes."""

from __future__ import annotations

from lepton.agent import shard_scratch as ss


def make(root, data_dir, task_id: str, attempt: int, suffix: str = "ab_12xyz"):
    folder = root / f"{ss.PREFIX}{ss.node_key(data_dir)}-{task_id}-{attempt}-{suffix}"
    folder.mkdir()
    (folder / "shard.npy").write_bytes(b"plain")
    return folder


def test_the_prefix_names_the_node_and_the_attempt(tmp_path):
    prefix = ss.scratch_prefix(tmp_path / "data", "t-1", 3, root=tmp_path)
    assert prefix == str(tmp_path / f"{ss.PREFIX}{ss.node_key(tmp_path / 'data')}-t-1-3-")
    assert ss.scratch_prefix(tmp_path / "data", "t-1", 3, root=tmp_path / "none") == ""  # no such folder
    assert ss.node_key(tmp_path / "a") != ss.node_key(tmp_path / "b")


def test_an_attempt_removes_only_its_own_folder(tmp_path):
    data = tmp_path / "data"
    # Task "a" attempt 1 must not take task "a-1" attempt 5's folder (a shared prefix).
    own, other_task = make(tmp_path, data, "a", 1), make(tmp_path, data, "a-1", 5)
    other_node = make(tmp_path, tmp_path / "other", "a", 1)
    assert ss.remove_attempt(data, "a", 1, root=tmp_path) == 1
    assert not own.exists() and other_task.exists() and other_node.exists()


def test_stale_skips_running_attempts_other_nodes_and_links(tmp_path):
    data = tmp_path / "data"
    running, ended = make(tmp_path, data, "j.x-2", 0), make(tmp_path, data, "j.x-2", 1)
    other_node = make(tmp_path, tmp_path / "other", "j.x-2", 1)
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / f"{ss.PREFIX}{ss.node_key(data)}-j-3-ab_12xyz").symlink_to(target)
    (tmp_path / f"{ss.PREFIX}{ss.node_key(data)}-noattempt").mkdir()
    assert ss.stale(data, [("j.x-2", 0)], root=tmp_path) == [ended]
    assert ss.remove([ended, ended]) == 1  # the second is gone already: no error
    assert running.exists() and other_node.exists() and target.exists()
