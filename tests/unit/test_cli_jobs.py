"""lepton-ctl's job commands in-process: what is refused before any job RPC (the fake
coordinator of client.testing has none; tests/integration/test_jobs_cli.py runs them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lepton.client import cli
from lepton.client.testing import FakeCoordinator, serve


@pytest.fixture
def server() -> Iterator[str]:
    with serve(FakeCoordinator()) as address:
        yield address


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_task_command_given_a_job_id_says_it_is_one(server, capsys):
    for argv in (("tasks", "show", "j-0a1b2c3d4e5f"), ("tasks", "cancel", "j-0a1b2c3d4e5f")):
        code, out, err = run(capsys, "--server", server, *argv)
        assert (code, out) == (1, "")
        assert err == ('lepton-ctl: "j-0a1b2c3d4e5f" is a job id, not a task id: '
                       "see jobs show|cancel|logs\n")


def test_submit_nodes_with_a_sweep_is_a_usage_error(server, capsys):
    code, out, err = run(capsys, "--server", server, "submit", "--nodes", "2", "--sweep",
                         "a=1,2", "--", "echo", "{a}")
    assert (code, out) == (2, "") and "--sweep is for single-node tasks" in err
    assert len(err.splitlines()) == 1


def test_apply_refuses_a_bad_file_before_connecting(tmp_path, capsys):
    (tmp_path / "job.toml").write_text('command = ["true"]\ngpus = "one"\n')
    code, out, err = run(capsys, "--server", "127.0.0.1:1", "apply", "-f", str(tmp_path / "job.toml"))
    assert (code, out) == (1, "")
    assert err == f"lepton-ctl: {tmp_path / 'job.toml'}: gpus: expected int, not str\n"
