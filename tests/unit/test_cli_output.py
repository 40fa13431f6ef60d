"""lepton-ctl's human output: sizes, ages, tables and views."""

from __future__ import annotations

import argparse
import io

import pytest
from rich.console import Console

from lepton.client import NodeInfo
from lepton.client._cli_common import print_result
from lepton.client.render import (
    ago,
    cluster_status_view,
    dump_json,
    emit,
    human_bytes,
    node_detail,
    node_event_line,
    nodes_table,
    when,
)
from lepton.client.testing import make_node
from lepton.client.types import ClusterStatusInfo, NodeEvent
from lepton.v1 import common_pb2 as pb
from lepton.v1 import coordinator_pb2 as cpb

NOW = 1_700_000_100_000


def render(renderable: object) -> str:
    buf = io.StringIO()
    Console(file=buf, width=300, color_system=None).print(renderable)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (16_777_216_000, "15.6 GiB"),
        (80 * 1024**3, "80.0 GiB"),
        (3 * 1024**5, "3.0 PiB"),
        (2**70, "1024.0 EiB"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "-"),
        (NOW, "0s ago"),
        (NOW + 5000, "0s ago"),  # the leader's clock is ahead: no negative ages
        (NOW - 59_000, "59s ago"),
        (NOW - 60_000, "1m ago"),
        (NOW - 7200_000, "2h ago"),
        (NOW - 3 * 86400_000, "3d ago"),
    ],
)
def test_ago(ms: int, text: str) -> None:
    assert ago(ms, NOW) == text


def test_when() -> None:
    assert when(0) == "-"
    assert when(NOW - 60_000, NOW).endswith(" (1m ago)")


def node(**kw: object) -> NodeInfo:
    return NodeInfo.from_proto(make_node(**kw))  # type: ignore[arg-type]


def test_nodes_table_columns_and_cells() -> None:
    usage = pb.Usage(cpu_percent=37.4, memory_used_bytes=8 * 1024**3)
    rows = [
        node(
            node_id="0123456789abcdef",
            name="agent-1",
            voter=True,
            gpus=2,
            memory_bytes=16_777_216_000,
            usage=usage,
            last_heartbeat_ms=NOW - 3000,
        ),
        node(node_id="fedcba", name="agent-2", state=pb.NODE_STATE_READY, draining=True),
    ]
    lines = render(nodes_table(rows, NOW)).splitlines()
    header = lines[0].split()
    assert header == [
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
    first = lines[1]
    for cell in ("0123456789abcdef ", "agent-1", "yes", "15.6 GiB", "37%", "51%", "3s ago"):
        assert cell in first
    assert "0123456789abcdef" in first  # ids in full, never cut
    second = lines[2]
    assert "ready (draining)" in second and "no" in second
    assert second.split()[-3:] == ["-", "-", "-"]  # no usage, never seen


def test_names_are_not_markup() -> None:
    out = render(nodes_table([node(node_id="x", name="[bold]evil[/bold]")], NOW))
    assert "[bold]evil[/bold]" in out


def test_node_detail() -> None:
    usage = pb.Usage(
        cpu_percent=12.5,
        load1=1.5,
        memory_used_bytes=4 * 1024**3,
        disk_free_bytes=10 * 1024**3,
        gpus=[
            pb.Gpu(
                index=0,
                utilization_percent=40,
                memory_used_bytes=1024**3,
                memory_total_bytes=80 * 1024**3,
            )
        ],
    )
    n = node(node_id="abc", name="agent-1", gpus=1, labels={"zone": "a", "rack": "7"}, usage=usage)
    out = render(node_detail(n, NOW))
    for text in (
        "abc",
        "rack=7, zone=a",
        "8 logical, 4 physical (Fake CPU)",
        "GPU 0",
        "Fake GPU, 80.0 GiB, GPU-0",
        "12.5% (load1 1.50)",
        "4.0 GiB of 16.0 GiB (25%)",
        "40% util, 1.0 GiB of 80.0 GiB",
    ):
        assert text in out, text
    bare = render(node_detail(node(node_id="abc"), NOW))
    assert "<none>" in bare and "unknown (no recent heartbeat" in bare


def test_cluster_status_view() -> None:
    s = ClusterStatusInfo.from_proto(
        cpb.ClusterStatus(
            leader_id="L1",
            leader="h:1",
            term=7,
            commit_index=5,
            applied_index=4,
            voters=[cpb.Voter(id="L1", address="h:1", role="leader", match_index=5, lag=0)],
            nodes_by_state={"ready": 1, "down": 0},
            node_count=1,
        )
    )
    out = render(cluster_status_view(s))
    assert "L1 at h:1" in out and "commit 5, applied 4" in out and "1 (ready 1)" in out
    assert out.splitlines()[-1].split() == ["L1", "h:1", "leader", "5", "0"]
    empty = render(cluster_status_view(ClusterStatusInfo.from_proto(cpb.ClusterStatus())))
    assert "none (no leader elected)" in empty


def test_node_event_line() -> None:
    ev = NodeEvent.from_proto(
        cpb.NodeEvent(
            kind=cpb.NodeEvent.KIND_STATE_CHANGED,
            node=make_node("0123456789abcdef", "agent-4", state=pb.NODE_STATE_DOWN),
        )
    )
    assert node_event_line(ev).split() == [
        "-",
        "state_changed",
        "agent-4",
        "(0123456789abcdef)",
        "down",
    ]


def test_emit_off_a_terminal_has_no_trailing_spaces() -> None:
    buf = io.StringIO()
    emit(
        nodes_table([node(node_id="a", name="a"), node(node_id="b", name="much-longer-name")], NOW),
        buf,
    )
    text = buf.getvalue()
    assert text.endswith("\n") and "\x1b[" not in text
    assert all(line == line.rstrip() for line in text.splitlines())


# -- print_result: the one switch between -o json and the human form --------------------


def _printed(capsys: pytest.CaptureFixture[str], output: str, doc: object, human: object,
             **kw: object) -> tuple[str, str]:
    assert print_result(argparse.Namespace(output=output), doc, human, **kw) == 0
    got = capsys.readouterr()
    return got.out, got.err


def test_print_result_json_never_builds_the_human_form(capsys: pytest.CaptureFixture[str]) -> None:
    def human() -> str:
        raise AssertionError("built for -o json")

    doc = {"b": [1, {"d": 2, "c": 3}], "a": "x"}
    assert _printed(capsys, "json", doc, human) == (dump_json(doc) + "\n", "")
    assert _printed(capsys, "json", doc, human, line=True) == (
        '{"a": "x", "b": [1, {"c": 3, "d": 2}]}\n', "")
    assert _printed(capsys, "json", [], human, empty="no tasks") == ("[]\n", "")


def test_print_result_human_forms(capsys: pytest.CaptureFixture[str]) -> None:
    assert _printed(capsys, "table", {"id": 1}, "t-1 [bold]x[/bold]\n") == ("t-1 [bold]x[/bold]\n", "")
    assert _printed(capsys, "table", {"id": 1}, lambda: "as is\n") == ("as is\n", "")
    assert _printed(capsys, "table", [], lambda: "unused", empty="no tasks") == ("", "no tasks\n")
    out, _ = _printed(capsys, "table", [1], lambda: nodes_table([node(node_id="a", name="a")], NOW))
    assert out.split("\n")[0].split()[:2] == ["ID", "NAME"] and "\x1b[" not in out

    def writes_its_own() -> None:
        print("line one")

    assert _printed(capsys, "table", {"x": 1}, writes_its_own) == ("line one\n", "")
