"""lepton-ctl's conventions (issue 16): --version, completion, -o yaml|wide, -q, tables that
never cut ids at 80 columns, tasks list -w, SIGTERM/SIGHUP handled as Ctrl-C."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from importlib import resources

import pytest
import yaml

import lepton.client
from lepton.agent import main as agent_main
from lepton.client import cli
from lepton.client._cli_common import Terminated, stop_signals_as_interrupt
from lepton.client.cli_watch import watch_tasks
from lepton.client.testing import FakeCoordinator, make_node, make_task, serve
from lepton.client.types import TaskInfo
from lepton.common.version import VERSION
from lepton.v1 import tasks_pb2 as tpb

NODE_IDS = ["46a58a0c62aa11ff", "46a58a0c62bb11ff", "46a58a0c62cc11ff"]


@pytest.fixture
def server() -> Iterator[str]:
    f = FakeCoordinator()
    names = ["agent-1", "a-rather-long-node-name-for-a-narrow-terminal", "agent-3"]
    for node_id, name in zip(NODE_IDS, names, strict=True):
        f.add_node(make_node(node_id, name))
    f.add_task(make_task("t-0123456789abcdef01", name="train-with-a-long-name", state=tpb.TASK_STATE_RUNNING))
    f.add_task(make_task("t-0123456789abcdef02", argv=["python", "x.py"]))
    with serve(f) as address:
        yield address


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"lepton-ctl {VERSION}\n", "")
    with pytest.raises(SystemExit) as exit_:
        agent_main.build_parser().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"lepton-agent {VERSION}\n"
    assert lepton.client.__version__ == VERSION
    assert resources.files("lepton.client").joinpath("py.typed").is_file()


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script(capsys: pytest.CaptureFixture[str], shell: str) -> None:
    code, out, _ = run(capsys, "completion", shell)
    assert code == 0
    for word in ("nodes", "tasks", "config", "use-context", "--output"):
        assert word in out
    checker = shutil.which(shell)
    if checker:  # the script at least parses in its shell
        subprocess.run([checker, "-n"], input=out, text=True, check=True)


def test_yaml_is_the_json_document(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    for what in (["nodes", "list"], ["tasks", "list"], ["nodes", "show", "agent-1"]):
        _, as_json, _ = run(capsys, "--server", server, "-o", "json", *what)
        code, as_yaml, _ = run(capsys, "--server", server, "-o", "yaml", *what)
        assert code == 0 and yaml.safe_load(as_yaml) == json.loads(as_json)


def test_quiet_prints_only_ids(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--server", server, "nodes", "list", "-q")
    assert code == 0 and sorted(out.splitlines()) == NODE_IDS
    code, out, _ = run(capsys, "--server", server, "-q", "tasks", "list")
    assert code == 0 and out == "t-0123456789abcdef01\nt-0123456789abcdef02\n"


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.parametrize("what", [["nodes", "list"], ["tasks", "list"], ["-o", "wide", "nodes", "list"]])
def test_80_column_tables_keep_full_ids(
    server: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, what: list[str]
) -> None:
    # A real terminal of 80 columns, as rich sees one.
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "25")
    code, out, _ = run(capsys, "--server", server, *what)
    text = strip_ansi(out)
    assert code == 0 and "…" not in text
    ids = NODE_IDS if "nodes" in what else ["t-0123456789abcdef01", "t-0123456789abcdef02"]
    for full in ids:
        assert full in text
    if what == ["nodes", "list"]:
        assert text.count("127.0.0.1:7070") == 3  # addresses whole too
        assert max(len(line) for line in text.splitlines()) <= 80


def test_wide_adds_columns(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    head = run(capsys, "--server", server, "-o", "wide", "tasks", "list")[1].splitlines()[0]
    assert head.split()[-3:] == ["OWNER", "RESOURCES", "COMMAND"]
    head = run(capsys, "--server", server, "-o", "wide", "nodes", "list")[1].splitlines()[0]
    assert head.split()[-3:] == ["DISK", "VERSION", "LABELS"]


def _task(task_id: str, state: int) -> TaskInfo:
    return TaskInfo.from_proto(make_task(task_id, state=state))


def _args(output: str = "table", quiet: bool = False) -> argparse.Namespace:
    return argparse.Namespace(output=output, quiet=quiet)


def test_watch_prints_the_list_then_only_changes(capsys: pytest.CaptureFixture[str]) -> None:
    looks = iter([
        [_task("t-a", tpb.TASK_STATE_PENDING), _task("t-b", tpb.TASK_STATE_RUNNING)],
        [_task("t-a", tpb.TASK_STATE_PENDING), _task("t-b", tpb.TASK_STATE_RUNNING)],
        [_task("t-a", tpb.TASK_STATE_RUNNING), _task("t-b", tpb.TASK_STATE_RUNNING),
         _task("t-c", tpb.TASK_STATE_PENDING)],
    ])
    assert watch_tasks(_args(), lambda: next(looks), lambda ts: {}, interval=0, rounds=3) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "STATE"]
    assert [line.split()[0] for line in lines[1:]] == ["t-a", "t-b", "t-a", "t-c"]
    assert lines[3].split()[2] == "running"
    # Later rows line up under the first listing's columns.
    assert lines[3].index("running") == lines[4].index("pending") == lines[0].index("STATE")
    assert lines[3].index("1 ") == lines[0].index("ATTEMPT")

    looks = iter([[_task("t-a", tpb.TASK_STATE_PENDING)], [_task("t-a", tpb.TASK_STATE_SUCCEEDED)]])
    watch_tasks(_args("json"), lambda: next(looks), lambda ts: {}, interval=0, rounds=2)
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["id"], d["state"]) for d in docs] == [("t-a", "pending"), ("t-a", "succeeded")]


def test_sigterm_and_sighup_raise_as_ctrl_c_does() -> None:
    before = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with pytest.raises(KeyboardInterrupt) as caught, stop_signals_as_interrupt():
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        assert isinstance(caught.value, Terminated) and str(caught.value) == sig.name
    assert signal.getsignal(signal.SIGTERM) == before  # put back


def test_an_ignored_sighup_stays_ignored() -> None:
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_signals_as_interrupt():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # nohup
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGHUP, before)


def test_jobs_table_keeps_full_ids_when_narrow() -> None:
    from rich.console import Console

    from lepton.client.cli_jobs import jobs_table
    from lepton.client.jobs import JobInfo

    job_id = "j-0123456789abcdef0123"
    members = [_task("t-0123456789abcdef01", tpb.TASK_STATE_FAILED)]
    job = JobInfo(job_id, "failed", "rank 1 exited with code 3 " * 4, 2, members)
    console = Console(width=24, color_system=None, record=True)
    with console.capture() as cap:
        console.print(jobs_table([job]), crop=False)
    text = cap.get()
    assert job_id in text


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, parser
    for group in groups:
        for name, child in group.choices.items():
            yield from _leaves(child, (*path, name))


def test_subcommands_are_declared_one_way() -> None:
    """Issue 11: every CLI module declares its commands with `_cli_common.command` and
    `command_group`: each leaf runs a function and takes the global options (`completion`
    talks to no cluster; set-context stores its own --server, so it has only -o)."""
    leaves = dict(_leaves(cli.build_parser()))
    assert ("tasks", "list") in leaves and ("cluster", "peers", "add") in leaves
    for path, p in leaves.items():
        assert callable(p.get_default("func")), path
        options = {o for a in p._actions for o in a.option_strings}
        assert "-o" in options or path == ("completion",), path
        if path not in (("completion",), ("config", "set-context")):
            assert "--server" in options and "--context" in options, path
    sources = resources.files("lepton.client")
    for module in sources.iterdir():
        if module.name.startswith("cli") and module.name.endswith(".py"):
            assert ".add_parser(" not in module.read_text(), f"{module.name}: use _cli_common.command"


def test_tasks_list_marks_job_members(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16: a job's members are listed with their job's id (JOB), whole even at 80
    columns; -o json has it as `job_id` (and the rank as `gang_rank`)."""
    f = FakeCoordinator()
    f.add_task(make_task("t-0123456789abcdef01", name="alone"))
    for rank in (0, 1):
        member = make_task(f"t-0123456789ab-{rank}", name="train-with-a-long-name",
                           reason="unschedulable: " + "x" * 80)
        member.spec.job_id, member.spec.gang_rank = "j-0123456789ab", rank
        f.add_task(member)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "80")
    with serve(f) as address:
        code, out, _ = run(capsys, "--server", address, "tasks", "list")
        lines = strip_ansi(out).splitlines()
        assert code == 0 and "JOB" in lines[0].split()
        job_at = lines[0].index("JOB")
        # Long names and reasons wrap onto lines of their own; a row starts with its id.
        jobs = {line.split()[0]: line[job_at:].split()[0] for line in lines[1:] if line.startswith("t-")}
        assert jobs == {"t-0123456789abcdef01": "-", "t-0123456789ab-0": "j-0123456789ab",
                        "t-0123456789ab-1": "j-0123456789ab"}
        _, out, _ = run(capsys, "--server", address, "tasks", "show", "t-0123456789ab-1")
        assert "j-0123456789ab (rank 1)" in strip_ansi(out)
        code, out, _ = run(capsys, "--server", address, "-o", "json", "tasks", "list")
    members = {d["id"]: (d["job_id"], d["gang_rank"]) for d in json.loads(out)}
    assert members == {"t-0123456789abcdef01": ("", 0), "t-0123456789ab-0": ("j-0123456789ab", 0),
                       "t-0123456789ab-1": ("j-0123456789ab", 1)}
