"""`lepton-ctl local up/down` with a stand-in agent (the real one is tested in integration)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lepton.client import Client, DeadlineExceeded, FailedPrecondition, InvalidArgument, cli, local

# Speaks the agent's command line. Without --join it serves a fake coordinator and
# registers itself; with --join it registers with the first address given, then idles.
FAKE_AGENT = textwrap.dedent(
    """
    import argparse, signal, sys, threading, time
    import grpc
    from lepton.client.testing import FakeCoordinator, serve
    from lepton.v1 import coordinator_pb2 as cpb, coordinator_pb2_grpc as cg

    p = argparse.ArgumentParser()
    for flag in ("--data-dir", "--listen", "--name", "--peers", "--join", "--labels", "--metrics-listen"):
        p.add_argument(flag)
    a = p.parse_args()
    print("fake agent", sys.argv[1:], flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    req = cpb.RegisterNodeRequest(node_id="id-" + a.name, name=a.name, address=a.listen)

    def register(target):
        stub = cg.CoordinatorStub(grpc.insecure_channel(target))
        while not stop.is_set():
            try:
                return stub.RegisterNode(req, timeout=1)
            except grpc.RpcError:
                time.sleep(0.05)

    if a.join:
        register(a.join.split(",")[0])
        stop.wait()
    else:
        with serve(FakeCoordinator(), a.listen):
            register(a.listen)
            stop.wait()
    """
)


@pytest.fixture
def agent_cmd(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_agent.py"
    script.write_text(FAKE_AGENT)
    return [sys.executable, str(script)]


def alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


# -- pure pieces ---------------------------------------------------------------------------


def test_agent_args_one_voter() -> None:
    addrs = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    d = Path("/d")
    assert local.agent_args(0, addrs, 1, d) == [
        "--data-dir",
        "/d/agent-1",
        "--listen",
        "127.0.0.1:1",
        "--name",
        "agent-1",
    ]
    assert local.agent_args(2, addrs, 1, d)[-2:] == ["--join", "127.0.0.1:1"]


def test_agent_args_three_voters() -> None:
    addrs = [f"127.0.0.1:{p}" for p in range(1, 6)]
    for i in range(3):
        args = local.agent_args(i, addrs, 3, Path("/d"))
        assert args[-2:] == ["--peers", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"]
        assert "--join" not in args
    for i in (3, 4):
        args = local.agent_args(i, addrs, 3, Path("/d"))
        assert args[-2:] == ["--join", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"]
        assert "--peers" not in args


def test_free_ports_are_distinct() -> None:
    ports = local.free_ports(20)
    assert len(set(ports)) == 20 and all(p > 0 for p in ports)


def test_agent_command_prefers_the_script_beside_python() -> None:
    cmd = local.agent_command()
    script = Path(sys.executable).with_name("lepton-agent")
    assert cmd == (
        [str(script)] if script.exists() else [sys.executable, "-m", "lepton.agent.main"]
    )


def test_up_rejects_bad_counts(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        local.up(tmp_path, agents=0)
    with pytest.raises(InvalidArgument):
        local.up(tmp_path, agents=2, voters=3)


# -- up and down -------------------------------------------------------------------------------


def test_up_then_down(tmp_path: Path, agent_cmd: list[str]) -> None:
    root = tmp_path / "c"
    cluster = local.up(root, agents=3, voters=1, wait=30, agent_cmd=agent_cmd)
    try:
        assert [a.name for a in cluster.agents] == ["agent-1", "agent-2", "agent-3"]
        assert cluster.servers == cluster.agents[0].address
        saved = json.loads((root / "cluster.json").read_text())
        assert saved["servers"] == cluster.servers
        assert [(a["name"], a["pid"], a["address"]) for a in saved["agents"]] == [
            (a.name, a.pid, a.address) for a in cluster.agents
        ]
        # Each agent its own metrics port: they share the host.
        metrics = {a.metrics for a in cluster.agents}
        assert len(metrics) == 3 and all(m.startswith("http://127.0.0.1:") for m in metrics)
        for a in cluster.agents:
            assert alive(a.pid)
            assert Path(a.data_dir) == root / a.name
            assert "fake agent" in Path(a.log).read_text()
        with Client(cluster.servers) as c:
            assert sorted((n.name, n.state) for n in c.nodes()) == [
                ("agent-1", "ready"),
                ("agent-2", "ready"),
                ("agent-3", "ready"),
            ]
        with pytest.raises(FailedPrecondition, match="already running"):
            local.up(root, agents=1, agent_cmd=agent_cmd)
    finally:
        result = local.down(root)
    assert result.found and sorted(result.stopped) == ["agent-1", "agent-2", "agent-3"]
    assert result.killed == []
    assert not any(alive(a.pid) for a in cluster.agents)
    assert not (root / "cluster.json").exists()
    assert (root / "agent-1").is_dir()  # kept without --wipe

    again = local.down(root, wipe=True)
    assert not again.found and again.wiped == ["agent-1", "agent-2", "agent-3"]
    assert not root.exists()


def test_up_over_a_stale_cluster_file(tmp_path: Path, agent_cmd: list[str]) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.joinpath("cluster.json").write_text(
        json.dumps(
            {
                "agents": [
                    {
                        "name": "agent-1",
                        "pid": dead.pid,
                        "address": "x:1",
                        "data_dir": "",
                        "log": "",
                    }
                ]
            }
        )
    )
    cluster = local.up(tmp_path, agents=1, wait=30, agent_cmd=agent_cmd)
    local.down(tmp_path)
    assert len(cluster.agents) == 1


def test_agent_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; print('boom: bad flag'); sys.exit(3)"]
    with pytest.raises(FailedPrecondition) as info:
        local.up(tmp_path, agents=2, wait=30, agent_cmd=cmd)
    msg = str(info.value)
    assert msg.startswith("agent-1 exited with code 3 before it was ready")
    assert 'last log line: "boom: bad flag"' in msg
    assert msg.endswith(str(tmp_path / "agent-1" / "agent.log"))
    assert not (tmp_path / "cluster.json").exists()


def test_agent_that_never_serves_times_out_and_is_stopped(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(
        DeadlineExceeded, match=r"agent-1 not answering after 1s .*agent-1/agent.log"
    ):
        local.up(tmp_path, agents=1, wait=1, agent_cmd=cmd)
    assert not (tmp_path / "cluster.json").exists()
    assert local.down(tmp_path).found is False


def test_down_kills_an_agent_that_ignores_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    agent = local.LocalAgent(
        "agent-1", proc.pid, "x:1", str(tmp_path), "", local._create_time(proc.pid)
    )
    local._save_cluster(local.LocalCluster([agent], "x:1", 1, str(tmp_path)))
    t0 = time.monotonic()
    result = local.down(tmp_path, grace=0.5)
    assert result.killed == ["agent-1"] and result.stopped == []
    assert not alive(proc.pid)  # killed, and reaped by down() (it is our child here)
    proc.wait(5)
    proc.stdout.close()
    assert time.monotonic() - t0 < 5


def test_down_leaves_a_reused_pid_alone(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # Same pid, different start time: it is not our agent any more.
        agent = local.LocalAgent("agent-1", proc.pid, "x:1", str(tmp_path), "", create_time=1.0)
        local._save_cluster(local.LocalCluster([agent], "x:1", 1, str(tmp_path)))
        assert local.down(tmp_path, grace=0.2).stopped == []
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_wipe_removes_only_agent_dirs(tmp_path: Path) -> None:
    (tmp_path / "agent-1").mkdir()
    (tmp_path / "agent-12").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "agent-x").mkdir()
    assert local.down(tmp_path, wipe=True).wiped == ["agent-1", "agent-12"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent-x", "notes"]


# -- through the CLI -----------------------------------------------------------------------------


def test_cli_local_up_and_down(
    tmp_path: Path,
    agent_cmd: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(local, "agent_command", lambda: agent_cmd)
    monkeypatch.delenv("LEPTON_SERVER", raising=False)
    root = str(tmp_path / "c")
    # A context in use before: `local up` switches away from it, `local down` back.
    assert cli.main(["config", "set-context", "prod", "--server", "10.9.9.9:7070", "--use"]) == 0
    try:
        assert cli.main(["local", "up", "--agents", "2", "--data-dir", root]) == 0
        out = capsys.readouterr().out
        servers = json.loads((tmp_path / "c" / "cluster.json").read_text())["servers"]
        assert f"servers: {servers}\n" in out
        assert "context: local (now current" in out
        assert cli.main(["config", "current-context"]) == 0
        assert capsys.readouterr().out == "local\n"
        # No --server, no $LEPTON_SERVER: the local context reaches the new cluster.
        assert cli.main(["-q", "nodes", "list"]) == 0
        assert len(capsys.readouterr().out.split()) == 2
        assert cli.main(["local", "up", "--data-dir", root]) == 1
        err = capsys.readouterr().err
        assert (
            err.startswith("lepton-ctl: a local cluster is already running in")
            and err.count("\n") == 1
        )
    finally:
        assert cli.main(["-o", "json", "local", "down", "--data-dir", root, "--wipe"]) == 0
    down = json.loads(capsys.readouterr().out)
    assert down == {
        "found": True,
        "stopped": ["agent-1", "agent-2"],
        "killed": [],
        "wiped": ["agent-1", "agent-2"],
    }
    assert cli.main(["config", "current-context"]) == 0
    assert capsys.readouterr().out == "prod\n"
    assert cli.main(["local", "down", "--data-dir", root]) == 0
    assert capsys.readouterr().out == f"no local cluster running in {root}\n"


def test_wipe_tolerates_a_file_removed_under_it(tmp_path: Path, monkeypatch) -> None:
    """The attempt fence removes its socket on its way out, maybe while `down --wipe` runs."""
    folder = tmp_path / "agent-1"
    (folder / "tasks").mkdir(parents=True)
    for name in ("task-fence.sock", "node_id", "tasks/run.json"):
        (folder / name).write_text("x")
    real_unlink = os.unlink

    def raced_unlink(path, *args, **kwargs):
        if str(path).endswith("task-fence.sock") or path == "task-fence.sock":
            real_unlink(path, *args, **kwargs)  # the fence got there first
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", raced_unlink)
    local._wipe(folder)
    assert not folder.exists()
