"""The node's attempt fence (agent/tasks/fence.py) through its link: one per data dir,
shared by the links that find it, gone once idle, refusing bad requests with a reason."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys

import pytest

from lepton.agent.assignments import to_proto
from lepton.agent.tasks import fence, fence_link
from lepton.agent.tasks import runner as runner_mod
from lepton.agent.tasks.fence_link import FenceLink, InDoubt
from lepton.agent.tasks.runner import FAILED_TO_START_CODE, TaskEventKind
from lepton.agent.tasks.task_spec import FENCE_DOWN
from tests.unit.test_runner import Node, gone, sh, spawned, wait_until


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


async def test_a_runner_starts_no_fence_until_its_first_spawn(tmp_path):
    node = Node(tmp_path)
    r = await node.runner()
    await asyncio.sleep(0.5)
    assert not (tmp_path / fence.LOCK_NAME).exists() and not r._fence.link.up  # an idle agent pays for none
    r.launch(sh("t", "exit 4"))
    assert (await node.exited("t")).exit_code == 4
    pid = fence_pid(tmp_path)
    await r.stop()
    r2 = await node.runner()  # a fence that runs is linked to at start, as before
    assert r2._fence.link.up and fence_pid(tmp_path) == pid
    await r2.stop()


async def test_a_node_idle_for_a_while_lets_its_fence_go_and_the_next_spawn_starts_one(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "FENCE_IDLE_S", 0.0)
    monkeypatch.setattr(runner_mod, "SCAN_S", 0.2)
    node = Node(tmp_path)
    r = await node.runner()
    r.launch(sh("t", "exit 0"))
    await node.exited("t")
    pid = fence_pid(tmp_path)
    await wait_until(lambda: gone(pid), "the idle fence to be let go", timeout=fence.LINGER_S + 20)
    assert not r._fence.link.up
    r.launch(sh("u", "exit 6"))
    assert (await node.exited("u")).exit_code == 6
    assert fence_pid(tmp_path) != pid
    await r.stop()


async def test_attempts_launched_while_no_fence_can_start_are_requeued_then_failed(tmp_path, monkeypatch):
    node = Node(tmp_path)
    r = await node.runner()

    def cannot_start(self):
        raise OSError("no fence can start here now")

    monkeypatch.setattr(FenceLink, "_launch", cannot_start)
    r.launch(sh("t", "exit 0"))
    ev = await node.exited("t")
    assert (ev.exit_code, ev.reason) == (FAILED_TO_START_CODE, FENCE_DOWN)
    assert to_proto(ev).requeue  # the leader requeues it; no failure counts against the task
    assert node.of("t", kind=TaskEventKind.STARTED) == []
    # A fence that never starts: after a few tries, attempts count as failed (retries spent).
    await wait_until(lambda: r._fence.gave_up and r._fence._relinking.done(),
                     "the fence to fail to start a few times", timeout=4 * runner_mod.SCAN_S + 20)
    r.launch(sh("u", "exit 0"))
    ev = await node.exited("u")
    await wait_until(lambda: r._fence._relinking.done(), "the relink after it to fail")
    failures = r._fence.failures
    assert ev.exit_code == FAILED_TO_START_CODE and "attempt fence cannot start" in ev.reason
    assert "no fence can start here now" in ev.reason and not to_proto(ev).requeue
    await asyncio.sleep(2 * runner_mod.SCAN_S)
    assert r._fence.failures == failures  # given up: no more tries while nothing is to spawn
    monkeypatch.undo()  # a fence can start again: the next spawn starts one
    r.launch(sh("t", "exit 0", attempt=2))
    assert (await node.exited("t", attempt=2)).exit_code == 0
    await r.stop()


async def test_a_stopped_fence_never_blocks_the_agents_loop(tmp_path):
    node = Node(tmp_path)
    r = await node.runner()
    r.launch(sh("warm", "exit 0"))  # the fence runs
    await node.exited("warm")
    pid = fence_pid(tmp_path)
    os.kill(pid, signal.SIGSTOP)
    try:
        r.launch(sh("t", "exit 5"))
        ticks = 0
        for _ in range(20):  # the loop runs on while the spawn request waits on the fence
            await asyncio.sleep(0.02)
            ticks += 1
        assert ticks == 20 and [x.pid for x in r.running()] == [0]  # still being started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (await node.exited("t")).exit_code == 5
    await r.stop()


async def test_a_spawn_the_fence_never_answered_is_found_running_not_failed(tmp_path, monkeypatch):
    """The fence spawned the batch, then died before its answer came: the attempts run on
    (orphans) and are tracked, not reported failed to start (a retry elsewhere would overlap
    them)."""
    node = Node(tmp_path)
    r = await node.runner()
    r.launch(sh("warm", "exit 0"))
    await node.exited("warm")
    real = FenceLink._request

    def answered_then_lost(self, doc):
        reply = real(self, doc)
        if doc["op"] == "spawn":
            os.kill(fence_pid(tmp_path), signal.SIGKILL)
            with self._lock:
                self._control = None
            raise InDoubt("the node's attempt fence did not answer: killed")
        return reply

    monkeypatch.setattr(FenceLink, "_request", answered_then_lost)
    r.launch(sh("t", "echo ready; while [ ! -f go ]; do sleep 0.02; done"))
    await node.output_has("t", "ready")
    monkeypatch.undo()
    [t] = await spawned(r)
    assert [e.kind for e in node.of("t")] == [TaskEventKind.STARTED] and not r._live[("t", 1)].held
    await wait_until(lambda: r._fence.link.up, "a new fence")
    (tmp_path / "tasks/t/1/go").touch()
    ev = await node.exited("t")
    assert ev.reason == "lost" and ev.pid == t.pid  # its fence died: no status, but no second run
    await r.stop()


async def test_a_spawn_dropped_by_a_fence_stopped_past_the_timeout_is_requeued(tmp_path, monkeypatch):
    monkeypatch.setattr(fence_link, "REQUEST_TIMEOUT_S", 1.0)
    node = Node(tmp_path)
    r = await node.runner()
    r.launch(sh("warm", "exit 0"))
    await node.exited("warm")
    pid = fence_pid(tmp_path)
    os.kill(pid, signal.SIGSTOP)
    try:
        r.launch(sh("t", "touch ran"))
        await wait_until(lambda: ("t", 1) in r._in_doubt, "the request to time out")
    finally:
        os.kill(pid, signal.SIGCONT)  # it sees its agent hung up and drops the request
    ev = await node.exited("t")
    assert (ev.exit_code, ev.reason) == (FAILED_TO_START_CODE, FENCE_DOWN) and to_proto(ev).requeue
    assert not (tmp_path / "tasks/t/1/ran").exists() and not (tmp_path / "tasks/t/1/run.json").exists()
    assert fence_pid(tmp_path) == pid and r._fence.link.up  # the same fence, linked again
    await r.stop()


# A fence SIGKILLed between forking an attempt and recording it in run.json: run in a process
# of its own, whose record step kills it (after noting the pid the record would have named).
KILLED_BEFORE_THE_RECORD = r"""
import json, os, signal, socket, sys
from lepton.agent.tasks import fence, task_proc

def killed(path, doc, **kw):
    with open(sys.argv[2], "w") as f:
        f.write(str(doc["pid"]))
    os.kill(os.getpid(), signal.SIGKILL)

task_proc.write_json_atomic = killed
fence.Fence(socket.socket(socket.AF_UNIX))._spawn_one(json.loads(sys.argv[1]))
"""


async def test_a_fence_killed_between_fork_and_record_leaves_nothing_running(tmp_path):
    """What no run.json names must never run: its agent settles it as not started, and the
    leader may run it again elsewhere."""
    spawn = item(tmp_path, "t", [shutil.which("sh"), "-c", f"touch {tmp_path}/ran; exec sleep 30"])
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", KILLED_BEFORE_THE_RECORD,
                                                json.dumps(spawn), str(tmp_path / "pid"))
    assert await proc.wait() == -signal.SIGKILL
    pid = int((tmp_path / "pid").read_text())
    await wait_until(lambda: gone(pid), "the unrecorded attempt's process to end")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "t" / "run.json").exists()


async def test_a_command_that_cannot_run_leaves_no_record_and_one_that_can_runs_as_given(tmp_path):
    link = FenceLink(tmp_path, lambda *e: None, lambda: None)
    await link.open()
    try:
        (tmp_path / "w").mkdir()
        results = link.spawn([item(tmp_path, "gone-cwd", [shutil.which("true")]) | {"cwd": str(tmp_path / "no-dir")},
                              item(tmp_path, "not-exec", [str(tmp_path / "w")]),
                              item(tmp_path, "ok", [shutil.which("sh"), "-c", "echo fine"])])
        assert "no-dir" in results[0]["error"] and "not an executable" in results[1]["error"]
        assert results[2]["pid"] > 0
        assert not (tmp_path / "gone-cwd" / "run.json").exists() and not (tmp_path / "not-exec" / "run.json").exists()
        assert (tmp_path / "ok" / "run.json").exists()
        # Past its gate, a command runs with the environment it was given and nothing on stdin.
        [env] = link.spawn([item(tmp_path, "env", [shutil.which("sh"), "-c", "env; cat"]) | {"env": {"A": "1"}}])
        await wait_until(lambda: gone(env["pid"]), "env to end")
        assert "A=1" in (tmp_path / "env" / "output.log").read_text().splitlines()
        [env] = link.spawn([item(tmp_path, "argv", [shutil.which("env")]) | {"env": {"A": "1"}}])
        await wait_until(lambda: gone(env["pid"]), "env to end")
        assert (tmp_path / "argv" / "output.log").read_text() == "A=1\n"
    finally:
        await link.close()
