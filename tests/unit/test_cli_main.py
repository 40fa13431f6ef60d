"""lepton-ctl end to end in-process: argument parsing, exit codes, one-line errors, JSON."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from lepton.client import cli, cli_app
from lepton.client.testing import FakeCoordinator, make_node, serve
from lepton.v1 import common_pb2 as pb
from lepton.v1 import coordinator_pb2 as cpb


@pytest.fixture
def fake() -> FakeCoordinator:
    f = FakeCoordinator()
    f.add_node(make_node("aaaa1111ffff0000", "agent-2", voter=True))
    f.add_node(make_node("aaaa2222ffff0000", "agent-1", state=pb.NODE_STATE_SUSPECT))
    f.add_node(make_node("bbbb3333ffff0000", "agent-3"))
    return f


@pytest.fixture
def server(fake: FakeCoordinator) -> Iterator[str]:
    with serve(fake) as a:
        yield a


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def dead_address() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


# -- parsing ---------------------------------------------------------------------------------


def test_server_is_left_to_the_client_to_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    # $LEPTON_SERVER and contexts are read by Client() (test_contexts.py), not the parser.
    monkeypatch.setenv("LEPTON_SERVER", "a:1,b:2")
    args = cli.build_parser().parse_args(["nodes", "list"])
    assert (args.server, args.output, args.timeout) == (None, "table", 10.0)
    with cli._client(args) as c:
        assert c.addresses == ["a:1", "b:2"]


def test_global_options_go_before_or_after_the_command() -> None:
    p = cli.build_parser()
    before = p.parse_args(
        ["--server", "x:1", "-o", "json", "--timeout", "3", "nodes", "show", "abc"]
    )
    after = p.parse_args(
        ["nodes", "show", "abc", "--server", "x:1", "-o", "json", "--timeout", "3"]
    )
    for a in (before, after):
        assert (a.server, a.output, a.timeout, a.node) == ("x:1", "json", 3.0, "abc")


def test_local_defaults() -> None:
    a = cli.build_parser().parse_args(["local", "up"])
    assert (a.agents, a.voters, a.data_dir) == (3, None, ".lepton-local")  # None: 3 voters for 3+ agents
    assert cli.build_parser().parse_args(["local", "down", "--wipe"]).wipe is True


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nodes"],
        ["bogus"],
        ["-o", "xml", "nodes", "list"],
        ["--timeout", "0", "nodes", "list"],
        ["--timeout", "soon", "nodes", "list"],
        ["nodes", "show"],
        ["nodes", "list", "--state", "happy"],
        ["local", "up", "--agents", "0"],
    ],
)
def test_usage_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("lepton-ctl: ") and err.count("\n") == 1, err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "nodes", "drain", "--help")
    assert code == 0 and "--undo" in out


# -- errors ----------------------------------------------------------------------------------


def test_unreachable_server_is_one_line_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    dead = dead_address()
    code, out, err = run(capsys, "--server", dead, "--timeout", "1", "nodes", "list")
    assert (code, out) == (1, "")
    assert err == f"lepton-ctl: cannot reach {dead} (connection refused)\n"


def test_bad_server_address(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--server", "nohost", "cluster", "status")
    assert code == 1 and err == "lepton-ctl: server address 'nohost' is not HOST:PORT\n"


def test_not_found_and_ambiguous(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--server", server, "nodes", "show", "abc") == (
        1,
        "",
        'lepton-ctl: node "abc" not found\n',
    )
    code, _, err = run(capsys, "--server", server, "nodes", "drain", "aaaa")
    assert code == 1
    assert err == 'lepton-ctl: node "aaaa" is ambiguous: matches aaaa1111ffff, aaaa2222ffff\n'


def test_ctrl_c_exits_130_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_app, "cmd_cluster_status", interrupted)
    assert run(capsys, "cluster", "status") == (130, "", "")


def test_unexpected_errors_are_one_line_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object) -> int:
        raise ValueError("oops\nsecond line")

    monkeypatch.setattr(cli_app, "cmd_cluster_status", broken)
    code, _, err = run(capsys, "cluster", "status")
    assert code == 1
    assert (
        err
        == "lepton-ctl: unexpected error: ValueError: oops second line (run with --debug for details)\n"
    )


def test_server_error_message_is_flattened_to_one_line(
    fake: FakeCoordinator, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    class Broken(FakeCoordinator):
        def GetClusterStatus(self, request, context):  # type: ignore[no-untyped-def]
            import grpc

            context.abort(grpc.StatusCode.INTERNAL, "disk full\n  while applying")

    with serve(Broken()) as a:
        assert run(capsys, "--server", a, "cluster", "status") == (
            1,
            "",
            "lepton-ctl: disk full while applying\n",
        )


# -- commands ----------------------------------------------------------------------------------


def test_nodes_list_json_is_stable(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--server", server, "-o", "json", "nodes", "list")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert [n["name"] for n in doc] == ["agent-1", "agent-2", "agent-3"]  # sorted by name
    assert out == json.dumps(doc, indent=2, sort_keys=True) + "\n"


def test_nodes_list_state_filter(
    fake: FakeCoordinator, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys,
        "--server",
        server,
        "-o",
        "json",
        "nodes",
        "list",
        "--state",
        "suspect",
        "--state",
        "down",
    )
    assert code == 0 and [n["name"] for n in json.loads(out)] == ["agent-1"]
    assert list(fake.calls[-1][1].states) == [pb.NODE_STATE_SUSPECT, pb.NODE_STATE_DOWN]


def test_nodes_list_table(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--server", server, "nodes", "list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4
    assert lines[0].split() == [
        "ID",
        "NAME",
        "ADDRESS",
        "STATE",
        "VOTER",
        "CPU",
        "MEMORY",
        "GPUS",
        "CPU%",
        "MEM%",
        "LAST",
        "SEEN",
    ]
    assert lines[1].split()[:5] == ["aaaa2222ffff0000", "agent-1", "127.0.0.1:7070", "suspect", "no"]


def test_empty_nodes_list(capsys: pytest.CaptureFixture[str]) -> None:
    with serve(FakeCoordinator()) as a:
        assert run(capsys, "--server", a, "nodes", "list") == (0, "", "no nodes\n")
        assert run(capsys, "--server", a, "-o", "json", "nodes", "list") == (
            0,
            "[]\n",
            "",
        )


def test_nodes_show_by_prefix(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--server", server, "-o", "json", "nodes", "show", "bbbb")
    assert code == 0 and json.loads(out)["id"] == "bbbb3333ffff0000"
    code, out, _ = run(capsys, "--server", server, "nodes", "show", "agent-2")
    assert code == 0 and "aaaa1111ffff0000" in out and "Voter" in out


def test_nodes_drain_and_undo(
    fake: FakeCoordinator, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "--server", server, "nodes", "drain", "bbbb") == (
        0,
        "node agent-3 (bbbb3333ffff0000) is draining\n",
        "",
    )
    assert fake.nodes["bbbb3333ffff0000"].draining
    code, out, _ = run(capsys, "--server", server, "-o", "json", "nodes", "drain", "bbbb", "--undo")
    assert code == 0 and json.loads(out)["draining"] is False
    assert [r.enable for m, r in fake.calls if m == "DrainNode"] == [True, False]


def test_cluster_status(
    fake: FakeCoordinator, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.status = cpb.ClusterStatus(
        leader_id="aaaa1111ffff0000",
        leader="127.0.0.1:7070",
        term=2,
        voters=[cpb.Voter(id="aaaa1111ffff0000", address="127.0.0.1:7070", role="leader")],
        nodes_by_state={"ready": 2, "suspect": 1},
        node_count=3,
    )
    code, out, _ = run(capsys, "--server", server, "cluster", "status")
    assert code == 0
    assert "aaaa1111ffff0000 at 127.0.0.1:7070" in out and "3 (ready 2, suspect 1)" in out
    code, out, _ = run(capsys, "--server", server, "-o", "json", "cluster", "status")
    assert json.loads(out)["nodes_by_state"] == {"ready": 2, "suspect": 1}


def test_nodes_watch_json_lines(
    fake: FakeCoordinator, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.push_event(
        cpb.NodeEvent(kind=cpb.NodeEvent.KIND_REGISTERED, node=make_node("n1", "agent-9"), index=3)
    )
    fake.push_event(None)  # the server ends the stream
    code, out, _ = run(capsys, "--server", server, "-o", "json", "nodes", "watch")
    assert code == 0
    (line,) = out.splitlines()
    ev = json.loads(line)
    assert (ev["kind"], ev["index"], ev["node"]["name"]) == ("registered", 3, "agent-9")


def test_cli_does_not_import_heavy_modules() -> None:
    code = "import sys, lepton.client.cli; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_console_script_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    dead = dead_address()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lepton.client.cli",
            "--server",
            dead,
            "--timeout",
            "0.5",
            "cluster",
            "status",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr == f"lepton-ctl: cannot reach {dead} (connection refused)\n"
