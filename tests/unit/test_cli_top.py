"""`lepton-ctl top` in-process, against the fake coordinator of client.testing."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
from rich.console import Console

from lepton.client import cli, cli_top
from lepton.client.testing import FakeCoordinator, make_node, make_task, serve
from lepton.common.errors import Unavailable
from lepton.v1 import common_pb2 as pb
from lepton.v1 import tasks_pb2 as tpb


@pytest.fixture
def server() -> Iterator[str]:
    fake = FakeCoordinator()
    with serve(fake) as address:
        usage = pb.Usage(
            cpu_percent=42.0,
            memory_used_bytes=8 * 1024**3,
            load1=1.5,
            gpus=[pb.Gpu(index=0, utilization_percent=95.0, memory_used_bytes=1024**3)],
        )
        fake.add_node(make_node("n1aaaaaaaaaaaaaa", "gpu-box", gpus=1, usage=usage))
        fake.add_node(make_node("n2bbbbbbbbbbbbbb", "quiet", state=pb.NODE_STATE_SUSPECT))
        fake.add_task(make_task("t-1", state=tpb.TASK_STATE_RUNNING, node_id="n1aaaaaaaaaaaaaa"))
        fake.add_task(make_task("t-2", state=tpb.TASK_STATE_ASSIGNED, node_id="n1aaaaaaaaaaaaaa"))
        fake.add_task(make_task("t-3", state=tpb.TASK_STATE_SUCCEEDED, node_id="n2bbbbbbbbbbbbbb"))
        yield address


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_once_json_has_load_gpus_and_task_counts(server: str, capsys) -> None:
    code, out, err = run(capsys, "--server", server, "top", "--once", "-o", "json")
    assert code == 0, err
    frame = json.loads(out)
    box, quiet = frame["nodes"]
    assert box["name"] == "gpu-box" and box["cpu_percent"] == 42.0 and box["memory_percent"] == 50.0
    assert box["gpus"][0]["utilization_percent"] == 95.0
    assert (box["tasks_running"], box["tasks_assigned"]) == (1, 1)
    assert (
        quiet["state"] == "suspect" and quiet["cpu_percent"] is None and quiet["tasks_running"] == 0
    )
    assert frame["tasks"] == {"running": 1, "assigned": 1}
    assert frame["nodes_by_state"] == {"ready": 1, "suspect": 1}


def test_once_table(server: str, capsys) -> None:
    code, out, _ = run(capsys, "--server", server, "top", "--once")
    assert code == 0
    lines = out.splitlines()
    assert "2 nodes (ready 1, suspect 1)" in lines[0] and "1 running, 1 assigned" in lines[0]
    box = next(line for line in lines if "gpu-box" in line)
    assert "42%" in box and "95%" in box and "1 (+1)" in box
    assert "suspect" in next(line for line in lines if "quiet" in line)


def test_live_refreshes_until_ctrl_c(server: str, capsys, monkeypatch) -> None:
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_top.time, "sleep", sleep)
    code, out, err = run(capsys, "--server", server, "top", "--interval", "0.5")
    assert code == 0 and err == ""
    assert out.count("gpu-box") == 3  # piped: one frame per refresh
    assert sleeps == [0.5, 0.5, 0.5]


def test_live_on_a_terminal_keeps_the_last_frame_when_a_refresh_fails(
    server: str, capsys, monkeypatch
) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(
        cli_top, "make_console", lambda: Console(file=screen, force_terminal=True, width=120)
    )
    real_collect, calls = cli_top.collect, []

    def collect(client):
        calls.append(1)
        if len(calls) > 1:
            raise Unavailable("no leader")
        return real_collect(client)

    def sleep(_s: float) -> None:
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_top, "collect", collect)
    monkeypatch.setattr(cli_top.time, "sleep", sleep)
    code, _, err = run(capsys, "--server", server, "top")
    assert code == 0 and err == ""
    text = screen.getvalue()
    assert "gpu-box" in text and "refresh failed, showing the last frame: no leader" in text


def test_json_without_once_is_a_usage_error(server: str, capsys) -> None:
    code, _, err = run(capsys, "--server", server, "top", "-o", "json")
    assert code == 2 and "--once" in err
