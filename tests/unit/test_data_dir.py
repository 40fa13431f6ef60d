"""The agent's data dir: refused when others may write it, made private otherwise
(agent/identity.py secure_data_dir)."""

from __future__ import annotations

import os
import stat

import pytest

from lepton.agent.identity import secure_data_dir
from lepton.common.errors import FailedPrecondition


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("loose", [0o777, 0o770, 0o757, 0o722])
def test_a_data_dir_others_can_write_is_refused(tmp_path, loose):
    d = tmp_path / "data"
    d.mkdir()
    (d / "node_id").write_text("x")
    os.chmod(d, loose)
    with pytest.raises(FailedPrecondition, match=f"can be written by others \\(mode {loose:04o}\\)"):
        secure_data_dir(d)
    assert mode(d) == loose  # nothing touched


def test_everything_in_it_loses_group_and_other_bits_and_keeps_the_owners(tmp_path):
    d = tmp_path / "data"
    (d / "tasks" / "t" / "1").mkdir(parents=True)
    os.chmod(d, 0o755)
    script = d / "tasks" / "t" / "1" / "run.sh"
    script.write_text("#!/bin/sh\n")
    os.chmod(script, 0o755)
    (d / "raft.log").write_text("secrets")
    os.chmod(d / "raft.log", 0o644)
    outside = tmp_path / "outside"
    outside.write_text("not ours to change")
    os.chmod(outside, 0o644)
    (d / "link").symlink_to(outside)
    assert secure_data_dir(d) == 6  # data, tasks, t, 1, run.sh, raft.log
    assert mode(d) == 0o700 and mode(d / "tasks" / "t" / "1") == 0o700
    assert mode(script) == 0o700  # still executable by its owner
    assert mode(d / "raft.log") == 0o600
    assert mode(outside) == 0o644  # a link is not followed
    assert secure_data_dir(d) == 0  # nothing left to fix
