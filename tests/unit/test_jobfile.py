"""Job files (`lepton-ctl apply -f`): one schema with the submit keywords, strict keys."""

from __future__ import annotations

from dataclasses import fields

import pytest

from lepton.client import jobfile
from lepton.client.tasks import TaskOptions
from lepton.common.errors import InvalidArgument

try:
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib


def test_the_keys_are_the_submit_keywords():
    task_fields = {f.name for f in fields(TaskOptions)} - {"code_digest"}
    assert set(jobfile.allowed_keys()) == task_fields | set(jobfile.JOB_OPTIONS) | {
        "command", "working_dir", "sweep"}


def test_the_documented_example_parses(tmp_path):
    spec = jobfile.parse(tomllib.loads(jobfile.example()), base=str(tmp_path))
    assert spec.task == {"argv": ["python", "train.py"], "cpu": 1, "memory": "2GiB",
                         "env": {"SEED": "1"}}
    assert spec.job == {"nodes": 2, "nproc_per_node": 1, "max_restarts": 1}
    assert spec.working_dir == str(tmp_path) and spec.is_job


@pytest.mark.parametrize("text, says", [
    ('command = ["x"]\nnodez = 2', "unknown key 'nodez'"),
    ('command = ["x"]\ncpu = "two"', "cpu: expected int or float, not str"),
    ('command = ["x"]\nnodes = true', "nodes: expected int, not bool"),
    ('command = ["x"]\nenv = { A = 1 }', "env: every value must be a string"),
    ('command = "x"', "command: expected a list of strings"),
    ('command = ["x"]\nshell = "y"', "give command or shell, not both"),
    ("cpu = 1", "no command"),
    ('command = ["x"]\nnodes = 2\nsweep = { a = ["1"] }', "sweep: is for single-node tasks"),
    ('command = ["x"]\nsweep = { a = ["1,2"] }', "sweep.a: values must be"),
])
def test_mistakes_are_refused_in_one_line_naming_the_key(text, says):
    with pytest.raises(InvalidArgument) as err:
        jobfile.parse(tomllib.loads(text), where="job.toml")
    assert says in str(err.value) and str(err.value).startswith("job.toml: ")
    assert "\n" not in str(err.value)


def test_a_sweep_becomes_submit_sweep_pairs():
    spec = jobfile.parse(tomllib.loads('shell = "echo {lr}"\nsweep = { lr = [0.1, "0.01"] }'))
    assert spec.sweep == [("lr", "0.1,0.01")] and not spec.is_job


def test_an_unreadable_or_broken_file_is_one_line(tmp_path):
    with pytest.raises(InvalidArgument, match="cannot read job file"):
        jobfile.load(str(tmp_path / "missing.toml"))
    (tmp_path / "bad.toml").write_text("command = [")
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        jobfile.load(str(tmp_path / "bad.toml"))


def test_the_readme_and_the_cli_reference_show_the_checked_example():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for doc in ("README.md", "docs/cli.md"):
        assert f"```toml\n{jobfile.example()}```" in (root / doc).read_text(), doc
