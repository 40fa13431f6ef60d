"""The node's attempt fence (agent/tasks/fence.py) through its link: one per data dir,
shared by the links that find it, gone once idle, refusing bad requests with a reason."""

from __future__ import annotations

import shutil

import pytest

from lepton.agent.assignments import to_proto
from lepton.agent.tasks import fence
from lepton.agent.tasks.fence_link import FenceLink
from lepton.agent.tasks.runner import FAILED_TO_START_CODE, TaskEventKind
from lepton.agent.tasks.task_spec import FENCE_DOWN
from tests.unit.test_runner import Node, gone, kill_fence, sh, wait_until


def fence_pid(data_dir) -> int:
    return int((data_dir / fence.LOCK_NAME).read_text())


def item(tmp_path, name: str, argv: list[str]) -> dict:
    att_dir = tmp_path / name
    att_dir.mkdir()
    return {"key": [name, 1], "argv": argv, "env": {}, "cwd": str(tmp_path), "dir": str(att_dir),
            "run": {"spec": {}}, "lease": ""}


async def test_one_fence_per_data_dir_reports_exits_and_leaves_once_idle(tmp_path):
    exits = []
    a = FenceLink(tmp_path, lambda *e: exits.append(e), lambda: None)
    b = FenceLink(tmp_path, lambda *e: None, lambda: None)
    assert await a.open() == {}
    pid = fence_pid(tmp_path)
    [started] = a.spawn([item(tmp_path, "t", [shutil.which("sh"), "-c", "echo hi; exit 3"])])
    assert started["pid"] > 0
    await wait_until(lambda: exits, "the exit")
    assert exits == [(("t", 1), started["pid"], 3, 3)]  # key, pid, $?, output.log's size
    assert (tmp_path / "t" / "exit.json").read_text() == '{"rc": 3}\n'
    assert (tmp_path / "t" / "output.log").read_text() == "hi\n"
    assert await b.open() == {} and fence_pid(tmp_path) == pid  # the same fence
    await a.close()
    await b.close()
    await wait_until(lambda: gone(pid), "the idle fence to leave", timeout=fence.LINGER_S + 20)
    assert not (tmp_path / fence.SOCKET_NAME).exists()


async def test_bad_requests_and_unrunnable_commands_are_refused_with_a_reason(tmp_path):
    link = FenceLink(tmp_path, lambda *e: None, lambda: None)
    await link.open()
    try:
        [result] = link.spawn([item(tmp_path, "t", [str(tmp_path / "no-such-program")])])
        assert "no-such-program" in result["error"]
        with pytest.raises(OSError, match="refused the request: unknown op"):
            link._request({"op": "nope"})
        with pytest.raises(OSError, match="refused the request: bad request"):
            link._request({"op": "spawn"})
        assert link.up  # the fence answered each, and still does
        assert link.spawn([]) == []
    finally:
        await link.close()


async def test_attempts_launched_while_no_fence_can_be_reached_are_requeued_not_failed(tmp_path, monkeypatch):
    node = Node(tmp_path)
    r = await node.runner()

    def cannot_start(self):
        raise OSError("no fence can start here now")

    monkeypatch.setattr(FenceLink, "_launch", cannot_start)
    await kill_fence(node.data_dir)
    await wait_until(lambda: not r._link.up and r._relinking is not None and r._relinking.done(),
                     "the relink to fail")
    r.launch(sh("t", "exit 0"))
    ev = await node.exited("t")
    assert (ev.exit_code, ev.reason) == (FAILED_TO_START_CODE, FENCE_DOWN)
    assert to_proto(ev).requeue  # the leader requeues it; no failure counts against the task
    assert node.of("t", kind=TaskEventKind.STARTED) == []
    monkeypatch.undo()  # a fence can start again: the runner relinks by itself
    await wait_until(lambda: r._link.up, "the runner to relink")
    r.launch(sh("t", "exit 0", attempt=2))
    assert (await node.exited("t", attempt=2)).exit_code == 0
    await r.stop()
