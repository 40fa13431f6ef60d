"""A careless user's output paths at the real `lepton-ctl`: `data get` (and so a model's
download, models being datasets) into a folder that is not there fails as `cp` does, one
line naming the folder, exit 1, nothing written; a directory, an existing file (without
--force) and a file where the folder should be are refused the same way."""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration.cluster import run_ctl

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("edges_paths")]


def one_line(out, says: str) -> None:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert out.stderr == f"lepton-ctl: {says}\n", out.stderr


def files_under(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_data_get_writes_only_where_the_user_said(agents, tmp_path):
    node = agents("paths")
    np.save(tmp_path / "rows.npy", np.arange(12, dtype=np.int64).reshape(6, 2))
    run_ctl("data", "put", str(tmp_path / "rows.npy"), "--name", "rows", "--replicas", "1",
            server=node.address, check=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "a-file").write_text("not a folder")
    (work / "taken.npy").write_text("mine")
    (work / "folder.npy").mkdir()
    before = files_under(work)

    def get(out: str):
        return run_ctl("data", "get", "rows", out, server=node.address, timeout=120)

    one_line(get(str(work / "missing_dir" / "out.npy")), f"{work / 'missing_dir'}: no such folder")
    one_line(get(str(work / "missing" / "deeper" / "out.npy")), f"{work / 'missing' / 'deeper'}: no such folder")
    one_line(get(str(work / "a-file" / "out.npy")), f"{work / 'a-file'}: not a folder")
    one_line(get(str(work / "taken.npy")), f"{work / 'taken.npy'} exists; pass --force to replace it")
    one_line(get(str(work / "folder.npy")), f"{work / 'folder.npy'} is a directory; name a file")
    assert files_under(work) == before  # no folder made, no temp file left

    ok = get(str(work / "out.npy"))
    assert ok.returncode == 0, ok.stderr
    assert np.load(work / "out.npy").tolist() == np.arange(12).reshape(6, 2).tolist()
