"""A careless user at `lepton-ctl data *` and `serve *`, refused before anything is sent: one
line on stderr and the right exit code (2: usage, 1: a file that is not what the command
needs), never "unexpected error"."""

from __future__ import annotations

import numpy as np
import pytest

from lepton.client import cli

NOWHERE = "127.0.0.1:1"  # nothing listens: a command that got this far would say "cannot reach"


def run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(["--server", NOWHERE, *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("argv", "code", "says"), [
    # Past a message field's range: was "unexpected error: ValueError: Value out of range".
    (("data", "put", "{npy}", "--name", "x", "--replicas", "99999999999"), 2, "--replicas: at most 16"),
    # A wait that would never end, or never start: NaN was taken as a number.
    (("--timeout", "nan", "nodes", "list"), 2, "--timeout: must be positive"),
    (("serve", "up", "m", "--name", "w", "--wait-timeout", "nan"), 2, "--wait-timeout: must be positive"),
    (("serve", "up", "m", "--name", "w", "--wait-timeout", "inf"), 2, "--wait-timeout: must be positive"),
    (("--timeout", "1e308", "nodes", "list"), 2, "--timeout: must be positive and at most 1e+09"),
    # An empty .npy: was "unexpected error: EOFError".
    (("serve", "predict", "web", "--input", "{empty}"), 1, "not a numpy array file"),
    (("serve", "predict", "web", "--input", "{folder}"), 1, "not a numpy array file"),
])
def test_careless_input_is_refused_in_one_line(capsys, tmp_path, argv, code, says):
    np.save(tmp_path / "rows.npy", np.ones((2, 3), dtype=np.float32))
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "dir.npy").mkdir()
    paths = {"npy": str(tmp_path / "rows.npy"), "empty": str(tmp_path / "empty.npy"), "folder": str(tmp_path / "dir.npy")}
    got, err = run(capsys, *(a.format(**paths) for a in argv))
    assert got == code, err
    assert err.count("\n") == 1 and err.startswith("lepton-ctl: ") and says in err, err
    assert "unexpected error" not in err and "cannot reach" not in err, err


@pytest.mark.parametrize("replicas", [0, 17, 10**11])
def test_the_library_refuses_a_replica_count_out_of_range_before_sending(replicas):
    """Client.put_shards (put_dataset's last step): InvalidArgument, not ValueError from the proto."""
    from lepton.client.data import DataMethods
    from lepton.common.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="replicas must be 1 to 16"):
        DataMethods.put_shards(object.__new__(DataMethods), "x", [], {}, replicas=replicas)
