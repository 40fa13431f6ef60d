"""Small edges a careless user finds at the real `lepton-ctl` (H6): a destination that
cannot be written is told by the path the user gave; an output named like its input is
refused by `data process` as by `data split`; a model's empty name is called a model name."""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration.cluster import run_ctl

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("edges_small")]


def one_line(out, says: str) -> None:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("lepton-ctl: "), out.stderr
    assert says in out.stderr, out.stderr


def test_careless_names_and_paths_on_a_real_agent(agents, tmp_path):
    node = agents("small")
    np.save(tmp_path / "rows.npy", np.arange(12, dtype=np.float32).reshape(6, 2))
    run_ctl("data", "put", str(tmp_path / "rows.npy"), "--name", "rows", "--replicas", "1",
            server=node.address, check=True)

    def ctl(*argv: str):
        return run_ctl(*argv, server=node.address, timeout=120)

    # /proc takes no new file or folder, even as root: was the work folder's name.
    got = ctl("data", "get", "rows", "/proc/x.npy")
    one_line(got, "/proc/x.npy: cannot write in /proc")
    assert ".lepton-get" not in got.stderr

    one_line(ctl("data", "process", "rows", "--steps", "normalize", "--out", "rows"),
             "the output name (--out) must differ from the input's: rows")
    one_line(ctl("data", "split", "rows", "--fractions", "0.5,0.5", "--out", "a,rows"),
             "the output name (--out) must differ from the input's: rows")
    listed = ctl("-o", "json", "data", "show", "rows")
    assert listed.returncode == 0 and '"version": 1' in listed.stdout, listed.stdout  # not rewritten

    one_line(ctl("models", "show", ""), "model name is required")
    one_line(ctl("serve", "update", "web", ""), "model name is required")
